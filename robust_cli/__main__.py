"""`robust` and `python -m robust_cli`: the CLI, with a Ctrl-C outside a running job (while torch and Hydra load,
while a command line is checked, between sweep jobs) as one line instead of a traceback. A job catches its own
Ctrl-C and records its run as interrupted (cli.run_command)."""

import sys

from robust_cli.core import interrupts


def main() -> None:
    interrupts.install()  # before the heavy imports: a Ctrl-C during them is remembered too
    try:
        from robust_cli.cli import main as cli_main

        cli_main()
    except Exception:
        if not interrupts.received:  # a real error: its traceback
            raise
        _interrupted()
    except KeyboardInterrupt:
        _interrupted()


def _interrupted() -> None:
    print(
        f"interrupted ({interrupts.received or 'Ctrl-C'}) outside a running job: no run was left half-written; runs already finished are complete",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(143 if interrupts.received == "SIGTERM" else 130)


if __name__ == "__main__":
    main()

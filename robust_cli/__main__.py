"""`robust` and `python -m robust_cli`: the CLI, with a Ctrl-C outside a running job (while torch and Hydra load,
while a command line is checked, between sweep jobs) as one line instead of a traceback. A job catches its own
Ctrl-C and records its run as interrupted (cli.run_command)."""
import sys


def main() -> None:
    try:
        from robust_cli.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) outside a running job: no run was left half-written; runs already finished are complete",
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

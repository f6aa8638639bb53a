"""`robust <command> [hydra overrides...]`: a thin dispatcher in front of one Hydra app per command.

The command word is removed from argv and the command's `@hydra.main(config_name=<command>)` runs, so every
Hydra feature works after it (overrides, --multirun, hydra/launcher=..., --cfg job). `collect` takes plain
paths and uses argparse.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

import robust_cli
from robust_cli.commands import COMMANDS, CONF_DIR, build
from robust_cli.commands.checks import chosen_options, validate_job
from robust_cli.commands.usage import command_help, usage
from robust_cli.core import interrupts
from robust_cli.core.errors import UserError
from robust_cli.core.store import claim_run_dir

# torch scripts its forward-AD decompositions on first use and warns about its own deprecated API: not the user's concern
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
# conf/hydra/launcher/{joblib,submitit_*}.yaml give the plugins' launchers our defaults under the plugins' own names;
# Hydra validates them against the plugins' schemas but warns that this matching is deprecated. Set at import, so
# that joblib/submitit workers (which import this module to run a job, and compose its config again) are quiet too.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
# Hydra flags that take a value; moved in front of the overrides (hydra#3053: `a=1 -m b=2` fails otherwise).
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--package", "-p", "--info", "-i"}
HYDRA_FLAGS = {"--multirun", "-m", "--resolve", "--hydra-help", "--help", "-h", "--run", "-r"}


def _reorder(args: list[str]) -> list[str]:
    flags, overrides, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a in HYDRA_FLAGS_WITH_VALUE and i + 1 < len(args):
            flags += [a, args[i + 1]]
            i += 2
            continue
        (flags if a in HYDRA_FLAGS or a.startswith("--cfg=") or a.startswith("-") else overrides).append(a)
        i += 1
    return flags + overrides


def _quote(value: str) -> str:
    """A Hydra override value: quoted (with escapes) unless it is plain path characters."""
    if re.fullmatch(r"[\w/.\-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _config_dirs(args: list[str]) -> list[str]:
    """The folders given with --config-dir / -cd (Hydra's way to add one's own YAMLs), as absolute paths."""
    dirs = []
    for i, a in enumerate(args):
        if a in ("--config-dir", "-cd") and i + 1 < len(args):
            dirs.append(args[i + 1])
        elif a.startswith("--config-dir="):
            dirs.append(a.partition("=")[2])
    for d in dirs:
        if not Path(d).is_dir():
            raise UserError(f"--config-dir {d}: no such folder; give the folder that holds your group folders (e.g. model/mine.yaml)")
    return [str(Path(d).resolve()) for d in dirs]


def _precheck(command: str, overrides: list[str], config_dirs: list[str] = ()):
    """Compose once before Hydra runs, to turn a bad override into one line and exit code 2; returns the run
    directory Hydra would use and the composed config. `config_dirs` (--config-dir) are searched as Hydra's run
    searches them."""
    from hydra import compose, initialize_config_dir

    if config_dirs:
        overrides = [*overrides, "hydra.searchpath=[" + ",".join(f"file://{d}" for d in config_dirs) + "]"]
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=command):
            cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # resolves ${hydra.runtime.choices.*} in the run directory name
            added = [o.lstrip("+").partition("=")[0] for o in overrides if o.startswith("+") and o.lstrip("+").split(".")[0] in STRICT_NODES]
            if added:  # `+train.epoch=3` would add a key nothing reads: compare with the config without the additions
                reference = compose(
                    config_name=command, overrides=[o for o in overrides if not o.startswith("+") or o.lstrip("+").split(".")[0] not in STRICT_NODES]
                )
                for key in added:
                    _check_known_key(reference, key, added=True)
            return str(cfg.hydra.run.dir), cfg
    except (HydraException, OmegaConfBaseException) as exc:
        message = " ".join(str(exc).split("Config search path")[0].split())
        unknown = re.match(r"Could not override '([\w.]+)'", message)
        if unknown and unknown.group(1).split(".")[0] in STRICT_NODES:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=command):
                reference = compose(config_name=command, overrides=[o for o in overrides if not o.startswith(unknown.group(1) + "=")])
            _check_known_key(reference, unknown.group(1), added=False)
        raise UserError(message) from None
    except ValueError as exc:  # e.g. group=null: Hydra's defaults list refuses it with a bare ValueError
        raise UserError(f"{exc} (to drop a config group, write ~group, e.g. '~hydra/callbacks')") from None


# config nodes whose keys are read by name: a key added there with `+` that nothing reads is a typo, not a setting
STRICT_NODES = ("train", "data", "attack", "defense", "persistence")


def _accepted_parameters(target: str) -> set[str]:
    """Keyword parameters of a `_target_` class, through its base classes (an attack's eot_iter is the base's)."""
    import inspect

    from hydra.utils import get_class

    try:
        cls = get_class(target)
    except Exception:  # noqa: BLE001 - an unresolvable target is reported when it is instantiated
        return set()
    names = set()
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {n for n, p in inspect.signature(init).parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self"}


def _check_known_key(reference, key: str, added: bool) -> None:
    """Raise a one-line UserError when `key` is not a setting of its node (with the closest known ones)."""
    import difflib

    from omegaconf import OmegaConf

    parts = key.split(".")
    parent = OmegaConf.select(reference, ".".join(parts[:-1])) if len(parts) > 1 else None
    if parent is None or not OmegaConf.is_dict(parent):
        return  # a new sub-tree, or a list: nothing to compare with
    known = set(parent.keys())
    if parts[-1] in known:
        return
    target = parent.get("_target_")
    parameters = _accepted_parameters(target) if target else set()
    if parts[-1] in parameters:
        if not added:
            raise UserError(f"{key} is a parameter of {target.rsplit('.', 1)[-1]} that its YAML does not set: write +{key}=...")
        return
    candidates = sorted((known | parameters) - {"_target_"})
    close = difflib.get_close_matches(parts[-1], candidates, n=1)
    hint = f"did you mean {'.'.join(parts[:-1] + close[:1])}? " if close else ""
    node = ".".join(parts[:-1])
    raise UserError(f"unknown key {key}: {hint}{node} has {', '.join(candidates)}" if candidates else f"unknown key {key}: {node} takes no settings here")


BASH_COMPLETION = r"""# robust: tab completion of commands, then of each command's Hydra overrides
_robust_completion() {
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE=$COMP_LINE robust -sc query=bash 2>/dev/null)
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "${COMP_WORDS[COMP_CWORD]}"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _robust_completion robust
"""


def shell_completion(args: list[str]) -> int:
    """`robust [command] -sc install=bash | uninstall=bash | query=bash`: Hydra's completion, with the command word.

    The installed function asks `robust -sc query=bash` with the line typed so far (COMP_LINE): the first word
    completes to a command, the rest to that command's config keys and group options (Hydra's own query)."""
    i = next(i for i, a in enumerate(args) if a in ("-sc", "--shell-completion"))
    request = args[i + 1] if i + 1 < len(args) else ""
    action, _, shell = request.partition("=")
    if shell not in ("bash", "zsh") or action not in ("install", "uninstall", "query"):
        raise UserError(
            f"shell completion takes install=bash, uninstall=bash or query=bash (zsh: the same after `autoload -U bashcompinit && bashcompinit`), got {request!r}"
        )
    if action == "install":
        print(BASH_COMPLETION, end="")
        return 0
    if action == "uninstall":
        print("complete -r robust 2>/dev/null; unset -f _robust_completion")
        return 0
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    completing_command = len(words) < 2 or (len(words) == 2 and not line.endswith(" "))
    if completing_command:
        print(" ".join(COMMANDS))
        return 0
    command = words[1]
    if command not in COMMANDS or command in ("collect", "report", "ledger"):  # they take paths: the shell's file completion
        return 0
    os.environ["COMP_LINE"] = line.replace(f" {command}", "", 1)
    sys.argv = ["robust", "-sc", "query=bash"]
    _hydra_app(command)()
    return 0


def _search_user_configs(args: list[str]) -> None:
    """./conf (when the current folder has one) and every --config-dir go ahead of the package's configs on Hydra's
    search path: hydra_plugins/robust_searchpath reads ROBUST_CONFIG_DIRS, which joblib and SLURM workers inherit."""
    folders = [str(Path("conf").resolve())] if Path("conf").is_dir() else []
    folders += [d for d in _config_dirs(args) if d not in folders]
    os.environ["ROBUST_CONFIG_DIRS"] = os.pathsep.join(folders)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    try:
        _search_user_configs(argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if any(a in ("-sc", "--shell-completion") for a in argv[1:]):
        try:
            sys.exit(shell_completion(argv[1:]))
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command, rest = argv[1], argv[2:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(
            f"error: unknown command '{command}'{hint}\nusage: robust <command> [key=value ...] [--multirun]   commands: {', '.join(COMMANDS)}\n"
            "robust --help lists what each command does, the config groups and examples",
            file=sys.stderr,
        )
        sys.exit(2)
    if command == "collect":
        from robust_cli.commands import collect

        sys.exit(collect.main(rest))
    if command == "ledger":
        from robust_cli.commands import ledger

        sys.exit(ledger.main(rest))
    if command == "report":
        from robust_cli.results import report

        sys.exit(report.main(rest))
    rest = _reorder(rest)
    if rest and rest[0] in ("-h", "--help"):
        print(command_help(command))
        sys.exit(0)
    plain = [a for a in rest if "=" in a and not a.startswith("-")]
    sweeping = any(a in ("-m", "--multirun") for a in rest)
    helping = any(a in ("-h", "--help", "--hydra-help") for a in rest)
    inspecting = any(a in ("-c", "--cfg", "-i", "--info") or a.startswith("--cfg=") for a in rest)
    try:
        _check_launcher(plain)
        if not sweeping and not helping:
            run_dir, cfg = _precheck(command, plain, _config_dirs(rest))
            module = importlib.import_module(f"robust_cli.commands.{command}")
            if not inspecting:  # bad values are refused before a run directory exists: nothing is written
                from omegaconf import open_dict

                with open_dict(cfg):
                    cfg.choices = chosen_options(cfg.hydra.runtime.choices)
                validate_job(module, cfg)
            from robust_cli.core.engine import ranks_from_environment

            if not ranks_from_environment().main:  # torchrun / SLURM tasks: rank 0 alone has a run directory
                import tempfile

                rest += [f"hydra.run.dir={_quote(tempfile.mkdtemp(prefix='robust-rank-'))}", "hydra.output_subdir=null"]
            elif getattr(module, "WRITES_RUN_DIR", True) and not inspecting and not any(a.lstrip("+").startswith("hydra.run.dir=") for a in plain):
                rest.append(f"hydra.run.dir={_quote(str(claim_run_dir(run_dir)))}")
        elif sweeping and not helping and not inspecting and not any(a.lstrip("+").startswith("hydra.sweep.dir=") for a in plain):
            # two sweeps started in the same second would share (and overwrite) one sweep directory: claim it
            root = next((a.partition("=")[2] for a in plain if a.lstrip("+").startswith("outputs_root=")), "outputs")
            sweep_dir = Path(root) / command / "multirun" / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
            rest.append(f"hydra.sweep.dir={_quote(str(claim_run_dir(str(sweep_dir))))}")
    except UserError as exc:
        if interrupts.received:  # a signal during the precheck that a library reported as another error
            raise KeyboardInterrupt() from None
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        _exit_if_disk_full(exc)
        raise
    sys.argv = [argv[0], *rest]
    try:
        _hydra_app(command)()
    except OSError as exc:  # Hydra's own writes (the run directory, .hydra/*.yaml) on a full disk
        _exit_if_disk_full(exc)
        raise
    if sweeping:
        from robust_cli.results.callbacks import SweepStatus

        if SweepStatus.not_completed:
            first, status = SweepStatus.not_completed[0]
            print(
                f"error: {len(SweepStatus.not_completed)} of {SweepStatus.jobs} sweep jobs did not complete (first: {first}, {status}); "
                "their run.json says why, and the sweep's collected/failed_runs.csv lists them",
                file=sys.stderr,
            )
            sys.exit(1)


def _exit_if_disk_full(exc: OSError) -> None:
    from robust_cli.core import store

    if exc.errno in store.DISK_FULL_ERRNOS:
        print(f"error: {store.disk_full_line(exc.filename or '.')}", file=sys.stderr)
        sys.exit(1)


# launcher option -> (plugin module, install command): a missing plugin is one line, not Hydra's "Unknown plugin class"
# (joblib's plugin is a core dependency; the submitit one comes with the cluster extra)
LAUNCHER_PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "pip install hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "pip install 'robust[cluster]'"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "pip install 'robust[cluster]'"),
}


def _check_launcher(overrides: list[str]) -> None:
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra/launcher" and value in LAUNCHER_PLUGINS:
            module, install = LAUNCHER_PLUGINS[value]
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # no hydra_plugins namespace at all
                found = False
            if not found:
                raise UserError(f"hydra/launcher={value} needs its Hydra launcher plugin ({module}): {install}")


def _hydra_app(command: str):
    import hydra

    @hydra.main(version_base="1.3", config_path="conf", config_name=command)
    def app(cfg):
        return run_command(command, cfg)

    return app


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _exit_interrupted(how, command, record, run_json, run_dir, ctx, beat):
    record.update(status="interrupted", error=how)
    _finish(record, run_json, ctx, beat)
    saved = "the last finished epoch is kept: rerun the same command with resume=true" if command == "train" else "rerun the same command"
    print(f"interrupted ({how}): {run_json or run_dir} says status=interrupted; {saved}", file=sys.stderr, flush=True)
    sys.exit(143 if how == "SIGTERM" else 130)


def run_command(command: str, cfg):
    """Run one job: validate, execute, record run.json; user errors become one line and exit code 2."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from robust_cli.core import registry, store

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    with open_dict(cfg):  # the chosen option names: for checkpoint keys, tags and `collect`
        cfg.choices = chosen_options(hydra_cfg.runtime.choices)
    record = {
        "command": command,
        "status": "running",
        "overrides": list(hydra_cfg.overrides.task),
        "choices": dict(cfg.choices),
        "config": None,
        "git_commit": _git_commit(),
        "versions": {"robust": robust_cli.__version__, "torch": str(torch.__version__), "python": platform.python_version()},
        "host": platform.node(),
        "pid": os.getpid(),
        "device": None,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "end_time": None,
        "multirun_job": hydra_cfg.job.num if multirun else None,
    }
    # SIGTERM (SLURM's time-out and pre-emption) is handled like Ctrl-C: status interrupted, checkpoint kept
    interrupts.install()  # again: a launcher's worker process did not run main()
    module = importlib.import_module(f"robust_cli.commands.{command}")
    from robust_cli.core.engine import ranks_from_environment

    main_rank = ranks_from_environment().main
    run_json = run_dir / "run.json" if getattr(module, "WRITES_RUN_DIR", True) and main_rank else None
    ctx = None
    beat = store.Heartbeat(run_dir) if run_json is not None else None
    log = store.tee_output(run_dir / "run.log") if run_json is not None else contextlib.nullcontext()
    with log:  # what the console shows is kept in the run directory too
        try:
            record["config"] = OmegaConf.to_container(cfg, resolve=True)
            device = validate_job(module, cfg)  # again: sweep jobs were not prechecked
            record["device"] = str(device)
            record["environment"] = {**registry.environment(), "device": str(device)}  # what bitwise reproducibility depends on
            ctx = store.RunContext(run_dir, device, record, build.described(cfg))
            if "dataset" in cfg:
                for message in build.weights_sizes(cfg)[1]:  # once per run, kept in run.json
                    ctx.warn(message)
            if run_json is not None:
                store.write_json(run_json, record)
                beat.start()
            module.run(cfg, ctx)
            record["status"] = "completed"
        except store.DiskFull as exc:  # failed, not the user's input: one line, and run.json says so where it still fits
            _fail_on_full_disk(str(exc), record, multirun, run_json, ctx, beat)
        except UserError as exc:
            if interrupts.received:  # a signal that a library reported as another error
                _exit_interrupted(interrupts.received, command, record, run_json, run_dir, ctx, beat)
            record.update(status="user_error", error=str(exc))
            print(f"error: {exc}", file=sys.stderr, flush=True)
            if not multirun:
                _finish(record, run_json, ctx, beat)
                sys.exit(2)
        except torch.OutOfMemoryError:  # a fixed batch size that does not fit: say which setting, never a traceback
            from robust_cli.core.engine import out_of_memory_line

            message = out_of_memory_line(getattr(module, "BATCH_SETTINGS", "batch_size"), record.get("device"))
            record.update(status="user_error", error=message)
            print(f"error: {message}", file=sys.stderr, flush=True)
            if not multirun:
                _finish(record, run_json, ctx, beat)
                sys.exit(2)
        except KeyboardInterrupt as exc:
            _exit_interrupted("SIGTERM" if isinstance(exc, interrupts.Terminated) else "Ctrl-C", command, record, run_json, run_dir, ctx, beat)
        except SystemExit:
            record.update(status="interrupted", error="SystemExit")
            _finish(record, run_json, ctx, beat)
            raise
        except Exception as exc:
            if interrupts.received:  # a signal inside a library whose clean-up raised another error
                _exit_interrupted(interrupts.received, command, record, run_json, run_dir, ctx, beat)
            if isinstance(exc, OSError) and exc.errno in store.DISK_FULL_ERRNOS:  # a library's own write (tracking, figures)
                _fail_on_full_disk(store.disk_full_line(exc.filename or run_dir), record, multirun, run_json, ctx, beat)
            else:
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                if not multirun:
                    _finish(record, run_json, ctx, beat)
                    raise
                # one failing job must not kill the sweep (hydra#1927): record it and return normally
                store.console.print(f"[bold red]job {hydra_cfg.job.num} failed:[/] {type(exc).__name__}: {exc} (see {run_json})")
        _finish(record, run_json, ctx, beat)
        return record["status"]


def _fail_on_full_disk(message, record, multirun, run_json, ctx, beat) -> None:
    """A full disk is a failure of the machine, not of the input: one line, exit 1 (a sweep goes on to its next job)."""
    record.update(status="failed", error=message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    if not multirun:
        _finish(record, run_json, ctx, beat)
        sys.exit(1)


def _finish(record, run_json, ctx, beat) -> None:
    from rich.table import Table

    from robust_cli.core import store

    record["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if run_json is not None:
        try:
            store.write_json(run_json, record)
        except store.DiskFull:  # the run's own error (if any) was already said; this one is the same disk
            store.console.print(f"[yellow]{run_json} could not be updated to {record.get('status')!r} (no space left on the device)[/]")
    if ctx is not None and record["status"] == "completed" and run_json is not None:
        table = Table(title=f"robust {record['command']}", show_header=True)
        table.add_column("result", no_wrap=True)
        table.add_column("value", overflow="fold")
        for key, value in ctx.headline_values.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        store.results.print(table)
        # on its own line, unwrapped, so it can be copied
        store.results.print(f"run directory: {ctx.dir}", soft_wrap=True, highlight=False)

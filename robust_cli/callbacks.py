"""Hydra callbacks: `robust collect` on the sweep directory when a --multirun ends (conf/hydra/callbacks/collect.yaml)."""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback


class CollectOnMultirunEnd(Callback):
    """After the last job of a sweep (any launcher: the submitting process waits for them), collect its directory.

    A collection problem never fails the sweep: the jobs' results are on disk and `robust collect DIR` can redo it.
    """

    def __init__(self, format: str = "csv", figures: bool = True):
        self.format = format
        self.figures = figures

    def on_multirun_end(self, config, **kwargs) -> None:
        from robust_cli import store
        from robust_cli.collect import collect, print_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        try:
            print_summary(collect([sweep_dir], fmt=self.format, figures=self.figures))
        except Exception as exc:  # noqa: BLE001 - reported, never raised: the sweep itself succeeded
            store.console.print(f"[bold yellow]warning:[/] collecting {sweep_dir} failed ({type(exc).__name__}: {exc}); run `robust collect {sweep_dir}`")


class SweepStatus(Callback):
    """Counts the sweep's jobs that did not complete, so that `robust` exits non-zero after all of them ran.

    A failing job returns normally to keep the sweep going (hydra#1927); its run.json says what happened. Configured
    in common.yaml under hydra.callbacks, not in the hydra/callbacks group, so that ~hydra/callbacks keeps it."""

    not_completed: list[tuple[str, str]] = []  # (run directory, status), read by cli.main once the sweep returns
    jobs = 0

    def on_multirun_end(self, config, **kwargs) -> None:
        import json

        from robust_cli import store
        from robust_cli.collect import find_run_dirs

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        runs, orphans = find_run_dirs([sweep_dir])
        SweepStatus.jobs = len(runs) + len(orphans)
        for run_dir in runs:
            try:
                status = store.run_status(json.loads((run_dir / "run.json").read_text()), run_dir)
            except (OSError, ValueError):
                status = "unreadable"
            if status != "completed":
                SweepStatus.not_completed.append((str(run_dir), status))
        SweepStatus.not_completed += [(str(o), "missing") for o in orphans]


class CheckScale(Callback):
    """Experiment presets pick their sizes with `scale=<name>` from their `scales` table; an unknown name would
    surface as an interpolation traceback from deep inside the sweeper, so stop first with one line (exit 2)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config)

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config)

    @staticmethod
    def _check(config) -> None:
        import sys

        scales, scale = config.get("scales"), config.get("scale")
        if scales is not None and scale not in scales:
            experiment = config.hydra.runtime.choices.get("experiment", "this preset")
            print(f"error: scale must be one of {', '.join(scales)} for experiment={experiment}, got {scale!r}", file=sys.stderr)
            sys.exit(2)

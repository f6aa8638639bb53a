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

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
        from robust_cli.core import store
        from robust_cli.results.collect import collect, print_summary

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

        from robust_cli.core import store
        from robust_cli.results.collect import find_run_dirs

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
    """Experiment presets pick their sizes with `scale=<name>` from their `scales` table (and szegedy_table its
    attack with `variant=<name>` from `variants`); an unknown name would surface as an interpolation traceback from
    deep inside the sweeper, so stop first with one line (exit 2)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config)

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config)

    @staticmethod
    def _check(config) -> None:
        import sys

        for key, table in (("scale", "scales"), ("variant", "variants")):
            names, name = config.get(table), config.get(key)
            if names is not None and name not in names:
                experiment = config.hydra.runtime.choices.get("experiment", "this preset")
                print(f"error: {key} must be one of {', '.join(names)} for experiment={experiment}, got {name!r}", file=sys.stderr)
                sys.exit(2)


# ----------------------------------------------------------------------------------------------- tracking
def _warn_once(message: str) -> None:
    from rich.markup import escape

    from robust_cli.core import store

    store.console.print(f"[bold yellow]warning:[/] {escape(message)}; the run goes on and its files are written as always", soft_wrap=True)


def _job_files(run_dir: Path):
    """(run.json contents, train_log rows) of a finished job's directory; ({}, []) when unreadable."""
    import csv
    import json

    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        record = {}
    try:
        with open(run_dir / "train_log.csv", newline="") as f:
            log = list(csv.DictReader(f))
    except OSError:
        log = []
    return record, log


def _number(value):
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    import math

    return f if math.isfinite(f) else None


def _flatten(tree, prefix="") -> dict:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list):
        out[prefix[:-1]] = str(tree)
    else:
        out[prefix[:-1]] = tree
    return out


def _tags(record: dict, run_dir: Path) -> dict:
    from robust_cli.core import store

    choices = record.get("choices") or {}
    tags = {"command": record.get("command"), "status": store.run_status(record, run_dir) if record else "unknown", "run_dir": str(run_dir)}
    tags.update({g: choices.get(g) for g in ("model", "dataset", "defense", "attack", "experiment") if choices.get(g)})
    tags["seed"] = (record.get("config") or {}).get("seed")
    checkpoint = record.get("checkpoint") or (record.get("headline") or {}).get("checkpoint")  # train: the headline's
    if checkpoint:
        tags["checkpoint_key"] = Path(str(checkpoint)).parent.name
    return {k: str(v) for k, v in tags.items() if v is not None}


class MLflowTracking(Callback):
    """One MLflow run per job (a parent run per --multirun, the jobs nested under it): the resolved config as
    params, every train_log column as metrics per epoch, the headline numbers, the run directory's CSVs and PNGs as
    artifacts, and tags. Logged when the job has ended, from its files. Never breaks a run: a missing package or
    an unreachable tracking URI is one warning line."""

    PARENT_ENV = "ROBUST_MLFLOW_PARENT_RUN"

    def __init__(self, uri: str | None = None, experiment: str = "robust"):
        self.uri, self.experiment = uri, experiment
        self._broken = False

    def _client(self, config):
        import os

        # an unreachable server must cost seconds, not mlflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        import mlflow  # noqa: F401 - ImportError is reported by the caller
        from mlflow.tracking import MlflowClient

        uri = self.uri or f"sqlite:///{Path(str(config.get('outputs_root', 'outputs'))).resolve() / 'mlflow.db'}"
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
        return client, experiment_id, uri

    def _guard(self, what, fn):
        if self._broken:
            return None
        try:
            return fn()
        except ImportError:
            self._broken = True
            _warn_once("hydra/callbacks=mlflow needs the mlflow package (pip install 'robust[track]'): nothing was tracked")
        except Exception as exc:  # noqa: BLE001 - tracking must never break a run
            self._broken = True
            _warn_once(f"MLflow tracking failed while {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
        return None

    def on_multirun_start(self, config, **kwargs) -> None:
        import os

        def start():
            client, experiment_id, _ = self._client(config)
            sweep = str(config.hydra.sweep.dir)
            run = client.create_run(
                experiment_id, run_name=Path(sweep).name, tags={"kind": "multirun", "sweep_dir": sweep, "command": str(config.hydra.job.name)}
            )
            os.environ[self.PARENT_ENV] = run.info.run_id  # the jobs (also in launcher subprocesses) nest under it

        self._guard("starting the sweep's run", start)

    def on_multirun_end(self, config, **kwargs) -> None:
        import os

        parent = os.environ.pop(self.PARENT_ENV, None)
        if parent:
            self._guard("ending the sweep's run", lambda: self._client(config)[0].set_terminated(parent, "FINISHED"))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        self._guard("logging the job", lambda: self._log_job(config))

    def _log_job(self, config) -> None:
        import os

        from hydra.core.hydra_config import HydraConfig
        from mlflow.entities import Metric, Param

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        record, log = _job_files(run_dir)
        client, experiment_id, _ = self._client(config)
        tags = _tags(record, run_dir)
        parent = os.environ.get(self.PARENT_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        rid = run.info.run_id
        params = [Param(k[:250], str(v)[:6000]) for k, v in _flatten({k: v for k, v in (record.get("config") or {}).items() if k != "table"}).items()]
        # (a preset's paper-table definition is not a setting of the run: it stays in run.json)
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(rid, params=params[start : start + 100])
        now = int(__import__("time").time() * 1000)
        metrics = []
        for row in log:
            step = int(float(row.get("epoch", 0)))
            metrics += [Metric(k, v, now, step) for k, v in ((k, _number(x)) for k, x in row.items() if k != "epoch") if v is not None]
        for k, v in (record.get("headline") or {}).items():
            value = _number(v) if not isinstance(v, bool) else None
            if value is not None:
                metrics.append(Metric("headline." + k.replace("@", "_at_"), value, now, 0))  # apart from the per-epoch series
        for start in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[start : start + 1000])
        for path in sorted(run_dir.glob("*")):
            if path.suffix in (".csv", ".png", ".json") and path.is_file() and path.name != "heartbeat.json":
                client.log_artifact(rid, str(path))
        status = tags.get("status")
        client.set_terminated(rid, "FINISHED" if status == "completed" else ("KILLED" if status == "interrupted" else "FAILED"))


class TensorBoardLogging(Callback):
    """Per job, `<run dir>/tensorboard/`: every train_log column as a scalar per epoch, the headline numbers, and
    the run's figures as images. Needs the tensorboard package; without it, one warning line."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        try:
            self._log(config)
        except ImportError:
            _warn_once("hydra/callbacks=tensorboard needs the tensorboard package (pip install 'robust[track]'): nothing was logged")
        except Exception as exc:  # noqa: BLE001
            _warn_once(f"TensorBoard logging failed ({type(exc).__name__}: {exc})")

    @staticmethod
    def _log(config) -> None:
        import numpy as np
        from hydra.core.hydra_config import HydraConfig
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        record, log = _job_files(run_dir)
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        try:
            for row in log:
                step = int(float(row.get("epoch", 0)))
                for k, x in row.items():
                    value = _number(x)
                    if k != "epoch" and value is not None:
                        writer.add_scalar(f"train/{k}", value, step)
            for k, v in (record.get("headline") or {}).items():
                value = _number(v) if not isinstance(v, bool) else None
                if value is not None:
                    writer.add_scalar(f"headline/{k}", value, 0)
            for png in sorted(run_dir.glob("*.png")):
                with Image.open(png) as img:
                    writer.add_image(png.stem, np.asarray(img.convert("RGB")), 0, dataformats="HWC")
        finally:
            writer.close()

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


def _swept(record: dict) -> dict:
    """The keys a sweep varies, as TensorBoard's HParams want them: the group choices and every key=value override."""
    values = {g: v for g, v in (record.get("choices") or {}).items() if v}
    for override in record.get("overrides") or []:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and not key.startswith("hydra"):
            number = _number(value)
            values[key] = number if number is not None and value.strip() not in ("true", "false") else value
    values["seed"] = (record.get("config") or {}).get("seed", 0)
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def _resolved(config) -> dict:
    """The job's config as plain values, without the hydra node (which does not resolve inside a single run)."""
    from omegaconf import OmegaConf

    out = {}
    for key in config:
        if key not in ("hydra", "table"):
            value = config[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def _tensorboard_name(kind: str, key: str) -> str:
    return f"{kind}/{key}".replace("@", "_at_")


def _mlflow_name(kind: str, key: str) -> str:
    """train_log columns under their own names (test_accuracy, ...), the rest prefixed: attack.robust_accuracy."""
    return (key if kind == "train" else f"{kind}.{key}").replace("@", "_at_")


class _Sink:
    """What a tracking callback registers in store.LIVE_SINKS for its job: sends each number as it is made and
    remembers what it sent, so that the pass after the job sends only what a killed run could not."""

    def __init__(self, send, name):
        self.send, self.name, self.sent = send, name, set()

    def log(self, kind, metrics, step):
        for key, value in metrics.items():
            number = _number(value) if not isinstance(value, bool) else None
            if number is not None and key != "epoch":
                self.send(self.name(kind, key), number, int(step))
                self.sent.add((self.name(kind, key), int(step)))


def _register(sink) -> None:
    from robust_cli.core import store

    store.LIVE_SINKS.append(sink)


def _unregister(sink) -> None:
    from robust_cli.core import store

    if sink in store.LIVE_SINKS:
        store.LIVE_SINKS.remove(sink)


def _curve_figure(run_dir: Path):
    """Robust accuracy vs eps of an attack run, one line per attack, as a matplotlib figure (None without curve.csv)."""
    import csv
    import math

    try:
        with open(run_dir / "curve.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if math.isfinite(float(r["eps"]))]
    except (OSError, KeyError, ValueError):
        return None
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    for name in dict.fromkeys(r["attack"] for r in rows):
        mine = [r for r in rows if r["attack"] == name]
        ax.plot([float(r["eps"]) for r in mine], [float(r["robust_accuracy"]) for r in mine], "o-", label=name)
    ax.set(xlabel=f"eps ({rows[0]['norm']})", ylabel="robust accuracy", ylim=(-0.02, 1.02), title="robust accuracy vs eps")
    ax.legend(fontsize=8)
    return fig


class MLflowTracking(Callback):
    """One MLflow run per job (a parent run per --multirun, the jobs nested under it). Live: the run starts with the
    job (the resolved config as params, tags), every train_log row is logged as its epoch ends and every eps's robust
    accuracy as it is measured, with their true timestamps, so a long training can be watched in `mlflow ui`. When
    the job ends: what a killed job could not send, the headline numbers, the run directory's CSVs and PNGs and the
    robust-accuracy-vs-eps figure as artifacts (beside the store: <outputs_root>/mlruns for the local database).
    Never breaks a run: a missing package or an unreachable tracking URI is one warning line."""

    PARENT_ENV = "ROBUST_MLFLOW_PARENT_RUN"

    def __init__(self, uri: str | None = None, experiment: str = "robust"):
        self.uri, self.experiment = uri, experiment
        self._broken = False
        self._run = None  # (client, run id, sink) of the job in progress

    def _client(self, config):
        import os

        # an unreachable server must cost seconds, not mlflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        import mlflow  # noqa: F401 - ImportError is reported by the caller
        from mlflow.tracking import MlflowClient

        root = Path(str(config.get("outputs_root", "outputs"))).resolve()
        uri = self.uri or f"sqlite:///{root / 'mlflow.db'}"
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return client, found.experiment_id, uri
        # a local database keeps its artifacts beside it, not in ./mlruns of wherever the command ran
        location = (root / "mlruns").as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
        return client, client.create_experiment(self.experiment, artifact_location=location), uri

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

    def on_job_start(self, config, **kwargs) -> None:
        self._guard("starting the job's run", lambda: self._start_job(config))

    def _start_job(self, config) -> None:
        import os
        import time

        from hydra.core.hydra_config import HydraConfig
        from mlflow.entities import Param

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        client, experiment_id, _ = self._client(config)
        resolved = _resolved(config)
        choices = {g: v for g, v in dict(HydraConfig.get().runtime.choices).items() if v and "/" not in g and "@" not in g and g != "hydra"}
        resolved.setdefault("choices", choices)  # as run.json records them (the command adds them after this hook)
        tags = {"command": str(config.hydra.job.name) if "hydra" in config else "", "run_dir": str(run_dir), "status": "running"}
        tags.update({g: str(v) for g, v in choices.items() if g in ("model", "dataset", "defense", "attack", "experiment")})
        tags["seed"] = str(resolved.get("seed"))
        parent = os.environ.get(self.PARENT_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        rid = run.info.run_id
        params = [Param(k[:250], str(v)[:6000]) for k, v in _flatten(resolved).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(rid, params=params[start : start + 100])
        sink = _Sink(lambda key, value, step: client.log_metric(rid, key, value, timestamp=int(time.time() * 1000), step=step), _mlflow_name)
        _register(sink)
        self._run = (client, rid, sink)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        self._guard("logging the job", lambda: self._end_job(config))

    def _end_job(self, config) -> None:
        import tempfile
        import time

        from hydra.core.hydra_config import HydraConfig
        from mlflow.entities import Metric

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        record, log = _job_files(run_dir)
        if self._run is None:
            self._start_job(config)
        client, rid, sink = self._run
        self._run = None
        _unregister(sink)
        now = int(time.time() * 1000)
        metrics = []
        for row in log:  # the post-hoc pass: only the epochs the live sink did not send (a killed or resumed run)
            step = int(float(row.get("epoch", 0)))
            for k, x in row.items():
                value = _number(x)
                if k != "epoch" and value is not None and (_mlflow_name("train", k), step) not in sink.sent:
                    metrics.append(Metric(_mlflow_name("train", k), value, now, step))
        for k, v in (record.get("headline") or {}).items():
            value = _number(v) if not isinstance(v, bool) else None
            if value is not None:
                metrics.append(Metric("headline." + k.replace("@", "_at_"), value, now, 0))  # apart from the per-epoch series
        for start in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[start : start + 1000])
        for path in sorted(run_dir.glob("*")):
            if path.suffix in (".csv", ".png", ".json", ".log") and path.is_file() and path.name != "heartbeat.json":
                client.log_artifact(rid, str(path))
        figure = _curve_figure(run_dir)
        if figure is not None:
            import matplotlib.pyplot as plt

            with tempfile.TemporaryDirectory() as tmp:
                figure.savefig(Path(tmp) / "robust_accuracy_vs_eps.png", dpi=120)
                plt.close(figure)
                client.log_artifact(rid, str(Path(tmp) / "robust_accuracy_vs_eps.png"))
        tags = _tags(record, run_dir)
        for key in ("status", "checkpoint_key"):
            if key in tags:
                client.set_tag(rid, key, tags[key])
        status = tags.get("status")
        client.set_terminated(rid, "FINISHED" if status == "completed" else ("KILLED" if status == "interrupted" else "FAILED"))


class TensorBoardLogging(Callback):
    """Per job, `<run dir>/tensorboard/`. Live: the config as text when the job starts, every train_log column as a
    scalar as its epoch ends, every eps's robust accuracy as it is measured. When the job ends: what a killed job
    could not send, the headline numbers, HParams (the swept keys against the headline metrics, for TensorBoard's
    HParams view across runs), the robust-accuracy-vs-eps curve as one figure and the run's PNGs. Needs the
    tensorboard package; without it, one warning line."""

    def __init__(self):
        self._job = None  # (writer, sink) of the job in progress

    def _guard(self, fn) -> None:
        try:
            fn()
        except ImportError:
            _warn_once("hydra/callbacks=tensorboard needs the tensorboard package (pip install 'robust[track]'): nothing was logged")
        except Exception as exc:  # noqa: BLE001
            _warn_once(f"TensorBoard logging failed ({type(exc).__name__}: {exc})")

    def on_job_start(self, config, **kwargs) -> None:
        self._guard(lambda: self._start(config))

    def _start(self, config) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf
        from torch.utils.tensorboard import SummaryWriter

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        writer.add_text("config", "```\n" + OmegaConf.to_yaml(_resolved(config)) + "```", 0)  # markdown: kept as written

        def send(key, value, step):
            writer.add_scalar(key, value, step)
            writer.flush()  # visible in TensorBoard now, not at the end

        sink = _Sink(send, _tensorboard_name)
        _register(sink)
        self._job = (writer, sink)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        self._guard(lambda: self._end(config))

    def _end(self, config) -> None:
        import numpy as np
        from hydra.core.hydra_config import HydraConfig
        from PIL import Image

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        record, log = _job_files(run_dir)
        if self._job is None:
            self._start(config)
        writer, sink = self._job
        self._job = None
        _unregister(sink)
        try:
            for row in log:
                step = int(float(row.get("epoch", 0)))
                for k, x in row.items():
                    value = _number(x)
                    if k != "epoch" and value is not None and (_tensorboard_name("train", k), step) not in sink.sent:
                        writer.add_scalar(_tensorboard_name("train", k), value, step)
            headline = {}
            for k, v in (record.get("headline") or {}).items():
                value = _number(v) if not isinstance(v, bool) else None
                if value is not None:
                    headline["headline/" + k.replace("@", "_at_")] = value
            for key, value in headline.items():
                writer.add_scalar(key, value, 0)
            if headline:
                writer.add_hparams(_swept(record), headline, run_name="hparams")
            figure = _curve_figure(run_dir)
            if figure is not None:
                writer.add_figure("robust_accuracy_vs_eps", figure, 0)
            for png in sorted(run_dir.glob("*.png")):
                with Image.open(png) as img:
                    writer.add_image(png.stem, np.asarray(img.convert("RGB")), 0, dataformats="HWC")
        finally:
            writer.close()

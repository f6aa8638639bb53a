"""Experiment tracking callbacks: MLflow (read back with MlflowClient) and TensorBoard; tracking never breaks a run."""

import json
import time

import pytest

from tests.conftest import latest_run

mlflow = pytest.importorskip("mlflow")


def test_mlflow_sweep_is_read_back_with_the_client(robust, tmp_path):
    from mlflow.tracking import MlflowClient

    robust("train", "--multirun", "defense=none,fgsm_at", "train.epochs=2", "hydra/callbacks=mlflow", check=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("robust")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "multirun"]
    jobs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["defense"] for r in jobs) == ["fgsm_at", "none"] and parent.info.status == "FINISHED"
    for job in jobs:
        tags, params = job.data.tags, job.data.params
        assert tags["command"] == "train" and tags["status"] == "completed" and tags["model"] == "fc200_200_10" and tags["seed"] == "0"
        assert tags["checkpoint_key"].startswith("fc200_200_10-digits-") and job.info.status == "FINISHED"
        assert params["train.epochs"] == "2" and params["choices.defense"] == tags["defense"]
        history = client.get_metric_history(job.info.run_id, "test_accuracy")
        assert [m.step for m in history] == [1, 2] and all(0 <= m.value <= 1 for m in history)
        assert job.data.metrics["headline.test_accuracy"] == history[-1].value
        assert {"train_log.csv", "run.json"} <= {a.path for a in client.list_artifacts(job.info.run_id)}


def test_unreachable_tracking_server_is_one_warning_and_the_run_completes(robust, tmp_path):
    started = time.perf_counter()
    proc = robust("train", "train.epochs=1", "hydra/callbacks=mlflow", "tracking.uri=http://127.0.0.1:9")
    assert proc.returncode == 0 and time.perf_counter() - started < 60
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "MLflow tracking failed" in warnings[0] and "the run goes on" in warnings[0]
    assert json.loads((latest_run(tmp_path, "train") / "run.json").read_text())["status"] == "completed"


def test_missing_tracking_package_is_one_warning(robust, tmp_path):
    fake = tmp_path / "fake"
    (fake / "mlflow").mkdir(parents=True)
    (fake / "mlflow" / "__init__.py").write_text("raise ImportError('no mlflow here')\n")
    proc = robust("train", "train.epochs=1", "hydra/callbacks=mlflow", env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 0
    assert [line for line in proc.stderr.splitlines() if "warning:" in line] == [
        "warning: hydra/callbacks=mlflow needs the mlflow package (pip install 'robust[track]'): nothing was tracked; the run goes on and its files are written as always"
    ]


def test_tensorboard_scalars_per_epoch(robust, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    robust("attack", "train.epochs=2", "attack=fgsm", "hydra/callbacks=tensorboard", check=True)
    robust("train", "train.epochs=2", "seed=1", "hydra/callbacks=tensorboard", check=True)
    events = EventAccumulator(str(latest_run(tmp_path, "train") / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/test_accuracy")] == [1, 2]
    attack = EventAccumulator(str(latest_run(tmp_path, "attack") / "tensorboard"))
    attack.Reload()
    assert "headline/clean_accuracy" in attack.Tags()["scalars"] and "curve" in attack.Tags()["images"]

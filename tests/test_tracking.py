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


def test_mlflow_logs_live_from_inside_the_run_with_artifacts_beside_the_store(robust, tmp_path):
    """Each epoch is logged as it ends (its own timestamp, in order) and each eps's robust accuracy as it is
    measured; the artifacts go to <outputs_root>/mlruns, never to ./mlruns of the folder the command ran in."""
    from mlflow.tracking import MlflowClient

    robust("attack", "train.epochs=3", "data.n_train=600", "attack=fgsm", "eps=[0,0.1,0.2]", "audit=false", "hydra/callbacks=mlflow", check=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("robust").experiment_id])
    history = client.get_metric_history(run.info.run_id, "attack.robust_accuracy")
    assert [m.step for m in history] == [0, 1, 2] and len({m.timestamp for m in history}) == 3  # logged as each eps ended
    assert sorted(m.timestamp for m in history) == [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    curve = json.loads((latest_run(tmp_path, "attack") / "run.json").read_text())["headline"]
    assert history[-1].value == pytest.approx(curve["robust_accuracy@0.2"])
    assert history[-1].timestamp < run.info.end_time  # before the job ended: not written after the fact
    assert not (tmp_path / "mlruns").exists() and (tmp_path / "outputs" / "mlruns").is_dir()
    assert "robust_accuracy_vs_eps.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_mlflow_training_epochs_have_their_own_timestamps(robust, tmp_path):
    from mlflow.tracking import MlflowClient

    robust("train", "train.epochs=3", "data.n_train=600", "hydra/callbacks=mlflow", check=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("robust").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "test_accuracy"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    assert history[0].timestamp < history[1].timestamp < history[2].timestamp  # each epoch when it ended


def test_tensorboard_has_hparams_config_text_and_the_curve_figure(robust, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    robust("attack", "train.epochs=1", "attack=fgsm", "eps=[0,0.1,0.2]", "audit=false", "defense=none", "hydra/callbacks=tensorboard", check=True)
    folder = latest_run(tmp_path, "attack") / "tensorboard"
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [e.step for e in events.Scalars("attack/robust_accuracy")] == [0, 1, 2]
    assert "config/text_summary" in events.Tags()["tensors"] and "robust_accuracy_vs_eps" in events.Tags()["images"]
    assert "robust_cli.attacks.FGSM" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()  # the resolved config
    hparams = [p for p in folder.rglob("events.out.tfevents*") if p.parent.name == "hparams"]
    assert hparams, "no HParams run"
    session = EventAccumulator(str(hparams[0].parent))
    session.Reload()
    content = session.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["defense"].string_value == "none" and start.hparams["eps"].string_value == "[0,0.1,0.2]"

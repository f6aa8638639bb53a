"""Sweeps through the real CLI: joblib and submitit_local launchers, the collect-on-multirun-end callback, failures
recorded in run.json, chained training under the checkpoint lock, and the experiment presets' sweep settings."""

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from robust_cli.cli import CONF_DIR
from robust_cli.results.paper_tables import preset_block

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=fc10_4", "train.epochs=1", "data.n_train=200"]


def statuses(sweep: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/run.json")}


def test_joblib_sweep_of_three_defenses_and_two_seeds_is_collected(robust, tmp_path):
    robust("train", "--multirun", "hydra/launcher=joblib", "defense=none,fgsm_at,tulip", "seed=0,1", *TINY, "hydra.sweep.dir=sweep", check=True)
    sweep = tmp_path / "sweep"
    assert sorted(statuses(sweep).values()) == ["completed"] * 6
    # the callback collected the sweep at its end: one table, defense and seed as columns
    log = pd.read_csv(sweep / "collected" / "train_log.csv")
    assert set(zip(log.defense, log.seed)) == {(d, s) for d in ("none", "fgsm_at", "tulip") for s in (0, 1)}
    assert len(log) == 6  # one epoch each
    assert len(list((tmp_path / "outputs" / "checkpoints").glob("*/model.pt"))) == 6
    none = log[log.defense == "none"].set_index("seed")
    assert none.loc[0, "train_loss"] != none.loc[1, "train_loss"]  # the seed reached each job
    runs = pd.read_csv(sweep / "collected" / "runs.csv")
    assert len(runs) == 6 and {"defense", "seed", "test_accuracy"} <= set(runs.columns)


def test_submitit_local_sweep_of_two_jobs_is_collected(robust, tmp_path):
    robust("train", "--multirun", "hydra/launcher=submitit_local", "defense=none,fgsm_at", *TINY, "hydra.sweep.dir=sweep", check=True)
    sweep = tmp_path / "sweep"
    assert any((sweep / ".submitit").iterdir())  # the jobs went through submitit
    assert sorted(statuses(sweep).values()) == ["completed"] * 2
    log = pd.read_csv(sweep / "collected" / "train_log.csv")
    assert sorted(zip(log.defense, log.seed)) == [("fgsm_at", 0), ("none", 0)]


def test_parallel_attack_jobs_train_their_shared_checkpoint_once_and_a_failing_job_is_recorded(robust, tmp_path):
    proc = robust(
        "attack",
        "--multirun",
        "hydra/launcher=joblib",
        "attack=fgsm",
        "eps=0.05,0.1,-1",
        "audit=false",
        "save_adversarial=false",
        "data.n_test=100",
        "model=fc10_4",
        "train.epochs=2",
        "data.n_train=300",
        "hydra.sweep.dir=sweep",
    )
    # one failing job does not stop the others, but the sweep exits non-zero once all ran
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 3 sweep jobs did not complete")
    sweep = tmp_path / "sweep"
    assert sorted(statuses(sweep).values()) == ["completed", "completed", "user_error"]
    output = proc.stdout + proc.stderr
    assert output.count("no checkpoint for this config: training it first") == 1, output
    assert len(list((tmp_path / "outputs" / "checkpoints").glob("*/model.pt"))) == 1
    checkpoints = {json.loads(p.read_text()).get("checkpoint") for p in sweep.glob("*/run.json")} - {None}
    assert len(checkpoints) == 1
    failed = pd.read_csv(sweep / "collected" / "failed_runs.csv")
    assert list(failed.status) == ["user_error"] and "eps" in failed.error.item()
    curve = pd.read_csv(sweep / "collected" / "curve.csv")
    assert sorted(curve.eps.unique()) == [0.05, 0.1]


# ----------------------------------------------------------------------------------------------- presets
def sweep_config(command, overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=command, overrides=overrides, return_hydra_config=True)
    return cfg, {k: str(v) for k, v in cfg.hydra.sweeper.params.items()}


def test_szegedy_preset_sweeps_bells_networks():
    _, full = sweep_config("persistence", ["experiment=szegedy_table", "scale=full"])
    spec = preset_block("szegedy_table")["szegedy_table"]
    assert {spec["names"][m] for m in full["model"].split(",")} == set(spec["source"]["rows"])  # all 14 rows of Bell's Table 1
    assert full["n_points"] == "300" and full["gamma"] == "0.7" and full["data.n_train"] == "null" and full["dataset"] == "mnist"
    cfg, cpu = sweep_config("persistence", ["experiment=szegedy_table"])
    assert cfg.attack._target_.endswith("LBFGS") and cfg.scale == "cpu"
    assert set(cpu["model"].split(",")) < set(full["model"].split(",")) and "c_8" in cpu["model"] and "c_32" not in cpu["model"]
    assert int(cpu["n_points"]) < 300
    assert (cpu["attack"], cpu["eps"], cpu["targets_per_point"]) == ("lbfgs", "null", "1")


def test_szegedy_igsm_variant_is_bells_histogram_attack():
    """variant=igsm: BIM towards each of the 9 other classes, stopped at the first iterate in the target class."""
    _, params = sweep_config("persistence", ["experiment=szegedy_table", "variant=igsm"])
    assert (params["attack"], params["targets_per_point"]) == ("igsm", "9") and float(params["eps"]) > 0
    cfg, _ = sweep_config("persistence", ["experiment=szegedy_table", "attack=igsm"])
    assert cfg.attack._target_.endswith(".IGSM") and cfg.attack.early_stop is True and cfg.attack.targeted == "random"


def test_oberman_objectives_carry_their_settings():
    expected = {
        "j0": ("CrossEntropy", None, 0.0),
        "j1": ("AdversarialTraining", None, 0.0),
        "j2": ("AdversarialTraining", None, 0.0),
        "j2_lip": ("Tulip", "tanh", 5e-4),
    }
    for objective, (defense, head, decay) in expected.items():
        cfg, params = sweep_config("attack", ["experiment=oberman_table", f"experiment/oberman_objective={objective}"])
        assert cfg.defense._target_.endswith(defense) and cfg.model.get("head") == head and cfg.train.weight_decay == decay
    assert cfg.attack._target_.endswith("DeepFool") and params["experiment/oberman_objective"] == "j0,j1,j2,j2_lip"
    assert "0.1" in params["eps"].strip("[]").split(",")
    cfg, _ = sweep_config("attack", ["experiment=oberman_table", "experiment/oberman_objective=j2"])
    assert cfg.defense.attack.norm == "l2"
    _, full = sweep_config("attack", ["experiment=oberman_table", "scale=full"])
    assert (full["dataset"], full["model"]) == ("cifar10", "resnext")


def test_ibp_preset_compares_demyanovs_objectives_on_two_evaluations():
    _, params = sweep_config("attack", ["experiment=ibp_comparison"])
    order = preset_block("ibp_comparison")["ibp_comparison"]["sort"]["defense"]
    assert params["defense"].split(",") == order
    assert len(params["data.n_train"].split(",")) >= 2
    for evaluation, attack in (("adversarial", "FGSM"), ("gaussian", "Noise")):
        cfg, _ = sweep_config("attack", ["experiment=ibp_comparison", f"experiment/ibp_eval={evaluation}"])
        assert cfg.attack._target_.endswith(attack)
    assert cfg.attack.distribution == "gaussian"


def test_reproduce_script_rejects_unknown_preset_and_scale():
    for args in (["nope"], ["szegedy_table", "huge"], []):
        proc = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["szegedy_table", "oberman_table", "ibp_comparison", "cohen_table"])
def test_reproduce_smoke_scale_builds_the_table(tmp_path, preset):
    env = {"OUTPUTS_ROOT": str(tmp_path / "outputs"), "ROBUST": str(REPO / ".venv" / "bin" / "robust"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), preset, "smoke"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table_line = [line for line in proc.stdout.splitlines() if line.startswith("table: ")][-1]
    table = pd.read_csv(table_line.removeprefix("table: "))
    assert len(table) == 2 and table.notna().any(axis=1).all()
    # the table from the preset's YAML block is the one the Python function of the previous release built
    import legacy_tables

    from robust_cli.results.collect import collect

    c = collect([Path(table_line.removeprefix("table: ")).parent.parent], out=tmp_path / "recollected")
    old = getattr(legacy_tables, preset, lambda c: {})(c)  # cohen_table came with the YAML tables: no Python original
    for name, expected in (old if isinstance(old, dict) else {preset: old}).items():
        pd.testing.assert_frame_equal(c.tables[name].reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False, rtol=1e-12)


def test_unknown_scale_stops_with_one_line(capsys):
    from omegaconf import OmegaConf

    from robust_cli.results.callbacks import CheckScale

    cfg = OmegaConf.create({"scale": "huge", "scales": {"cpu": {}, "full": {}}, "hydra": {"runtime": {"choices": {"experiment": "szegedy_table"}}}})
    with pytest.raises(SystemExit) as stop:
        CheckScale().on_multirun_start(cfg)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: scale must be one of cpu, full for experiment=szegedy_table, got 'huge'"
    cfg.scale = "cpu"
    CheckScale().on_run_start(cfg)  # a known scale passes
    cfg.variant, cfg.variants = "cw", {"lbfgs": {}, "igsm": {}}
    with pytest.raises(SystemExit):
        CheckScale().on_run_start(cfg)
    assert capsys.readouterr().err.strip() == "error: variant must be one of lbfgs, igsm for experiment=szegedy_table, got 'cw'"
    cfg, _ = sweep_config("persistence", ["experiment=szegedy_table"])
    assert cfg.hydra.callbacks.check_scale._target_ == "robust_cli.results.callbacks.CheckScale"


def test_missing_launcher_plugin_is_one_line(monkeypatch):
    from robust_cli import cli
    from robust_cli.core.errors import UserError

    monkeypatch.setitem(cli.LAUNCHER_PLUGINS, "submitit_local", ("hydra_plugins.no_such_launcher", cli.LAUNCHER_PLUGINS["submitit_local"][1]))
    with pytest.raises(UserError, match="pip install 'robust\\[cluster\\]'"):
        cli._check_launcher(["hydra/launcher=submitit_local", "seed=1"])
    cli._check_launcher(["hydra/launcher=basic"])  # Hydra's own launcher needs no plugin


def test_cohen_preset_trains_each_base_classifier_with_its_certification_noise():
    _, params = sweep_config("certify", ["experiment=cohen_table", "scale=smoke"])
    assert params["sigma"] == "[0.25],[0.5]"
    for sigma in (0.25, 0.5):
        cfg, _ = sweep_config("certify", ["experiment=cohen_table", f"sigma=[{sigma}]"])
        assert cfg.defense._target_.endswith("GaussianAugmentation") and cfg.defense.sigma == sigma and list(cfg.sigma) == [sigma]

"""`robust attack` end to end on digits: output files and columns, conventions, user errors, every attack YAML."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ATTACK_DIR = Path(__file__).resolve().parents[1] / "robust_cli" / "conf" / "attack"
CURVE_COLUMNS = [
    "attack",
    "norm",
    "targeted",
    "eps",
    "n",
    "clean_accuracy",
    "robust_accuracy",
    "robust_accuracy_low",
    "robust_accuracy_high",
    "success_rate",
    "mean_l2",
    "mean_linf",
    "mean_distortion",
    "seconds",
    "precision",
    "fp32_rejected",
]
EXAMPLE_COLUMNS = ["index", "eps", "label", "clean_pred", "adv_pred", "target", "success", "l2", "linf", "l1", "distortion", "l0"]


@pytest.fixture(scope="module")
def attack_cli(tmp_path_factory):
    """Run `robust attack` with a shared outputs root (the digits model is trained once, 2 epochs)."""
    root = tmp_path_factory.mktemp("attack_cli")

    def run(*args):
        env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "robust_cli", "attack", f"outputs_root={root}/outputs", "train.epochs=2", *args],
            cwd=root,
            capture_output=True,
            text=True,
            env=env,
        )
        runs = sorted((root / "outputs" / "attack").glob("*/*"), key=lambda p: p.stat().st_mtime)
        return proc, (runs[-1] if runs else None)

    return run


def test_budgeted_curve_files(attack_cli):
    proc, run = attack_cli("attack=pgd", "eps=[0,0.1,0.3]", "data.n_test=60", "attack.steps=5")
    assert proc.returncode == 0, proc.stderr
    curve = pd.read_csv(run / "curve.csv")
    assert list(curve.columns) == CURVE_COLUMNS and curve["eps"].tolist() == [0.0, 0.1, 0.3]
    assert curve.loc[0, "robust_accuracy"] == curve.loc[0, "clean_accuracy"]  # eps = 0 row is clean accuracy exactly
    assert (curve["robust_accuracy"] <= curve["clean_accuracy"]).all() and curve["robust_accuracy"].is_monotonic_decreasing
    examples = pd.read_csv(run / "examples.csv")
    assert list(examples.columns) == EXAMPLE_COLUMNS and len(examples) == 3 * 60
    assert (examples["linf"] <= examples["eps"] + 1e-6).all()
    assert examples["distortion"].round(6).equals((examples["l2"] / 8).round(6))  # ||d||_2 / sqrt(64)
    adv = torch.load(run / "adversarial.pt", weights_only=True)
    assert adv["x_adv"].shape == (3, 60, 1, 8, 8) and torch.equal(adv["x_adv"][0], adv["x"])
    # predictions stored = re-running the model; success in examples.csv agrees with them
    last = examples[examples["eps"] == 0.3]
    assert (last["adv_pred"].to_numpy() == adv["pred"][2].numpy()).all()
    assert (last["success"] == (last["adv_pred"] != last["label"])).all()
    assert (run / "curve.png").stat().st_size > 0 and (run / "adversarial_examples.png").stat().st_size > 0
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed"
    audit = pd.read_csv(run / "audit.csv")
    assert list(audit.columns) == ["check", "eps", "status", "detail", "seconds"]
    # every eps > 0 has its single-step, noise, margin-twin, gradient and more-effort rows (not only the largest eps)
    for check in ("single_step", "noise", "stronger_than_ce", "gradients", "more_effort"):
        assert sorted(audit.loc[audit["check"] == check, "eps"].astype(float)) == [0.1, 0.3], check
    assert {"logits", "randomised", "train_mode", "box_eps", "monotone"} <= set(audit["check"])


def test_minimal_attack_distances(attack_cli):
    proc, run = attack_cli("attack=deepfool", "eps=[0.5,1.0]", "data.n_test=40")
    assert proc.returncode == 0, proc.stderr
    dist = pd.read_csv(run / "distances.csv")
    assert list(dist.columns)[:6] == ["index", "label", "l2", "linf", "l1", "distortion"] and len(dist) == 40
    examples = pd.read_csv(run / "examples.csv")
    wrong = (examples["clean_pred"] != examples["label"]).to_numpy()
    assert (dist["l2"].to_numpy()[wrong] == 0).all()
    failed = (~examples["success"]).to_numpy() & ~wrong
    assert (dist["l2"].to_numpy()[failed] == math.inf).all()
    curve = pd.read_csv(run / "curve.csv")
    assert curve["eps"].tolist() == [0.5, 1.0, math.inf]
    expected = ((examples["clean_pred"] == examples["label"]).to_numpy() & (dist["l2"].to_numpy() > 0.5)).mean()
    assert curve.loc[0, "robust_accuracy"] == pytest.approx(expected)


def test_fab_in_l1_keeps_its_budget_and_writes_l1_distances(attack_cli):
    proc, run = attack_cli("attack=fab_t", "attack.norm=l1", "eps=[0,1.5]", "data.n_test=40", "attack.n_iter=30", "audit=false")
    assert proc.returncode == 0, proc.stderr
    curve, examples = pd.read_csv(run / "curve.csv"), pd.read_csv(run / "examples.csv")
    assert (curve["norm"] == "l1").all() and curve.loc[1, "robust_accuracy"] < curve.loc[0, "robust_accuracy"]
    broken = examples[(examples.eps == 1.5) & examples.success]
    assert len(broken) and (broken["l1"] <= 1.5 + 1e-5).all() and (broken["l1"] >= broken["l2"] - 1e-9).all()
    proc, run = attack_cli("attack=fab", "attack.norm=l1", "attack.minimal=true", "eps=[1.0]", "data.n_test=40", "attack.n_iter=30")
    assert proc.returncode == 0, proc.stderr
    dist, curve = pd.read_csv(run / "distances.csv"), pd.read_csv(run / "curve.csv")
    expected = (dist["l1"] > 1.0).mean()  # misclassified inputs have distance 0, failures +inf
    assert curve.loc[curve.eps == 1.0, "robust_accuracy"].item() == pytest.approx(expected)


def test_autoattack_in_l1_runs_its_cascade_and_audit(attack_cli):
    proc, run = attack_cli("attack=autoattack", "attack.norm=l1", "eps=[0,1,32]", "data.n_test=40", "attack.n_iter=20", "attack.n_queries=100")
    assert proc.returncode == 0, proc.stderr
    curve, examples = pd.read_csv(run / "curve.csv"), pd.read_csv(run / "examples.csv")
    assert (curve["norm"] == "l1").all() and curve["robust_accuracy"].is_monotonic_decreasing
    assert curve.loc[1, "robust_accuracy"] < curve.loc[0, "robust_accuracy"] and curve.loc[2, "robust_accuracy"] <= 0.05
    broken = examples[examples.success & (examples.eps > 0) & (examples.clean_pred == examples.label)]
    assert len(broken) and (broken["l1"] <= broken["eps"] * (1 + 1e-5)).all()
    assert set(broken["broken_by"]) <= {"apgd_ce", "apgd_t", "fab_t", "square"}
    audit = pd.read_csv(run / "audit.csv")
    box = audit[audit["check"] == "box_eps"]  # 32 = half the 64 pixels: the l1 box-sized budget
    assert len(box) == 1 and box["status"].item() == "ok"


def test_binary_search_distances(attack_cli):
    proc, run = attack_cli("attack=fgsm", "search=binary", "search.tol=0.01", "eps=0.1", "data.n_test=30")
    assert proc.returncode == 0, proc.stderr
    dist = pd.read_csv(run / "distances.csv")
    assert "eps" in dist.columns and len(dist) == 30
    found = dist["eps"][(dist["eps"] > 0) & (dist["eps"] < math.inf)]
    assert ((dist.loc[found.index, "linf"] - found).abs() <= 1e-6).all()  # FGSM uses its whole linf budget


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eps=-0.1"], "eps"),
        (["attack.norm=l3"], "norm"),
        (["attack=deepfool", "search=binary"], "budgeted"),
        (["attack=lbfgs", "attack.targeted=false"], "targeted"),
        (["attack=pgd", "attack.stepz=3"], "attack"),
        (["attack=apgd", "attack.norm=l0"], "norm"),
        (["attack=apgd", "attack.large_eps=true"], "large_eps"),
    ],
)
def test_user_errors_exit_2_with_one_line(attack_cli, args, needle):
    proc, _ = attack_cli(*args, "data.n_test=10")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in ATTACK_DIR.glob("*.yaml")))
def test_every_attack_yaml_runs_on_digits(attack_cli, name):
    extra = {"cw": ["attack.steps=50", "attack.binary_search_steps=3"], "lbfgs": ["attack.max_iter=200"], "sparse_rs": ["attack.n_queries=300"]}.get(name, [])
    eps = "eps=[0,2]" if name == "sparse_rs" else "eps=[0,0.1]"  # l0: a number of pixels
    proc, run = attack_cli(f"attack={name}", eps, "data.n_test=40", *extra)
    assert proc.returncode == 0, proc.stderr
    curve = pd.read_csv(run / "curve.csv")
    # an attack with a loss or version names it too (apgd_ce, autoattack_standard): the curve row says which ran
    assert list(curve.columns) == CURVE_COLUMNS and curve["attack"].iloc[0] in (name, f"{name}_ce", f"{name}_standard")

"""Issue 13: an evaluation survives a kill (resume=true) and splits into shards that merge into the unsharded run."""

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import latest_run

ATTACK = (
    "attack",
    "attack=apgd",
    "attack.n_iter=5",
    "eps=[0,0.1,0.2]",
    "data.n_test=200",
    "batch_size=32",
    "audit=false",
    "train.epochs=1",
    "data.n_train=300",
)


def without_seconds(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in frame.columns if c == "seconds"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The uninterrupted, unsharded evaluation (with resume=true and nothing to resume: it must say so)."""
    root = tmp_path_factory.mktemp("whole")
    proc = subprocess.run([sys.executable, "-m", "robust_cli", *ATTACK, "resume=true"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = latest_run(root, "attack")
    warnings = json.loads((run / "run.json").read_text())["warnings"]
    assert any("no interrupted evaluation" in w for w in warnings)
    return {name: pd.read_csv(run / f"{name}.csv") for name in ("curve", "examples")} | {"adversarial": torch.load(run / "adversarial.pt", weights_only=True)}


def test_a_killed_evaluation_resumes_to_the_same_csvs(robust, tmp_path, whole_run):
    killed = robust(*ATTACK, "outputs_root=second", env={"ROBUST_STOP_AFTER_BATCHES": "10"})
    assert killed.returncode != 0
    state = list((tmp_path / "second" / "evaluations").glob("*/*.pt"))
    assert len(state) == 10  # seven batches per eps: eps 0 done, three of eps 0.1
    resumed = robust(*ATTACK, "outputs_root=second", "resume=true", check=True)
    assert "10 finished batches are read back" in resumed.stderr
    run = sorted((tmp_path / "second" / "attack").glob("*/*"))[-1]
    for name in ("curve", "examples"):
        pd.testing.assert_frame_equal(without_seconds(pd.read_csv(run / f"{name}.csv")), without_seconds(whole_run[name]))
    assert torch.equal(torch.load(run / "adversarial.pt", weights_only=True)["x_adv"], whole_run["adversarial"]["x_adv"])
    assert not list((tmp_path / "second" / "evaluations").glob("*/*.pt"))  # discarded once the results are written


def test_shards_merge_into_the_unsharded_curve(robust, tmp_path, whole_run):
    robust(*ATTACK, "--multirun", "data.shard=0/3,1/3,2/3", "hydra.sweep.dir=sweep", check=True)
    shards = [json.loads(p.read_text())["shard"] for p in sorted((tmp_path / "sweep").glob("*/run.json"))]
    assert [(s["start"], s["stop"]) for s in shards] == [(0, 64), (64, 128), (128, 200)]  # whole batches of 32
    merged = pd.read_csv(tmp_path / "sweep" / "collected" / "merged_curve.csv")
    assert set(merged.shards) == {3}
    curve = whole_run["curve"]
    pd.testing.assert_frame_equal(without_seconds(merged[curve.columns]), without_seconds(curve), check_dtype=False)
    examples = pd.read_csv(tmp_path / "sweep" / "collected" / "merged_examples.csv")
    expected = whole_run["examples"].sort_values(["eps", "index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(examples[expected.columns].reset_index(drop=True), expected)
    partial = tmp_path / "two_of_three"  # a shard missing: no merged curve, and a line saying why
    for run in sorted((tmp_path / "sweep").glob("[02]_*")):
        shutil.copytree(run, partial / run.name)
    proc = robust("collect", "two_of_three", check=True)
    assert "merged_curve needs all of them" in proc.stderr and not (partial / "collected" / "merged_curve.csv").exists()


def test_batch_seeds_depend_on_the_global_batch_only():
    from robust_cli.evaluation.evaluate import BatchPlan

    whole, second_half = BatchPlan(seed=0), BatchPlan(seed=0, first_batch=4)
    assert whole.batch_seed(0.1, 5) == second_half.batch_seed(0.1, 1)
    assert len({whole.batch_seed(e, b) for e in (0.1, 0.2) for b in range(5)}) == 10
    assert BatchPlan(seed=1).batch_seed(0.1, 5) != whole.batch_seed(0.1, 5)


STAGED = (
    "attack",
    "attack=autoattack",
    "attack.n_iter=5",
    "attack.n_queries=20",
    "attack.report_each=true",
    "search=binary",
    "eps=[0,0.1]",
    "data.n_test=64",
    "batch_size=32",
    "train.epochs=1",
    "data.n_train=300",
)


def test_a_run_killed_after_the_curve_keeps_report_each_and_the_search_and_computes_the_audit_the_same(robust, tmp_path):
    """The steps after the curve (report_each, search=binary, the audit) are kept as they finish: a resume reads them
    back instead of recomputing, and every CSV equals the uninterrupted run's."""
    robust(*STAGED, "outputs_root=whole/outputs", check=True)
    killed = robust(*STAGED, "outputs_root=second/outputs", env={"ROBUST_STOP_AFTER_STAGE": "search"})
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "second" / "outputs" / "evaluations").glob("*/stage=*.pt")) == ["stage=report_each.pt", "stage=search.pt"]
    robust(*STAGED, "outputs_root=second/outputs", "resume=true", check=True)
    whole, resumed = latest_run(tmp_path / "whole", "attack"), latest_run(tmp_path / "second", "attack")
    assert json.loads((resumed / "run.json").read_text())["resumed_stages"] == ["report_each", "search"]
    for name in ("curve", "audit", "distances", "examples"):
        pd.testing.assert_frame_equal(without_seconds(pd.read_csv(resumed / f"{name}.csv")), without_seconds(pd.read_csv(whole / f"{name}.csv")))
    assert not list((tmp_path / "second" / "outputs" / "evaluations").glob("*/*.pt"))

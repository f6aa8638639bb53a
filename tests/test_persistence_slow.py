"""Slow checks: Bell's Prop. 4.3 on the whole grid at n = 784 (both methods), `robust persistence` with defaults."""

import json
import math
import time

import pandas as pd
import pytest
import torch

from robust_cli.analysis.analytic import Wedge
from robust_cli.analysis.persistence import bracketing, persistence
from tests.conftest import latest_run
from tests.test_persistence import sd_for

torch.set_num_threads(1)


def cli_defaults():
    """The `robust persistence` defaults (persistence.yaml), as the command passes them to the estimator."""
    from hydra import compose, initialize_config_dir

    from robust_cli.cli import CONF_DIR
    from robust_cli.commands.persistence import persistence_options

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="test"):
        cfg = compose(config_name="persistence")
    return cfg.persistence.method, persistence_options(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("k", range(1, 9))
def test_prop_4_3_grid_with_the_cli_defaults(k, gamma):
    # Bell's wedge at n = 784, 200 points per case (each its own draws), the command's own settings: the median
    # relative error is below 2 %, the 99 % interval covers the exact value for at least 98 % of the points
    # (k = 1, gamma = 0.5: +inf for at least 98 %)
    method, options = cli_defaults()
    w = Wedge((1, 28, 28), 10, k=k, d=0.1, apex=0.5)
    exact = w.persistence(gamma)
    x = w.point()[None].expand(200, -1, -1, -1)
    r = persistence(w, x, gamma, method=method, **(options | {"seed": 100 * k + int(10 * gamma)}))
    if math.isinf(exact):
        assert torch.isinf(r.sigma).double().mean().item() >= 0.98
        return
    rel = (r.sigma - exact) / exact
    covered = ((r.ci_low <= exact) & (exact <= r.ci_high)).double().mean().item()
    print(
        f"k={k} gamma={gamma}: median |rel err| {rel.abs().median().item():.4f}, median rel err {rel.median().item():+.4f}, "
        f"coverage {covered:.3f}, evaluations {r.evaluations.double().mean().item():.0f}"
    )
    assert rel.abs().median().item() < 0.02
    assert covered >= 0.98


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("k", range(1, 9))
def test_bracketing_grid_n784(k, gamma):
    w = Wedge((1, 28, 28), 10, k=k, d=1.0)
    exact = w.persistence(gamma)
    x = w.point()[None]
    if math.isinf(exact):  # k = 1, gamma = 0.5: stability -> 0.5 from above; Algorithm 1 stops at the cap
        assert bracketing(w, x, gamma, sigma_cap=200.0, seed=k).sigma.item() == math.inf
        return
    n = sd_for(k, gamma, 1.0, 0.01)  # draws for a 1 % standard deviation: 3 % is three of them
    brk = bracketing(w, x, gamma, n_samples=n, precision=0.002, seed=k)
    assert brk.sigma.item() == pytest.approx(exact, rel=0.03), (brk.sigma.item(), exact)


@pytest.mark.slow
def test_digits_defaults(robust, tmp_path):
    start = time.perf_counter()
    robust("persistence", check=True)
    seconds = time.perf_counter() - start
    run = latest_run(tmp_path, "persistence")
    summary = pd.read_csv(run / "summary.csv").iloc[0]
    table = pd.read_csv(run / "persistence.csv")
    assert summary.n_nat == 300 and len(table) == 600 and summary.gamma == 0.7 and summary.method == "fast"
    assert summary.persistence_nat > 0 and summary.persistence_adv > 0
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed"
    print(f"robust persistence on digits with defaults: {seconds:.0f} s (training included)")


@pytest.mark.slow
def test_methods_agree_on_digits(robust, tmp_path):
    common = ["n_points=20", "stability.points=0", "line.points=0", "train.epochs=5"]
    robust("persistence", *common, check=True)
    fast = pd.read_csv(latest_run(tmp_path, "persistence") / "persistence.csv")
    robust("persistence", *common, "persistence.method=bracketing", check=True)
    brk = pd.read_csv(latest_run(tmp_path, "persistence") / "persistence.csv")
    ratio = (fast.persistence / brk.persistence).dropna()
    assert len(ratio) >= 30 and ratio.median() == pytest.approx(1.0, abs=0.05)
    # fast's pool grows until its 99 % interval is within 1 +- 0.07, for a smaller error than Algorithm 1's (MNIST:
    # 1.32 % vs 1.54 %, scripts/bench_persistence.py), at about half its evaluations
    print(f"evaluations per point: fast {fast.evaluations.mean():.0f}, bracketing {brk.evaluations.mean():.0f}")
    assert (fast.evaluations.mean() * 1.5) < brk.evaluations.mean()

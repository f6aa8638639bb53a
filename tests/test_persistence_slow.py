"""Slow checks: Bell's Prop. 4.3 on the whole grid at n = 784 (both methods), `robust persistence` with defaults."""
import json
import math
import time

import pandas as pd
import pytest
import torch

from robust_cli.analytic import Wedge
from robust_cli.persistence import bracketing, fast_persistence
from tests.conftest import latest_run
from tests.test_persistence import sd_for

torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("k", range(1, 9))
def test_prop_4_3_grid_n784(k, gamma):
    w = Wedge((1, 28, 28), 10, k=k, d=1.0)
    exact = w.persistence(gamma)
    x = w.point()[None]
    if math.isinf(exact):  # k = 1, gamma = 0.5: stability -> 0.5 from above; both stop at the cap
        assert fast_persistence(w, x, gamma, sigma_cap=200.0, seed=k).sigma.item() == math.inf
        assert bracketing(w, x, gamma, sigma_cap=200.0, seed=k).sigma.item() == math.inf
        return
    n = sd_for(k, gamma, 1.0, 0.01)  # draws for a 1 % standard deviation: 3 % is three of them
    fast = fast_persistence(w, x, gamma, n_samples=n, seed=k)
    brk = bracketing(w, x, gamma, n_samples=n, precision=0.002, seed=k)
    assert fast.sigma.item() == pytest.approx(exact, rel=0.03), (fast.sigma.item(), exact)
    assert brk.sigma.item() == pytest.approx(exact, rel=0.03), (brk.sigma.item(), exact)
    assert fast.ci_low.item() <= fast.sigma.item() <= fast.ci_high.item()


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
    assert (fast.evaluations.mean() * 4) < brk.evaluations.mean()

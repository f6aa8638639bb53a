"""`robust persistence` end to end: files and columns, the wedge's known answer, determinism, user errors."""

import json
import math

import pandas as pd
import pytest
from scipy.special import erfinv

from tests.conftest import latest_run

SMALL = [
    "train.epochs=3",
    "data.n_train=600",
    "attack.max_iter=50",
    "persistence.max_samples=256",
    "stability.n_samples=64",
    "sigma_grid.num=4",
    "line.points=2",
    "line.steps=4",
]


def test_digits_files_and_columns(robust, tmp_path):
    robust("persistence", "n_points=6", *SMALL, check=True)
    run = latest_run(tmp_path, "persistence")
    for name in ("persistence.csv", "summary.csv", "stability.csv", "stability.png", "line.csv", "line.png", "persistence_hist.png", "run.json"):
        assert (run / name).is_file(), name
    table = pd.read_csv(run / "persistence.csv")
    for column in ("index", "kind", "label", "pred", "target", "attack", "distortion", "gamma", "persistence", "ci_low", "ci_high", "evaluations", "method"):
        assert column in table.columns, column
    nat, adv = table[table.kind == "natural"], table[table.kind == "adversarial"]
    assert len(nat) == len(adv) == 6 and (nat.label == nat.pred).all()  # natural points are correctly classified
    ok = adv[adv.success.astype(bool)]
    assert len(ok) > 0 and (ok.pred == ok.target).all() and (ok.target != ok.label).all()  # L-BFGS is targeted
    assert ((ok.distortion - ok.l2 / 8).abs() < 1e-9).all()  # digits: n = 64, distortion = l2 / sqrt(n)
    assert (ok.persistence > 0).all() and (ok.ci_low <= ok.persistence).all() and (ok.persistence <= ok.ci_high).all()
    summary = pd.read_csv(run / "summary.csv")
    assert len(summary) == 1
    row = summary.iloc[0]
    assert list(summary.columns[:5]) == ["network", "test_acc", "avg_distortion", "persistence_nat", "persistence_adv"]
    assert row.persistence_nat == pytest.approx(nat.persistence.mean()) and row.persistence_adv == pytest.approx(ok.persistence.mean())
    assert row.avg_distortion == pytest.approx(ok.distortion.mean()) and 0 < row.test_acc <= 100
    stab = pd.read_csv(run / "stability.csv")
    sums = stab.groupby(["pair", "kind", "sigma"]).frequency.sum()
    assert len(sums) == 2 * 2 * 4 and ((sums - 1).abs() < 1e-9).all()
    line = pd.read_csv(run / "line.csv")
    assert len(line) == 2 * 4 and set(line.t.round(6)) == {0.0, round(1 / 3, 6), round(2 / 3, 6), 1.0}
    ends = line.sort_values("t").groupby("pair")
    assert (~ends.crossed.first()).all() and ends.crossed.last().all()  # starts in the natural class, ends across
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["headline"]["persistence_nat"] == pytest.approx(row.persistence_nat)


def test_wedge_known_answer_and_determinism(robust, tmp_path):
    # model=wedge, k = 1, apex 0.25: the sklearn digits' first pixel is always 0, so every digit lies outside
    # (class 1) at distance 0.25 from the one sheet; Prop. 4.3 (a half-space either side) gives the persistence
    # 0.25 / (sqrt(2) erfinv(2 gamma - 1)). DeepFool (untargeted) just crosses the sheet.
    args = [
        "persistence",
        "model=wedge",
        "model.apex=0.25",
        "attack=deepfool",
        "n_points=3",
        "train.epochs=1",
        "persistence.max_samples=8192",
        "stability.points=1",
        "stability.n_samples=32",
        "sigma_grid.num=2",
        "line.points=0",
    ]
    robust(*args, check=True)
    run = latest_run(tmp_path, "persistence")
    table = pd.read_csv(run / "persistence.csv")
    nat, adv = table[table.kind == "natural"], table[table.kind == "adversarial"]
    assert (nat.label == 1).all() and (adv.pred == 0).all()
    exact = 0.25 / (math.sqrt(2) * erfinv(2 * 0.7 - 1))
    assert ((nat.persistence - exact).abs() < 0.08 * exact).all(), (nat.persistence.tolist(), exact)
    assert ((nat.ci_low <= exact) & (exact <= nat.ci_high)).mean() >= 0.75
    # just across the sheet: the adversarial point's persistence is its distance to the sheet times the same factor
    assert (adv.persistence < 0.1 * exact).all()
    robust(*args, "hydra.run.dir=outputs/persistence/again/run", check=True)
    again = pd.read_csv(tmp_path / "outputs/persistence/again/run/persistence.csv")
    pd.testing.assert_frame_equal(table, again)  # same config and seed: identical CSV


def test_several_random_targets_per_point(robust, tmp_path):
    """Bell's Table 2 protocol: K distinct random targets per natural point, one adversarial row each; the natural
    point is measured once."""
    robust("persistence", "n_points=4", "targets_per_point=3", *SMALL, "line.points=1", check=True)
    table = pd.read_csv(latest_run(tmp_path, "persistence") / "persistence.csv")
    nat, adv = table[table.kind == "natural"], table[table.kind == "adversarial"]
    assert len(nat) == 4 and len(adv) == 12 and (nat.target == -1).all()
    for index, rows in adv.groupby("index"):
        label = nat[nat["index"] == index].label.item()
        assert len(rows) == 3 and rows.target.nunique() == 3 and (rows.target != label).all() and (rows.label == label).all()
    ok = adv[adv.success.astype(bool)]
    assert len(ok) > 0 and (ok.pred == ok.target).all()
    summary = pd.read_csv(latest_run(tmp_path, "persistence") / "summary.csv").iloc[0]
    assert summary.n_nat == 4 and summary.n_adv == len(ok)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["gamma=1.5"], "gamma must be in (0, 1)"),
        (["persistence.method=exact"], "persistence.method must be one of"),
        (["persistence.n_init=20000"], "must not exceed persistence.max_samples"),
        (["attack=pgd"], "budgeted attack"),
        (["line.steps=1"], "line.steps must be an integer >= 2"),
        (["attack=deepfool", "targets_per_point=2"], "add attack.targeted=random"),
        (["targets_per_point=10"], "10 classes leave 9 other classes"),
    ],
)
def test_user_errors_are_one_line(robust, args, fragment):
    proc = robust("persistence", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr

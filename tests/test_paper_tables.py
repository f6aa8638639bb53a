"""The paper tables declared in the experiment presets' `table:` blocks (robust_cli/results/paper_tables.py), checked against
the Python functions that built them before (tests/legacy_tables.py) on random collected frames, and the block's
validation: a bad block is one line, at collect and before a job does any work."""

import math

import legacy_tables as legacy
import numpy as np
import pandas as pd
import pytest
import yaml
from test_collect import curve_rows, make_run

from robust_cli.core.errors import UserError
from robust_cli.results import paper_tables
from robust_cli.results.collect import collect


class Frames:  # what the legacy functions read from a Collection
    def __init__(self, frames):
        self.frames = frames


def same(ours: pd.DataFrame, theirs: pd.DataFrame):
    pd.testing.assert_frame_equal(ours.reset_index(drop=True), theirs.reset_index(drop=True), check_dtype=False, rtol=1e-12, atol=0)


def spec(experiment, name=None):
    block = paper_tables.preset_block(experiment)
    return block[name or experiment]


def runs(n):
    return [f"sweep/{i}" for i in range(n)]


# ----------------------------------------------------------------------------------------------- YAML vs the old Python
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_szegedy_table_from_yaml_equals_the_python_table(seed):
    rng = np.random.default_rng(seed)
    models = ["fc200_200_10", "c_8", "fc10_4", "fc10_0"]  # out of Bell's order on purpose
    rows = []
    for model in rng.permutation(models):
        for s in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "run": f"{model}-{s}",
                    "network": model,
                    "test_acc": rng.uniform(80, 99),
                    "avg_distortion": rng.uniform(0.05, 0.3),
                    "persistence_nat": rng.uniform(0.2, 2),
                    "persistence_adv": rng.uniform(0.2, 2),
                    "n_nat": int(rng.integers(5, 50)),
                }
            )
    frames = {"summary": pd.DataFrame(rows)}
    same(paper_tables.render(spec("szegedy_table"), frames), legacy.szegedy_table(Frames(frames)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oberman_tables_from_yaml_equal_the_python_tables(seed):
    rng = np.random.default_rng(seed)
    dist, curve = [], []
    for defense in ("tulip", "none", "fgsm_at", "l2_at"):
        for s in range(int(rng.integers(1, 4))):
            run = f"{defense}-{s}"
            d = rng.exponential(0.3, size=int(rng.integers(5, 40)))
            d[0] = 0.0
            dist += [{"run": run, "defense": defense, "model": "fc", "dataset": "mnist", "index": i, "l2": v} for i, v in enumerate(d)]
            clean = float(np.mean(d > 0))
            for eps in (0.0, 0.05, 0.1, 0.3, math.inf):
                acc = clean if math.isinf(eps) else float(np.mean(d > eps))
                curve.append(
                    {
                        "run": run,
                        "defense": defense,
                        "model": "fc",
                        "dataset": "mnist",
                        "norm": "l2",
                        "eps": eps,
                        "clean_accuracy": clean,
                        "robust_accuracy": acc,
                    }
                )
            curve.append(
                {"run": run, "defense": defense, "model": "fc", "dataset": "mnist", "norm": "linf", "eps": 0.1, "clean_accuracy": clean, "robust_accuracy": 0.0}
            )  # another norm: not in the table
    frames = {"distances": pd.DataFrame(dist), "curve": pd.DataFrame(curve)}
    old = legacy.oberman_table(Frames(frames))
    for name in ("oberman_table", "oberman_error_vs_eps"):
        same(paper_tables.render(spec("oberman_table", name), frames), old[name])


@pytest.mark.parametrize("seed", [0, 1])
def test_ibp_comparison_from_yaml_equals_the_python_table(seed):
    rng = np.random.default_rng(seed)
    curve, log = [], []
    for defense in ("fgsm_at", "none", "loss_ibp"):
        for n_train in (300, 1000):
            for s in range(2):
                run_seconds = rng.uniform(1, 5) * (1 + n_train / 1000)
                log += [
                    {
                        "run": f"ckpt-{defense}-{n_train}-{s}",
                        "defense": defense,
                        "data.n_train": n_train,
                        "epoch": e,
                        "seconds": run_seconds + rng.uniform(0, 1),
                    }
                    for e in (1, 2, 3)
                ]
                clean = rng.uniform(0.8, 0.99)
                for attack in ("fgsm", "noise"):
                    run = f"{defense}-{n_train}-{s}-{attack}"
                    for eps in (0.0, 0.1, 0.3):
                        curve.append(
                            {
                                "run": run,
                                "defense": defense,
                                "data.n_train": n_train,
                                "attack": attack,
                                "eps": eps,
                                "norm": "linf",
                                "clean_accuracy": clean,
                                "robust_accuracy": clean if eps == 0 else rng.uniform(0, clean),
                            }
                        )
    frames = {"curve": pd.DataFrame(curve), "train_log": pd.DataFrame(log)}
    same(paper_tables.render(spec("ibp_comparison"), frames), legacy.ibp_comparison(Frames(frames)))


def test_bell_table2_from_yaml_equals_the_python_table():
    rng = np.random.default_rng(0)
    rows = []
    for arch in ("vgg16", "alexnet"):
        for attack in ("pgd", "bim", "mifgsm"):
            run = f"{arch}-{attack}"
            for i in range(12):
                success = bool(rng.random() < 0.7)
                p_nat = rng.uniform(0.005, 0.03) if i != 3 else math.inf  # a +inf persistence: counted, not averaged
                rows.append(
                    {
                        "run": run,
                        "model.arch": arch,
                        "attack": attack,
                        "kind": "natural",
                        "index": i,
                        "success": None,
                        "distortion": math.nan,
                        "persistence": p_nat,
                    }
                )
                rows.append(
                    {
                        "run": run,
                        "model.arch": arch,
                        "attack": attack,
                        "kind": "adversarial",
                        "index": i,
                        "success": success,
                        "distortion": rng.uniform(0.01, 0.03),
                        "persistence": rng.uniform(0.001, 0.01),
                    }
                )
    frames = {"persistence": pd.DataFrame(rows)}
    same(paper_tables.render(spec("bell_table2"), frames), legacy.bell_table2(Frames(frames)))


def test_cohen_table_is_certified_accuracy_per_sigma_at_each_radius():
    rng = np.random.default_rng(0)
    rows = []
    for sigma in (0.5, 0.25):
        for seed in range(3):
            for radius in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75):
                rows.append(
                    {
                        "run": f"{sigma}-{seed}",
                        "sigma": sigma,
                        "model": "lenet",
                        "dataset": "mnist",
                        "radius": radius,
                        "certified_accuracy": rng.uniform(0, 1),
                        "n": 50,
                        "abstain_rate": rng.uniform(0, 0.2),
                    }
                )
    frame = pd.DataFrame(rows)
    table = paper_tables.render(spec("cohen_table"), {"certified_accuracy": frame}).set_index("sigma")
    assert list(table.index) == [0.25, 0.5]
    assert [c for c in table.columns if c.startswith("r=")] == ["r=0", "r=0.25", "r=0.5", "r=0.75", "r=1", "r=1.25", "r=1.5"]
    for sigma in (0.25, 0.5):
        for radius in (0.0, 0.75, 1.5):
            want = 100 * frame[(frame.sigma == sigma) & (frame.radius == radius)].certified_accuracy.mean()
            assert table.loc[sigma, f"r={radius:g}"] == pytest.approx(want, rel=1e-12)
        assert table.loc[sigma, "points"] == 150 and table.loc[sigma, "runs"] == 3


# ----------------------------------------------------------------------------------------------- a user's own table
OWN_TABLE = """
table:
  my_table:
    title: "error per defense, with the source's ordering"
    frame: curve
    where: {eps: 0.1}
    rows: {defense: defense}
    sort: {defense: source}
    source:
      prefix: paper_
      columns: [error]
      rows: {none: [60.0], fgsm_at: [20.0]}
    columns:
      error: {value: 100 * (1 - robust_accuracy), per_run: first, agg: mean}
      paper_error: {source: error}
      better_than_paper: {check: [error, "<", paper_error]}
      runs: {agg: runs}
"""


def test_a_users_own_table_block_renders_from_the_runs_config(tmp_path):
    sweep = tmp_path / "sweep"
    block = yaml.safe_load(OWN_TABLE)["table"]
    accs = {"fgsm_at": [0.7, 0.9], "none": [0.3, 0.5]}
    for defense, values in accs.items():
        for seed, acc in enumerate(values):
            make_run(
                sweep,
                f"{defense}-{seed}",
                choices={"defense": defense, "experiment": "mine"},
                seed=seed,
                csvs={"curve": curve_rows({0.0: 0.95, 0.1: acc})},
                config_extra={"table": block},
            )
    c = collect([sweep])
    t = c.tables["my_table"].set_index("defense")
    assert list(t.index) == ["none", "fgsm_at"]  # the source's order
    assert t.loc["none", "error"] == pytest.approx(60.0) and t.loc["fgsm_at", "error"] == pytest.approx(20.0)
    assert t.loc["none", "paper_error"] == 60.0 and t.loc["none", "runs"] == 2
    assert not t.loc["none", "better_than_paper"]
    assert (sweep / "collected" / "table_my_table.csv").is_file()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("frame"), "frame"),
        (lambda s: s.update(frame=3), "frame"),
        (lambda s: s["columns"].update(x={"agg": "mode"}), "agg"),
        (lambda s: s["columns"].update(x={"check": ["error", "<>", "runs"]}), "check"),
        (lambda s: s["columns"].update(x={"source": "nope"}), "nope"),
        (lambda s: s.update(sort={"defense": "sideways"}), "sort"),
        (lambda s: s["source"]["rows"].update(none=[1.0, 2.0]), "none"),
    ],
)
def test_a_bad_table_block_is_one_line_naming_what_is_wrong(edit, message):
    block = yaml.safe_load(OWN_TABLE)["table"]
    edit(block["my_table"])
    with pytest.raises(UserError) as err:
        paper_tables.validate_block(block, "experiment=mine")
    text = str(err.value)
    assert "\n" not in text and "my_table" in text and message in text


def test_every_shipped_table_block_is_valid():
    tables = paper_tables.shipped_tables()
    assert {"szegedy_table", "oberman_table", "oberman_error_vs_eps", "ibp_comparison", "bell_table2", "cohen_table"} <= set(tables)
    for name, block in tables.items():
        paper_tables.validate_block({name: block}, name)


def test_a_bad_table_block_stops_the_job_before_any_work(robust, tmp_path):
    proc = robust("attack", "dataset=digits", "eps=[0,0.1]", "+table={mine: {frame: curve, rows: {defense: defense}, columns: {x: {agg: mode}}}}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == [
        "error: experiment=custom: table mine: column x: agg must be one of mean, median, sum, first, count, finite_mean, "
        "not_finite, runs, got 'mode' (see robust_cli/results/paper_tables.py)"
    ]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("model.pt"))  # nothing trained


def test_check_lines_count_the_rows_where_an_ordering_holds():
    from robust_cli.results.collect import check_lines

    table = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [2.0, 1.0, math.nan]})
    table["a<b"] = [True, False, None]
    spec = {"columns": {"a": {}, "b": {}, "a<b": {"check": ["a", "<", "b"]}}}
    assert check_lines("t", table, spec) == ["t: a < b in 1 of 2 rows (1 without both values)"]

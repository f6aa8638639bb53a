"""`robust kernel` end to end: files, columns, exactness on the 2-D set, image outputs, user errors."""

import json

import pandas as pd
import pytest

from tests.conftest import latest_run

SMALL_2D = ("kernel", "dataset.n_train_per_class=150", "dataset.n_test_per_class=50", "kernel.steps=25", "kernel.n_agreement=60", "kernel.n_explain=2")


def test_gaussians2d_is_exact_and_writes_every_file(robust, tmp_path):
    robust(*SMALL_2D, check=True)
    run = latest_run(tmp_path, "kernel")
    for name in ("path_log.csv", "kernel_agreement.csv", "agreement.png", "kernel_values.csv", "kernel_map.png", "ood.csv", "top_influences.csv", "run.json"):
        assert (run / name).is_file(), name
    agreement = pd.read_csv(run / "kernel_agreement.csv")
    assert list(agreement.columns) == ["index", "class", "network_output", "kernel_output", "abs_error"]
    assert len(agreement) == 60 * 2 and agreement.abs_error.max() < 1e-6
    assert (agreement.abs_error - (agreement.network_output - agreement.kernel_output).abs()).abs().max() < 1e-15
    log = pd.read_csv(run / "path_log.csv")
    assert len(log) == 26 and log.loss.iloc[-1] < log.loss.iloc[0]
    values = pd.read_csv(run / "kernel_values.csv")
    assert len(values) == (2 + 2) * 300 and set(values.kind) == {"in", "ood"}
    ood = pd.read_csv(run / "ood.csv")
    assert (ood.kind == "in").sum() == 60 and set(ood[ood.kind == "ood"].probe) == {"(4, 15)", "(-6, -6)"}
    # the per-point values and the cheap kernel sums are two computations of the same number
    by_probe = values.groupby("probe").kernel_value.sum()
    for probe in ("(4, 15)", "(-6, -6)"):
        assert by_probe[probe] == pytest.approx(float(ood.set_index("probe").kernel_sum[probe]), rel=1e-8)
    top = pd.read_csv(run / "top_influences.csv")
    assert set(top.columns) >= {"probe", "rank", "train_index", "train_label", "contribution", "share_of_output_change"}
    assert (top.groupby("probe").contribution.apply(lambda c: c.abs().is_monotonic_decreasing)).all()
    headline = json.loads((run / "run.json").read_text())["headline"]
    assert headline["max_abs_error"] < 1e-6 and headline["kernel_test_accuracy"] == headline["test_accuracy"]


def test_digits_images_give_neighbours(robust, tmp_path):
    robust(
        "kernel",
        "dataset=digits",
        "data.n_train=100",
        "kernel.steps=6",
        "kernel.n_agreement=30",
        "kernel.n_explain=2",
        "kernel.n_ood=1",
        "kernel.top_k=3",
        check=True,
    )
    run = latest_run(tmp_path, "kernel")
    assert (run / "neighbours.png").is_file()
    agreement = pd.read_csv(run / "kernel_agreement.csv")
    assert len(agreement) == 30 * 10
    assert agreement.abs_error.max() < 1e-4 * agreement.network_output.abs().max()
    top = pd.read_csv(run / "top_influences.csv")
    assert len(top) == 3 * 3 and set(top.kind) == {"in", "ood"}


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("kernel.step_size=-1",), "kernel.step_size"),
        (("kernel.variant=nope",), "kernel.variant"),
        (("kernel.tolerance=0",), "kernel.tolerance"),
        (("kernel.steps=0",), "kernel.steps"),
        (("kernel.ood_points=[[1,2,3]]",), "kernel.ood_points"),
    ],
)
def test_user_errors_are_one_line(robust, args, fragment):
    proc = robust("kernel", *args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip() and "Warning" not in line and "warnings.warn" not in line]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr

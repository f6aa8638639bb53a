"""`robust boundary` end to end: files, columns, known answers on the orthant, determinism, user errors."""

import json

import pandas as pd
import pytest

from tests.conftest import latest_run

SMALL_NET = ["train.epochs=3", "data.n_train=600"]


def test_digits_natural_pairs(robust, tmp_path):
    robust("boundary", "n_points=3", "n_samples=80", *SMALL_NET, check=True)
    run = latest_run(tmp_path, "boundary")
    for name in ("boundary.csv", "singular_values.csv", "singular_values.png", "dimension_hist.png", "boundary_points.png", "run.json"):
        assert (run / name).is_file(), name
    table = pd.read_csv(run / "boundary.csv")
    assert len(table) == 3 * 2 and set(table.distribution) == {"gaussian", "flat_svd"}
    for column in (
        "index",
        "pair",
        "class_a",
        "class_b",
        "distance_from_x1",
        "n_degenerate",
        "normal_vs_gradient_cos",
        "normal_vs_attack_gradient_cos",
        "normal_vs_direction_cos",
        "incidence_angle_deg",
    ):
        assert column in table.columns, column
    assert (table.pair == "natural_natural").all() and (table.class_a != table.class_b).all()
    assert (table.distance_from_x1 > 0).all() and (table.distance_from_x1 < table.segment_length).all()
    assert table.normal_vs_gradient_cos.between(0, 1).all()
    spectra = pd.read_csv(run / "singular_values.csv")
    assert len(spectra) == 3 * 2 * min(80 - 1, 64)  # digits: n = 64 inputs
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and "planar_fraction_flat_svd" in record["headline"]


@pytest.mark.slow
def test_digits_adversarial_pairs(robust, tmp_path):
    robust("boundary", "pairs=natural_adversarial", "attack=fgsm", "eps=0.3", "n_points=2", "n_samples=80", "distributions=[flat_svd]", *SMALL_NET, check=True)
    table = pd.read_csv(latest_run(tmp_path, "boundary") / "boundary.csv")
    assert len(table) == 2 and (table.pair == "natural_adversarial").all()
    assert (table.x1_index == table.x2_index).all() and (table.class_a != table.class_b).all()


ORTHANT = ("boundary", "model=orthant", "k=4", "n_points=2", "n_samples=150")


def test_orthant_counts_k(robust, tmp_path):
    robust(*ORTHANT, check=True)
    table = pd.read_csv(latest_run(tmp_path, "boundary") / "boundary.csv")
    assert (table.pair == "centerline").all()
    assert (table[table.distribution == "flat_svd"].n_degenerate == 4).all()  # k faces meet at the apex


def orthant_with_defaults(robust, tmp_path, k, *extra):
    robust("boundary", "model=orthant", f"k={k}", *extra, f"hydra.run.dir=outputs/boundary/k{k}", check=True)
    table = pd.read_csv(tmp_path / f"outputs/boundary/k{k}/boundary.csv")
    record = json.loads((tmp_path / f"outputs/boundary/k{k}/run.json").read_text())
    return table[table.distribution == "flat_svd"].n_degenerate, record["headline"]["method"]


def test_orthant_known_answer_with_defaults(robust, tmp_path):
    # nothing but the object and k: method=auto picks the nearest-point projection for the cones
    counts, method = orthant_with_defaults(robust, tmp_path, 3, "n_points=10")
    assert method == "descent" and counts.median() == 3 and (counts == 3).mean() >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("k", range(1, 9))
def test_orthant_known_answer_with_all_defaults(robust, tmp_path, k):
    counts, _ = orthant_with_defaults(robust, tmp_path, k)  # 50 points, 500 samples each
    assert counts.median() == k


@pytest.mark.slow
def test_same_seed_same_csvs(robust, tmp_path):
    robust(*ORTHANT, check=True)
    first = latest_run(tmp_path, "boundary")
    robust(*ORTHANT, "hydra.run.dir=outputs/boundary/again/run", check=True)
    again = tmp_path / "outputs/boundary/again/run"
    assert (first / "boundary.csv").read_text() == (again / "boundary.csv").read_text()
    assert (first / "singular_values.csv").read_text() == (again / "singular_values.csv").read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["pairs=centerline"], "cone model"),
        (["pairs=natural_adversarial"], "needs an attack"),
        (["sigma=-1"], "sigma"),
        (["distributions=[uniform]"], "distributions"),
        (["model=orthant", "k=100"], "model.k"),
    ],
)
def test_user_errors_are_one_line(robust, args, fragment):
    proc = robust("boundary", *args)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr

"""Randomized smoothing (robust certify): Cohen et al.'s CERTIFY/PREDICT against closed forms and exact distances."""

import json
import math

import pandas as pd
import pytest
import torch
from conftest import latest_run
from scipy.stats import norm

from robust_cli.analysis.certify import ABSTAIN, certified_accuracy, certify, lower_confidence_bound, predict
from robust_cli.commands import build


class Linear(torch.nn.Module):
    """f(x) = sign(w.x + b) as two logits: the smoothed classifier is f itself, p_A = Phi(|w.x + b| / (sigma |w|))."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], dim=1)


def linear_points(n_points, dim, sigma, ratios, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    b = 0.3
    direction = w / w.norm()
    base = torch.randn(n_points, dim, generator=gen, dtype=torch.float64)
    base -= ((base @ w + b) / w.norm() ** 2)[:, None] * w  # onto the hyperplane
    sign = torch.where(torch.arange(n_points) % 2 == 0, 1.0, -1.0).double()
    distance = torch.as_tensor(ratios, dtype=torch.float64) * sigma
    return Linear(w, b), base + (sign * distance)[:, None] * direction, distance


def test_lower_confidence_bound_is_clopper_pearson():
    from scipy.stats import binomtest

    k, n, alpha = 9_870, 10_000, 0.001
    low = lower_confidence_bound(k, n, alpha)
    assert binomtest(k, n, low, alternative="greater").pvalue == pytest.approx(alpha, rel=1e-3)  # exact one-sided bound
    assert lower_confidence_bound(0, n, alpha) == 0.0


def test_certified_radius_of_a_linear_classifier_approaches_the_distance_from_below():
    sigma = 0.5
    ratios = torch.linspace(0.5, 3.0, 12)
    model, x, distance = linear_points(12, 10, sigma, ratios)
    cert = certify(model, x, sigma, n0=100, n=100_000, alpha=0.001, seed=1, batch_size=20_000)
    assert (cert.predicted != ABSTAIN).all()
    assert (cert.radius <= distance).all(), (cert.radius, distance)
    assert (cert.radius >= 0.95 * distance).all(), cert.radius / distance
    # p_A lower bound below the closed form, and close to it
    exact = torch.as_tensor(norm.cdf((distance / sigma).numpy()))
    assert (cert.p_a_lower <= exact).all() and (exact - cert.p_a_lower).max() < 0.01


def test_the_certificate_is_wrong_at_most_alpha_of_the_time():
    """Over 2000 linear-classifier points with few draws, the radius exceeds the true distance for <= alpha of them
    (with binomial slack); a two-sided or a swapped bound would fail this."""
    sigma, alpha = 1.0, 0.05
    gen = torch.Generator().manual_seed(3)
    ratios = 0.05 + 2.5 * torch.rand(2000, generator=gen, dtype=torch.float64)
    model, x, distance = linear_points(2000, 5, sigma, ratios, seed=3)
    cert = certify(model, x, sigma, n0=20, n=200, alpha=alpha, seed=5, batch_size=50_000)
    wrong = ((cert.radius > distance) | ((cert.predicted != ABSTAIN) & (cert.predicted != (model(x).argmax(1))))).sum()
    assert int(wrong) <= 2000 * alpha + 3 * math.sqrt(2000 * alpha * (1 - alpha))
    assert int((cert.predicted != ABSTAIN).sum()) > 1000  # it does certify most points


@pytest.mark.parametrize("k", [1, 3])
def test_certified_radius_never_exceeds_the_exact_distance_inside_the_orthant(k):
    """Inside a convex class region (the orthant) the smoothed region is inside the base one, so the certificate
    is at most the exact distance. Outside it is not: the smoothed class-0 region reaches into the orthant near its
    apex, and a point there can be certified farther than its base boundary (docs/certify.md says so)."""
    from robust_cli.analysis.geometry_objects import Orthant

    model = Orthant((6,), k=k).double()
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(400, 6, generator=gen, dtype=torch.float64) * 0.8 + 0.6
    inside = model(x).argmax(1) == 1
    x = x[inside][:60]
    cert = certify(model, x, 0.3, n0=100, n=10_000, alpha=0.001, seed=0)
    exact = model.signed_distance(x)
    certified = cert.predicted == 1
    assert certified.sum() > 20 and (cert.predicted != 0).all()
    assert (cert.radius[certified] <= exact[certified]).all()


def test_certify_is_reproducible_and_independent_of_the_batch_size():
    model, x, _ = linear_points(10, 8, 0.5, torch.linspace(0.1, 2, 10))
    a = certify(model, x, 0.5, n0=50, n=3000, seed=7, batch_size=64)
    b = certify(model, x, 0.5, n0=50, n=3000, seed=7, batch_size=5000)
    c = torch.cat([certify(model, x[i : i + 3], 0.5, n0=50, n=3000, seed=7, index_offset=i).radius for i in range(0, 10, 3)])
    assert torch.equal(a.counts, b.counts) and torch.allclose(a.radius, b.radius, equal_nan=True)
    assert torch.allclose(a.radius, c, equal_nan=True)
    assert not torch.equal(certify(model, x, 0.5, n0=50, n=3000, seed=8).counts, a.counts)


@pytest.mark.parametrize("antithetic", [True, False])
def test_persistence_rays_that_certify_drew_are_the_same_draws(antithetic):
    from robust_cli.analysis.persistence import _Sampler

    model, x, _ = linear_points(3, 30, 0.5, [1.0, 1.0, 1.0])
    mine = _Sampler(model, x, antithetic=antithetic, seed=4, index_offset=5)
    certify_draws = _Sampler(model, x, seed=4, index_offset=5)  # what certify's estimation sampler draws
    rays = torch.arange(64)
    index = mine.independent_index(rays)
    known = index >= 0
    assert int(known.sum()) == (32 if antithetic else 64)  # an antithetic pair's first ray is shared, not the negated one
    assert torch.equal(mine.rays(1, range(4))[rays[known]], certify_draws.rays(1, range(4))[index[known]])


def test_persistence_reuses_the_certify_draws_and_finds_the_same_sigma():
    from robust_cli.analysis.persistence import fast_persistence

    sigma = 0.5
    model, x, distance = linear_points(12, 40, sigma, torch.linspace(0.5, 3.0, 12))
    cert = certify(model, x, sigma, n0=50, n=10_000, seed=3, keep=8192)
    assert cert.draws.shape == (12, 8192)
    alone = fast_persistence(model, x, 0.7, seed=3)
    shared = fast_persistence(model, x, 0.7, seed=3, shared=[[(sigma, cert.draws[i])] for i in range(len(x))])
    exact = distance / norm.ppf(0.7)  # a half-space: stability Phi(d / sigma)
    assert shared.evaluations.sum() < 0.97 * alone.evaluations.sum()
    assert ((shared.sigma / alone.sigma - 1).abs() < 0.02).all()  # the same pool, the same order statistics
    assert ((shared.ci_low <= exact) & (exact <= shared.ci_high)).float().mean() >= 11 / 12
    # labels that lie about the draws would move the answer: the sharing is used, not ignored
    flipped = fast_persistence(model, x, 0.7, seed=3, shared=[[(sigma, 1 - cert.draws[i])] for i in range(len(x))])
    assert not torch.allclose(flipped.sigma, shared.sigma)


def test_predict_abstains_on_the_boundary_and_answers_far_from_it():
    model, x, _ = linear_points(40, 6, 0.5, [0.0] * 20 + [2.0] * 20)
    out = predict(model, x, 0.5, n=2000, alpha=0.001, seed=0)
    assert (out[:20] == ABSTAIN).sum() >= 18
    assert torch.equal(out[20:], model(x[20:]).argmax(1))


def test_certified_accuracy_counts_correct_and_certified_points():
    radius = torch.tensor([0.1, 0.6, float("nan"), 1.2])
    correct = torch.tensor([True, True, False, False])
    assert certified_accuracy(radius, correct, [0, 0.5, 1.0]) == [0.5, 0.25, 0.0]


def test_robust_certify_end_to_end(robust, tmp_path):
    proc = robust(
        "certify",
        "defense=gaussian_aug",
        "defense.sigma=0.25",
        "data.n_test=40",
        "n=1000",
        "sigma=[0.25,0.5]",
        "attack=deepfool",
        "persistence=true",
        "train.epochs=3",
        check=True,
    )
    run = latest_run(tmp_path, "certify")
    cert = pd.read_csv(run / "certify.csv")
    assert len(cert) == 80 and set(cert.sigma) == {0.25, 0.5}
    assert {"index", "label", "sigma", "predicted", "p_a_lower", "radius", "correct", "evaluations", "seconds"} <= set(cert.columns)
    assert (cert.evaluations == 1100).all()
    curve = pd.read_csv(run / "certified_accuracy.csv")
    for _, part in curve.groupby("sigma"):
        assert part.certified_accuracy.is_monotonic_decreasing and part.radius.iloc[0] == 0
    sandwich = pd.read_csv(run / "sandwich.csv")
    comparable = sandwich.dropna(subset=["holds"])
    assert len(comparable) > 40 and comparable.holds.astype(bool).all()
    assert (sandwich.persistence_radius - sandwich.persistence * norm.ppf(0.7)).abs().max() < 1e-9
    assert (sandwich.persistence_evaluations > 0).all()  # beyond the certify draws it reused
    record = json.loads((run / "run.json").read_text())
    assert record["headline"]["sandwich_violations"] == 0 and record["checks"][0]["status"] == "ok"
    assert (run / "certified_accuracy.png").is_file() and (run / "sandwich.png").is_file()
    assert "certified_accuracy@0.5 (sigma=0.25)" in proc.stdout


def test_certify_refuses_a_budgeted_attack_for_the_sandwich(tmp_path, monkeypatch, capsys):
    from test_reliability import refused_in_process

    assert "minimal L2 attack" in refused_in_process(("certify", "attack=pgd"), tmp_path, monkeypatch, capsys)
    assert "sigma must be numbers > 0" in refused_in_process(("certify", "sigma=[0]"), tmp_path, monkeypatch, capsys)


def test_a_sandwich_violation_outside_the_orthant_is_explained(tmp_path):
    """Outside the orthant near its apex, g keeps class 0 past f's boundary: the certified radius exceeds the
    attacked distance, and the check finds g still saying class 0 at the attacked point (explained, not a failure)."""
    from omegaconf import OmegaConf

    from robust_cli.analysis.geometry_objects import Orthant
    from robust_cli.commands.certify import _sandwich
    from robust_cli.core import store

    class Shifted(torch.nn.Module):  # the orthant's apex at the centre of the [0, 1] box
        def __init__(self):
            super().__init__()
            self.orthant = Orthant((6,), k=3)

        def forward(self, x):
            return self.orthant(x.double() - 0.5).float()

    model = Shifted()
    x = torch.tensor([[0.4, 0.8, 0.8, 0.5, 0.5, 0.5], [0.45, 0.7, 0.9, 0.5, 0.5, 0.5]])
    y = model(x).argmax(1)
    assert (y == 0).all()  # outside
    cfg = OmegaConf.create(
        {
            "attack": {"_target_": "robust_cli.attacks.DeepFool"},
            "seed": 0,
            "batch_size": 64,
            "n0": 100,
            "n": 20_000,
            "alpha": 0.001,
            "persistence": False,
            "gamma": 0.7,
            "choices": {},
            "model": {},
            "dataset": {},
            "defense": {},
        }
    )
    ctx = store.RunContext(tmp_path, torch.device("cpu"), {}, build.described(cfg))
    cert = certify(model, x, 0.3, n0=100, n=20_000)
    assert (cert.predicted == 0).all()
    unexplained = _sandwich(cfg, ctx, model, x, y, y, {0.3: {"predicted": cert.predicted, "radius": cert.radius}})
    rows = pd.read_csv(tmp_path / "sandwich.csv")
    assert (~rows.holds.astype(bool)).all() and rows.explained.astype(bool).all() and unexplained == 0
    assert ctx.record["checks"][0]["status"] == "ok" and "2 explained" in ctx.record["checks"][0]["detail"]

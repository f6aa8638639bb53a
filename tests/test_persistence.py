"""Stability and persistence against Bell's closed forms (Prop. 4.3), a second implementation and edge cases."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm

from robust_cli.analysis.analytic import Wedge, wedge_persistence, wedge_stability
from robust_cli.analysis.persistence import acceptance_counts, binomial_interval, bracketing, fast_persistence, persistence, stability, stability_curve
from robust_cli.core.errors import UserError

torch.set_num_threads(1)


def sd_for(k, gamma, d, rel):
    """Rays needed so the persistence estimate has relative standard deviation `rel` (delta method on Prop. 4.3)."""
    sigma = wedge_persistence(d, gamma, k)
    h = 1e-4 * sigma
    slope = -(wedge_stability(d, sigma + h, k) - wedge_stability(d, sigma - h, k)) / (2 * h) * sigma  # -ds/dlog sigma
    return int(2 ** math.ceil(math.log2(gamma * (1 - gamma) / (rel * slope) ** 2)))


# ----------------------------------------------------------------------------------------------- closed forms
def test_closed_forms_match_bell():
    assert wedge_persistence(1.0, 0.7, 1) == pytest.approx(1.91, abs=0.005)  # Bell, text after Prop. 4.3
    for k in range(1, 9):
        for gamma in (0.5, 0.7, 0.9):
            sigma = wedge_persistence(1.0, gamma, k)
            if math.isfinite(sigma):  # the persistence is where the stability formula equals gamma
                assert wedge_stability(1.0, sigma, k) == pytest.approx(gamma, rel=1e-9)
    assert wedge_persistence(1.0, 0.5, 1) == math.inf
    # persistence falls as the number of sheets (curvature) grows, at a fixed distance (Bell, Figure 8)
    assert all(wedge_persistence(1.0, 0.7, k) > wedge_persistence(1.0, 0.7, k + 1) for k in range(1, 8))


def test_wedge_classifier_and_point():
    w = Wedge((1, 28, 28), 10, k=3, d=0.25)
    p = w.point()
    assert p.shape == (1, 28, 28) and p.flatten()[:3].tolist() == [0.25] * 3 and p.flatten()[3:].abs().max() == 0
    x = torch.stack([p, -p, w.point(0.0)])
    logits = w(x)
    assert logits.shape == (3, 10) and logits.argmax(1).tolist() == [0, 1, 0]  # inside, outside, boundary (closed)
    assert w.margin(p[None]).item() == pytest.approx(0.25)  # distance to the nearest sheet
    with pytest.raises(UserError):
        Wedge((2,), 10, k=3)


# ----------------------------------------------------------------------------------------------- stability
def test_stability_matches_prop_4_3_and_class_frequencies():
    w = Wedge((1, 28, 28), 10, k=4, d=1.0)
    x = torch.stack([w.point(), w.point(0.5)])
    n = 4096
    for sigma in (0.5, 1.0, 2.0):
        r = stability(w, x, sigma, n_samples=n, seed=1)
        assert r.class_frequencies.shape == (2, 10)
        assert torch.allclose(r.class_frequencies.sum(1), torch.ones(2, dtype=torch.float64))
        assert r.class_frequencies[:, 2:].sum() == 0  # the wedge never predicts other classes
        for i, d in enumerate((1.0, 0.5)):
            exact = wedge_stability(d, sigma, 4)
            assert abs(r.stability[i].item() - exact) < 4 * math.sqrt(exact * (1 - exact) / n) + 1e-9
    assert r.evaluations.tolist() == [n + 1, n + 1]


def test_uniform_ball_matches_its_own_closed_form():
    # x' = x + sigma z with z uniform in the ball of radius sqrt(n + 2); (z_1 / R)^2 ~ Beta(1/2, (n + 1)/2)
    n, d, sigma, samples = 3, 1.0, 1.5, 20000
    w = Wedge((n,), 2, k=1)
    r = stability(w, w.point(d)[None], sigma, samples, distribution="uniform_ball", seed=2)
    exact = 1 - 0.5 * beta.sf(d**2 / (sigma**2 * (n + 2)), 0.5, (n + 1) / 2)
    gaussian = wedge_stability(d, sigma, 1)
    assert abs(r.stability.item() - exact) < 4 * math.sqrt(exact * (1 - exact) / samples)
    assert abs(exact - gaussian) > 8 * math.sqrt(exact * (1 - exact) / samples)  # and the two laws differ here


def test_clip_changes_the_answer_and_is_off_by_default():
    w = Wedge((1, 8, 8), 10, k=1, d=0.5, apex=0.0)
    x = w.point()[None]
    assert stability(w, x, 1.0, 2000, clip=True).stability.item() == 1.0  # clipped to [0, 1]: never below apex 0
    assert stability(w, x, 1.0, 2000).stability.item() < 0.8  # source's convention: unclipped, ~0.69


def test_common_random_numbers_make_the_curve_monotone():
    # inside a convex class every ray leaves it once: with the same draws at every sigma the curve cannot rise
    w = Wedge((1, 28, 28), 10, k=2, d=1.0)
    sigmas = np.linspace(0.2, 3.0, 30)
    freq, stab, labels = stability_curve(w, w.point()[None], sigmas, n_samples=200, seed=3)
    assert freq.shape == (1, 30, 10) and labels.tolist() == [0]
    assert (stab[0, 1:] <= stab[0, :-1]).all()
    fresh = torch.tensor([stability(w, w.point()[None], float(s), 200, seed=i).stability.item() for i, s in enumerate(sigmas)])
    assert (fresh[1:] > fresh[:-1]).any()  # independent draws per sigma do rise somewhere


def test_labels_callable_and_mode_restored():
    w = Wedge((4,), 3, k=2, d=1.0).train()
    x = w.point()[None]
    by_module = stability(w, x, 0.7, 500, seed=4)
    by_labels = stability(lambda b: w(b).argmax(1), x, 0.7, 500, seed=4, num_classes=3)
    assert torch.equal(by_module.class_frequencies, by_labels.class_frequencies)
    assert w.training  # evaluated in eval mode, given back in train mode


def test_binomial_intervals_match_scipy():
    for k, n in ((0, 10), (3, 10), (70, 100), (1000, 1000), (345, 1024)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = binomial_interval(k, n, 0.95, "wilson")
        assert (low.item(), high.item()) == pytest.approx((ci.low, ci.high), abs=1e-9)
        ci = binomtest(k, n).proportion_ci(confidence_level=0.99, method="exact")
        low, high = binomial_interval(k, n, 0.99, "clopper_pearson")
        assert (low.item(), high.item()) == pytest.approx((ci.low, ci.high), abs=1e-9)


# ----------------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("method", ["fast", "bracketing"])
def test_persistence_k1_gamma07_is_1_91(method):
    # Bell's example (k = 1, d = 1, gamma = 0.7); Prop. 4.3 is independent of n, so n = 4 keeps the draws cheap
    # (test_persistence_slow.py checks the whole k x gamma grid at n = 784)
    w = Wedge((4,), 2, k=1, d=1.0)
    n = sd_for(1, 0.7, 1.0, 0.008)
    opts = dict(n_samples=n, precision=0.001) if method == "bracketing" else dict(n_samples=n)
    r = persistence(w, w.point()[None], 0.7, method=method, seed=5, **opts)
    assert r.sigma.item() == pytest.approx(1.9069, rel=0.03)
    if method == "fast":
        assert r.ci_low.item() <= 1.9069 <= r.ci_high.item()


@pytest.mark.parametrize("k,gamma", [(8, 0.9), (4, 0.7)])
def test_persistence_at_n784_both_methods(k, gamma):
    w = Wedge((1, 28, 28), 10, k=k, d=1.0)
    exact = w.persistence(gamma)
    n = sd_for(k, gamma, 1.0, 0.01)
    fast = fast_persistence(w, w.point()[None], gamma, n_samples=n, seed=6)
    brk = bracketing(w, w.point()[None], gamma, n_samples=n, precision=0.002, seed=6)
    assert fast.sigma.item() == pytest.approx(exact, rel=0.03)
    assert brk.sigma.item() == pytest.approx(exact, rel=0.03)
    assert fast.evaluations.item() * 3 < brk.evaluations.item()


@pytest.mark.parametrize("method", ["fast", "bracketing"])
def test_infinite_persistence_stops_at_the_cap(method):
    # k = 1, gamma = 0.5: the stability tends to 0.5 from above as sigma grows; Algorithm 1 as printed never stops
    w = Wedge((4,), 2, k=1, d=1.0)
    r = persistence(w, w.point()[None], 0.5, method=method, n_samples=1000, sigma_cap=100.0, seed=7)
    assert r.sigma.item() == math.inf


@pytest.mark.parametrize("method", ["fast", "bracketing"])
def test_point_on_the_boundary_has_zero_persistence(method):
    w = Wedge((4,), 2, k=1, d=1.0)
    x = torch.stack([w.point(0.0), w.point(1.0)])  # on the boundary; inside
    r = persistence(w, x, 0.7, method=method, n_samples=512, sigma_floor=1e-3, seed=8)
    assert r.sigma[0].item() == 0.0 and r.sigma[1].item() > 1.0
    assert r.labels.tolist() == [0, 0]


def test_fast_is_per_point_and_deterministic():
    w = Wedge((6,), 2, k=3, d=1.0)
    x = torch.stack([w.point(0.5), w.point(1.0), w.point(2.0)])
    together = fast_persistence(w, x, 0.7, n_samples=2048, seed=9)
    alone = fast_persistence(w, x[1:2], 0.7, n_samples=2048, seed=9, index_offset=1, batch_size=100)
    assert together.sigma[1].item() == alone.sigma.item()
    assert together.evaluations[1].item() == alone.evaluations.item()
    assert torch.equal(together.sigma, fast_persistence(w, x, 0.7, n_samples=2048, seed=9).sigma)
    # persistence scales with the distance (the wedge is a cone): ratios 0.5 : 1 : 2
    assert (together.sigma / together.sigma[1]).tolist() == pytest.approx([0.5, 1.0, 2.0], rel=0.1)


def test_acceptance_counts_are_the_binomial_tests_quantiles():
    for n, gamma, alpha in ((128, 0.7, 0.01), (1000, 0.5, 0.0033), (9520, 0.9, 0.0033)):
        c_lo, c_hi = acceptance_counts(n, gamma, alpha)
        assert binom.cdf(c_lo, n, gamma) <= alpha / 2 < binom.cdf(c_lo + 1, n, gamma)  # the largest count rejected low
        assert binom.sf(c_hi - 1, n, gamma) <= alpha / 2 < binom.sf(c_hi - 2, n, gamma)  # the smallest rejected high


def test_fast_interval_covers_the_truth():
    # 200 points, each with its own draws, on a 3-sheet wedge: the 99 % interval is exact for one crossing per ray
    w = Wedge((5,), 2, k=3, d=1.0)
    exact = w.persistence(0.7)
    r = fast_persistence(w, w.point()[None].expand(200, -1), 0.7, seed=10)
    covered = ((r.ci_low <= exact) & (exact <= r.ci_high)).double().mean().item()
    rel = (r.sigma - exact) / exact
    assert covered >= 0.98, covered
    assert rel.abs().median().item() < 0.02 and abs(rel.mean().item()) < 0.005, (rel.abs().median().item(), rel.mean().item())
    half_width = (r.ci_high / r.ci_low).log() / 2  # the pool grows until rtol = 0.07, at most twice: nearly always reached
    assert (half_width <= math.log1p(0.07)).double().mean() >= 0.8 and half_width.max() < 2 * 0.07, half_width.tolist()


class Slab(torch.nn.Module):
    """Class 0 where |x_1| < 1: antithetic pairs (z, -z) leave it together, the opposite of a half-space."""

    def forward(self, x):
        m = 1.0 - x.flatten(1)[:, 0].abs()
        return torch.stack([m, -m], dim=1)


def test_antithetic_interval_uses_the_pairs_variance():
    # exact: P(|sigma z_1| < 1) = gamma at sigma = 1 / Phi^-1((1 + gamma) / 2); the pairs agree always, so their
    # count varies twice as much as independent draws' would: a binomial interval would under-cover
    gamma = 0.7
    exact = 1.0 / norm.ppf((1 + gamma) / 2)
    x = torch.zeros(200, 3)
    r = fast_persistence(Slab(), x, gamma, seed=12, antithetic=True)
    covered = ((r.ci_low <= exact) & (exact <= r.ci_high)).double().mean().item()
    assert covered >= 0.98, covered
    assert ((r.sigma - exact).abs() / exact).median().item() < 0.02


def test_infinite_persistence_is_one_test_at_the_cap():
    # k = 1, gamma = 0.5: the stability tends to 0.5 from above; +inf is decided by the count at the cap, not by
    # bisecting towards it, and a point whose stability falls below gamma is not sent there
    w = Wedge((784,), 2, k=1, d=1.0)
    r = fast_persistence(w, w.point()[None].expand(50, -1), 0.5, seed=13)
    assert torch.isinf(r.sigma).double().mean().item() >= 0.98
    assert r.evaluations.double().mean().item() < 1000, r.evaluations.double().mean().item()
    finite = fast_persistence(w, w.point()[None], 0.7, seed=13)
    assert finite.sigma.item() == pytest.approx(w.persistence(0.7), rel=0.05)


def test_bad_input_is_a_user_error():
    w = Wedge((4,), 2, k=1)
    x = w.point()[None]
    for bad in (dict(gamma=1.0), dict(gamma=0.0), dict(method="nope"), dict(n_samples=1), dict(distribution="laplace")):
        kwargs = dict(gamma=0.7, method="fast") | bad
        with pytest.raises(UserError):
            persistence(w, x, **kwargs)

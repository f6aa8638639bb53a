"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): the smoothed classifier g(x) = argmax_c P[f(x + sigma z) = c].

CERTIFY (their Algorithm 1, "certify"): guess the top class c_A from n0 draws, estimate its probability from n
fresh draws, take the one-sided (1 - alpha) Clopper-Pearson lower bound p_A; if p_A > 1/2, g is constant on the
L2 ball of radius R = sigma * Phi^-1(p_A) around x (their Theorem 1), else abstain.
PREDICT (Algorithm 2): the top two counts of n draws; answer c_A when the two-sided binomial test of n_A against
n_A + n_B at 1/2 rejects at level alpha, else abstain (the answer is then wrong with probability <= alpha).

p_A(sigma) is exactly Bell's (gamma, sigma)-stability of x's class when f(x) = c_A, so the draws come from the
same sampler as `persistence`: point i's rays are seeded by (seed, index, page), whatever the batch or batch size.
The selection draws use another seed than the estimation draws: Cohen's bound needs them independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import beta, binomtest, norm

from robust_cli.analysis.persistence import PAGE, _mix, _Sampler
from robust_cli.core.engine import BatchSize
from robust_cli.core.errors import UserError

ABSTAIN = -1


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion (Cohen's LowerConfBound)."""
    return float(beta.ppf(alpha, k, n - k + 1)) if k > 0 else 0.0


@dataclass
class Certificate:
    predicted: torch.Tensor  # (B,) c_A, or ABSTAIN (-1)
    p_a_lower: torch.Tensor  # (B,) lower confidence bound of P[f(x + sigma z) = c_A]
    radius: torch.Tensor  # (B,) certified L2 radius sigma * Phi^-1(p_a_lower); NaN where abstained
    counts: torch.Tensor  # (B, C) estimation counts per class
    evaluations: torch.Tensor  # (B,) inputs classified per point (n0 + n)
    draws: torch.Tensor | None = None  # (B, keep) labels of each point's first `keep` estimation draws (uint8 up to 256 classes)


def _check(sigma, n, alpha, batch_size):
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise UserError(f"sigma must be a number > 0, got {sigma!r}")
    if not (isinstance(n, int) and n >= 1):
        raise UserError(f"the number of draws must be an integer >= 1, got {n!r}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise UserError(f"alpha must be in (0, 1), got {alpha!r}; Cohen et al. use 0.001")
    if batch_size != "auto" and not isinstance(batch_size, BatchSize) and not (isinstance(batch_size, int) and batch_size >= 1):
        raise UserError(f"batch_size must be a positive integer or auto, got {batch_size!r}")


def _counts(sampler: _Sampler, sigma: float, n: int, num_classes: int, keep: int = 0):
    """(counts (B, C), labels of the first `keep` draws (B, keep), or None for keep=0) of each point's n draws."""
    pages = range(-(-n // PAGE))
    labels = sampler.classify([(i, sigma, pages, n) for i in range(len(sampler.x))])
    counts = torch.stack([torch.bincount(lab.cpu(), minlength=num_classes)[:num_classes] for lab in labels])
    if not keep:
        return counts, None
    small = torch.uint8 if num_classes <= 256 else torch.int16 if num_classes <= 32767 else torch.int32  # kept labels, small
    return counts, torch.stack([lab[:keep].cpu().to(small) for lab in labels]) if labels else torch.empty(0, keep, dtype=small)


def _num_classes(classifier, x) -> int:
    with torch.no_grad():
        out = classifier(x[:1])
    if out.dim() != 2:
        raise UserError("randomized smoothing needs a classifier that returns logits (B, C)")
    return int(out.shape[1])


def certify(
    classifier,
    x,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    *,
    seed: int = 0,
    index_offset: int | list[int] = 0,
    batch_size: int = 1024,
    keep: int = 0,
) -> Certificate:
    """Cohen's CERTIFY for every point of x (B, ...); deterministic for a seed, independent of the batch size.
    `keep`: also return the labels of the first `keep` estimation draws, which persistence can reuse (`shared`)."""
    _check(sigma, n, alpha, batch_size)
    _check(sigma, n0, alpha, batch_size)
    num_classes = _num_classes(classifier, x)
    common = {"seed": seed, "index_offset": index_offset, "batch_size": batch_size}
    estimate = _Sampler(classifier, x, **common)
    select = _Sampler(classifier, x, **{**common, "seed": _mix(seed, 0x5E1EC7)})  # independent of the estimation draws
    guess = _counts(select, float(sigma), n0, num_classes)[0].argmax(dim=1)
    counts, draws = _counts(estimate, float(sigma), n, num_classes, min(int(keep), n))
    k = counts.gather(1, guess.view(-1, 1)).squeeze(1)
    p_low = torch.tensor([lower_confidence_bound(int(ki), n, float(alpha)) for ki in k], dtype=torch.float64)
    certified = p_low > 0.5
    radius = torch.where(certified, float(sigma) * torch.as_tensor(norm.ppf(p_low.clamp(max=1.0).numpy())), torch.tensor(float("nan"), dtype=torch.float64))
    predicted = torch.where(certified, guess, torch.full_like(guess, ABSTAIN))
    return Certificate(predicted, p_low, radius, counts, select.evaluations + estimate.evaluations, draws)


def predict(
    classifier, x, sigma: float, n: int = 100_000, alpha: float = 0.001, *, seed: int = 0, index_offset: int | list[int] = 0, batch_size: int = 1024
) -> torch.Tensor:
    """Cohen's PREDICT: the smoothed class of every point, or ABSTAIN where the top two counts are too close."""
    _check(sigma, n, alpha, batch_size)
    num_classes = _num_classes(classifier, x)
    sampler = _Sampler(classifier, x, seed=_mix(seed, 0x9E7D1C7), index_offset=index_offset, batch_size=batch_size)
    counts = _counts(sampler, float(sigma), n, num_classes)[0]
    top2 = counts.topk(min(2, num_classes), dim=1)
    out = torch.full((len(x),), ABSTAIN, dtype=torch.long)
    for i in range(len(x)):
        n_a = int(top2.values[i, 0])
        n_b = int(top2.values[i, 1]) if num_classes > 1 else 0
        if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
            out[i] = int(top2.indices[i, 0])
    return out


def certified_accuracy(radius: torch.Tensor, correct: torch.Tensor, radii) -> list[float]:
    """Fraction of all points whose smoothed prediction is correct and certified at radius >= r, for each r."""
    r = torch.nan_to_num(radius.double(), nan=-math.inf)
    return [float((correct & (r >= float(level))).double().mean()) if len(r) else float("nan") for level in radii]

"""(gamma, sigma)-stability and gamma-persistence (Bell, Definitions 4.1-4.2, Algorithm 1).

stability(x, sigma)  = P[C(x') = C(x)] for x' ~ N(x, sigma^2 I), estimated by Monte Carlo.
persistence(x, gamma) = the largest sigma* with stability >= gamma for every sigma < sigma*.

Two estimators of the same persistence:
- `bracketing`: Bell's Algorithm 1 (RANGEFINDER from [0.5, 1.5] by halving/doubling, then bisection in sigma with
  fresh `n_samples` draws per evaluation until |stability - gamma| < precision or `max_steps`).
- `fast`: common random numbers (one sequence of standard-normal draws z per point, reused at every sigma, so the
  estimated stability curve is one fixed function of sigma and bisection on it is stable), bisection in log sigma,
  each sigma first judged on a few draws and given more only while a Wilson (or Clopper-Pearson) interval for its
  stability still contains gamma, all points of a batch searched together, a secant step on the common draws at
  the end. It returns sigma, an approximate confidence interval and the number of evaluations.

Both stop at `sigma_cap` and report +inf when the stability is not shown to fall below gamma there (k = 1,
gamma = 0.5 for the wedge: it tends to 0.5 from above forever), and at `sigma_floor` and report 0 when the point
is not shown stable even there (a point on the decision boundary).

Draws: ray j of point i is page j // PAGE of that point's sequence; each page has its own seed (seed, index, page),
so a point's draws do not depend on the batch it is in, the batch size, or the device's chunking. The source does
not clip the samples to the data box, so `clip=False` is the default.
An evaluation is one input classified (a sample, or the point itself); that is what `evaluations` counts.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, norm

from robust_cli.errors import UserError

PAGE = 32  # rays per seeded page of draws
DISTRIBUTIONS = ("gaussian", "uniform_ball")
INTERVALS = ("wilson", "clopper_pearson")
METHODS = ("bracketing", "fast")


# ----------------------------------------------------------------------------------------------- helpers
def binomial_interval(k, n, confidence: float = 0.99, method: str = "wilson"):
    """Two-sided interval for a binomial proportion from k successes in n trials (tensors or numbers)."""
    k = torch.as_tensor(k, dtype=torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64)
    alpha = 1.0 - confidence
    if method == "wilson":
        z = norm.ppf(1 - alpha / 2)
        p = k / n
        denom = 1 + z**2 / n
        center = (p + z**2 / (2 * n)) / denom
        half = z * torch.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
        return (center - half).clamp(min=0.0), (center + half).clamp(max=1.0)
    if method == "clopper_pearson":
        kn, nn_ = k.numpy(), n.numpy()
        low = np.where(kn > 0, beta.ppf(alpha / 2, kn, nn_ - kn + 1), 0.0)
        high = np.where(kn < nn_, beta.ppf(1 - alpha / 2, kn + 1, nn_ - kn), 1.0)
        return torch.as_tensor(np.nan_to_num(low), dtype=torch.float64), torch.as_tensor(np.nan_to_num(high, nan=1.0), dtype=torch.float64)
    raise UserError(f"interval must be one of {', '.join(INTERVALS)}, got {method!r}")


@contextlib.contextmanager
def _eval_mode(classifier):
    """Classify in eval mode (BatchNorm statistics, no dropout) and restore every submodule's own flag after."""
    modules = list(classifier.modules()) if isinstance(classifier, torch.nn.Module) else []
    flags = [(m, m.training) for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _labels(out: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) -> argmax; labels (B,) pass through."""
    return out.argmax(dim=1) if out.dim() == 2 else out.long()


def _check_common(gamma, clip, distribution, batch_size):
    if gamma is not None and not (isinstance(gamma, (int, float)) and 0 < gamma < 1):
        raise UserError(f"gamma must be in (0, 1), got {gamma!r}")
    if distribution not in DISTRIBUTIONS:
        raise UserError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")


class _Sampler:
    """Draws the per-point ray sequences and classifies x_i + sigma * z in batches; counts evaluations per point."""

    def __init__(self, classifier, x, *, clip=False, distribution="gaussian", antithetic=False, seed=0, index_offset=0, batch_size=1024):
        self.classifier, self.x = classifier, x
        self.shape, self.dim = tuple(x.shape[1:]), int(math.prod(x.shape[1:]))
        self.clip, self.distribution, self.antithetic = clip, distribution, antithetic
        self.seed, self.index_offset, self.batch_size = int(seed), int(index_offset), batch_size
        self.evaluations = torch.zeros(len(x), dtype=torch.int64)
        self.num_classes = None

    def _forward(self, batch):
        out = self.classifier(batch)
        if out.dim() == 2:
            self.num_classes = out.shape[1]
        return _labels(out)

    def center_labels(self) -> torch.Tensor:
        with torch.no_grad(), _eval_mode(self.classifier):
            labels = torch.cat([self._forward(self.x[i : i + self.batch_size]) for i in range(0, len(self.x), self.batch_size)])
        self.evaluations += 1
        return labels

    def _page(self, i: int, page: int) -> torch.Tensor:
        """PAGE standard draws for point i (unit per-coordinate variance), from their own seed."""
        state = np.random.SeedSequence([self.seed, self.index_offset + i, page]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator(device=self.x.device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        half = PAGE // 2 if self.antithetic else PAGE
        z = torch.randn((half, self.dim), generator=gen, device=self.x.device, dtype=self.x.dtype)
        if self.distribution == "uniform_ball":
            # uniform in the ball of radius sqrt(n + 2): E|z|^2 = n, so sigma z has per-coordinate variance sigma^2
            u = torch.rand((half, 1), generator=gen, device=self.x.device, dtype=self.x.dtype)
            z = z / z.norm(dim=1, keepdim=True) * math.sqrt(self.dim + 2) * u ** (1.0 / self.dim)
        if self.antithetic:  # pairs (z, -z): same marginal law, negatively correlated near a flat boundary
            z = torch.cat([z, -z])
        return z

    def rays(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Rays start..stop-1 of point i's sequence, shape (stop - start, dim)."""
        pages = range(start // PAGE, (stop - 1) // PAGE + 1)
        z = torch.cat([self._page(i, p) for p in pages])
        offset = pages[0] * PAGE
        return z[start - offset : stop - offset]

    def classify(self, requests):
        """requests: list of (i, sigma, start, stop). Returns one label tensor per request (rays start..stop-1)."""
        results = [[] for _ in requests]
        pending, sizes = [], 0
        owners = []

        def flush():
            nonlocal pending, sizes, owners
            if not pending:
                return
            labels = self._forward(torch.cat(pending))
            pos = 0
            for r, n in owners:
                results[r].append(labels[pos : pos + n])
                pos += n
            pending, sizes, owners = [], 0, []

        with torch.no_grad(), _eval_mode(self.classifier):
            for r, (i, sigma, start, stop) in enumerate(requests):
                self.evaluations[i] += stop - start
                for a in range(start, stop, self.batch_size):
                    b = min(stop, a + self.batch_size)
                    samples = self.x[i].reshape(1, -1) + float(sigma) * self.rays(i, a, b)
                    if self.clip:
                        samples = samples.clamp(0.0, 1.0)
                    pending.append(samples.view(-1, *self.shape))
                    owners.append((r, b - a))
                    sizes += b - a
                    if sizes >= self.batch_size:
                        flush()
            flush()
        return [torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64) for parts in results]


# ----------------------------------------------------------------------------------------------- stability
@dataclass
class Stability:
    stability: torch.Tensor  # (B,) fraction of samples classified as the point's own class C(x)
    class_frequencies: torch.Tensor  # (B, C) fraction of samples per class
    labels: torch.Tensor  # (B,) C(x)
    n_samples: int
    evaluations: torch.Tensor  # (B,) inputs classified per point


def stability(classifier, x, sigma, n_samples: int = 1000, *, clip: bool = False, distribution: str = "gaussian", antithetic: bool = False,
              seed: int = 0, index_offset: int = 0, batch_size: int = 1024, num_classes: int | None = None) -> Stability:
    """(gamma, sigma)-stability of each point of x (B, ...) under N(x, sigma^2 I) (Bell Def. 4.1), by Monte Carlo.

    `classifier` maps a batch to logits (B, C) or labels (B,). `sigma` is a number or one value per point.
    Calls with the same seed use the same draws at every sigma (common random numbers): a curve over sigma is then
    one smooth-looking function instead of independent noise (Figure 9). `distribution="uniform_ball"` samples the
    ball with the same per-coordinate variance sigma^2 (radius sigma sqrt(n + 2)).
    """
    _check_common(None, clip, distribution, batch_size)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise UserError(f"n_samples must be a positive integer, got {n_samples!r}")
    sigmas = torch.as_tensor(sigma, dtype=torch.float64).flatten().expand(len(x)) if torch.as_tensor(sigma).numel() == 1 else torch.as_tensor(sigma, dtype=torch.float64)
    if sigmas.shape != (len(x),) or (sigmas < 0).any():
        raise UserError(f"sigma must be a number >= 0 or one value >= 0 per point ({len(x)})")
    sampler = _Sampler(classifier, x, clip=clip, distribution=distribution, antithetic=antithetic, seed=seed, index_offset=index_offset, batch_size=batch_size)
    labels = sampler.center_labels()
    preds = sampler.classify([(i, float(sigmas[i]), 0, n_samples) for i in range(len(x))])
    classes = num_classes or sampler.num_classes or int(max(int(labels.max()), *(int(p.max()) for p in preds)) + 1)
    freq = torch.stack([torch.bincount(p.cpu(), minlength=classes)[:classes] for p in preds]).double() / n_samples
    own = freq.gather(1, labels.cpu().view(-1, 1)).squeeze(1)
    return Stability(own, freq, labels.cpu(), n_samples, sampler.evaluations)


def stability_curve(classifier, x, sigmas, n_samples: int = 1000, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class frequencies over a grid of sigma with common random numbers: (freq (B, S, C), stability (B, S), labels)."""
    results = [stability(classifier, x, float(s), n_samples, **options) for s in sigmas]
    classes = max(r.class_frequencies.shape[1] for r in results)
    freq = torch.stack([torch.nn.functional.pad(r.class_frequencies, (0, classes - r.class_frequencies.shape[1])) for r in results], dim=1)
    return freq, torch.stack([r.stability for r in results], dim=1), results[0].labels


# ----------------------------------------------------------------------------------------------- persistence
@dataclass
class Persistence:
    sigma: torch.Tensor  # (B,) gamma-persistence; +inf past sigma_cap, 0 below sigma_floor
    ci_low: torch.Tensor  # (B,) confidence interval for sigma (fast); NaN for bracketing (Algorithm 1 has none)
    ci_high: torch.Tensor
    evaluations: torch.Tensor  # (B,) inputs classified per point, the point itself included
    labels: torch.Tensor  # (B,) C(x)
    method: str


def _check_search(gamma, n_samples, sigma_floor, sigma_cap, confidence, interval):
    if not isinstance(n_samples, int) or n_samples < 2:
        raise UserError(f"n_samples must be an integer >= 2, got {n_samples!r}")
    if not 0 < sigma_floor < sigma_cap:
        raise UserError(f"need 0 < sigma_floor < sigma_cap, got {sigma_floor!r}, {sigma_cap!r}")
    if confidence is not None and not 0 < confidence < 1:
        raise UserError(f"confidence must be in (0, 1), got {confidence!r}")
    if interval not in INTERVALS:
        raise UserError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}")


def bracketing(classifier, x, gamma: float = 0.7, *, n_samples: int = 1000, max_steps: int = 20, precision: float = 0.01,
               sigma_min: float = 0.5, sigma_max: float = 1.5, sigma_floor: float = 1e-4, sigma_cap: float = 1e3,
               confidence: float | None = 0.99, interval: str = "wilson", clip: bool = False, distribution: str = "gaussian",
               seed: int = 0, index_offset: int = 0, batch_size: int = 1024) -> Persistence:
    """Bell's Bracketing Algorithm (Algorithm 1), one point after the other, fresh draws for every evaluation.

    As printed, except: (1) RANGEFINDER stops and reports +inf once sigma_max passes `sigma_cap`, 0 once sigma_min
    falls below `sigma_floor` (as printed it never terminates there); (2) with `confidence` set, a RANGEFINDER end
    counts as on the far side of gamma only when the estimate is there beyond sampling error (interval at that
    confidence excludes gamma): where the stability tends to gamma as sigma grows, the printed point comparison
    ends the doubling at a random sigma instead of the cap. confidence=None gives the printed comparisons.
    `max_steps` is not given in the source; 20 bisection steps halve [0.5, 1.5] below 1e-6.
    """
    _check_common(gamma, clip, distribution, batch_size)
    _check_search(gamma, n_samples, sigma_floor, sigma_cap, confidence, interval)
    if not 0 < precision < 1 or not isinstance(max_steps, int) or max_steps < 1:
        raise UserError(f"need 0 < precision < 1 and max_steps >= 1, got {precision!r}, {max_steps!r}")
    sampler = _Sampler(classifier, x, clip=clip, distribution=distribution, seed=seed, index_offset=index_offset, batch_size=batch_size)
    labels = sampler.center_labels()
    stride = -(-n_samples // PAGE) * PAGE  # every evaluation starts on a fresh page: independent draws
    result = torch.empty(len(x), dtype=torch.float64)

    for i in range(len(x)):
        calls = 0

        def compute_persistence(sigma):  # Bell's COMPUTE_PERSISTENCE: the Monte Carlo stability at sigma
            nonlocal calls
            start = calls * stride
            calls += 1
            pred = sampler.classify([(i, sigma, start, start + n_samples)])[0]
            return (pred.cpu() == labels[i].cpu()).double().mean().item()

        def unstable(s):  # estimate s says: below gamma
            if confidence is None:
                return s < gamma
            return binomial_interval(round(s * n_samples), n_samples, confidence, interval)[1].item() < gamma

        def stable(s):
            if confidence is None:
                return s >= gamma
            return binomial_interval(round(s * n_samples), n_samples, confidence, interval)[0].item() > gamma

        # RANGEFINDER
        lo, hi = sigma_min, sigma_max
        g1, g2 = compute_persistence(lo), compute_persistence(hi)
        answer = None
        while not stable(g1) or not unstable(g2):
            if not stable(g1):
                lo *= 0.5
                if lo < sigma_floor:
                    answer = 0.0
                    break
                g1 = compute_persistence(lo)
            if not unstable(g2):
                hi *= 2.0
                if hi > sigma_cap:
                    answer = math.inf
                    break
                g2 = compute_persistence(hi)
        if answer is None:  # BRACKETING: bisection in sigma
            count = 1
            while True:
                sigma = (lo + hi) / 2
                g = compute_persistence(sigma)
                if abs(g - gamma) < precision or count >= max_steps:
                    break
                if g > gamma:
                    lo = sigma
                else:
                    hi = sigma
                count += 1
            answer = sigma
        result[i] = answer
    nan = torch.full_like(result, math.nan)
    return Persistence(result, nan, nan.clone(), sampler.evaluations, labels.cpu(), "bracketing")



class _Search:
    """The fast search of one point. `lo`: a sigma confidently stable, `hi`: confidently unstable, `anchor`: one
    undecided with all rays; each kept as (sigma, bool tensor: ray i classified as C(x))."""

    def __init__(self, sigma_start, gamma, confidence, interval, rtol, sigma_floor, sigma_cap):
        self.sigma, self.n, self.inside = sigma_start, 0, []  # rays 0..n-1 classified at sigma
        self.gamma, self.confidence, self.interval = gamma, confidence, interval
        self.rtol, self.sigma_floor, self.sigma_cap = rtol, sigma_floor, sigma_cap
        self.lo = self.hi = self.anchor = None
        self.answer = self.ci = None

    def interval_of(self, inside):
        low, high = binomial_interval(int(inside.sum()), len(inside), self.confidence, self.interval)
        return low.item(), high.item()

    def decide(self, n_max) -> None:
        """Judge the current sigma on the rays so far; move on, or ask for more rays (return with n unchanged)."""
        inside = torch.cat(self.inside)
        low, high = self.interval_of(inside)
        if low > self.gamma:
            self.lo = (self.sigma, inside)
        elif high < self.gamma:
            self.hi = (self.sigma, inside)
        elif self.n < n_max:
            return  # undecided: double the rays at this sigma
        else:
            self.anchor = (self.sigma, inside)  # gamma is within sampling error of the stability here
        self.n, self.inside = 0, []
        if self.hi is None:  # nothing unstable yet: look further out
            self.sigma = 2.0 * max(self.sigma, self.lo[0] if self.lo else 0.0, self.anchor[0] if self.anchor else 0.0)
            if self.sigma > self.sigma_cap:
                self.answer, self.ci = math.inf, (self.lo[0] if self.lo else self.sigma_cap, math.inf)
        elif self.lo is None:  # nothing stable yet: look further in
            self.sigma = 0.5 * min(self.sigma, self.hi[0], self.anchor[0] if self.anchor else math.inf)
            if self.sigma < self.sigma_floor:
                self.answer, self.ci = 0.0, (0.0, self.hi[0])
        elif (self.anchor is not None and self.lo[0] < self.anchor[0] < self.hi[0]) or self.hi[0] / self.lo[0] <= 1 + self.rtol:
            self.finish()
        else:
            self.sigma = math.sqrt(self.lo[0] * self.hi[0])  # bisection in log sigma

    def finish(self) -> None:
        """Secant step in log sigma from the best-sampled point a towards the bracket end on gamma's side."""
        (lo, lo_in), (hi, hi_in) = self.lo, self.hi
        points = [self.lo, self.hi] + ([self.anchor] if self.anchor is not None and lo <= self.anchor[0] <= hi else [])
        a, a_in = max(points, key=lambda p: (len(p[1]), -abs(p[1].double().mean().item() - self.gamma)))
        s_a = a_in.double().mean().item()
        b, b_in = self.hi if s_a > self.gamma else self.lo  # the root lies between a and b
        m = min(len(a_in), len(b_in))  # common random numbers: the same rays 0..m-1 at a and at b
        slope = (a_in[:m].double().mean().item() - b_in[:m].double().mean().item()) / math.log(b / a) if b != a else 0.0
        low, high = self.interval_of(a_in)
        if slope > 0:  # -d stability / d log sigma
            step = lambda s: min(hi, max(lo, a * math.exp((s - self.gamma) / slope)))  # noqa: E731
            self.answer, self.ci = step(s_a), (step(low), step(high))
        else:  # flat or non-monotone between a and b: no secant; report the bracket
            self.answer, self.ci = (a if lo < a < hi else math.sqrt(lo * hi)), (lo, hi)


def fast_persistence(classifier, x, gamma: float = 0.7, *, n_samples: int = 1024, n_init: int = 32, confidence: float = 0.99,
                     interval: str = "wilson", rtol: float = 0.01, sigma_start: float = 1.0, sigma_floor: float = 1e-4,
                     sigma_cap: float = 1e3, antithetic: bool = False, refine_samples: int = 0, clip: bool = False,
                     distribution: str = "gaussian", seed: int = 0, index_offset: int = 0, batch_size: int = 1024) -> Persistence:
    """gamma-persistence of every point of x with common random numbers and confidence-interval early stopping.

    Per point, one ray sequence z_1, z_2, ... serves every sigma. At a sigma the first `n_init` rays are classified;
    while the `interval` at `confidence` for the stability still contains gamma the number of rays doubles (only the
    new rays are classified), up to `n_samples`. A confident "stable" sets the lower end `lo`, "unstable" the upper
    end `hi`; an open side is searched by doubling/halving sigma, a bracketed one by bisection in log sigma. The
    search ends when a sigma stays undecided with all `n_samples` rays (gamma is within sampling error of its
    stability) or when hi/lo <= 1 + rtol. The answer is a secant step in log sigma from the best-sampled sigma
    towards the bracket end on gamma's side, the slope taken on the rays both share (with common random numbers
    only rays that change class between the two sigmas count, so the slope is precise), clipped to [lo, hi]; the
    interval maps the stability interval at that sigma through the same slope (approximate).
    `refine_samples` > 0 classifies that many rays at the answer and repeats the secant step from there.
    All points advance together: each round classifies the requests of every unfinished point in shared batches.
    """
    _check_common(gamma, clip, distribution, batch_size)
    _check_search(gamma, n_samples, sigma_floor, sigma_cap, confidence, interval)
    if not isinstance(n_init, int) or n_init < 1 or n_init > n_samples:
        raise UserError(f"n_init must be an integer in 1..n_samples ({n_samples}), got {n_init!r}")
    if not rtol > 0 or not sigma_floor <= sigma_start <= sigma_cap:
        raise UserError(f"need rtol > 0 and sigma_floor <= sigma_start <= sigma_cap, got {rtol!r}, {sigma_start!r}")
    sampler = _Sampler(classifier, x, clip=clip, distribution=distribution, antithetic=antithetic, seed=seed, index_offset=index_offset, batch_size=batch_size)
    labels = sampler.center_labels().cpu()
    searches = [_Search(float(sigma_start), gamma, confidence, interval, rtol, sigma_floor, sigma_cap) for _ in range(len(x))]

    while active := [i for i, s in enumerate(searches) if s.answer is None]:
        requests = [(i, searches[i].sigma, searches[i].n, min(max(2 * searches[i].n, n_init), n_samples)) for i in active]
        for (i, _, _, stop), pred in zip(requests, sampler.classify(requests)):
            searches[i].inside.append(pred.cpu() == labels[i])
            searches[i].n = stop
        for i in active:
            searches[i].decide(n_samples)

    if refine_samples > 0:
        refine = [i for i, s in enumerate(searches) if 0 < s.answer < math.inf]
        requests = [(i, searches[i].answer, 0, refine_samples) for i in refine]
        for (i, sigma, _, _), pred in zip(requests, sampler.classify(requests)):
            searches[i].anchor = (sigma, pred.cpu() == labels[i])
            searches[i].finish()

    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return Persistence(as_tensor([s.answer for s in searches]), as_tensor([s.ci[0] for s in searches]),
                       as_tensor([s.ci[1] for s in searches]), sampler.evaluations, labels, "fast")


def persistence(classifier, x, gamma: float = 0.7, method: str = "fast", **options) -> Persistence:
    """gamma-persistence of each point of x by `method` ("fast" or "bracketing"); options go to that estimator."""
    if method == "fast":
        return fast_persistence(classifier, x, gamma, **options)
    if method == "bracketing":
        return bracketing(classifier, x, gamma, **options)
    raise UserError(f"persistence method must be one of {', '.join(METHODS)}, got {method!r}")

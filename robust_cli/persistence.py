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

Draws: ray j of point i comes from page j // PAGE of that point's sequence; each page has its own seed (seed, index,
page), index = index_offset + position (or the given per-point indices), so a point's draws do not depend on the
batch it is in or the batch size, and two points given the same index share their draws. The source does
not clip the samples to the data box, so `clip=False` is the default.
An evaluation is one input classified (a sample, or the point itself); that is what `evaluations` counts.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from scipy.stats import beta, norm

from robust_cli.engine import AUTO_SAMPLE_START, BatchSize, chunked
from robust_cli.errors import UserError

PAGE = 16  # rays per seeded page of draws
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


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser per value): distinct inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


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
    if not isinstance(batch_size, BatchSize) and batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"batch_size must be a positive integer or auto, got {batch_size!r}")


class _Sampler:
    """Draws the per-point ray sequences and classifies x_i + sigma * z in batches; counts evaluations per point."""

    def __init__(self, classifier, x, *, clip=False, distribution="gaussian", antithetic=False, seed=0, index_offset=0, batch_size=1024):
        self.classifier, self.x = classifier, x
        self.shape, self.dim = tuple(x.shape[1:]), int(math.prod(x.shape[1:]))
        self.clip, self.distribution, self.antithetic = clip, distribution, antithetic
        self.seed = int(seed)
        # an integer or auto (halve on out-of-memory): only the grouping of model calls, never the draws, depends on it
        self.batch = batch_size if isinstance(batch_size, BatchSize) else BatchSize(batch_size, "batch_size", x.device, start=AUTO_SAMPLE_START)
        # seed index of each point: index_offset + position, or the given per-point indices
        self.indices = [int(index_offset) + i for i in range(len(x))] if isinstance(index_offset, int) else [int(i) for i in index_offset]
        if len(self.indices) != len(x):
            raise UserError(f"index_offset must be an integer or one index per point ({len(x)}), got {len(self.indices)}")
        self.evaluations = torch.zeros(len(x), dtype=torch.int64)
        self.num_classes = None

    @property
    def batch_size(self) -> int:
        return self.batch.size

    def _forward(self, batch):
        def labels(part):
            out = self.classifier(part)
            if out.dim() == 2:
                self.num_classes = out.shape[1]
            return _labels(out)

        return chunked(labels, batch, self.batch)

    def center_labels(self) -> torch.Tensor:
        with torch.no_grad(), _eval_mode(self.classifier):
            labels = torch.cat([self._forward(self.x[i : i + self.batch_size]) for i in range(0, len(self.x), self.batch_size)])
        self.evaluations += 1
        return labels

    def _page(self, i: int, page: int) -> torch.Tensor:
        """PAGE standard draws for point i (unit per-coordinate variance), from their own seed."""
        gen = torch.Generator(device=self.x.device).manual_seed(_mix(self.seed, self.indices[i], page))
        half = PAGE // 2 if self.antithetic else PAGE
        z = torch.randn((half, self.dim), generator=gen, device=self.x.device, dtype=self.x.dtype)
        if self.distribution == "uniform_ball":
            # uniform in the ball of radius sqrt(n + 2): E|z|^2 = n, so sigma z has per-coordinate variance sigma^2
            u = torch.rand((half, 1), generator=gen, device=self.x.device, dtype=self.x.dtype)
            z = z / z.norm(dim=1, keepdim=True) * math.sqrt(self.dim + 2) * u ** (1.0 / self.dim)
        if self.antithetic:  # pairs (z, -z), interleaved: same marginal law, negatively correlated near a flat boundary
            z = torch.stack([z, -z], dim=1).reshape(PAGE, self.dim)
        return z

    def rays(self, i: int, pages) -> torch.Tensor:
        """The rays of the given pages of point i's sequence, shape (PAGE * len(pages), dim)."""
        return torch.cat([self._page(i, p) for p in pages])

    def classify(self, requests):
        """requests: list of (i, sigma, pages, n): point i at sigma on the rays of `pages`, the first n of them.
        Returns one label tensor of length n per request, classified in shared batches of about batch_size."""
        results = [[] for _ in requests]
        pending, owners, size = [], [], 0

        def flush():
            nonlocal pending, owners, size
            if pending:
                labels, pos = self._forward(torch.cat(pending)), 0
                for r, n in owners:
                    results[r].append(labels[pos : pos + n])
                    pos += n
            pending, owners, size = [], [], 0

        per_call = max(1, self.batch_size // PAGE)
        with torch.no_grad(), _eval_mode(self.classifier):
            for r, (i, sigma, pages, n) in enumerate(requests):
                self.evaluations[i] += n
                pages = list(pages)
                for c in range(0, len(pages), per_call):
                    take = min(PAGE * len(pages[c : c + per_call]), n - PAGE * c)
                    if take <= 0:
                        break
                    samples = self.x[i].reshape(1, -1) + float(sigma) * self.rays(i, pages[c : c + per_call])[:take]
                    if self.clip:
                        samples = samples.clamp(0.0, 1.0)
                    pending.append(samples.view(-1, *self.shape))
                    owners.append((r, take))
                    size += take
                    if size >= self.batch_size:
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
              seed: int = 0, index_offset: int | list[int] = 0, batch_size: int = 1024, num_classes: int | None = None) -> Stability:
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
    pages = range(-(-n_samples // PAGE))  # the same draws at every sigma
    preds = sampler.classify([(i, float(sigmas[i]), pages, n_samples) for i in range(len(x))])
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
               seed: int = 0, index_offset: int | list[int] = 0, batch_size: int = 1024) -> Persistence:
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
    stride = -(-n_samples // PAGE)  # pages per evaluation; every evaluation takes fresh pages: independent draws
    result = torch.empty(len(x), dtype=torch.float64)

    for i in range(len(x)):
        calls = 0

        def compute_persistence(sigma):  # Bell's COMPUTE_PERSISTENCE: the Monte Carlo stability at sigma
            nonlocal calls
            pages = range(calls * stride, (calls + 1) * stride)
            calls += 1
            pred = sampler.classify([(i, sigma, pages, n_samples)])[0]
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



_probit = NormalDist().inv_cdf  # scalar inverse normal CDF (scipy's is slow per call)


def _fraction(point, pages=None) -> float:
    """Stability at a visited sigma: fraction of its rays (or of those on `pages`) classified as C(x)."""
    chunks = [point[1][p] for p in (point[1] if pages is None else pages)]
    return torch.cat(chunks).double().mean().item()


class _Search:
    """The fast search of one point.

    Draws: a pool of `pool` pages (n_samples rays) shared by every sigma. Each sigma visits the pool in its own
    seeded page order, so the few rays that decide a sigma far from the root differ from sigma to sigma (an
    unlucky first page cannot bias every decision the same way) while two sigmas evaluated on the same pages see
    the same draws. Visited sigmas are kept as (sigma, {page: bool tensor, ray classified as C(x)}):
    `lo` confidently stable, `hi` confidently unstable, `anchor` undecided on the whole pool.
    """

    def __init__(self, sigma_start, pool, init, order_seed, gamma, confidence, interval, rtol, sigma_floor, sigma_cap):
        self.sigma, self.pool, self.init, self.order_seed = sigma_start, pool, init, order_seed
        self.gamma, self.confidence, self.interval = gamma, confidence, interval
        self.rtol, self.sigma_floor, self.sigma_cap = rtol, sigma_floor, sigma_cap
        self.lo = self.hi = self.anchor = None
        self.answer = self.ci = None
        self.visited = []  # every judged sigma: the secant partner is chosen among them
        self._new_sigma()

    def _new_sigma(self):
        self.inside = {}
        gen = torch.Generator().manual_seed(_mix(*self.order_seed, len(self.visited)))
        self.order = torch.randperm(self.pool, generator=gen).tolist()

    def next_pages(self):
        """The next pages at this sigma: sizes run pool/2^k, ..., pool/4, pool/2, pool (rounded up, the first at
        least `init`), so the last doubling lands exactly on the whole pool."""
        done, size = len(self.inside), self.pool
        while size > 1 and math.ceil(size / 2) > done and math.ceil(size / 2) >= self.init:
            size = math.ceil(size / 2)
        return self.order[done:size]

    def record(self, pages, inside):
        for page, chunk in zip(pages, inside.split(PAGE)):
            self.inside[page] = chunk

    def counts(self):
        return sum(int(v.sum()) for v in self.inside.values()), sum(len(v) for v in self.inside.values())

    def decide(self, low, high) -> None:
        """Judge the current sigma by the interval (low, high) for its stability; move on, or return with the
        sigma unchanged to ask for more pages."""
        point = (self.sigma, self.inside)
        if low > self.gamma:
            self.lo = point
        elif high < self.gamma:
            self.hi = point
        elif len(self.inside) < self.pool:
            return  # undecided: double the rays at this sigma
        else:
            self.anchor = point  # gamma is within sampling error of the stability here
        self.visited.append(point)
        self._new_sigma()
        if self.hi is None:  # nothing unstable yet: look further out
            self.sigma = 2.0 * max(point[0], self.lo[0] if self.lo else 0.0, self.anchor[0] if self.anchor else 0.0)
            if self.sigma > self.sigma_cap:
                self.answer, self.ci = math.inf, (self.lo[0] if self.lo else self.sigma_cap, math.inf)
        elif self.lo is None:  # nothing stable yet: look further in
            self.sigma = 0.5 * min(point[0], self.hi[0], self.anchor[0] if self.anchor else math.inf)
            if self.sigma < self.sigma_floor:
                self.answer, self.ci = 0.0, (0.0, self.hi[0])
        elif self._ready() or self.hi[0] / self.lo[0] <= 1 + self.rtol:
            self.finish()
        else:
            self.sigma = self._between()

    def _between(self) -> float:
        """Next sigma inside (lo, hi): where the line through (log sigma, probit(stability)) of the two ends meets
        probit(gamma) (exact for a probit-shaped curve; plain bisection in log sigma when the curve is not
        resolved), kept at least a quarter of the bracket from either end so the bracket always shrinks."""
        (lo, lo_in), (hi, hi_in) = self.lo, self.hi
        clip = lambda p, d: min(max(_fraction(p), 0.5 / d), 1 - 0.5 / d)  # noqa: E731
        z_lo = _probit(clip(self.lo, sum(len(v) for v in lo_in.values())))
        z_hi = _probit(clip(self.hi, sum(len(v) for v in hi_in.values())))
        t = (z_lo - _probit(self.gamma)) / (z_lo - z_hi) if z_lo > z_hi else 0.5
        return lo * (hi / lo) ** min(max(t, 0.25), 0.75)

    def _secant_points(self):
        """a: the best-sampled sigma in [lo, hi] (most draws, then stability nearest gamma); b: the nearest visited
        sigma whose stability lies on gamma's other side and shares rays with a (None if none); m: rays shared."""
        lo, hi = self.lo[0], self.hi[0]
        inside = [p for p in self.visited if lo <= p[0] <= hi]
        a = max(inside, key=lambda p: (len(p[1]), -abs(_fraction(p) - self.gamma)))
        side = _fraction(a) > self.gamma
        beyond = [p for p in inside if p[0] != a[0] and (p[0] > a[0]) == side and any(q in a[1] for q in p[1])]
        b = min(beyond, key=lambda p: (abs(math.log(p[0] / a[0])), -len(p[1]))) if beyond else None
        return a, b, (PAGE * sum(q in a[1] for q in b[1]) if b else 0)

    def _ready(self) -> bool:
        """Stop bisecting once a sigma in the bracket has the whole pool and either is undecided (gamma within its
        sampling error) or has a secant partner sharing at least a quarter of the pool (a precise slope); another
        bisection step would cost a whole pool again."""
        a, b, m = self._secant_points()
        if len(a[1]) < self.pool:
            return False
        return a is self.anchor or 4 * m >= PAGE * self.pool

    def finish(self) -> None:
        """Secant step in log sigma from a towards b (see _secant_points) on the probit scale (a sigmoid-shaped
        stability curve is nearly straight there), the slope taken on the rays a and b share (common random
        numbers: only rays that change class count); clipped to the bracket [lo, hi]."""
        lo, hi = self.lo[0], self.hi[0]
        a, b, m = self._secant_points()
        s_a = _fraction(a)
        slope = 0.0  # -d probit(stability) / d log sigma
        if b is not None:
            common = [page for page in b[1] if page in a[1]]
            probit = lambda f: _probit(min(max(f, 0.5 / m), 1 - 0.5 / m))  # noqa: E731
            slope = (probit(_fraction(a, common)) - probit(_fraction(b, common))) / math.log(b[0] / a[0])
        k, n = sum(int(v.sum()) for v in a[1].values()), sum(len(v) for v in a[1].values())
        low, high = (v.item() for v in binomial_interval(k, n, self.confidence, self.interval))
        if slope > 0:
            z_gamma = _probit(self.gamma)
            step = lambda f: min(hi, max(lo, a[0] * math.exp((_probit(min(max(f, 0.5 / n), 1 - 0.5 / n)) - z_gamma) / slope)))  # noqa: E731
            self.answer, self.ci = step(s_a), (step(low), step(high))
        else:  # flat or rising between a and b: no secant; report the bracket
            self.answer, self.ci = (a[0] if lo < a[0] < hi else math.sqrt(lo * hi)), (lo, hi)


def fast_persistence(classifier, x, gamma: float = 0.7, *, n_samples: int = 1024, n_init: int = 16, confidence: float = 0.99,
                     interval: str = "wilson", rtol: float = 0.01, sigma_start: float = 1.0, sigma_floor: float = 1e-4,
                     sigma_cap: float = 1e3, antithetic: bool = True, refine_samples: int = 0, clip: bool = False,
                     distribution: str = "gaussian", seed: int = 0, index_offset: int | list[int] = 0, batch_size: int = 1024) -> Persistence:
    """gamma-persistence of every point of x with common random numbers and confidence-interval early stopping.

    Per point, one pool of `n_samples` draws (rounded up to pages of 32) serves every sigma. A sigma is first
    judged on `n_init` of them; while the `interval` at `confidence` for its stability still contains gamma the
    number of draws doubles (only the new ones are classified), up to the whole pool. A confident "stable" sets
    the lower end `lo` of the bracket, "unstable" the upper end `hi`; an open side is searched by doubling or
    halving sigma, a bracketed one by bisection in log sigma. The search ends when a sigma stays undecided on the
    whole pool (gamma is within sampling error of its stability) or when hi/lo <= 1 + rtol. The answer is a secant
    step in log sigma from the best-sampled sigma towards the bracket end on gamma's side, clipped to [lo, hi];
    the interval maps the stability interval at that sigma through the same slope (approximate).
    `antithetic` draws come in pairs (z, -z) (unbiased; about 30 % less variance than independent draws on MNIST
    nets). `refine_samples` > 0 classifies that many draws (the pool first) at the answer and repeats the secant
    step from there. All points advance together: each round classifies the requests of every unfinished point
    in shared batches.
    """
    _check_common(gamma, clip, distribution, batch_size)
    _check_search(gamma, n_samples, sigma_floor, sigma_cap, confidence, interval)
    if not isinstance(n_init, int) or n_init < 1 or n_init > n_samples:
        raise UserError(f"n_init must be an integer in 1..n_samples ({n_samples}), got {n_init!r}")
    if not rtol > 0 or not sigma_floor <= sigma_start <= sigma_cap:
        raise UserError(f"need rtol > 0 and sigma_floor <= sigma_start <= sigma_cap, got {rtol!r}, {sigma_start!r}")
    sampler = _Sampler(classifier, x, clip=clip, distribution=distribution, antithetic=antithetic, seed=seed, index_offset=index_offset, batch_size=batch_size)
    labels = sampler.center_labels().cpu()
    pool, init = -(-n_samples // PAGE), -(-n_init // PAGE)
    searches = [_Search(float(sigma_start), pool, init, (int(seed), index, 1), gamma, confidence, interval, rtol, sigma_floor, sigma_cap)
                for index in sampler.indices]

    while active := [i for i, s in enumerate(searches) if s.answer is None]:
        requests = [(i, searches[i].sigma, searches[i].next_pages(), None) for i in active]
        requests = [(i, sigma, pages, PAGE * len(pages)) for i, sigma, pages, _ in requests]
        for (i, _, pages, _), pred in zip(requests, sampler.classify(requests)):
            searches[i].record(pages, pred.cpu() == labels[i])
        counts = torch.tensor([searches[i].counts() for i in active])
        lows, highs = binomial_interval(counts[:, 0], counts[:, 1], confidence, interval)  # one call for all points
        for i, low, high in zip(active, lows.tolist(), highs.tolist()):
            searches[i].decide(low, high)

    if refine_samples > 0:
        refine = [i for i, s in enumerate(searches) if 0 < s.answer < math.inf]
        pages = list(range(-(-refine_samples // PAGE)))  # the pool's pages first: common with every visited sigma
        requests = [(i, searches[i].answer, pages, PAGE * len(pages)) for i in refine]
        for (i, sigma, _, _), pred in zip(requests, sampler.classify(requests)):
            s = searches[i]
            s.visited.append((sigma, dict(zip(pages, (pred.cpu() == labels[i]).split(PAGE)))))
            s.finish()

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

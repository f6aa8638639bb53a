"""(gamma, sigma)-stability and gamma-persistence (Bell, Definitions 4.1-4.2, Algorithm 1).

stability(x, sigma)  = P[C(x') = C(x)] for x' ~ N(x, sigma^2 I), estimated by Monte Carlo.
persistence(x, gamma) = the largest sigma* with stability >= gamma for every sigma < sigma*.

Two estimators of the same persistence:
- `bracketing`: Bell's Algorithm 1 (RANGEFINDER from [0.5, 1.5] by halving/doubling, then bisection in sigma with
  fresh `n_samples` draws per evaluation until |stability - gamma| < precision or `max_steps`).
- `fast`: common random numbers (one pool of standard-normal rays z per point, reused at every sigma), where the
  persistence is an order statistic of the rays' crossing radii: each ray is classified only at the sigmas where
  it can still change the answer, the pool grows until an exact confidence interval for sigma itself is within
  1 +- rtol (at most three pools, Bonferroni over them), and all points of a batch are searched together. It
  returns sigma, the interval and the number of evaluations (see `_Search`).

Both report +inf when the stability at `sigma_cap` is not shown below gamma (k = 1, gamma = 0.5 for the wedge:
it tends to 0.5 from above forever) and 0 when it is not shown above gamma at `sigma_floor` (a point on the
decision boundary); `fast` decides +inf by one test at the cap, Algorithm 1 by doubling sigma up to it.

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

import numpy as np
import torch
from scipy.stats import beta, binom, norm

from robust_cli.core.engine import AUTO_SAMPLE_START, BatchSize, chunked
from robust_cli.core.errors import UserError

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
        self._prefix_alike = None  # see independent_index

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

    def independent_index(self, rays: torch.Tensor) -> torch.Tensor:
        """For rays of this sequence, the index of the same draw in the independent (non-antithetic) gaussian
        sequence of the same seed and index, as certify draws it; -1 where there is none (the negated half of an
        antithetic pair). A pair's first ray is row k of its page's draw of PAGE/2 rows; it is row k of the page's
        draw of PAGE rows only if the generator fills a prefix alike, which is checked once, not assumed."""
        if self.distribution != "gaussian" or self.clip:
            return torch.full_like(rays, -1)
        if not self.antithetic:
            return rays.clone()
        if self._prefix_alike is None:
            gen = torch.Generator(device=self.x.device)
            short = torch.randn((PAGE // 2, self.dim), generator=gen.manual_seed(1), device=self.x.device, dtype=self.x.dtype)
            full = torch.randn((PAGE, self.dim), generator=gen.manual_seed(1), device=self.x.device, dtype=self.x.dtype)
            self._prefix_alike = bool(torch.equal(short, full[: PAGE // 2]))
        q = rays % PAGE
        same = (rays // PAGE) * PAGE + q // 2
        return torch.where((q % 2 == 0) & self._prefix_alike, same, torch.full_like(rays, -1))

    def rays(self, i: int, pages) -> torch.Tensor:
        """The rays of the given pages of point i's sequence, shape (PAGE * len(pages), dim)."""
        return torch.cat([self._page(i, p) for p in pages])

    def classify(self, requests):
        """requests: list of (i, sigma, pages, n): point i at sigma on the rays of `pages`, the first n of them.
        Returns one label tensor of length n per request (see classify_rays)."""

        def rays(pages, n):
            return (torch.tensor(list(pages), dtype=torch.long).view(-1, 1) * PAGE + torch.arange(PAGE)).flatten()[:n]

        return self.classify_rays([(i, sigma, rays(pages, n)) for i, sigma, pages, n in requests])

    def classify_rays(self, requests):
        """requests: list of (i, sigma, rays): point i at sigma on the given rays of its sequence (indices, any
        order). Returns one label tensor per request, in the order of its rays; only their pages are drawn."""
        results = [torch.empty(len(rays), dtype=torch.int64, device=self.x.device) for _, _, rays in requests]
        pending, owners, size = [], [], 0

        def flush():
            nonlocal pending, owners, size
            if pending:
                labels, pos = self._forward(torch.cat(pending)), 0
                for r, where in owners:
                    results[r][where] = labels[pos : pos + len(where)]
                    pos += len(where)
            pending, owners, size = [], [], 0

        per_call = max(1, self.batch_size // PAGE)
        with torch.no_grad(), _eval_mode(self.classifier):
            for r, (i, sigma, rays) in enumerate(requests):
                self.evaluations[i] += len(rays)
                pages, slot = torch.unique(rays // PAGE, return_inverse=True)  # sorted pages; slot: each ray's page
                for c in range(0, len(pages), per_call):
                    where = ((slot >= c) & (slot < c + per_call)).nonzero().squeeze(1)
                    z = self.rays(i, pages[c : c + per_call].tolist())[(slot[where] - c) * PAGE + rays[where] % PAGE]
                    samples = self.x[i].reshape(1, -1) + float(sigma) * z
                    if self.clip:
                        samples = samples.clamp(0.0, 1.0)
                    pending.append(samples.view(-1, *self.shape))
                    owners.append((r, where.to(self.x.device)))
                    size += len(where)
                    if size >= self.batch_size:
                        flush()
            flush()
        return results


# ----------------------------------------------------------------------------------------------- stability
@dataclass
class Stability:
    stability: torch.Tensor  # (B,) fraction of samples classified as the point's own class C(x)
    class_frequencies: torch.Tensor  # (B, C) fraction of samples per class
    labels: torch.Tensor  # (B,) C(x)
    n_samples: int
    evaluations: torch.Tensor  # (B,) inputs classified per point


def stability(
    classifier,
    x,
    sigma,
    n_samples: int = 1000,
    *,
    clip: bool = False,
    distribution: str = "gaussian",
    antithetic: bool = False,
    seed: int = 0,
    index_offset: int | list[int] = 0,
    batch_size: int = 1024,
    num_classes: int | None = None,
) -> Stability:
    """(gamma, sigma)-stability of each point of x (B, ...) under N(x, sigma^2 I) (Bell Def. 4.1), by Monte Carlo.

    `classifier` maps a batch to logits (B, C) or labels (B,). `sigma` is a number or one value per point.
    Calls with the same seed use the same draws at every sigma (common random numbers): a curve over sigma is then
    one smooth-looking function instead of independent noise (Figure 9). `distribution="uniform_ball"` samples the
    ball with the same per-coordinate variance sigma^2 (radius sigma sqrt(n + 2)).
    """
    _check_common(None, clip, distribution, batch_size)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise UserError(f"n_samples must be a positive integer, got {n_samples!r}")
    sigmas = (
        torch.as_tensor(sigma, dtype=torch.float64).flatten().expand(len(x))
        if torch.as_tensor(sigma).numel() == 1
        else torch.as_tensor(sigma, dtype=torch.float64)
    )
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
    if interval is not None and interval not in INTERVALS:  # None: a method without an interval option (fast)
        raise UserError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}")


def bracketing(
    classifier,
    x,
    gamma: float = 0.7,
    *,
    n_samples: int = 1000,
    max_steps: int = 20,
    precision: float = 0.01,
    sigma_min: float = 0.5,
    sigma_max: float = 1.5,
    sigma_floor: float = 1e-4,
    sigma_cap: float = 1e3,
    confidence: float | None = 0.99,
    interval: str = "wilson",
    clip: bool = False,
    distribution: str = "gaussian",
    seed: int = 0,
    index_offset: int | list[int] = 0,
    batch_size: int = 1024,
) -> Persistence:
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
            # i is this iteration's point: the closures are used only inside it
            pred = sampler.classify([(i, sigma, pages, n_samples)])[0]  # noqa: B023
            return (pred.cpu() == labels[i].cpu()).double().mean().item()  # noqa: B023

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


STAGES = 3  # pools a fast search may be judged on (pilot, sized from the pilot, top-up); each at (1 - confidence) / STAGES


def acceptance_counts(n: int, gamma: float, alpha: float, pair_variance: float | None = None) -> tuple[int, int]:
    """(c_lo, c_hi): the level-alpha two-sided test of "stability == gamma" on n rays rejects when the number of rays
    classified as C(x) is <= c_lo or >= c_hi, each side with probability at most alpha / 2. Independent rays: exact
    binomial quantiles. Antithetic rays (n / 2 pairs): normal quantiles with the variance of a pair's count."""
    if pair_variance is None:
        return int(binom.ppf(alpha / 2, n, gamma)) - 1, int(binom.isf(alpha / 2, n, gamma)) + 1
    half = float(norm.isf(alpha / 2)) * math.sqrt(n / 2 * pair_variance)
    return math.floor(gamma * n - half - 0.5), math.ceil(gamma * n + half + 0.5)


class _Search:
    """The fast search of one point, on a pool of rays z_j shared by every sigma (common random numbers).

    Along a ray the point x + sigma z_j stays in C(x) up to a crossing radius t_j and leaves it after (one
    crossing: exact for a convex class region, such as the wedge's). The pool's stability at sigma is then the
    fraction of rays with t_j > sigma, and the quantities sought are order statistics of the t_j (descending,
    t_[1] >= t_[2] >= ...): the estimate is t_[ceil(gamma n)], where the pool's stability crosses gamma, and the
    interval is [t_[c_hi], t_[c_lo + 1]] with c_lo, c_hi the acceptance counts of the test "stability == gamma":
    sigma* < t_[c_hi] means at least c_hi rays survive at sigma*, where the stability is exactly gamma, which has
    probability <= alpha / 2; likewise above. An exact interval for sigma itself, not one for the stability mapped
    through a slope.

    Each ray keeps the largest sigma it was seen in C(x) (`L`) and the smallest it was seen outside (`U`), so
    t_j is in (L_j, U_j] and t_[r] lies between the r-th largest L and the r-th largest U. A sigma is evaluated
    only on the rays it can tell something about (L_j < sigma < U_j): far from the order statistics sought a ray
    is settled by one or two evaluations. Each order statistic is bracketed by stepping sigma by 4 (bounded by
    the floor and the cap), then narrowed by interpolating the rank in log sigma until its bracket is rtol / 8.

    The pool starts at n_init rays (a pilot). When the interval is wider than 1 +- rtol the pool grows once to the
    size the pilot's width asks for (width ~ 1 / sqrt(n)), then once more if still needed, up to n_samples: at
    most STAGES pools, each interval at (1 - confidence) / STAGES, so the one reported covers at `confidence`
    whichever pool it came from (Bonferroni over the looks at the data).
    """

    pool_margin = 1.15  # a grown pool this much larger than the pilot's width asks for (a top-up costs more)
    end_margin = 2.0  # the new rays are first classified at the predicted ends of the interval, this much further out

    def __init__(self, pages, max_pages, gamma, alpha, rtol, antithetic, sigma_start, sigma_floor, sigma_cap):
        self.pages, self.max_pages = pages, max_pages
        self.gamma, self.alpha, self.rtol, self.antithetic = gamma, alpha, rtol, antithetic
        self.floor, self.cap, self.tol = sigma_floor, sigma_cap, rtol / 8
        self.L = torch.zeros(PAGE * pages, dtype=torch.float64)
        self.U = torch.full((PAGE * pages,), math.inf, dtype=torch.float64)
        self.stage, self.pair_variance, self.value = 0, None, None  # value: the estimate, once located in this pool
        self.start = float(sigma_start)
        self.queue = [self.start]  # sigmas to evaluate first: the start, then a grown pool's new rays at the old answers
        self.answer = self.ci = None
        self.shared = []  # (sigma, inside_of): classifications of these rays made elsewhere (see share)

    def share(self, sigma: float, inside_of) -> None:
        """Take classifications of this pool's rays at sigma made elsewhere (certify's draws): `inside_of(rays)`
        gives (rays it knows, inside C(x) there). They are recorded now and for every ray a grown pool adds."""
        self.shared.append((float(sigma), inside_of))
        self._record_shared(0, len(self.L))

    def _record_shared(self, start: int, stop: int) -> None:
        for sigma, inside_of in self.shared:
            rays, inside = inside_of(torch.arange(start, stop))
            self.record(sigma, rays, inside)

    # ---- what the rays say
    def undetermined(self, sigma: float) -> torch.Tensor:
        return ((self.L < sigma) & (self.U > sigma)).nonzero().squeeze(1)

    def record(self, sigma: float, rays: torch.Tensor, inside: torch.Tensor) -> None:
        self.L[rays[inside]] = sigma
        self.U[rays[~inside]] = sigma

    def bracket(self, r: int) -> tuple[float, float]:
        """(a, b) with t_[r] in (a, b]: the r-th largest L and the r-th largest U."""
        return -torch.kthvalue(-self.L, r).values.item(), -torch.kthvalue(-self.U, r).values.item()

    def ranks(self):
        """Ranks of the estimate and of the interval's ends (None: not yet known, or no such rank in this pool)."""
        n = len(self.L)
        estimate = max(1, math.ceil(self.gamma * n - 1e-9))
        if self.antithetic and self.pair_variance is None:  # set with the estimate
            return estimate, None, None
        c_lo, c_hi = acceptance_counts(n, self.gamma, self.alpha / STAGES, self.pair_variance if self.antithetic else None)
        return estimate, (c_hi if c_hi <= n else None), (c_lo + 1 if c_lo >= 0 else None)

    def _pair_variance(self, sigma: float) -> float:
        """Variance of a pair's count at sigma (rays still undetermined there count 1/2), at least a quarter of
        the independent pair's 2 gamma (1 - gamma): a guard against a pilot whose pairs happen to agree."""
        s = (self.L >= sigma).double() + 0.5 * ((self.L < sigma) & (self.U > sigma)).double()
        pairs = s.view(-1, 2).sum(1)
        return max(pairs.var().item(), 0.5 * self.gamma * (1 - self.gamma))

    def _resolved(self, r: int) -> bool:
        a, b = self.bracket(r)
        return a >= self.cap or b <= self.floor or (a > 0 and b <= a * (1 + self.tol))

    def _step(self, r: int) -> float:
        a, b = self.bracket(r)
        # an open bracket: steps of 4 while looking for the estimate; for an end of the interval, twice its
        # present distance from the estimate (at least 2 rtol): a step too far re-classifies the rays beyond
        factor = 4.0 if self.value is None else math.exp(max(2 * math.log1p(self.rtol), 2 * abs(math.log(max(a, b if b < math.inf else a) / self.value))))
        if b == math.inf:
            return min(factor * a, self.cap) if a > 0 else self.start
        if a == 0:
            return max(b / factor, self.floor)
        c_a, c_b = int((self.L >= a).sum()), int((self.U > b).sum())  # rays known inside at a; possibly inside at b
        t = (c_a - r + 0.5) / (c_a - c_b) if c_a > c_b else 0.5
        return a * (b / a) ** min(max(t, 0.2), 0.8)

    # ---- the search
    def next_request(self):
        """(sigma, rays to classify there), or None once the answer is set."""
        while True:
            while self.queue:
                sigma = self.queue.pop(0)
                rays = self.undetermined(sigma)
                if len(rays):
                    return sigma, rays
            estimate, low, high = self.ranks()
            if not self._resolved(estimate):
                sigma = self._step(estimate)
                return sigma, self.undetermined(sigma)
            if self.value is None:
                a, b = self.bracket(estimate)
                self.value = math.sqrt(a * b) if 0 < a and b < math.inf else max(a, min(b, self.cap))
                if self.antithetic:
                    self.pair_variance = self._pair_variance(self.value)
                continue
            for r in (high, low):  # the upper end first: past the cap it decides +inf
                if r is not None and not self._resolved(r):
                    sigma = self._step(r)
                    return sigma, self.undetermined(sigma)
            if self._finish_stage(estimate, low, high):
                return None

    def _finish_stage(self, estimate, low, high) -> bool:
        """Set the answer, or grow the pool and return False."""
        sigma_low = self.bracket(low)[0] if low is not None else 0.0
        high_a, high_b = self.bracket(high) if high is not None else (0.0, math.inf)
        if high is not None and high_a >= self.cap:  # not shown below gamma at the cap: +inf
            self.answer, self.ci = math.inf, (sigma_low, math.inf)
            return True
        if low is not None and self.bracket(low)[1] <= self.floor:  # not shown above gamma at the floor: 0
            self.answer, self.ci = 0.0, (0.0, high_b)
            return True
        value = self.value
        width = math.log(high_b / sigma_low) if sigma_low > 0 else math.inf
        if width <= 2 * math.log1p(self.rtol) or self.pages >= self.max_pages or self.stage >= STAGES - 1:
            self.answer, self.ci = value, (sigma_low, high_b)
            return True
        # the interval narrows as 1 / sqrt(n): the pool that width asks for, a little more (a top-up costs more)
        need = self.pool_margin * len(self.L) * (width / (2 * math.log1p(self.rtol))) ** 2 if math.isfinite(width) else 4 * len(self.L)
        pages = min(self.max_pages, max(math.ceil(1.25 * self.pages), math.ceil(need / PAGE)))
        shrink = min(1.0, self.end_margin * math.sqrt(self.pages / pages))  # predicted ends, further out: too near costs more
        grow = PAGE * (pages - self.pages)
        self.L = torch.cat([self.L, torch.zeros(grow, dtype=torch.float64)])
        self.U = torch.cat([self.U, torch.full((grow,), math.inf, dtype=torch.float64)])
        self._record_shared(len(self.L) - grow, len(self.L))
        self.pages, self.stage, self.pair_variance, self.value = pages, self.stage + 1, None, None
        # the new rays first at the predicted ends, the majority's end first: a ray in C(x) at the upper end (a
        # fraction ~gamma of them) or out of it at the lower end is then settled for all three order statistics
        ends = [value * (high_b / value) ** shrink, value * (sigma_low / value) ** shrink] if sigma_low > 0 and high_b < math.inf else [value]
        self.queue = [s for s in (ends if self.gamma >= 0.5 else ends[::-1]) if 0 < s < math.inf]
        return False


def fast_persistence(
    classifier,
    x,
    gamma: float = 0.7,
    *,
    n_samples: int = 8192,
    n_init: int = 128,
    confidence: float = 0.99,
    rtol: float = 0.07,
    sigma_start: float = 1.0,
    sigma_floor: float = 1e-4,
    sigma_cap: float = 1e3,
    antithetic: bool = True,
    clip: bool = False,
    distribution: str = "gaussian",
    seed: int = 0,
    index_offset: int | list[int] = 0,
    batch_size: int = 1024,
    shared=None,
) -> Persistence:
    """gamma-persistence of every point of x, to a relative precision `rtol`, with an exact interval (see _Search).

    Per point a pool of rays (common random numbers, pages of 16 seeded per point): a pilot of `n_init`, grown
    (at most twice, up to `n_samples`) until the `confidence` interval for sigma is within 1 +- rtol. A flat
    stability curve (a half-space) needs many rays, a steep one few: the work goes where the precision needs it.
    +inf: the stability at `sigma_cap` is not shown below gamma (one test at the cap; k = 1, gamma = 0.5 for the
    wedge tends to 0.5 from above forever); 0: not shown above gamma at `sigma_floor` (a point on the boundary).
    `antithetic` draws come in pairs (z, -z): unbiased, less variance near a flat boundary (43 % less for a
    half-space at gamma = 0.7); the interval then uses the pairs' measured variance (normal quantiles) instead
    of the exact binomial. All points advance together: each round classifies every unfinished point's rays in
    shared batches.
    `shared`: labels already computed on the same draws, per point a list of (sigma, labels of the first m draws of
    the point's independent gaussian sequence at this seed and index), which is what certify's estimation draws
    are: the rays they cover start with those classifications and are not classified there again (`evaluations`
    counts only this call's own).
    """
    _check_common(gamma, clip, distribution, batch_size)
    _check_search(gamma, n_samples, sigma_floor, sigma_cap, confidence, None)
    if not isinstance(n_init, int) or n_init < 1 or n_init > n_samples:
        raise UserError(f"n_init must be an integer in 1..n_samples ({n_samples}), got {n_init!r}")
    if not rtol > 0 or not sigma_floor <= sigma_start <= sigma_cap:
        raise UserError(f"need rtol > 0 and sigma_floor <= sigma_start <= sigma_cap, got {rtol!r}, {sigma_start!r}")
    sampler = _Sampler(classifier, x, clip=clip, distribution=distribution, antithetic=antithetic, seed=seed, index_offset=index_offset, batch_size=batch_size)
    labels = sampler.center_labels().cpu()
    max_pages = -(-n_samples // PAGE)
    searches = [
        _Search(min(max_pages, -(-n_init // PAGE)), max_pages, gamma, 1.0 - confidence, rtol, antithetic, sigma_start, sigma_floor, sigma_cap)
        for _ in range(len(x))
    ]
    if shared is not None:
        if len(shared) != len(x):
            raise ValueError(f"shared needs one list of (sigma, labels) per point ({len(x)}), got {len(shared)}")
        for search, known, label in zip(searches, shared, labels):
            for sigma, their in known:
                search.share(sigma, _inside_of(sampler, their.cpu(), label))
    while True:
        requests = [(i, *request) for i, s in enumerate(searches) if s.answer is None and (request := s.next_request()) is not None]
        if not requests:
            break
        for (i, sigma, rays), pred in zip(requests, sampler.classify_rays(requests)):
            searches[i].record(sigma, rays, pred.cpu() == labels[i])
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)
    return Persistence(
        as_tensor([s.answer for s in searches]),
        as_tensor([s.ci[0] for s in searches]),
        as_tensor([s.ci[1] for s in searches]),
        sampler.evaluations,
        labels,
        "fast",
    )


def _inside_of(sampler: _Sampler, labels: torch.Tensor, label):
    """rays -> (the rays `labels` covers, whether each is classified as `label` there)."""

    def inside_of(rays):
        index = sampler.independent_index(rays)
        known = (index >= 0) & (index < len(labels))
        return rays[known], labels[index[known]] == label

    return inside_of


def persistence(classifier, x, gamma: float = 0.7, method: str = "fast", **options) -> Persistence:
    """gamma-persistence of each point of x by `method` ("fast" or "bracketing"); options go to that estimator."""
    if method == "fast":
        return fast_persistence(classifier, x, gamma, **options)
    if method == "bracketing":
        return bracketing(classifier, x, gamma, **options)
    raise UserError(f"persistence method must be one of {', '.join(METHODS)}, got {method!r}")

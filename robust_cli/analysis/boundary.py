"""Decision-boundary geometry (Bell Part III, sections 29-31): boundary points, projection, sampling, dimension.

A classifier here is any callable mapping a batch (B, *shape) to logits (B, C); everything is batched.

- `boundary_point`: bisection on the segment x1 -> x2 (C(x1) != C(x2)) to a point within `tol` (data units)
  of both classes.
- `project_to_boundary`: put samples around a boundary point onto the boundary, either as the seed does
  (`interpolate`: bisect from each sample towards the parent point of the opposite class) or by
  `descent` on the margin z_a - z_b (Gauss-Newton steps, i.e. projection onto the linearised level set,
  until the two logits meet within `tol` in data units).
- `sample_around`: Gaussian samples or the seed's "Flat SVD" samples (section 31).
- `boundary_dimension`: SVD of the differences of projected points, the number of dropped (degenerate)
  singular values, the least-squares normal, and its angle to reference directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from robust_cli.core.errors import UserError

Classifier = Callable[[torch.Tensor], torch.Tensor]


def _predict(classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return classifier(x).argmax(1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against a batch shaped like `like`."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _match_batch(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A single point (*shape) or a batch (B, *shape) -> a batch shaped like `like`."""
    return x.expand_as(like) if x.dim() == like.dim() - 1 else x


@dataclass
class BoundaryPoints:
    points: torch.Tensor  # (B, *shape): midpoints of the final brackets
    t: torch.Tensor  # (B,) float64: position on the segment, x1 + t (x2 - x1)
    class_a: torch.Tensor  # (B,) the class of x1
    class_b: torch.Tensor  # (B,) the class just past the crossing (C(x2) unless a third class lies between)
    distance_from_x1: torch.Tensor  # (B,) float64: t ||x2 - x1||
    width: torch.Tensor  # (B,) float64: length of the final bracket in data units (<= tol)


def boundary_point(classifier: Classifier, x1: torch.Tensor, x2: torch.Tensor, tol: float = 1e-5) -> BoundaryPoints:
    """Batched bisection between differently classified x1 and x2 (both (B, *shape), or one of them a single point).

    The bracket [lo, hi] keeps C(lo) = C(x1) and C(hi) != C(x1); every pair takes the same number of steps
    (enough for the longest segment), so one forward pass per step serves the whole batch.
    """
    if tol <= 0:
        raise UserError(f"tol must be > 0, got {tol}")
    if x1.dim() < x2.dim():
        x1 = _match_batch(x1, x2)
    x2 = _match_batch(x2, x1)
    class_a, class_x2 = _predict(classifier, x1), _predict(classifier, x2)
    if (class_a == class_x2).any():
        bad = int((class_a == class_x2).nonzero()[0, 0])
        raise ValueError(f"boundary_point needs C(x1) != C(x2); pair {bad} has both in class {int(class_a[bad])}")
    direction = x2 - x1
    length = direction.flatten(1).double().norm(dim=1)
    lo = torch.zeros(len(x1), dtype=torch.float64, device=x1.device)
    hi = torch.ones_like(lo)
    class_b = class_x2.clone()
    steps = max(0, math.ceil(math.log2(max(float(length.max()), tol) / tol)))
    for _ in range(steps):
        mid = (lo + hi) / 2
        pred = _predict(classifier, x1 + _per_sample(mid, x1).to(x1.dtype) * direction)
        same = pred == class_a
        lo = torch.where(same, mid, lo)
        hi = torch.where(same, hi, mid)
        class_b = torch.where(same, class_b, pred)
    t = (lo + hi) / 2
    points = x1 + _per_sample(t, x1).to(x1.dtype) * direction
    return BoundaryPoints(points, t, class_a, class_b, t * length, (hi - lo) * length)


@dataclass
class Projection:
    points: torch.Tensor  # (M, *shape) the projected samples
    converged: torch.Tensor  # (M,) bool: on the class_a | class_b boundary within tol
    class_a: torch.Tensor  # (M,) the pair of classes whose boundary each sample was sent to
    class_b: torch.Tensor


def project_to_boundary(
    classifier: Classifier,
    samples: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    method: str = "interpolate",
    tol: float = 1e-5,
    max_steps: int = 50,
    classes: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Projection:
    """Project `samples` (M, *shape) around a boundary point between x1 and x2 onto the decision boundary.

    interpolate (the seed's way): a sample classified like x1 is bisected towards x2, any other sample towards x1.
    descent: Gauss-Newton on g = z_a - z_b: x <- x - g grad g / |grad g|^2, the nearest point of the linearised level
    set g = 0, until |g| / |grad g| <= tol; exact in one step for a linear classifier. The pair (a, b) is `classes`
    (pass the boundary point's class_a, class_b when a third class lies between x1 and x2), else (C(x1), C(x2)).
    A sample counts as converged when the two logits meet within tol and no third class beats them there.
    """
    x1, x2 = _match_batch(x1, samples), _match_batch(x2, samples)
    class_a, class_b = _predict(classifier, x1), _predict(classifier, x2)
    if classes is not None and method == "descent":
        class_a, class_b = (torch.as_tensor(c, device=samples.device).expand(len(samples)) for c in classes)
    if method == "interpolate":
        toward_x2 = _predict(classifier, samples) == class_a
        parent = torch.where(_per_sample(toward_x2, samples), x2, x1)
        found = boundary_point(classifier, samples, parent, tol)
        pair_a = torch.where(toward_x2, class_a, class_b)
        pair_b = torch.where(toward_x2, class_b, class_a)
        return Projection(found.points, torch.ones_like(toward_x2), pair_a, pair_b)
    if method != "descent":
        raise UserError(f"projection method must be interpolate or descent, got {method!r}")
    x = samples.detach().clone()
    rows = torch.arange(len(x), device=x.device)
    for _ in range(max_steps + 1):
        x.requires_grad_(True)
        logits = classifier(x)
        gap = logits[rows, class_a] - logits[rows, class_b]
        (grad,) = torch.autograd.grad(gap.sum(), x)
        x = x.detach()
        grad_sq = grad.flatten(1).pow(2).sum(1)
        gap = gap.detach()
        done = (gap == 0) | (gap.abs() <= tol * grad_sq.sqrt())  # |g| / |grad g|: distance to the linearised level set
        if bool(done.all()):
            break
        step = torch.where(done | (grad_sq == 0), torch.zeros_like(gap), gap / grad_sq)
        x = x - _per_sample(step, x) * grad
    with torch.no_grad():
        top2 = classifier(x).topk(2, dim=1).indices
    pair_on_top = ((top2 == class_a[:, None]) | (top2 == class_b[:, None])).all(1)
    return Projection(x, done & pair_on_top, class_a, class_b)


def flat_svd(noise: torch.Tensor) -> torch.Tensor:
    """The seed's Flat SVD transform of a sample matrix (M, n): U S V^T -> U (rms S) V^T.

    "Replacing Sigma by |Sigma|_2 I while maintaining the Frobenius norm": the common value is the root mean
    square of the singular values, so ||.||_F is unchanged and every singular value is equal.
    """
    u, s, vh = torch.linalg.svd(noise, full_matrices=False)
    return (u * s.pow(2).mean().sqrt()) @ vh


def sample_around(center: torch.Tensor, n_samples: int, sigma: float, distribution: str = "gaussian", generator: torch.Generator | None = None) -> torch.Tensor:
    """n_samples points center + noise, noise ~ N(0, sigma^2 I) or its Flat SVD version.

    The noise is centred (column means removed) before anything else, so the sample mean is exactly `center`
    and centring the sample later (see `boundary_dimension`) removes no direction of the noise; for Flat SVD
    this keeps all nonzero singular values equal after centring.
    """
    if sigma <= 0:
        raise UserError(f"sigma must be > 0, got {sigma}")
    n = center.numel()
    noise = torch.randn(n_samples, n, generator=generator, dtype=torch.float64)
    noise = (noise - noise.mean(0)) * sigma
    if distribution == "flat_svd":
        noise = flat_svd(noise)
    elif distribution != "gaussian":
        raise UserError(f"distribution must be gaussian or flat_svd, got {distribution!r}")
    return center.unsqueeze(0) + noise.to(center.dtype).to(center.device).reshape(n_samples, *center.shape)


@dataclass
class BoundaryDimension:
    singular_values: torch.Tensor  # (r,) float64, descending, of the differences of projected points
    n_degenerate: int  # trailing singular values dropped below the rest
    normal: torch.Tensor  # (n,) float64 unit least-squares normal of the projected points
    cosines: dict = field(default_factory=dict)  # name -> |cos| between the normal and a reference direction


def point_differences(points: torch.Tensor, n_pairs: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Differences among sampled points, which cancel the shared image content (the boundary point itself).

    n_pairs=None uses all pairs; their scatter is sum_{i<j} d_ij d_ij^T = M * sum_i (p_i - mean)(p_i - mean)^T,
    so we return the centred points (same singular vectors, singular values / sqrt(M)) instead of M^2/2 rows.
    n_pairs=int draws that many random pairs, as the seed describes.
    """
    flat = points.reshape(len(points), -1).double()
    if n_pairs is None:
        return flat - flat.mean(0)
    i = torch.randint(len(flat), (n_pairs,), generator=generator)
    j = (i + 1 + torch.randint(len(flat) - 1, (n_pairs,), generator=generator)) % len(flat)  # j != i
    return flat[i] - flat[j]


def count_degenerate(singular_values: torch.Tensor, min_gap: float = 1.3, max_degenerate: int | None = None) -> int:
    """Number of trailing singular values dropped below the rest: going down the lower part of the spectrum, the
    first ratio s_i / s_(i+1) >= `min_gap` between neighbours marks where the dropped set starts.

    The seed reads the count off plots ("a very clear dropped set of singular values smaller than the rest");
    this is that reading made mechanical. The first gap (not the largest) counts every value below the plateau:
    an acute wedge squashes its axis much more than its other k - 1 directions, yet all k are dropped. Flat SVD
    samples make every undisturbed value equal, so a drop of a few tens of percent is a clear gap; with Gaussian
    samples the Marchenko-Pastur spread of the values hides it. `max_degenerate` (default: half of the values)
    bounds the count so the top of the spectrum is never read as the drop.
    """
    s = singular_values.double()
    r = len(s)
    if r < 2:
        return 0
    max_degenerate = r // 2 if max_degenerate is None else min(int(max_degenerate), r - 1)
    floor = s[0].clamp(min=1e-300) * 1e-12  # exact zeros: keep the ratios finite, 0/0 -> 1
    ratios = s[:-1].clamp(min=floor) / s[1:].clamp(min=floor)
    first = r - 1 - max_degenerate  # ratio index i means r - 1 - i dropped values
    gaps = (ratios[first:] >= min_gap).nonzero()
    return r - 1 - (first + int(gaps[0, 0])) if len(gaps) else 0


def boundary_dimension(
    samples: torch.Tensor,
    projected: torch.Tensor,
    references: dict | None = None,
    min_gap: float = 1.3,
    max_degenerate: int | None = None,
    n_pairs: int | None = None,
    generator: torch.Generator | None = None,
) -> BoundaryDimension:
    """Section 31's analysis of one boundary point from its samples (M, *shape) and their projections.

    Singular values: of the differences of projected points (`point_differences`), first min(M - 1, n) of them.
    Normal: total least squares, the direction in which the centred projected points vary least. With M - 1 < n
    points that direction is not determined by the points alone (any M points lie in many hyperplanes), so it is
    sought in the span of the centred points and the main direction of the displacements sample -> projection:
    the part of that direction the boundary points do not spread along. For an orthogonal projection
    (method=descent) onto a locally flat boundary the displacements are normals and the answer is exact; with
    method=interpolate they run along the segments x -> parent and the estimate is only partial.
    references: name -> direction (*shape); `cosines[name]` = |cos| with the normal (its sign is arbitrary).
    """
    flat_p = projected.reshape(len(projected), -1).double()
    n = flat_p.shape[1]
    diffs = point_differences(flat_p, n_pairs, generator)
    rank = min(len(flat_p) - 1, n)
    singular_values = torch.linalg.svdvals(diffs)[:rank]
    centred = flat_p - flat_p.mean(0)
    if len(flat_p) - 1 >= n:
        normal = torch.linalg.svd(centred, full_matrices=False).Vh[-1]
    else:
        displacements = samples.reshape(len(samples), -1).double() - flat_p
        main_displacement = torch.linalg.svd(displacements, full_matrices=False).Vh[:1]
        basis = torch.linalg.svd(torch.cat([centred, main_displacement]), full_matrices=False)
        keep = basis.S > basis.S[0] * 1e-10
        span = basis.Vh[keep]  # orthonormal rows
        normal = torch.linalg.svd(centred @ span.T, full_matrices=True).Vh[-1] @ span
    normal = normal / normal.norm()
    cosines = {}
    for name, ref in (references or {}).items():
        ref = ref.reshape(-1).double()
        cosines[name] = float((normal @ ref).abs() / ref.norm().clamp(min=1e-300))
    return BoundaryDimension(singular_values, count_degenerate(singular_values, min_gap, max_degenerate), normal, cosines)

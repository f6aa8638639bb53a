"""The norm-specific pieces every gradient attack shares: measure, normalise, project, random start.

All functions work per example on a batch (B, *shape) of any shape, and accept `eps` as a float or as a
tensor of shape (B,) (one budget per example, used by the binary eps search).
Oberman's Theorem 2.2: the steepest-ascent direction of size eps in a norm is eps * a with a . g = ||g||_*:
sign(g) for linf, g / ||g||_2 for l2.
"""

from __future__ import annotations

import math

import torch

from robust_cli.core.errors import UserError

NORMS = ("linf", "l2")  # norms every budgeted gradient attack takes
L1_NORMS = ("linf", "l2", "l1")  # attacks with an l1 version: APGD, APGD-T, FAB, FAB-T, Square, AutoAttack
MEASURES = ("linf", "l2", "l1", "l0")  # norms we can measure a perturbation in

_TINY = 1e-12  # keeps 0/0 at 0: a zero gradient gives a zero direction, not NaN


def check_norm(norm: str, allowed=NORMS) -> str:
    if norm not in allowed:
        raise UserError(f"norm must be one of {', '.join(allowed)}, got {norm!r}")
    return norm


def per_example(eps, x: torch.Tensor) -> torch.Tensor | float:
    """eps as a float, or a (B,) tensor reshaped to (B, 1, ..., 1) so that it broadcasts against x."""
    if isinstance(eps, torch.Tensor):
        if eps.dim() == 0:
            return float(eps)
        return eps.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return float(eps)


def per_example_slice(eps, index: torch.Tensor):
    """eps for a subset of the batch: a float stays, a (B,) tensor is indexed."""
    if isinstance(eps, torch.Tensor) and eps.dim() > 0:
        return eps[index]
    return eps


def lp_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm of a batch: shape (B,)."""
    flat = t.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    if norm == "l0":
        return (flat != 0).sum(dim=1).to(t.dtype)
    raise UserError(f"cannot measure in norm {norm!r}; use one of {', '.join(MEASURES)}")


def normalize(grad: torch.Tensor, norm: str, inplace: bool = False) -> torch.Tensor:
    """Unit ascent direction in the dual sense: sign(g) for linf, g/||g||_2 for l2 (per example).

    inplace=True overwrites grad (attacks own their gradient: saves an allocation per step)."""
    if norm == "linf":
        return grad.sign_() if inplace else grad.sign()
    if norm == "l2":
        scale = grad.flatten(1).norm(dim=1).clamp_min(_TINY).reshape(-1, *([1] * (grad.dim() - 1)))
        return grad.div_(scale) if inplace else grad / scale
    raise UserError(f"cannot normalise in norm {norm!r}; use linf or l2")


def project(delta: torch.Tensor, eps, norm: str) -> torch.Tensor:
    """Nearest point of the eps-ball (centred at 0) to delta: clamp for linf, rescale if too long for l2."""
    eps = per_example(eps, delta)
    if norm == "linf":
        return torch.clamp(delta, -eps, eps) if isinstance(eps, torch.Tensor) else delta.clamp(-eps, eps)
    if norm == "l2":
        length = delta.flatten(1).norm(dim=1).reshape(-1, *([1] * (delta.dim() - 1)))
        return delta * torch.clamp(eps / length.clamp_min(_TINY), max=1.0)
    raise UserError(f"cannot project in norm {norm!r}; use linf or l2")


def clip_box(x: torch.Tensor, bounds) -> torch.Tensor:
    """Clamp to the data box (bounds = (low, high)); bounds None means unbounded data (e.g. gaussians2d)."""
    return x if bounds is None else x.clamp(bounds[0], bounds[1])


def projector(x: torch.Tensor, eps, norm: str, bounds, inplace: bool = False):
    """The map z -> a point of (eps-ball around x) that is also in the box (inplace=True may overwrite z).

    For linf the intersection of ball and box is itself a box, so one clamp with precomputed per-coordinate
    limits is the exact projection (and the cheapest: no per-step arithmetic beyond it). For l2 we project on
    the ball, then clamp to the box; clamping moves every coordinate towards x, so the result stays in the ball.
    For l1 the two do not commute (clamping frees budget another coordinate could use): project_l1_box is exact.
    """
    if norm == "l1":
        return lambda z: project_l1_box(x, z, eps, bounds)
    eps = per_example(eps, x)
    if norm == "linf":
        lower, upper = x - eps, x + eps
        if bounds is not None:
            lower, upper = lower.clamp(min=bounds[0]), upper.clamp(max=bounds[1])
        return (lambda z: z.clamp_(lower, upper)) if inplace else (lambda z: torch.clamp(z, lower, upper))
    check_norm(norm)
    return lambda z: clip_box(x + project(z - x, eps, norm), bounds)


def project_l1_box(x: torch.Tensor, z: torch.Tensor, eps, bounds) -> torch.Tensor:
    """The point of {w : ||w - x||_1 <= eps, w in the box} nearest to z in l2 (per example): exact.

    With d = z - x, the answer is x + sign(d) * clamp(|d| - lam, 0, room), room the box's room in the direction of
    d, and lam >= 0 the smallest value with sum clamp(|d| - lam, 0, room) <= eps (KKT: soft thresholding, capped
    by the box). That sum is piecewise linear and non-increasing in lam, with kinks at |d| - room (a coordinate
    starts to shrink) and |d| (it reaches 0): sorting the kinks gives it at every kink, and lam is read off by
    linear interpolation on the segment where it crosses eps. Sums in float64 (784 terms of mixed size).
    """
    shape = z.shape
    d = (z - x).flatten(1)
    a = d.abs()
    if bounds is None:
        room = torch.full_like(a, math.inf)
    else:
        xf = x.flatten(1)
        room = torch.where(d > 0, bounds[1] - xf, xf - bounds[0]).clamp_min(0)
    eps_t = torch.as_tensor(eps, dtype=torch.float64, device=z.device).reshape(-1).expand(len(d))
    capped = torch.minimum(a, room)
    over = (capped.sum(dim=1, dtype=torch.float64) > eps_t).nonzero().squeeze(1)
    if len(over):
        ao, ro = a[over].double(), room[over].double()
        kinks = torch.cat([(ao - ro).clamp_min(0), ao], dim=1)  # enter the shrinking phase, leave it at 0
        step = torch.cat([torch.full_like(ao, -1.0), torch.ones_like(ao)], dim=1)
        kinks, order = kinks.sort(dim=1)
        slope = step.gather(1, order).cumsum(dim=1)  # slope of the sum just after each kink
        start = capped[over].double().sum(dim=1, keepdim=True)  # the sum at lam = 0
        gaps = kinks.diff(dim=1, prepend=torch.zeros_like(kinks[:, :1]))
        before = torch.cat([torch.zeros_like(slope[:, :1]), slope[:, :-1]], dim=1)  # slope on the segment ending at the kink
        total = start + (before * gaps).cumsum(dim=1)  # the sum at each kink, non-increasing, last one 0
        e = eps_t[over].unsqueeze(1)
        k = (total > e).sum(dim=1, keepdim=True)  # the first kink at or below eps ends the crossing segment
        lam_k = kinks.gather(1, k.clamp(max=kinks.shape[1] - 1))
        lam = lam_k + (e - total.gather(1, k)) / before.gather(1, k).clamp(max=-1.0)  # back from that kink along the segment
        shrunk = (ao - lam).clamp_min(0).minimum(ro)
        capped = capped.clone()
        capped[over] = shrunk.to(capped.dtype)
    w = x.flatten(1) + d.sign() * capped
    # rounding can leave the l1 norm a hair above eps: pull towards x (stays in the box)
    size = capped.sum(dim=1, dtype=torch.float64)
    scale = torch.where(size > eps_t, eps_t / size.clamp_min(1e-300), torch.ones_like(size)).to(d.dtype)
    return (x.flatten(1) + (w - x.flatten(1)) * scale.unsqueeze(1)).reshape(shape)


def random_start(x: torch.Tensor, eps, norm: str, bounds=(0.0, 1.0)) -> torch.Tensor:
    """A random starting point (not a perturbation): x + delta, delta uniform in the eps-ball, clipped to the box.

    linf: delta ~ U[-eps, eps]^n (Madry et al.). l2: delta uniform in the ball: Gaussian direction, radius
    eps * U^(1/n) (in high dimension nearly all volume lies near the sphere, so the radius is close to eps).
    l1: delta uniform in the ball: random signs times E_i / (E_1 + ... + E_(n+1)), E_j i.i.d. exponential (the
    first n coordinates of a uniform point of the n-simplex).
    Clipping to the box only moves coordinates towards x, so the point stays in the ball.
    """
    eps_b = per_example(eps, x)
    if norm == "linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps_b
    elif norm == "l2":
        direction = normalize(torch.randn_like(x), "l2")
        n = math.prod(x.shape[1:])
        radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / n)
        delta = direction * radius.reshape(-1, *([1] * (x.dim() - 1))) * eps_b
    elif norm == "l1":
        e = -torch.rand(x.shape[0], math.prod(x.shape[1:]) + 1, device=x.device, dtype=x.dtype).log()
        simplex = (e[:, :-1] / e.sum(dim=1, keepdim=True)).reshape(x.shape)
        delta = simplex * (torch.rand_like(x) < 0.5).to(x.dtype).mul_(2).sub_(1) * eps_b
    else:
        raise UserError(f"cannot draw a random start in norm {norm!r}; use linf, l2 or l1")
    return clip_box(x + delta, bounds)

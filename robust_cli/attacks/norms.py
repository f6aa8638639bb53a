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

NORMS = ("linf", "l2")  # norms an attack can take as its budget
MINIMAL_NORM_NORMS = ("linf", "l2", "l1")  # FAB's: its step is an exact projection, which l1 also has in closed form
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
    """
    eps = per_example(eps, x)
    if norm == "linf":
        lower, upper = x - eps, x + eps
        if bounds is not None:
            lower, upper = lower.clamp(min=bounds[0]), upper.clamp(max=bounds[1])
        return (lambda z: z.clamp_(lower, upper)) if inplace else (lambda z: torch.clamp(z, lower, upper))
    check_norm(norm)
    return lambda z: clip_box(x + project(z - x, eps, norm), bounds)


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

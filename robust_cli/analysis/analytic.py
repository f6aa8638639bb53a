"""Analytic test model with known stability and persistence: Bell's wedge W_k^n (Proposition 4.3).

W_k^n = {x in R^n : x_1 >= a, ..., x_k >= a} (Bell takes the apex a = 0). A point inside at distance d from each
of the k sheets has, under x' ~ N(x, sigma^2 I),

    stability(sigma)  = ((1 + erf(d / (sqrt(2) sigma))) / 2)^k          (the Gaussian factorises over the sheets)
    persistence(gamma) = d / (sqrt(2) erfinv(2 gamma^(1/k) - 1)),

independent of n. For k = 1 and gamma <= 1/2 the stability never drops below gamma: the persistence is +inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from scipy.special import erfinv

from robust_cli.core.errors import UserError


def wedge_stability(d: float, sigma: float, k: int) -> float:
    """Bell Prop. 4.3: probability that N(x, sigma^2 I) stays in W_k^n when x is at distance d from every sheet."""
    if sigma == 0:
        return 1.0 if d > 0 else 0.5**k
    return ((1.0 + math.erf(d / (math.sqrt(2.0) * sigma))) / 2.0) ** k


def wedge_persistence(d: float, gamma: float, k: int) -> float:
    """Bell Prop. 4.3: gamma-persistence d / (sqrt(2) erfinv(2 gamma^(1/k) - 1)); +inf when gamma^(1/k) <= 1/2."""
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}")
    if d <= 0:  # on the boundary (stability 2^-k at every sigma) or outside (below 2^-k for small sigma)
        return math.inf if d == 0 and 0.5**k >= gamma else 0.0
    inv = float(erfinv(2.0 * gamma ** (1.0 / k) - 1.0))
    return math.inf if inv <= 0 else d / (math.sqrt(2.0) * inv)


class Wedge(nn.Module):
    """W_k^n as a classifier: class 0 inside the wedge, class 1 outside; other classes are never predicted.

    The wedge acts on the flattened input: its k sheets are {x_i = apex} for the first k coordinates. The logits
    are (s m, -s m, -s|m| - 1, ...) with m = min_i (x_i - apex) the signed distance to the nearest sheet (exact
    inside the wedge) and s = exp(log_scale); s is the one parameter, so the training loop has something to fit,
    and it can never move the decision boundary (argmax is invariant to a positive scale). On the boundary m = 0
    the tie goes to class 0, so the wedge is closed as in Bell's definition.

    `d` is the distance of the model's reference point `point()` from each sheet: apex + d on the first k
    coordinates, apex elsewhere; `stability(sigma)` and `persistence(gamma)` give Prop. 4.3 for that point.
    """

    def __init__(self, input_shape, num_classes, k: int = 1, d: float = 1.0, apex: float = 0.0):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        n = math.prod(self.input_shape)
        if not isinstance(k, int) or not 1 <= k <= n:
            raise UserError(f"model.k (number of wedge sheets) must be an integer in 1..{n} for inputs of shape {self.input_shape}, got {k!r}")
        if num_classes < 2:
            raise UserError(f"the wedge needs at least 2 classes (inside, outside), got num_classes={num_classes}")
        self.num_classes, self.k, self.d, self.apex = int(num_classes), k, float(d), float(apex)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """Signed distance-like margin min_i (x_i - apex): >= 0 inside, < 0 outside; exact distance inside."""
        return (x.flatten(1)[:, : self.k] - self.apex).min(dim=1).values

    def forward(self, x):
        m = self.margin(x) * self.log_scale.exp()
        logits = (-m.abs() - 1.0).unsqueeze(1).expand(-1, self.num_classes).clone()
        logits[:, 0], logits[:, 1] = m, -m
        return logits

    def point(self, d: float | None = None) -> torch.Tensor:
        """The point at distance d (default: the model's d) from every sheet, inside the wedge; shape input_shape."""
        x = torch.full((math.prod(self.input_shape),), self.apex)
        x[: self.k] += self.d if d is None else float(d)
        return x.view(self.input_shape)

    def stability(self, sigma: float, d: float | None = None) -> float:
        return wedge_stability(self.d if d is None else float(d), sigma, self.k)

    def persistence(self, gamma: float, d: float | None = None) -> float:
        return wedge_persistence(self.d if d is None else float(d), gamma, self.k)

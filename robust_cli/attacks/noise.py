"""Random noise of the attack's size: the baseline every accuracy-vs-eps curve needs.

A gradient attack that does no better than noise of the same norm is not attacking (gradient masking).
"""

from __future__ import annotations

import torch

from robust_cli.attacks import norms
from robust_cli.attacks.base import Attack
from robust_cli.core.errors import UserError


class Noise(Attack):
    """x + eps * u/||u||: u Gaussian N(0, I) or uniform U[-1, 1]^n, rescaled to norm exactly eps, then clipped to the box.

    Uses no gradient and ignores `targeted` for the perturbation (success is still judged against the target).
    """

    def __init__(self, norm: str = "linf", distribution: str = "uniform", **kwargs):
        super().__init__(**kwargs)
        self.norm = norms.check_norm(norm)
        if distribution not in ("gaussian", "uniform"):
            raise UserError(f"noise distribution must be gaussian or uniform, got {distribution!r}")
        self.distribution = distribution

    def perturb(self, model, x, y, eps, target):
        with torch.no_grad():
            u = torch.randn_like(x) if self.distribution == "gaussian" else torch.rand_like(x) * 2 - 1
            size = norms.lp_norm(u, self.norm).clamp_min(1e-12).reshape(-1, *([1] * (x.dim() - 1)))
            project = norms.projector(x, eps, self.norm, self.bounds)  # only guards float rounding and the box
            return project(x + u / size * norms.per_example(eps, x))

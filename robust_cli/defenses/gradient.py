"""Adversarial training read as gradient regularisation (Oberman, Finlay, Calder 2018): J^1 and J^2.

    J^q[w] = E[ ell(x) + lam * ||grad_x ell(x)||_* ]
with ||.||_* the dual of the attack norm: Linf attacks (FGSM) -> L1 (J^1), L2 attacks -> L2 (J^2). Oberman's
Theorem 2.2: the unit ascent direction a of the attack norm satisfies a . g = ||g||_*, with a = sign(g) (linf) or
g / ||g||_2 (l2), given by robust_cli.attacks.norms.normalize. Both methods below compute a . g:

- exact: double backprop. g = grad_x ell with create_graph; penalty = g . a with a held fixed. Its parameter
  gradient is that of ||g||_*, because a is the (sub)gradient of ||g||_* w.r.t. g.
- fd: finite difference along a (Finlay & Oberman's scalable version): penalty = (ell(x + h a) - ell(x)) / h,
  which is g . a + O(h). It needs one extra forward/backward instead of a backward through the backward.
"""

import torch.nn.functional as F

from robust_cli.attacks.norms import normalize
from robust_cli.core.errors import UserError
from robust_cli.defenses.utils import check_nonnegative, detached, frozen_buffers, input_gradient, per_example_norm


class GradientNormPenalty:
    """ell(x) + lam * ||grad_x ell(x)||_*, per example, averaged over the batch (lam is Oberman's epsilon)."""

    def __init__(self, lam=0.1, norm="linf", method="exact", h=0.01):
        self.lam = check_nonnegative("lam", lam)
        if norm not in ("linf", "l2"):
            raise UserError(f"grad_norm: defense.norm is the attack norm, linf (J^1) or l2 (J^2), got {norm!r}")
        if method not in ("exact", "fd"):
            raise UserError(f"grad_norm: defense.method must be exact or fd, got {method!r}")
        self.norm, self.method = norm, method
        self.h = check_nonnegative("h", h, positive=True)

    def __call__(self, model, x, y):
        _, losses, grad = input_gradient(model, x, y, create_graph=self.method == "exact")
        direction = normalize(grad.detach(), self.norm)
        if self.method == "exact":
            penalty = (grad * direction).flatten(1).sum(1)
        else:
            # the shifted batch is a derivative probe, not training data: keep BatchNorm statistics as they were
            with frozen_buffers(model):
                shifted = F.cross_entropy(model(x + self.h * direction), y, reduction="none")
            penalty = (shifted - losses) / self.h
        loss = losses.mean() + self.lam * penalty.mean()
        return loss, detached(ce=losses.mean(), penalty=penalty.mean(), grad_norm=per_example_norm(grad).mean())

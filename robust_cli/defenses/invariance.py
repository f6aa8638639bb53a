"""Invariant backpropagation and tangent propagation (Demyanov, Bailey, Kotagiri, Leckie 2015; Simard et al.).

All penalties are per example and averaged over the batch; the loss gradient g_i = d ell(x_i, y_i) / d x_i is
that of the example's own loss (not of the batch mean). "Predictions" are the logits: Demyanov et al. report
omitting the softmax derivative in the extra passes of Prediction IBP and Tangent BP for numerical stability,
and we do the same. Demyanov's three-pass implementation is replaced by autograd (double backprop for Loss
IBP / Fast TBP, forward-mode AD for Prediction IBP / Tangent BP): the gradients are the same, the bookkeeping
is PyTorch's.
"""

import torch
import torch.nn.functional as F

from robust_cli.core.errors import UserError
from robust_cli.defenses.tangents import image_tangents
from robust_cli.defenses.utils import (
    check_nonnegative,
    detached,
    input_gradient,
    jacobian_vector_product,
    per_example_norm,
)


class LossIBP:
    """Loss IBP (Demyanov §3.1): ell(x) + beta * ||d ell / d x||_2^2 (their default p = 2).

    Makes the loss insensitive to every input direction; costs about one extra forward/backward.
    """

    def __init__(self, beta=0.1):
        self.beta = check_nonnegative("beta", beta)

    def __call__(self, model, x, y):
        _, losses, grad = input_gradient(model, x, y, create_graph=True)
        penalty = grad.flatten(1).pow(2).sum(1)
        loss = losses.mean() + self.beta * penalty.mean()
        return loss, detached(ce=losses.mean(), penalty=penalty.mean(), grad_norm=per_example_norm(grad).mean())


class PredictionIBP:
    """Prediction IBP (Demyanov §3.2): ell(x) + beta * ||J_f(x) d||_2^2, f = logits.

    direction="gradient" (the paper): d = g, the loss gradient from the backward pass, held fixed like a
    tangent vector (the paper's third pass treats it as an input, not as a function of the weights).
    direction="random": d ~ N(0, I), an unbiased one-sample estimate of ||J_f||_F^2 (Hutchinson); then the
    forward-mode pass is also the main forward and the step costs a single JVP pass plus its backward.
    """

    def __init__(self, beta=0.1, direction="gradient"):
        self.beta = check_nonnegative("beta", beta)
        if direction not in ("gradient", "random"):
            raise UserError(f"prediction_ibp direction must be 'gradient' or 'random', got {direction!r}")
        self.direction = direction

    def __call__(self, model, x, y):
        if self.direction == "gradient":
            _, _, grad = input_gradient(model, x, y, create_graph=False, keep_graph=False)
            direction, extra = grad, {"grad_norm": per_example_norm(grad).mean()}
        else:
            direction, extra = torch.randn_like(x), {}
        # the JVP pass also gives the logits of the loss; it counts as the training forward only when no
        # plain forward ran before it (the gradient direction needed one)
        logits, jvp = jacobian_vector_product(model, x, direction, update_stats=self.direction == "random")
        losses = F.cross_entropy(logits, y, reduction="none")
        penalty = jvp.flatten(1).pow(2).sum(1)
        loss = losses.mean() + self.beta * penalty.mean()
        return loss, detached(ce=losses.mean(), penalty=penalty.mean(), jvp_norm=penalty.sqrt().mean(), **extra)


class TangentProp:
    """Tangent BP (Simard et al.; Demyanov §2.1): ell(x) + beta * sum_t ||J_f(x) t||_2^2 over the 5 tangents.

    One forward-mode pass per tangent vector (two shifts, two scalings, a rotation; see tangents.py), the
    first doubling as the training forward: about 5 JVP passes (the paper: 6x plain BP).
    """

    def __init__(self, beta=0.01, sigma=0.9):
        self.beta = check_nonnegative("beta", beta)
        self.sigma = check_nonnegative("sigma", sigma)

    def __call__(self, model, x, y):
        tangents = image_tangents(x, self.sigma).unbind(1)
        logits, first = jacobian_vector_product(model, x, tangents[0], update_stats=True)  # the training forward
        jvps = [first] + [jacobian_vector_product(model, x, t)[1] for t in tangents[1:]]
        losses = F.cross_entropy(logits, y, reduction="none")
        penalty = sum(jvp.flatten(1).pow(2).sum(1) for jvp in jvps)
        loss = losses.mean() + self.beta * penalty.mean()
        return loss, detached(ce=losses.mean(), penalty=penalty.mean(), jvp_norm=penalty.sqrt().mean())


class FastTangentProp:
    """Fast TBP (Demyanov §4.1): ell(x) + beta * sum_t (g . t)^2, the loss's directional derivatives.

    Penalising the loss rather than the predictions lets one double backprop replace the per-tangent
    passes (equivalent to Loss IBP started from the tangent vectors, Demyanov §A.5).
    """

    def __init__(self, beta=0.01, sigma=0.9):
        self.beta = check_nonnegative("beta", beta)
        self.sigma = check_nonnegative("sigma", sigma)

    def __call__(self, model, x, y):
        tangents = image_tangents(x, self.sigma)
        _, losses, grad = input_gradient(model, x, y, create_graph=True)
        directional = (grad.unsqueeze(1) * tangents).flatten(2).sum(2)  # (B, 5): d ell / d a_t
        penalty = directional.pow(2).sum(1)
        loss = losses.mean() + self.beta * penalty.mean()
        return loss, detached(ce=losses.mean(), penalty=penalty.mean(), grad_norm=per_example_norm(grad).mean())

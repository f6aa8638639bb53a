"""Lipschitz regularisation (Oberman & Calder; Finlay, Oberman, Abbasi 2018): J^Lip and tulip J^{2-Lip}.

J^Lip[f] = E[ell(f(x), y)] + lam * max(Lip(f) - L0, 0), with f the model's output in the label space (the
probability simplex, Oberman's Example 2.5: the softmax of the logits). The seed states the functional, not
how to estimate Lip(f) on a batch; two estimators (defense.estimate):
- gradient: max over the batch of ||J_f(x_i)||_F, the Frobenius norm of the input Jacobian of the softmax
  (an upper bound on the local L2->L2 Lipschitz constant). Exact with one double-backprop per class
  (projections=null), or the Hutchinson estimate mean_k ||J^T u_k||^2 with k Gaussian u_k ~ N(0, I).
- pairs: max over pairs i != j of the batch of ||f(x_i) - f(x_j)||_2 / ||x_i - x_j||_2, a lower bound on
  Lip(f) that needs no second derivatives (the discrete definition used for the data's constant L0).

tulip (J^{2-Lip}) = E[ell(x) + eps ||grad_x ell||_2] + lam_lip * max_batch ||grad_x ell(x)||_2: the first term
is realised, as in the talk, by L2 adversarial training (ell(x + eps g/||g||) = ell(x) + eps ||g||_2 + O(eps^2)),
the second on the loss gradient of the clean batch (double backprop).
"""

import torch
import torch.nn.functional as F

from robust_cli.attacks.norms import clip_box, normalize
from robust_cli.core.errors import UserError
from robust_cli.defenses.utils import check_in_box, check_nonnegative, detached, input_gradient, per_example_norm

_TINY = 1e-12  # inside square roots: keeps the derivative of a zero norm finite


class LipschitzPenalty:
    """ell(x) + lam * relu(Lip_batch(softmax o model) - lip0), Lip estimated by `estimate` (see module doc)."""

    def __init__(self, lam=0.1, lip0=0.0, estimate="gradient", projections=None):
        self.lam = check_nonnegative("lam", lam)
        self.lip0 = check_nonnegative("lip0", lip0)
        if estimate not in ("gradient", "pairs"):
            raise UserError(f"lipschitz: defense.estimate must be gradient or pairs, got {estimate!r}")
        self.estimate = estimate
        if projections is not None and (not isinstance(projections, int) or projections < 1):
            raise UserError(f"lipschitz: defense.projections must be null (exact) or an integer >= 1, got {projections!r}")
        self.projections = projections

    def __call__(self, model, x, y):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        probs = logits.softmax(dim=1)
        extra = {}
        if self.estimate == "gradient":
            jacobian_norms = self.jacobian_frobenius(probs, x)
            lipschitz = jacobian_norms.max()
            extra["jacobian_norm"] = jacobian_norms.mean()
        else:
            lipschitz = self.pairwise_ratio(probs, x)
        penalty = F.relu(lipschitz - self.lip0)
        loss = losses.mean() + self.lam * penalty
        return loss, detached(ce=losses.mean(), penalty=penalty, lipschitz=lipschitz, **extra)

    def jacobian_frobenius(self, probs, x):
        """Per example ||d probs / d x||_F, differentiable (create_graph)."""
        num_classes = probs.shape[1]
        if self.projections is None:
            directions, scale = torch.eye(num_classes, dtype=probs.dtype, device=probs.device), 1.0
        else:
            directions = torch.randn(self.projections, num_classes, dtype=probs.dtype, device=probs.device)
            scale = 1.0 / self.projections
        squared = 0.0
        for u in directions:  # row u of J^T u for every example at once: the examples do not interact
            (vjp,) = torch.autograd.grad((probs * u).sum(), x, create_graph=True, retain_graph=True)
            squared = squared + vjp.flatten(1).pow(2).sum(1)
        return (scale * squared + _TINY).sqrt()

    @staticmethod
    def pairwise_ratio(probs, x):
        """max_{i<j} ||probs_i - probs_j|| / ||x_i - x_j|| over pairs of distinct inputs."""
        i, j = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
        flat = x.detach().flatten(1)
        distance = (flat[i] - flat[j]).norm(dim=1)
        keep = distance > 0
        if not keep.any():
            return probs.sum() * 0  # a batch of identical points says nothing about Lip(f)
        change = ((probs[i] - probs[j]).pow(2).sum(1) + _TINY).sqrt()
        return (change[keep] / distance[keep]).max()


class Tulip:
    """J^{2-Lip}: CE at x + eps g/||g||_2 (one L2 step, clipped to the box) + lam_lip * max_i ||grad_x ell(x_i)||_2.

    g is the per-example loss gradient of the clean batch (computed once, with create_graph for the penalty);
    the adversarial point is held fixed (no gradient through the step), as in adversarial training. The tanh
    head and the weight decay of the talk are model/train options: ++model.head=tanh train.weight_decay=5e-4.
    """

    def __init__(self, eps=0.01, lam_lip=0.1, bounds=(0.0, 1.0)):
        self.eps = check_nonnegative("eps", eps)
        self.lam_lip = check_nonnegative("lam_lip", lam_lip)
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))

    def step(self, x, grad):
        """x + eps * g / ||g||_2 per example, clipped to the data box."""
        return clip_box(x.detach() + self.eps * normalize(grad.detach(), "l2"), self.bounds)

    def __call__(self, model, x, y):
        check_in_box(x, self.bounds, "defense.bounds=null")
        _, losses, grad = input_gradient(model, x, y, create_graph=True)
        grad_norms = per_example_norm(grad)
        lipschitz = grad_norms.max()
        adv_losses = F.cross_entropy(model(self.step(x, grad)), y, reduction="none")
        loss = adv_losses.mean() + self.lam_lip * lipschitz
        return loss, detached(
            ce=losses.mean(),
            adv_loss=adv_losses.mean(),
            penalty=lipschitz,
            grad_norm=grad_norms.mean(),
        )

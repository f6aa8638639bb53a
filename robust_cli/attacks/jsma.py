"""Jacobian-based saliency map attack (Papernot et al. 2016), an L0 attack."""

from __future__ import annotations

import math

import torch

from robust_cli.attacks.base import Attack
from robust_cli.core.errors import UserError


class JSMA(Attack):
    """Targeted: change few input features, two at a time, until the target class is predicted.

    With alpha = dZ_t/dx_i and beta = sum_{j != t} dZ_j/dx_i, each iteration takes the pair (p, q) of the search
    domain maximising -(alpha_p + alpha_q)(beta_p + beta_q) among pairs where theta*(alpha_p+alpha_q) > 0 and
    theta*(beta_p+beta_q) < 0 (the target rises, the others fall), moves both by theta (clipped to the box) and
    drops features that reached the box edge from the domain. Stops on success, when no admissible pair is
    left, or after gamma * n / 2 iterations (gamma = largest fraction of features changed).
    Paper's MNIST setting: theta = +1, gamma = 0.145. We differentiate the logits Z (the paper's F is the
    network output; Carlini & Wagner found the logits version stronger).
    """

    kind = "minimal"
    norm = "l0"

    def __init__(self, targeted="random", theta: float = 1.0, gamma: float = 0.145, chunk_elements: int = 2**24, **kwargs):
        super().__init__(targeted=targeted, **kwargs)
        if self.targeted is None:
            raise UserError("jsma is a targeted attack (Papernot et al.): set attack.targeted to random, next or least_likely")
        if self.bounds is None:
            raise UserError("jsma needs bounded inputs (it pushes features to the box edge); this data has no [0, 1] box")
        if float(theta) == 0 or not 0 < float(gamma) <= 1:
            raise UserError(f"jsma needs theta != 0 and 0 < gamma <= 1 (got {theta}, {gamma})")
        self.theta, self.gamma, self.chunk_elements = float(theta), float(gamma), int(chunk_elements)

    def perturb(self, model, x, y, eps, target):
        n = math.prod(x.shape[1:])
        per_chunk = max(1, self.chunk_elements // (n * n))  # the pair scores are (b, n, n)
        return torch.cat([self._attack(model, x[i : i + per_chunk], target[i : i + per_chunk]) for i in range(0, x.shape[0], per_chunk)])

    def _attack(self, model, x, target):
        lo, hi = self.bounds
        b, n = x.shape[0], math.prod(x.shape[1:])
        x_adv = x.clone().flatten(1)
        # features that can still move in theta's direction
        domain = x_adv < hi if self.theta > 0 else x_adv > lo
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        for _ in range(int(self.gamma * n / 2)):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xi = x_adv[idx].reshape(-1, *x.shape[1:]).requires_grad_(True)
            logits = model(xi)
            t = target[idx]
            hit = logits.argmax(dim=1) == t
            z_t = logits.gather(1, t[:, None]).sum()
            (alpha,) = torch.autograd.grad(z_t, xi, retain_graph=True)
            (total,) = torch.autograd.grad(logits.sum(), xi)
            with torch.no_grad():
                alpha = alpha.flatten(1)
                beta = total.flatten(1) - alpha
                # features outside the domain get alpha = -theta*inf: every pair holding one fails theta*a > 0
                alpha = alpha.masked_fill(~domain[idx], -self.theta * float("inf"))
                a = alpha[:, :, None] + alpha[:, None, :]
                score = (beta[:, :, None] + beta[:, None, :]).mul_(a).neg_()  # -(a_p+a_q)(b_p+b_q), in place
                # admissible: theta*a > 0 and theta*b < 0, i.e. theta*a > 0 and score > 0; p != q
                score.masked_fill_(a <= 0 if self.theta > 0 else a >= 0, 0.0)
                score.diagonal(dim1=1, dim2=2).zero_()
                best, flat = score.flatten(1).max(dim=1)
                move = (best > 0) & ~hit
                p, q = flat // n, flat % n
                rows = idx[move]
                for feature in (p[move], q[move]):
                    x_adv[rows, feature] = (x_adv[rows, feature] + self.theta).clamp(lo, hi)
                domain[idx] &= (x_adv[idx] < hi) if self.theta > 0 else (x_adv[idx] > lo)
                active[idx] = move
        return x_adv.reshape(x.shape)

"""DeepFool (Moosavi-Dezfooli et al. 2016): the smallest L2 step to the nearest linearised decision boundary."""

from __future__ import annotations

import torch

from robust_cli.attacks import norms
from robust_cli.attacks.base import Attack
from robust_cli.core.errors import UserError


class DeepFool(Attack):
    """Multi-class DeepFool (the paper's Algorithm 2), batched.

    At x_i, for each candidate class k != y: f'_k = f_k - f_y, w'_k = grad f'_k. The nearest linearised boundary
    is l = argmin |f'_k| / ||w'_k||_2 and the step r_i = (|f'_l| + 1e-4) / ||w'_l||^2 * w'_l lands on it.
    Steps accumulate in r_tot and x_{i+1} = clip(x + (1 + overshoot) * r_tot), as in the authors' code
    (torchattacks instead applies the overshoot to each step from the current point). Candidates are the
    `candidates` classes with the largest clean logits (the authors' num_classes = 10), the label first.
    An example stops as soon as the model misclassifies it; already-misclassified inputs are returned unchanged.
    """

    kind = "minimal"
    norm = "l2"

    def __init__(self, steps: int = 50, overshoot: float = 0.02, candidates: int = 10, **kwargs):
        super().__init__(**kwargs)
        if self.targeted is not None:
            raise UserError("deepfool is untargeted (Moosavi-Dezfooli et al.): set attack.targeted=false")
        if int(steps) < 1 or int(candidates) < 2 or not float(overshoot) >= 0:
            raise UserError(f"deepfool needs steps >= 1, candidates >= 2, overshoot >= 0 (got {steps}, {candidates}, {overshoot})")
        self.steps, self.overshoot, self.candidates = int(steps), float(overshoot), int(candidates)

    def perturb(self, model, x, y, eps, target):
        with torch.no_grad():
            logits = model(x)
        k = min(self.candidates, logits.shape[1])
        # the label first, then the k-1 most likely other classes
        others = logits.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
        classes = torch.cat([y[:, None], others], dim=1)

        r_tot = torch.zeros_like(x)
        x_adv = x.clone()
        active = logits.argmax(dim=1) == y
        for _ in range(self.steps):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xi = x_adv[idx].requires_grad_(True)
            out = model(xi)
            ci = classes[idx]
            f = out.gather(1, ci)
            still = out.argmax(dim=1) == y[idx]  # success is judged on this very forward pass
            diffs, grads = [], []
            for j in range(1, k):  # one input-gradient per candidate boundary f_k - f_y
                d = f[:, j] - f[:, 0]
                (g,) = torch.autograd.grad(d.sum(), xi, retain_graph=j < k - 1)
                diffs.append(d.detach())
                grads.append(g)
            with torch.no_grad():
                f_prime = torch.stack(diffs, dim=1)  # (b, k-1)
                w_prime = torch.stack(grads, dim=1)  # (b, k-1, *shape)
                w_norm = w_prime.flatten(2).norm(dim=2).clamp_min(1e-12)
                nearest = (f_prime.abs() / w_norm).argmin(dim=1)
                rows = torch.arange(len(idx), device=x.device)
                w_l, f_l, n_l = w_prime[rows, nearest], f_prime[rows, nearest], w_norm[rows, nearest]
                step = ((f_l.abs() + 1e-4) / n_l**2).reshape(-1, *([1] * (x.dim() - 1))) * w_l
                step[~still] = 0  # examples that crossed already keep their point
                r_tot[idx] += step
                x_adv[idx] = norms.clip_box(x[idx] + (1 + self.overshoot) * r_tot[idx], self.bounds)
                active[idx] = still
        return x_adv

"""Simultaneous propagation (Kunin 2018): minimise the forward error (the loss) and maximise the backward error.

Kunin's backward error is the input-space distance ||x~ - x||_2 to the nearest point the network classifies
differently. The seed gives no estimator; we use the first-order one of DeepFool / Large-Margin / MMA
training: with the logit margin m(x) = z_y(x) - max_{k != y} z_k(x), the linearised boundary m = 0 lies at
signed distance
    d(x) = m(x) / ||grad_x m(x)||_2          (negative when x is already misclassified).
Kunin adds -||x~ - x||_2^2 to the loss; an unbounded reward for distance would let the network inflate d by
shrinking the margin gradient forever, so we cap it at a target gamma (as Large-Margin training does):
    loss = ell(x) + mu * mean_i relu(gamma - d_i)^2,
zero for points already gamma away (to first order), the squared distance of the seed otherwise. The
distance is differentiated through the margin gradient (double backprop).
"""

import torch
import torch.nn.functional as F

from robust_cli.defenses.utils import check_nonnegative, detached, per_example_norm


class SimultaneousPropagation:
    """ell(x) + mu * relu(gamma - margin / ||grad_x margin||_2)^2 averaged over the batch."""

    def __init__(self, mu=0.1, gamma=1.0):
        self.mu = check_nonnegative("mu", mu)
        self.gamma = check_nonnegative("gamma", gamma, positive=True)

    def __call__(self, model, x, y):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        true_logit = logits.gather(1, y[:, None]).squeeze(1)
        runner_up = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        margin = true_logit - runner_up
        (margin_grad,) = torch.autograd.grad(margin.sum(), x, create_graph=True)
        # the tiny floor keeps d finite (and its gradient defined) where the margin is flat
        grad_norm = (margin_grad.flatten(1).pow(2).sum(1) + 1e-12).sqrt()
        distance = margin / grad_norm
        penalty = F.relu(self.gamma - distance).pow(2)
        loss = losses.mean() + self.mu * penalty.mean()
        return loss, detached(
            ce=losses.mean(),
            penalty=penalty.mean(),
            backward_error=distance.median(),
            grad_norm=per_example_norm(margin_grad).mean(),
        )

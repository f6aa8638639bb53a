"""Adversarial weight perturbation (Wu, Xia & Wang 2020, "Adversarial Weight Perturbation Helps Robust Generalization").

Before each update the weights w move to w + v, v the layer-wise perturbation that increases the defense's own outer
loss at the crafted x' (CE(x') for PGD-AT, the TRADES or MART loss for those), the update takes its gradient there,
and v is taken off again after the optimizer step:
    v_l = gamma * ||w_l|| * g_l / ||g_l||,    g_l = d loss / d w_l at w
for every weight with two or more dimensions (convolution and linear weights; biases and BatchNorm are left alone).
The official code takes one SGD ascent step on a proxy copy of the model and rescales the step per layer to
gamma * ||w_l||; with plain SGD the step is a multiple of g_l, so the rescaled step is v_l above, whatever the
proxy's learning rate. The gradient here is taken in the model's current (train) mode on copies of the BatchNorm
buffers, which is what the proxy's pass is: its running statistics are not the model's, and they are not changed.
gamma: 5e-3 with TRADES (warmup 10 epochs), 1e-2 with PGD-AT (no warmup), the paper's values.
"""

from __future__ import annotations

import torch

from robust_cli.core.errors import UserError
from robust_cli.defenses.utils import check_nonnegative, frozen_buffers

_EPS = 1e-20  # the official code's guard against a zero gradient


class AdversarialWeightPerturbation:
    """AWP for an adversarial objective (defense.awp): perturb(model, loss_fn) before the update, restore() after it.

    warmup: the first `warmup` epochs train without AWP (the official TRADES-AWP script starts it at epoch 10)."""

    def __init__(self, gamma=0.0, warmup=0):
        self.gamma = check_nonnegative("awp.gamma", gamma)
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise UserError(f"defense.awp.warmup must be an integer >= 0 (epochs without AWP), got {warmup!r}")
        self.warmup = warmup
        self.active = warmup == 0
        self._applied: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def begin_epoch(self, epoch: int) -> None:
        self.active = epoch > self.warmup

    @staticmethod
    def perturbed_weights(model) -> list[torch.Tensor]:
        return [p for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1 and name.endswith("weight")]

    def perturbation(self, model, loss_fn) -> list[torch.Tensor]:
        """v_l for each perturbed weight (see the module doc); model's buffers are left as they were."""
        weights = self.perturbed_weights(model)
        with frozen_buffers(model):
            grads = torch.autograd.grad(loss_fn(model), weights, allow_unused=True)
        out = []
        for w, g in zip(weights, grads):
            g = torch.zeros_like(w) if g is None else g.detach()
            out.append(self.gamma * w.detach().norm() * g / (g.norm() + _EPS))
        return out

    def perturb(self, model, loss_fn) -> dict:
        """Move the weights to w + v; returns stats for the training log."""
        self.restore()  # a step that never reached after_step (an exception) must not leave a perturbation behind
        if not self.active or self.gamma == 0:
            return {"awp_on": torch.tensor(0.0)}
        weights = self.perturbed_weights(model)
        perturbation = self.perturbation(model, loss_fn)
        with torch.no_grad():
            for w, v in zip(weights, perturbation):
                original = w.detach().clone()
                w.add_(v)
                self._applied.append((w, original, v))
        return {"awp_on": torch.tensor(1.0)}

    def restore(self) -> None:
        """Take v off after the optimizer step: w_new = w + (step taken at w + v). Without a step, w exactly."""
        with torch.no_grad():
            for w, original, v in self._applied:
                w.copy_(original + (w - (original + v)))
        self._applied = []

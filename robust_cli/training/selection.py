"""Choosing the checkpoint a training publishes (Rice, Wong & Kolter 2020; Gowal et al. 2020).

- Validation: clean and adversarial accuracy on the held-out split (data.val_fraction) every k epochs.
- Selection: the epoch with the best validation accuracy (clean or robust) is kept beside the last one.
- Weight averaging: an exponential moving average of the weights and BatchNorm buffers, evaluated and published
  instead of the raw weights.
"""

from __future__ import annotations

import copy

import torch

from robust_cli.core.batches import iterate_batches


class Validation:
    """Clean and robust accuracy of a model on the validation split; robust = correct on x and on attack(x)
    (an example the model already gets wrong counts as an error, as everywhere in robust)."""

    def __init__(self, attack, eps: float, every: int, x, y, batch_size: int = 256):
        self.attack, self.eps, self.every = attack, float(eps), int(every)
        self.x, self.y, self.batch_size = x, y, int(batch_size)

    def due(self, epoch: int, last_epoch: int) -> bool:
        return epoch % self.every == 0 or epoch == last_epoch

    def __call__(self, model, device) -> tuple[float, float]:
        was_training = model.training
        model.eval()
        clean = robust = 0
        try:
            for xb, yb in iterate_batches(self.x, self.y, self.batch_size, device):
                with torch.no_grad():
                    correct = model(xb).argmax(1) == yb
                x_adv = self.attack(model, xb, yb, self.eps) if self.eps > 0 else xb
                with torch.no_grad():
                    robust += (correct & (model(x_adv).argmax(1) == yb)).sum().item()
                clean += correct.sum().item()
        finally:
            model.train(was_training)
        n = max(len(self.y), 1)
        return clean / n, robust / n


CRITERIA = {"best_clean": "val_accuracy", "best_robust": "val_robust_accuracy"}


class BestCheckpoint:
    """The best validation epoch so far under one criterion (a train_log column), with its weights.

    Ties keep the earlier epoch. `state()` / `load()` carry it through the resumable checkpoint."""

    def __init__(self, criterion: str):
        self.criterion, self.column = criterion, CRITERIA[criterion]
        self.epoch, self.value, self.weights = None, None, None

    def offer(self, epoch: int, row: dict, model) -> bool:
        value = row.get(self.column)
        if value is None or value != value:  # not validated this epoch
            return False
        if self.value is not None and value <= self.value:
            return False
        self.epoch, self.value = epoch, float(value)
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def state(self) -> dict:
        return {"criterion": self.criterion, "column": self.column, "epoch": self.epoch, "value": self.value, "state_dict": self.weights}

    def load(self, state: dict | None) -> None:
        if state and state.get("criterion") == self.criterion:
            self.epoch, self.value, self.weights = state["epoch"], state["value"], state["state_dict"]


class WeightAverage:
    """avg <- decay * avg + (1 - decay) * w after every optimizer step, for every parameter and floating-point buffer
    (BatchNorm running statistics); integer buffers (num_batches_tracked) are copied. Starts at the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        for name, avg in self.model.state_dict().items():
            if avg.dtype.is_floating_point:
                avg.lerp_(current[name].to(avg.dtype), 1.0 - self.decay)
            else:
                avg.copy_(current[name])

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

"""The learning-rate schedules of the recipes that torch does not ship (conf/scheduler/*.yaml names them)."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from robust_cli.core.errors import UserError


def piecewise_milestones(milestones, epochs: int) -> list[int]:
    """Epochs (1-based) from which the piecewise schedule lowers the lr by train.lr_gamma each; null: Rice et al.'s
    /10 after 50 % and /100 after 75 % of the epochs (their t / epochs < 0.5, < 0.75 rule)."""
    if milestones is None:
        return [math.ceil(epochs * 0.5) + 1, math.ceil(epochs * 0.75) + 1]
    values = list(milestones)
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in values) or values != sorted(values):
        raise UserError(
            f"train.milestones must be increasing epoch numbers (the first epoch at each lower lr), or null "
            f"(/10 at 50 % and /100 at 75 % of the epochs), got {milestones!r}"
        )
    return values


class Piecewise(LambdaLR):
    """The lr times gamma at each milestone epoch, stepped once per epoch: after k steps, epoch k + 1 trains."""

    def __init__(self, optimizer, epochs: int, milestones=None, gamma: float = 0.1):
        marks, gamma = piecewise_milestones(milestones, int(epochs)), float(gamma)
        super().__init__(optimizer, lambda k: gamma ** sum(k + 1 >= m for m in marks))


class Cyclic(LambdaLR):
    """Wong et al.'s triangle, per step: linear from 0 up to the lr at `peak` of all steps, then down to 0. Step k
    (0-based) trains at the lr of its end, as their interpolation does."""

    def __init__(self, optimizer, epochs: int, steps_per_epoch: int, peak: float = 0.4):
        total = int(epochs) * int(steps_per_epoch)
        top = float(peak) * total

        def triangle(k):
            s = k + 1
            return s / top if s <= top else max(0.0, (total - s) / (total - top))

        super().__init__(optimizer, triangle)

"""Gradient attacks with an eps budget: single step (FGM/FGSM, Rozsa's gradient step, R+FGSM) and iterative
(PGD, BIM/IGSM, MI-FGSM). The norm-specific parts live in `norms`; nothing here is copied per norm.
"""

from __future__ import annotations

import math

import torch

from robust_cli.attacks import norms
from robust_cli.attacks.base import Attack, check_loss
from robust_cli.core.errors import UserError


def _advance(x_adv, step, direction, inplace=False):
    """x_adv + step * direction in one kernel (step is a float or a (B, 1, ..) tensor)."""
    if isinstance(step, torch.Tensor):
        return x_adv.addcmul_(step, direction) if inplace else torch.addcmul(x_adv, step, direction)
    return x_adv.add_(direction, alpha=step) if inplace else torch.add(x_adv, direction, alpha=step)


def _positive_int(name, value, minimum=1):
    if value is None or int(value) != value or int(value) < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------- one step
class FGM(Attack):
    """Fast gradient method (Oberman, Theorem 2.2): x + eps * a, a the dual-norm unit direction of grad loss.

    norm=l2 (default): a = g/||g||_2; norm=linf: a = sign(g), i.e. FGSM (Goodfellow et al.).
    """

    iterative = False

    def __init__(self, norm: str = "l2", loss: str = "ce", **kwargs):
        super().__init__(**kwargs)
        self.norm = norms.check_norm(norm)
        self.loss = check_loss(loss)

    def direction(self, grad):
        return norms.normalize(grad, self.norm)

    def perturb(self, model, x, y, eps, target):
        grad = self.loss_gradient(model, x, y, target)
        with torch.no_grad():
            project = norms.projector(x, eps, self.norm, self.bounds)
            return project(_advance(x, norms.per_example(eps, x), self.direction(grad)))


class FGSM(FGM):
    """Fast gradient sign method (Goodfellow et al. 2015): x + eps * sign(grad loss), clipped to [0, 1]."""

    def __init__(self, **kwargs):
        super().__init__(norm="linf", **kwargs)


class Gradient(FGM):
    """Rozsa et al. (2016) raw gradient step x + eps * grad (Langer's (B)(ii)), keeping the gradient's shape.

    The raw gradient has no fixed size, so we scale it by its largest entry: the step g/||g||_inf moves the most
    sensitive pixel by exactly eps and the others in proportion (Rozsa's "fast gradient value"); the budget is
    therefore linf, and unlike FGSM small gradient entries give small changes.
    """

    def __init__(self, **kwargs):
        super().__init__(norm="linf", **kwargs)

    def direction(self, grad):
        scale = grad.abs().flatten(1).amax(dim=1).clamp_min(1e-12)
        return grad / scale.reshape(-1, *([1] * (grad.dim() - 1)))


class RFGSM(Attack):
    """R+FGSM (Tramèr et al. 2018): a random sign step of size alpha, then FGSM with eps - alpha from there.

    alpha defaults to eps/2 as in the paper (eps = 16/256, alpha = 8/256); an alpha above eps is cut to eps.
    """

    norm = "linf"

    def __init__(self, alpha: float | None = None, loss: str = "ce", **kwargs):
        super().__init__(**kwargs)
        self.loss = check_loss(loss)
        if alpha is not None and not float(alpha) >= 0:
            raise UserError(f"rfgsm alpha must be >= 0 or null (= eps/2), got {alpha!r}")
        self.alpha = None if alpha is None else float(alpha)

    def perturb(self, model, x, y, eps, target):
        eps_b = norms.per_example(eps, x)
        alpha = eps_b / 2 if self.alpha is None else (torch.clamp(eps_b, max=self.alpha) if isinstance(eps_b, torch.Tensor) else min(self.alpha, eps_b))
        with torch.no_grad():
            x_start = norms.clip_box(_advance(x, alpha, torch.randn_like(x).sign()), self.bounds)
        grad = self.loss_gradient(model, x_start, y, target)
        with torch.no_grad():
            project = norms.projector(x, eps, "linf", self.bounds)
            return project(_advance(x_start, eps_b - alpha, grad.sign()))


# ----------------------------------------------------------------------------------------------- iterative
class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018): from a random point of the eps-ball, `steps` steps of
    size `step_size` along the dual-norm direction, each followed by projection onto ball and box.

    step_size null -> 2.5 * eps / steps (Madry et al.: enough to reach the sphere from any start).
    restarts > 1: each example keeps its own worst case over the restarts (adversarial first, then highest loss).
    early_stop: an example stops at its first adversarial iterate (judged on the logits the next gradient computes
    anyway, so it costs nothing): the point just across the boundary, as when IGSM is run "until the target class".
    Off by default: the papers run every step, which carries the example deeper into the other class.
    """

    iterative = True

    def __init__(
        self,
        norm: str = "linf",
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        early_stop: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(early_stop, bool):
            raise UserError(f"early_stop must be true or false, got {early_stop!r}")
        self.early_stop = early_stop
        self.norm = norms.check_norm(norm)
        self.loss = check_loss(loss)
        self.steps = _positive_int("steps", steps, minimum=0) if steps is not None else None
        if step_size is not None and not float(step_size) > 0:
            raise UserError(f"step_size must be > 0 or null (automatic), got {step_size!r}")
        self.step_size = None if step_size is None else float(step_size)
        self.random_start = bool(random_start)
        self.restarts = _positive_int("restarts", restarts)

    # the two rules a subclass changes: how many steps, how long
    def num_steps(self, eps) -> int:
        return self.steps

    def default_step_size(self, eps_b, steps):
        return 2.5 * eps_b / max(steps, 1)

    def ascent_direction(self, grad, memory):
        """(direction, memory) for this step; PGD is memoryless (and owns grad: normalised in place)."""
        return norms.normalize(grad, self.norm, inplace=True), None

    def perturb(self, model, x, y, eps, target):
        eps_b = norms.per_example(eps, x)
        steps = self.num_steps(eps)
        step = self.step_size if self.step_size is not None else self.default_step_size(eps_b, steps)
        # in place: x_adv is ours (a fresh start or a copy of x) and the step's graph is freed by then, so no
        # per-step allocations beyond autograd's own (a fifth of the step time on a memory-bound CPU)
        project = norms.projector(x, eps, self.norm, self.bounds, inplace=True)
        best_adv = best_success = best_loss = None
        for _ in range(self.restarts):
            x_adv = norms.random_start(x, eps, self.norm, self.bounds) if self.random_start else x.clone()
            memory = None
            for _ in range(steps):
                logits, _, grad = self.loss_and_gradient(model, x_adv, y, target)
                with torch.no_grad():
                    direction, memory = self.ascent_direction(grad, memory)
                    if self.early_stop:  # a finished example takes no further step
                        direction = direction * ~self.is_adversarial(logits, y, target).reshape(-1, *([1] * (x.dim() - 1)))
                    x_adv = project(_advance(x_adv, step, direction, inplace=True))
            if self.restarts == 1:
                return x_adv
            best_adv, best_success, best_loss = self._keep_worst_case(model, x_adv, y, target, best_adv, best_success, best_loss)
        return best_adv

    @torch.no_grad()
    def _keep_worst_case(self, model, x_adv, y, target, best_adv, best_success, best_loss):
        """Per example, not per batch: adversarial beats non-adversarial, then the higher attack loss wins."""
        logits = model(x_adv)
        loss = self.attack_loss(logits, y, target)
        success = self.is_adversarial(logits, y, target)
        if best_adv is None:
            return x_adv, success, loss
        better = (success & ~best_success) | ((success == best_success) & (loss > best_loss))
        mask = better.reshape(-1, *([1] * (x_adv.dim() - 1)))
        return torch.where(mask, x_adv, best_adv), torch.where(better, success, best_success), torch.where(better, loss, best_loss)


class BIM(PGD):
    """Basic iterative method / IGSM (Kurakin et al. 2017): FGSM steps of alpha from x itself (no random start),
    clipped to the linf eps-ball and the box after each step (Bell eq. 5).

    Paper defaults: alpha = 1/255 (one grey level) and steps = ceil(min(255 eps + 4, 1.25 * 255 eps)).
    """

    def __init__(self, steps: int | None = None, step_size: float | None = 1 / 255, **kwargs):
        super().__init__(norm="linf", steps=steps, step_size=step_size, random_start=False, restarts=1, **kwargs)

    def num_steps(self, eps) -> int:
        if self.steps is not None:
            return self.steps
        eps_max = float(eps.max()) if isinstance(eps, torch.Tensor) else float(eps)
        return int(math.ceil(min(255 * eps_max + 4, 1.25 * 255 * eps_max)))


class IGSM(BIM):
    """IGSM as Bell ran it for her MNIST persistence histograms (Figures 10, 13-16): BIM aimed at a target class and
    stopped at the first iterate the model gives the target, so the example sits just across the boundary; eps is
    only the cap. With the persistence command's targets_per_point=9, every other class is a target once."""

    def __init__(self, targeted="random", early_stop: bool = True, **kwargs):
        super().__init__(targeted=targeted, early_stop=early_stop, **kwargs)


class MIFGSM(PGD):
    """Momentum iterative FGSM (Dong et al. 2018): g <- mu * g + grad / ||grad||_1, step alpha * sign(g).

    The L1 normalisation is per example over all its input dimensions (not over the batch, not per channel).
    Paper defaults: 10 steps, alpha = eps / steps, mu = 1, start at x. norm=l2 steps along g/||g||_2 instead.
    """

    def __init__(self, norm: str = "linf", steps: int = 10, step_size: float | None = None, decay: float = 1.0, **kwargs):
        super().__init__(norm=norm, steps=steps, step_size=step_size, random_start=False, restarts=1, **kwargs)
        if not float(decay) >= 0:
            raise UserError(f"mifgsm decay must be >= 0, got {decay!r}")
        self.decay = float(decay)

    def default_step_size(self, eps_b, steps):
        return eps_b / max(steps, 1)

    def ascent_direction(self, grad, memory):
        l1 = grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (grad.dim() - 1)))
        memory = grad / l1 if memory is None else self.decay * memory + grad / l1
        return norms.normalize(memory, self.norm), memory

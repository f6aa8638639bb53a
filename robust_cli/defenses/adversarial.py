"""Adversarial objectives: an inner maximisation crafts x', an outer loss trains on it.

Every objective here is `AdversarialObjective.__call__(model, x, y) -> (loss, stats)`:
    x' = craft(model, x, y)                 (BatchNorm in `attack_bn` mode, running statistics left untouched)
    [AWP: weights w -> w + v, v the adversarial weight perturbation of the outer loss at x']
    loss, stats = outer(model, x, x', y)
x' is held fixed: the parameter gradient is that of the loss at the attack's point (Danskin's theorem for an inner
maximum), not a derivative through the attack.

attack_bn: the BatchNorm mode while x' is crafted. `train` (batch statistics, as the loop leaves the model: Madry's
and Rice's PGD-AT) or `eval` (running statistics: the official TRADES and MART code calls model.eval() to craft).
Either way the attack's forward passes are not training batches: the running statistics are restored after the
attack, so they see the training batches of the outer loss only.

AdversarialTraining (Goodfellow et al. 2015; Madry et al. 2018; Demyanov's fast AT), with the attacks' own code:
    loss = mix * ell(x) + (1 - mix) * ell(x_adv),     x_adv = attack(model, x, y, eps)
`mix` is Goodfellow's alpha (0.5 in his paper). The YAMLs use mix = 0: then E[ell(x_adv)] = E[ell(x) +
eps ||grad_x ell||_*] + O(eps^2) is exactly Oberman's J^1 (FGSM) / J^2 (L2 step), and it is Madry's PGD training
and Demyanov's fast AT (which skips the clean-loss weight gradients); set defense.mix=0.5 for Goodfellow's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robust_cli.attacks import norms
from robust_cli.core.errors import UserError
from robust_cli.defenses.utils import check_in_box, check_nonnegative, detached, frozen_buffers, per_example_norm

ATTACK_BN = ("train", "eval")


def check_attack_bn(attack_bn) -> str:
    if attack_bn not in ATTACK_BN:
        raise UserError(f"defense.attack_bn must be train or eval (BatchNorm mode while x' is crafted), got {attack_bn!r}")
    return attack_bn


class bn_mode:
    """Run a block with every module in eval mode when mode == 'eval' (restoring each module's own flag after)."""

    def __init__(self, model, mode):
        self.model, self.mode, self.flags = model, mode, None

    def __enter__(self):
        if self.mode == "eval":
            self.flags = [(m, m.training) for m in self.model.modules()]
            self.model.eval()

    def __exit__(self, *exc):
        if self.flags is not None:
            for m, training in self.flags:
                m.training = training
        return False


class AdversarialObjective:
    """The inner/outer split shared by PGD-AT, TRADES and MART, with AWP as an option (see the module doc).

    Subclasses define `craft(model, x, y) -> x'` and `outer(model, x, x_adv, y) -> (loss, stats)`.
    The training loop calls `begin_epoch(epoch)` before an epoch and `after_step()` after each optimizer step.
    """

    bounds = (0.0, 1.0)
    bounds_setting = "defense.bounds=null"  # the setting that turns the box off, named when data leave it

    def __init__(self, attack_bn="train", awp=None):
        self.attack_bn = check_attack_bn(attack_bn)
        self.awp = awp if awp is not None and awp.gamma > 0 else None

    def craft(self, model, x, y):
        raise NotImplementedError

    def outer(self, model, x, x_adv, y):
        raise NotImplementedError

    def __call__(self, model, x, y):
        check_in_box(x, self.bounds, self.bounds_setting)
        with bn_mode(model, self.attack_bn), frozen_buffers(model):
            x_adv = self.craft(model, x, y).detach()
        extra = {}
        if self.awp is not None:
            extra = self.awp.perturb(model, lambda m: self.outer(m, x, x_adv, y)[0])
        loss, stats = self.outer(model, x, x_adv, y)
        stats.update(extra)
        return loss, stats

    def begin_epoch(self, epoch: int) -> None:
        if self.awp is not None:
            self.awp.begin_epoch(epoch)

    def after_step(self) -> None:
        if self.awp is not None:
            self.awp.restore()


def inner_pgd(model, x, loss_fn, eps, steps, step_size, norm, bounds, init_std=0.001):
    """The inner maximisation of the official TRADES and MART code: start at x + init_std * N(0, I), then `steps`
    ascent steps of `step_size` on loss_fn(logits) (a per-example loss), each projected onto ball and box.

    norm=linf: sign steps (their code). norm=l2: normalised-gradient steps (the official TRADES l2 branch takes SGD
    steps on delta with its gradient renormalised to unit l2 length, lr = 2 eps / steps, then box and ball)."""
    project = norms.projector(x, eps, norm, bounds, inplace=True)
    x_adv = x + init_std * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(x_adv)).sum(), x_adv)
        # in place on the detached iterate and on our own gradient: no allocation per step beyond autograd's
        x_adv = project(x_adv.detach().add_(norms.normalize(grad, norm, inplace=True), alpha=step_size))
    return norms.clip_box(x_adv.detach(), bounds)


def default_step_size(eps, steps, norm):
    """The official scripts' ratio: linf 2/255 for eps 8/255 over 10 steps (eps / 4); l2 2 eps / steps (TRADES)."""
    return eps / 4 if norm == "linf" else 2 * eps / max(steps, 1)


class InnerPGDObjective(AdversarialObjective):
    """An objective whose x' comes from its own PGD on `inner_loss` (TRADES: the KL to p(x); MART: CE), started at
    x + init_std * N(0, I) and crafted in eval mode by default, as the official TRADES and MART code do."""

    def __init__(self, eps, beta=6.0, steps=10, step_size=None, norm="linf", init_std=0.001, attack_bn="eval", bounds=(0.0, 1.0), awp=None):
        super().__init__(attack_bn, awp)
        self.eps = check_nonnegative("eps", eps)
        self.beta = check_nonnegative("beta", beta)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise UserError(f"defense.steps must be an integer >= 0 (inner PGD steps), got {steps!r}")
        self.steps = steps
        self.norm = norms.check_norm(norm)
        self.step_size = default_step_size(self.eps, steps, self.norm) if step_size is None else check_nonnegative("step_size", step_size, positive=True)
        self.init_std = check_nonnegative("init_std", init_std)
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))

    def inner_loss(self, model, x, y):
        """The per-example loss (a function of the logits at x') the inner maximisation ascends."""
        raise NotImplementedError

    def craft(self, model, x, y):
        return inner_pgd(model, x, self.inner_loss(model, x, y), self.eps, self.steps, self.step_size, self.norm, self.bounds, self.init_std)


class AdversarialTraining(AdversarialObjective):
    """mix * CE(x) + (1 - mix) * CE(attack(model, x, y, eps)) for any budgeted attack (FGSM, FGM, PGD, ...)."""

    bounds_setting = "defense.attack.bounds=null"

    def __init__(self, attack, eps, mix=0.0, attack_bn="train", awp=None):
        super().__init__(attack_bn, awp)
        if getattr(attack, "kind", "budgeted") != "budgeted":
            raise UserError(f"adversarial training needs a budgeted attack (fgsm, fgm, pgd), got {type(attack).__name__}")
        self.attack = attack
        # attack_bn decides the mode: the attack must leave the model's mode as bn_mode set it
        if hasattr(attack, "model_mode"):
            attack.model_mode = "keep"
        self.bounds = getattr(attack, "bounds", None)
        self.norm = getattr(attack, "norm", "linf")
        self.eps = check_nonnegative("eps", eps)
        self.mix = check_nonnegative("mix", mix)
        if self.mix > 1:
            raise UserError(f"defense.mix is the weight of the clean loss and must be in [0, 1], got {mix}")

    def craft(self, model, x, y):
        return self.attack(model, x, y, self.eps)

    def outer(self, model, x, x_adv, y):
        adv_losses = F.cross_entropy(model(x_adv), y, reduction="none")
        stats = {"adv_loss": adv_losses.mean(), "perturbation_l2": per_example_norm(x_adv - x).mean()}
        if self.mix == 0:  # no clean forward at all: that is what makes single-step AT cost ~2x plain training
            return adv_losses.mean(), detached(**stats)
        clean_losses = F.cross_entropy(model(x), y, reduction="none")
        loss = self.mix * clean_losses.mean() + (1 - self.mix) * adv_losses.mean()
        # ell(x_adv) - ell(x) = eps ||grad_x ell||_* + O(eps^2) (Oberman): the implicit penalty and the gradient norm
        increase = (adv_losses - clean_losses).mean()
        stats.update(ce=clean_losses.mean(), penalty=increase)
        if self.eps > 0:
            stats["grad_norm_fd"] = increase / self.eps
        return loss, detached(**stats)

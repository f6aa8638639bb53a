"""Adversarial training (Goodfellow et al. 2015; Madry et al. 2018; Demyanov's fast AT), with the attacks' own code.

    loss = mix * ell(x) + (1 - mix) * ell(x_adv),     x_adv = attack(model, x, y, eps)
`mix` is Goodfellow's alpha (0.5 in his paper). The YAMLs use mix = 0: then E[ell(x_adv)] = E[ell(x) +
eps ||grad_x ell||_*] + O(eps^2) is exactly Oberman's J^1 (FGSM) / J^2 (L2 step), and it is Madry's PGD training
and Demyanov's fast AT (which skips the clean-loss weight gradients); set defense.mix=0.5 for Goodfellow's. x_adv is held fixed: the parameter gradient is that of the loss at the
attack's point (Danskin's theorem for an inner maximum), not a derivative through the attack.

Attack generation mode is the attack's `model_mode`: the YAMLs use "keep", i.e. the attack runs the model in
the mode the training loop left it in (train mode: batch statistics and dropout, as in Madry's and most
PyTorch AT code); `defense.attack.model_mode=eval` generates with running statistics instead. Either way the
attack's forward passes are not training batches: BatchNorm buffers are restored after the attack, so the
running statistics see the clean and/or adversarial training batches only.
"""
import torch.nn.functional as F

from robust_cli.defenses.utils import check_in_box, check_nonnegative, detached, frozen_buffers, per_example_norm
from robust_cli.errors import UserError


class AdversarialTraining:
    """mix * CE(x) + (1 - mix) * CE(attack(model, x, y, eps)) for any budgeted attack (FGSM, FGM, PGD, ...)."""

    def __init__(self, attack, eps, mix=0.0):
        if getattr(attack, "kind", "budgeted") != "budgeted":
            raise UserError(f"adversarial training needs a budgeted attack (fgsm, fgm, pgd), got {type(attack).__name__}")
        self.attack = attack
        self.eps = check_nonnegative("eps", eps)
        self.mix = check_nonnegative("mix", mix)
        if self.mix > 1:
            raise UserError(f"defense.mix is the weight of the clean loss and must be in [0, 1], got {mix}")

    def __call__(self, model, x, y):
        check_in_box(x, getattr(self.attack, "bounds", None), "defense.attack.bounds=null")
        with frozen_buffers(model):
            x_adv = self.attack(model, x, y, self.eps).detach()
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

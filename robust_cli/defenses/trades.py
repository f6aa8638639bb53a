"""TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy").

    loss = CE(f(x), y) + beta * KL(p(x) || p(x')),     x' = argmax_{x' in B(x, eps)} KL(p(x) || p(x'))
KL is summed over classes and averaged over the batch (the official code: KLDivLoss(sum) / batch size). x' comes
from PGD on that KL, started at x + 0.001 N(0, I) with p(x) held fixed, the model in eval mode (attack_bn=eval, as
the official trades.py calls model.eval() to craft). beta = 1/lambda: larger is more robust and less accurate. The
official script's default is beta 1.0; the released CIFAR-10 WRN-34-10 and the follow-ups (AWP, RobustBench's
TRADES baselines) use 6.0, which is ours.
"""
import torch
import torch.nn.functional as F

from robust_cli.attacks import norms
from robust_cli.defenses.adversarial import AdversarialObjective, default_step_size, inner_pgd
from robust_cli.defenses.utils import check_nonnegative, detached, per_example_norm
from robust_cli.errors import UserError


def kl_divergence(log_p, log_q):
    """KL(p || q) per example from log-probabilities, summed over classes."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def check_steps(steps):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise UserError(f"defense.steps must be an integer >= 0 (inner PGD steps), got {steps!r}")
    return steps


class TRADES(AdversarialObjective):
    """CE(x) + beta * KL(p(x) || p(x')), x' by KL-PGD (see the module doc); `awp` adds Wu et al.'s weight perturbation."""

    def __init__(self, eps, beta=6.0, steps=10, step_size=None, norm="linf", init_std=0.001, attack_bn="eval",
                 bounds=(0.0, 1.0), awp=None):
        super().__init__(attack_bn, awp)
        self.eps = check_nonnegative("eps", eps)
        self.beta = check_nonnegative("beta", beta)
        self.steps = check_steps(steps)
        self.norm = norms.check_norm(norm)
        self.step_size = default_step_size(self.eps, self.steps, self.norm) if step_size is None else check_nonnegative("step_size", step_size)
        self.init_std = check_nonnegative("init_std", init_std)
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))

    def craft(self, model, x, y):
        with torch.no_grad():
            log_p_clean = F.log_softmax(model(x), dim=1)
        return inner_pgd(model, x, lambda logits: kl_divergence(log_p_clean, F.log_softmax(logits, dim=1)),
                         self.eps, self.steps, self.step_size, self.norm, self.bounds, self.init_std)

    def outer(self, model, x, x_adv, y):
        logits, logits_adv = model(x), model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = kl_divergence(F.log_softmax(logits, dim=1), F.log_softmax(logits_adv, dim=1)).mean()
        loss = natural + self.beta * robust
        return loss, detached(ce=natural, kl=robust, perturbation_l2=per_example_norm(x_adv - x).mean())

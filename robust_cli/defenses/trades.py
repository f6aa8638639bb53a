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

from robust_cli.defenses.adversarial import InnerPGDObjective
from robust_cli.defenses.utils import detached, per_example_norm


def kl_divergence(log_p, log_q):
    """KL(p || q) per example from log-probabilities, summed over classes."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


class TRADES(InnerPGDObjective):
    """CE(x) + beta * KL(p(x) || p(x')), x' by KL-PGD (see the module doc); `awp` adds Wu et al.'s weight perturbation."""

    def inner_loss(self, model, x, y):
        with torch.no_grad():
            log_p_clean = F.log_softmax(model(x), dim=1)
        return lambda logits: kl_divergence(log_p_clean, F.log_softmax(logits, dim=1))

    def outer(self, model, x, x_adv, y):
        logits, logits_adv = model(x), model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = kl_divergence(F.log_softmax(logits, dim=1), F.log_softmax(logits_adv, dim=1)).mean()
        loss = natural + self.beta * robust
        return loss, detached(ce=natural, kl=robust, perturbation_l2=per_example_norm(x_adv - x).mean())

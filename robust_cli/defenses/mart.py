"""MART (Wang et al. 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified Examples").

    loss = BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x))
    BCE(p(x'), y) = CE(p(x'), y) - log(1 - max_{k != y} p_k(x'))
x' from CE-PGD started at x + 0.001 N(0, I), the model in eval mode (the official mart.py). The misclassification
weight 1 - p_y(x) is not detached (as in the official code). The constants keep the official code's guards
(log(1.0001 - p + 1e-12), log(p' + 1e-12), 1.0000001 - p_y). beta: 6.0 for WRN-34-10, 5.0 for ResNet-18 (the
official train_wideresnet.py / train_resnet.py).
"""

import torch
import torch.nn.functional as F

from robust_cli.defenses.adversarial import InnerPGDObjective
from robust_cli.defenses.utils import detached, per_example_norm


class MART(InnerPGDObjective):
    """BCE(x') + beta * KL(p(x) || p(x')) (1 - p_y(x)), x' by CE-PGD (see the module doc)."""

    def inner_loss(self, model, x, y):
        return lambda logits: F.cross_entropy(logits, y, reduction="none")

    def outer(self, model, x, x_adv, y):
        logits, logits_adv = model(x), model(x_adv)
        probs_adv = logits_adv.softmax(dim=1)
        # the most likely wrong class at x'
        runner_up = probs_adv.scatter(1, y[:, None], float("-inf")).argmax(dim=1)
        ce_adv = F.cross_entropy(logits_adv, y)
        margin_term = -torch.log(1.0001 - probs_adv.gather(1, runner_up[:, None]).squeeze(1) + 1e-12).mean()
        probs = logits.softmax(dim=1)
        kl = (probs * (F.log_softmax(logits, dim=1) - torch.log(probs_adv + 1e-12))).sum(dim=1)
        weight = 1.0000001 - probs.gather(1, y[:, None]).squeeze(1)
        robust = (kl * weight).mean()
        loss = ce_adv + margin_term + self.beta * robust
        return loss, detached(bce=ce_adv + margin_term, kl_weighted=robust, perturbation_l2=per_example_norm(x_adv - x).mean())

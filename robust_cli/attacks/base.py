"""One calling convention for every attack.

budgeted: `attack(model, x, y, eps) -> x_adv` with ||x_adv - x|| <= eps in `attack.norm`, x_adv in the box.
minimal:  `attack(model, x, y) -> x_adv`, the smallest perturbation the attack can find (x itself when x is
          already adversarial; an unsuccessful x_adv when it fails: callers judge success by re-running the model).
Both take `target=` (a (B,) tensor) to attack towards given classes; otherwise a targeted attack picks its
targets with `choose_target` (callers that report success need them: call it first and pass them in).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from robust_cli.attacks import norms
from robust_cli.core.errors import UserError

TARGET_MODES = ("least_likely", "random", "next")
LOSSES = ("ce", "margin", "dlr")
VOTES = ("majority", "worst")


@torch.no_grad()
def vote_labels(model, x, y=None, draws: int = 1, vote: str = "majority") -> torch.Tensor:
    """The predicted labels of x, judged over `draws` forward passes (randomised models; 1 pass otherwise).

    majority: the most frequent label over the draws. worst: the label y only if every draw predicts it (else a
    wrong label one of the draws gave), so an example counts as robust only when no draw is fooled.
    """
    first = model(x).argmax(dim=1)
    if draws == 1:
        return first
    preds = torch.stack([first] + [model(x).argmax(dim=1) for _ in range(draws - 1)], dim=1)  # (B, draws)
    if vote == "majority" or y is None:
        return preds.mode(dim=1).values
    wrong = preds != y[:, None]
    fill = torch.where(wrong, preds, torch.full_like(preds, -1))
    worst = torch.where(wrong.any(dim=1), fill.max(dim=1).values, y)
    return worst


def parse_targeted(targeted):
    """false|none -> None (untargeted); least_likely|random|next -> that mode."""
    if targeted is None or targeted is False or (isinstance(targeted, str) and targeted.lower() in ("false", "none", "")):
        return None
    if targeted in TARGET_MODES:
        return targeted
    raise UserError(f"targeted must be false, least_likely, random or next, got {targeted!r}")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise UserError(f"loss must be ce, margin or dlr, got {loss!r}")
    return loss


@contextlib.contextmanager
def model_mode(model: torch.nn.Module, mode: str):
    """'eval': evaluate in eval mode and restore every submodule's own flag after; 'keep': touch nothing."""
    if mode == "keep":
        yield
        return
    flags = [(m, m.training) for m in model.modules()]  # per module: a caller may have frozen some BN layers
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def dlr_loss(logits, y, target=None) -> torch.Tensor:
    """Croce & Hein (2020) DLR loss (to ascend); needs at least 3 classes (4 for the targeted version)."""
    z = logits.double()  # the ratio of small differences: float64 as for CE
    ordered = z.sort(dim=1, descending=True).values
    own = z.gather(1, y[:, None]).squeeze(1)
    if target is None:
        other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        out = -(own - other) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    else:
        tgt = z.gather(1, target[:, None]).squeeze(1)
        out = -(own - tgt) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)
    return out.to(logits.dtype)


class Attack:
    """Base class: argument checks, model mode, targets, and a cheap check of budget and box on the result."""

    kind = "budgeted"  # "budgeted" | "minimal"
    norm = "linf"  # "linf" | "l2" | "l1" | "l0"
    iterative = False  # iterative attacks must not be weaker than their single-step version (masking check)

    def __init__(self, targeted=False, model_mode: str = "eval", bounds=(0.0, 1.0), eot_iter: int = 1, eval_draws: int = 1, vote: str = "majority"):
        self.targeted = parse_targeted(targeted)
        if eval_draws is None or int(eval_draws) != eval_draws or int(eval_draws) < 1:
            raise UserError(f"eval_draws must be an integer >= 1 (forward passes that judge success), got {eval_draws!r}")
        if vote not in VOTES:
            raise UserError(f"vote must be majority or worst, got {vote!r}")
        self.eval_draws, self.vote = int(eval_draws), vote
        self._notes: list[str] = []
        if eot_iter is None or int(eot_iter) != eot_iter or int(eot_iter) < 1:
            raise UserError(f"eot_iter must be an integer >= 1 (gradient averaged over that many passes), got {eot_iter!r}")
        self.eot_iter = int(eot_iter)
        if model_mode not in ("eval", "keep"):
            raise UserError(f"model_mode must be eval or keep, got {model_mode!r}")
        self.model_mode = model_mode
        if bounds is not None:
            bounds = (float(bounds[0]), float(bounds[1]))
            if not bounds[0] < bounds[1]:
                raise UserError(f"bounds must be (low, high) with low < high, got {bounds}")
        self.bounds = bounds

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @property
    def notes(self) -> list[str]:
        """What the attack changed on its own (e.g. a loss the model has too few classes for), once each."""
        return self._notes

    def note(self, message: str) -> None:
        if message not in self._notes:
            self._notes.append(message)

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"

    # ------------------------------------------------------------------------------------------- entry point
    def __call__(self, model, x, y, eps=None, target=None):
        if self.kind == "budgeted":
            if eps is None:
                raise UserError(f"{self.name} is a budgeted attack: give eps")
            eps = self._check_eps(eps, x)
        x = x.detach()
        y = y.detach().to(x.device)
        with model_mode(model, self.model_mode):
            if self.targeted is not None and target is None:
                target = self.choose_target(model, x, y)
            if target is not None:
                target = target.detach().to(x.device)
            with torch.enable_grad():  # callers may sit in no_grad (evaluation loops)
                x_adv = self.perturb(model, x, y, eps, target)
        x_adv = x_adv.detach()
        self._check_result(x, x_adv, eps)
        return x_adv

    def perturb(self, model, x, y, eps, target):
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- targets
    def choose_target(self, model, x, y) -> torch.Tensor | None:
        """Targets for this attack's `targeted` mode (None when untargeted); random draws use torch's global RNG."""
        if self.targeted is None:
            return None
        with model_mode(model, self.model_mode), torch.no_grad():
            logits = model(x)
        num_classes = logits.shape[1]
        y = y.to(logits.device)
        if self.targeted == "least_likely":  # Kurakin et al.: the class the model finds least likely
            return logits.argmin(dim=1)
        if self.targeted == "next":
            return (y + 1) % num_classes
        # random: uniform over the other classes; drawn on the CPU so CPU and CUDA runs agree
        shift = torch.randint(1, num_classes, (len(y),)).to(y.device)
        return (y + shift) % num_classes

    # ------------------------------------------------------------------------------------------- shared math
    def attack_loss(self, logits, y, target) -> torch.Tensor:
        """Per-example objective the attack ascends (`self.loss`, default "ce").

        ce:     untargeted CE(f(x), y) (move away from the label); targeted -CE(f(x), target) (towards it).
        margin: Carlini & Wagner's logit margin, max_{i != y} Z_i - Z_y (targeted: Z_t - max_{i != t} Z_i). It does
                not saturate on over-confident models, where the CE gradient points at the runner-up class only.
        dlr:    Croce & Hein's difference of logits ratio, -(Z_y - max_{i != y} Z_i) / (Z_pi1 - Z_pi3); targeted
                -(Z_y - Z_t) / (Z_pi1 - (Z_pi3 + Z_pi4) / 2) (pi sorts the logits in decreasing order). Invariant to
                shifting and scaling the logits, so neither saturation nor a rescaled head can hide the gradient.
        """
        loss = getattr(self, "loss", "ce")
        if loss == "dlr":
            return dlr_loss(logits, y, target)
        label = y if target is None else target
        if loss == "margin":
            own = logits.gather(1, label[:, None]).squeeze(1)
            other = logits.scatter(1, label[:, None], float("-inf")).amax(dim=1)
            return own - other if target is not None else other - own
        # in float64: on a confident model the float32 softmax rounds p_y to exactly 1 and the CE gradient to 0,
        # a numerical gradient masking (PGD-10 at eps 0.3 on MNIST fc200: 3.1 % robust accuracy in float32, 0.4 % here)
        ce = F.cross_entropy(logits.double(), label, reduction="none").to(logits.dtype)
        return -ce if target is not None else ce

    def loss_gradient(self, model, x_adv, y, target):
        """Gradient w.r.t. the input only of the summed attack loss (summed, not averaged: an example's gradient
        does not depend on the batch size); the mean over `eot_iter` passes for randomised models (EoT)."""
        return self.loss_and_gradient(model, x_adv, y, target)[2]

    def loss_and_gradient(self, model, x_adv, y, target):
        """(logits, per-example loss, input gradient), each the mean over `eot_iter` forward/backward passes
        (Athalye et al.'s expectation over transformation; one pass for a deterministic model)."""
        logits_sum = loss_sum = grad_sum = None
        for _ in range(self.eot_iter):
            xr = x_adv.detach().requires_grad_(True)
            logits = model(xr)
            loss = self.attack_loss(logits, y, target)
            (grad,) = torch.autograd.grad(loss.sum(), xr)
            if self.eot_iter == 1:
                return logits.detach(), loss.detach(), grad
            logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            grad_sum = grad if grad_sum is None else grad_sum + grad
        k = float(self.eot_iter)
        return logits_sum / k, loss_sum / k, grad_sum / k

    def is_adversarial(self, logits, y, target) -> torch.Tensor:
        """Untargeted: prediction differs from the label. Targeted: prediction is the target."""
        pred = logits.argmax(dim=1)
        return pred != y if target is None else pred == target

    # ------------------------------------------------------------------------------------------- checks
    def _check_eps(self, eps, x):
        if isinstance(eps, torch.Tensor) and eps.dim() > 0:
            eps = eps.detach().to(device=x.device, dtype=x.dtype)
            if eps.shape != (x.shape[0],):
                raise UserError(f"eps must be a number or one value per example ({x.shape[0]}), got shape {tuple(eps.shape)}")
            bad = (eps < 0) | ~torch.isfinite(eps)
            if bad.any():
                raise UserError(f"eps must be finite and >= 0, got {eps[bad][0].item()}")
            return eps
        eps = float(eps)
        if not eps >= 0 or eps == float("inf"):
            raise UserError(f"eps must be finite and >= 0, got {eps}")
        return eps

    def _check_result(self, x, x_adv, eps):
        """Assert box and budget on every result (cheap): the peers' worst bugs were silent violations of these."""
        if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
            raise RuntimeError(f"{self.name} returned a non-finite or mis-shaped batch")
        if self.bounds is not None and (x_adv.min() < self.bounds[0] or x_adv.max() > self.bounds[1]):
            raise RuntimeError(f"{self.name} left the box {self.bounds}")
        if self.kind == "budgeted":
            size = norms.lp_norm(x_adv - x, self.norm)
            limit = eps if isinstance(eps, torch.Tensor) else torch.full_like(size, eps)
            if (size > limit * (1 + 1e-5) + 1e-6).any():
                raise RuntimeError(f"{self.name} exceeded its {self.norm} budget: {size.max().item():.6g} > {limit.max().item():.6g}")

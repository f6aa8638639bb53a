"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", Algorithm 1), untargeted (APGD-CE, APGD-DLR) and targeted over the top classes (APGD-T).

The step size starts at 2 eps and is halved at checkpoints w_j = ceil(p_j n_iter), p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), when since the last checkpoint
  (1) the loss rose in fewer than rho = 75 % of the steps, or
  (2) neither the step size nor the best loss changed;
after a halving the iterate restarts from the best point. Steps carry momentum alpha = 0.75:
  z = P(x_k + eta * a(grad)),  x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1})).
Every example keeps its own step size, checkpoints decisions, best loss and first adversarial iterate.

l1 (Croce & Hein 2021, "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers", as in their
AutoAttack code): the step moves only the top-k coordinates of |grad| (k a fraction of the input, 20 % at the start,
then the current best perturbation's sparsity / 1.5), each by step / k in the gradient's sign, then projects exactly
onto the l1-ball intersected with the box; no momentum. Every 4 % of the iterations: if the best point became
sparser by more than 5 %, the step returns to eps and the iterate to the best point, else the step shrinks by 1.5
(within [eps / 10, eps]). With `large_eps` (AutoAttack's l1 setting) a run spends 30 % + 30 % + 40 % of its
iterations at 3 eps, 2 eps and eps, each stage starting from the previous one's best point projected onto its
ball; only the last stage's points are within budget, so only they can count as adversarial.
"""

from __future__ import annotations

import math

import torch

from robust_cli.attacks import norms
from robust_cli.attacks.base import Attack, check_loss
from robust_cli.attacks.gradient import _positive_int
from robust_cli.core.errors import UserError


def checkpoints(n_iter: int) -> list[int]:
    """The iterations w_j at which APGD may halve its step (p_j as in the paper)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * n_iter, 9)) for q in p if q <= 1})  # round: 0.57 * 100 is 57.000000000000007


class APGD(Attack):
    """Untargeted Auto-PGD, linf or l2; loss ce | dlr | margin; restarts keep each example's worst case.

    The result is, per example, the first adversarial iterate found (over all iterations and restarts), else the
    iterate of highest loss. Success is judged by re-running the model on it (as for every attack).
    """

    iterative = True

    def __init__(
        self,
        norm: str = "linf",
        n_iter: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        momentum: float = 0.75,
        large_eps: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.norm = norms.check_norm(norm, norms.L1_NORMS)
        self.large_eps = self.norm == "l1" if large_eps is None else bool(large_eps)
        if self.large_eps and self.norm != "l1":
            raise UserError(f"apgd large_eps is the l1 schedule (3 eps, 2 eps, eps); with norm={self.norm} leave it null or false")
        self.loss = check_loss(loss)
        self.n_iter = _positive_int("n_iter", n_iter)
        self.restarts = _positive_int("restarts", restarts)
        if not 0 < float(rho) <= 1 or not 0 < float(momentum) <= 1:
            raise UserError(f"apgd rho and momentum must be in (0, 1], got {rho!r}, {momentum!r}")
        self.rho, self.momentum = float(rho), float(momentum)

    @property
    def name(self) -> str:
        return f"apgd_{self.loss}"

    def runs(self, clean_logits, target):
        """The targets of the successive runs (each run `restarts` times): the caller's target (None: untargeted)."""
        return [target]

    def perturb(self, model, x, y, eps, target):
        with torch.no_grad():
            clean_logits = model(x)
        self._check_classes(clean_logits.shape[1])
        best = x.clone()
        fooled = self.is_success(clean_logits, y, target)  # already adversarial: x itself is the answer
        best_loss = torch.full((len(x),), -math.inf, device=x.device)
        for run_target in self.runs(clean_logits, target):
            for _ in range(self.restarts):  # each example keeps its worst case: fooled first, then the highest loss
                todo = (~fooled).nonzero().squeeze(1)
                if len(todo) == 0:
                    return best
                t = None if run_target is None else run_target[todo]
                x_r, fooled_r, loss_r = self.single_run(model, x[todo], y[todo], norms.per_example_slice(eps, todo), t)
                better = fooled_r | (loss_r > best_loss[todo])
                best[todo[better]] = x_r[better]
                best_loss[todo[better]] = loss_r[better]
                fooled[todo[fooled_r]] = True
        return best

    min_dlr_classes = 3  # the DLR denominator Z_pi1 - Z_pi3 needs a third logit

    def _check_classes(self, classes: int):
        """Too few classes for the DLR loss: fall back to the logit margin and say so."""
        if self.loss == "dlr" and classes < self.min_dlr_classes:
            self.loss = "margin"
            self.note(f"{self.name}: {classes} classes are too few for the DLR loss; it uses the logit margin instead")

    def is_success(self, logits, y, target):
        return self.is_adversarial(logits, y, target)

    def single_run(self, model, x, y, eps, target):
        """One APGD run from a random start: (result, fooled mask, best loss) per example.

        An example leaves the batch at its first success (its answer is that point, as in the paper); the others
        go on unchanged, since every step-size decision is per example. Most of a weak model's examples fall in
        the first steps, so the rest of the run costs only the survivors' passes."""
        if self.norm == "l1":
            return self.single_run_l1(model, x, y, eps, target)
        x_adv = norms.random_start(x, eps, self.norm, self.bounds)
        logits, loss, grad = self.loss_and_gradient(model, x_adv, y, target)
        fooled = self.is_success(logits, y, target)
        x_found = x_adv.clone()
        best_loss_all = loss.clone()
        run = (~fooled).nonzero().squeeze(1)  # the examples still running, as indices into the batch

        def rows(index, *tensors):
            return [None if t is None else t[index] for t in tensors]

        x, y, target, x_adv, loss, grad = rows(run, x, y, target, x_adv, loss, grad)
        eps = norms.per_example_slice(eps, run)
        project = norms.projector(x, eps, self.norm, self.bounds)
        eta = torch.ones((len(run),) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype) * (2 * norms.per_example(eps, x))  # eta_0 = 2 eps
        best_loss, x_best, grad_best = loss.clone(), x_adv.clone(), grad.clone()
        marks = set(checkpoints(self.n_iter)[1:])
        last_mark = 0
        increases = torch.zeros(len(run), device=x.device)
        loss_at_mark = best_loss.clone()
        reduced_at_mark = torch.ones(len(run), dtype=torch.bool, device=x.device)
        x_prev = x_adv.clone()
        prev_loss = loss
        for k in range(self.n_iter):
            if len(run) == 0:
                break
            with torch.no_grad():
                z = project(x_adv + eta * norms.normalize(grad, self.norm))
                alpha = self.momentum if k > 0 else 1.0  # the first step has no previous step to carry
                x_new = project(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - x_prev))
                x_prev, x_adv = x_adv, x_new
            logits, loss, grad = self.loss_and_gradient(model, x_adv, y, target)
            with torch.no_grad():
                success = self.is_success(logits, y, target)
                if bool(success.any()):  # done: the first adversarial point is the answer; the rest go on
                    x_found[run[success]] = x_adv[success]
                    fooled[run[success]] = True
                    keep = (~success).nonzero().squeeze(1)
                    run = run[keep]
                    (x, y, target, x_adv, loss, grad, x_prev, prev_loss, eta, best_loss, x_best, grad_best, increases, loss_at_mark, reduced_at_mark) = rows(
                        keep, x, y, target, x_adv, loss, grad, x_prev, prev_loss, eta, best_loss, x_best, grad_best, increases, loss_at_mark, reduced_at_mark
                    )
                    eps = norms.per_example_slice(eps, keep)
                    project = norms.projector(x, eps, self.norm, self.bounds)
                increases += (loss > prev_loss).to(increases.dtype)
                prev_loss = loss
                improved = loss > best_loss
                x_best[improved], grad_best[improved], best_loss[improved] = x_adv[improved], grad[improved], loss[improved]
                if k + 1 in marks:
                    # (1) too few loss increases since the last checkpoint, (2) no halving and no better loss
                    cond1 = increases < self.rho * (k + 1 - last_mark)
                    cond2 = ~reduced_at_mark & (best_loss <= loss_at_mark)
                    halve = cond1 | cond2
                    eta[halve] /= 2
                    x_adv[halve] = x_best[halve]  # restart from the best point (its gradient is known)
                    grad[halve] = grad_best[halve]
                    x_prev[halve] = x_best[halve]
                    reduced_at_mark = halve
                    loss_at_mark = best_loss.clone()
                    increases.zero_()
                    last_mark = k + 1
        x_found[run], best_loss_all[run] = x_best, best_loss
        return x_found, fooled, torch.where(fooled, torch.full_like(best_loss_all, math.inf), best_loss_all)

    def single_run_l1(self, model, x, y, eps, target):
        """One l1-APGD run (see the module doc): (result, fooled mask, best loss) per example."""
        n = len(x)
        eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1).expand(n).clone()
        if self.large_eps:
            first = math.ceil(0.3 * self.n_iter)
            stages = [(3.0, first), (2.0, first), (1.0, max(self.n_iter - 2 * first, 1))]
        else:
            stages = [(1.0, self.n_iter)]
        # the authors' start: a standard gaussian step from x, projected onto the first ball (and the box)
        x_adv = norms.project_l1_box(x, x + torch.randn_like(x), eps * stages[0][0], self.bounds)
        sparsity = None if self.large_eps else torch.full((n,), 0.2, dtype=x.dtype, device=x.device)
        for j, (factor, n_iter) in enumerate(stages):
            last = j == len(stages) - 1
            x_adv = norms.project_l1_box(x, x_adv, eps * factor, self.bounds)
            result = self._l1_stage(model, x, y, target, eps * factor, x_adv, n_iter, sparsity, judge=last)
            if not last:
                x_adv, sparsity = result, None  # the next stage starts at this one's best point, its sparsity from it
        return result

    def _l1_stage(self, model, x, y, target, eps, x_adv, n_iter, sparsity, judge):
        """n_iter l1 steps at budget eps (B,) from x_adv. judge=False: return the best point; judge=True: the
        run's (result, fooled, best loss), an example leaving the batch at its first success."""
        n_fts = x[0].numel()
        view = (-1,) + (1,) * (x.dim() - 1)
        l0 = lambda d: (d.flatten(1) != 0).sum(dim=1).to(x.dtype)
        if sparsity is None:  # started from a given point: its sparsity
            sp_old = l0(x_adv - x)
            sparsity = sp_old / n_fts / 1.5
        else:
            sp_old = torch.full_like(sparsity, float(n_fts))
        logits, loss, grad = self.loss_and_gradient(model, x_adv, y, target)
        fooled = self.is_success(logits, y, target) if judge else torch.zeros(len(x), dtype=torch.bool, device=x.device)
        x_found, loss_found = x_adv.clone(), loss.clone()
        step = eps.clone()
        best_loss, x_best, grad_best = loss.clone(), x_adv.clone(), grad.clone()
        run = (~fooled).nonzero().squeeze(1)

        def rows(index, *tensors):
            return [None if t is None else t[index] for t in tensors]

        state = (x, y, target, eps, x_adv, grad, step, sparsity, sp_old, best_loss, x_best, grad_best)
        x, y, target, eps, x_adv, grad, step, sparsity, sp_old, best_loss, x_best, grad_best = rows(run, *state)
        every = max(int(0.04 * n_iter), 1)
        for i in range(n_iter):
            if len(run) == 0:
                break
            with torch.no_grad():
                flat = grad.flatten(1)
                keep_from = ((1 - sparsity) * n_fts).clamp(0, n_fts - 1).long()
                threshold = flat.abs().sort(dim=1).values.gather(1, keep_from.unsqueeze(1))
                direction = flat.sign() * (flat.abs() >= threshold)
                direction = direction / (direction.abs().sum(dim=1, keepdim=True) + 1e-10)
                x_adv = norms.project_l1_box(x, x_adv + step.reshape(view) * direction.reshape(x.shape), eps, self.bounds)
            logits, loss, grad = self.loss_and_gradient(model, x_adv, y, target)
            with torch.no_grad():
                if judge:
                    success = self.is_success(logits, y, target)
                    if bool(success.any()):
                        x_found[run[success]] = x_adv[success]
                        fooled[run[success]] = True
                        keep = (~success).nonzero().squeeze(1)
                        run = run[keep]
                        (x, y, target, eps, x_adv, loss, grad, step, sparsity, sp_old, best_loss, x_best, grad_best) = rows(
                            keep, x, y, target, eps, x_adv, loss, grad, step, sparsity, sp_old, best_loss, x_best, grad_best
                        )
                improved = loss > best_loss
                x_best[improved], grad_best[improved], best_loss[improved] = x_adv[improved], grad[improved], loss[improved]
                if (i + 1) % every == 0:  # the sparsity check
                    sp_curr = l0(x_best - x)
                    sparser = sp_curr / sp_old.clamp_min(1) < 0.95
                    sparsity = sp_curr / n_fts / 1.5
                    step = torch.where(sparser, eps, step / 1.5)
                    step = torch.minimum(torch.maximum(step, eps / 10), eps)
                    sp_old = sp_curr
                    x_adv[sparser], grad[sparser] = x_best[sparser], grad_best[sparser]
        if not judge:
            out = x_found
            out[run] = x_best
            return out
        x_found[run], loss_found[run] = x_best, best_loss
        return x_found, fooled, torch.where(fooled, torch.full_like(loss_found, math.inf), loss_found)


class APGDT(APGD):
    """Targeted APGD (APGD-T): for each of the `n_target_classes` classes the clean model ranks highest after the
    top one, an APGD run with the targeted DLR loss towards it, on the examples still robust. Success is
    untargeted (the label is no longer predicted): the targets only steer the search.

    DLR-targeted needs >= 4 classes; with fewer the targets are all the other classes and the loss is the targeted
    logit margin (recorded in `notes`).
    """

    def __init__(self, n_target_classes: int = 9, loss: str = "dlr", **kwargs):
        super().__init__(loss=loss, **kwargs)
        self.n_target_classes = _positive_int("n_target_classes", n_target_classes)

    min_dlr_classes = 4  # targeted DLR's denominator needs the 4th logit

    @property
    def name(self) -> str:
        return "apgd_t"

    def is_success(self, logits, y, target):
        return logits.argmax(dim=1) != y  # untargeted success whatever the steering target

    def runs(self, clean_logits, target):
        """One target per run: the classes ranked 2nd, 3rd, ... by the clean model."""
        classes = clean_logits.shape[1]
        if self.n_target_classes > classes - 1:
            self.note(f"apgd_t: {classes} classes give {classes - 1} target class(es), not {self.n_target_classes}")
        order = clean_logits.argsort(dim=1, descending=True)
        return [order[:, j] for j in range(1, 1 + min(self.n_target_classes, classes - 1))]

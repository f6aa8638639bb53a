"""Evaluate an attack on a dataset: accuracy-vs-eps curves, minimal distances, binary eps search, masking checks.

Conventions (DESIGN.md): success and accuracy are always computed by re-running the model (eval mode) on the
returned adversarial batch; robust accuracy counts an already-misclassified input as an error; a minimal
distance is 0 for an already-misclassified input and +inf where the attack failed; distortion = ||d||_2/sqrt(n).
Data stay on the CPU and move to the device one batch at a time.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from robust_cli.attacks import FGM, FGSM, Noise, model_mode

SIZE_COLUMNS = ("l2", "linf", "distortion", "l0")


# ----------------------------------------------------------------------------------------------- basics
def perturbation_sizes(x: torch.Tensor, x_adv: torch.Tensor) -> dict:
    """Per-example l2, linf, distortion (l2 / sqrt(n), Szegedy/Bell) and l0 of x_adv - x."""
    delta = (x_adv - x).flatten(1).double()  # double: tiny perturbations stay exact
    l2 = delta.norm(dim=1)
    return {"l2": l2, "linf": delta.abs().amax(dim=1), "distortion": l2 / math.sqrt(delta.shape[1]), "l0": (delta != 0).sum(dim=1).double()}


def _batches(n, batch_size):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def predict(model, x, batch_size=1000, device=None) -> torch.Tensor:
    """Labels predicted in eval mode (the caller's mode is restored), on the CPU."""
    device = device or next(model.parameters()).device
    with model_mode(model, "eval"):
        return torch.cat([model(x[s].to(device)).argmax(dim=1).cpu() for s in _batches(len(x), batch_size)])


def choose_targets(attack, model, x, y, batch_size=1000, device=None):
    """The attack's targets for every example (None for untargeted attacks), drawn once per dataset."""
    if attack.targeted is None:
        return None
    device = device or next(model.parameters()).device
    return torch.cat([attack.choose_target(model, x[s].to(device), y[s].to(device)).cpu() for s in _batches(len(x), batch_size)])


def run_attack(model, attack, x, y, eps=None, target=None, batch_size=256, device=None, advance=None):
    """x_adv for the whole set, batch by batch; eps a number or a (N,) tensor; eps == 0 returns x itself."""
    device = device or next(model.parameters()).device
    out = []
    for s in _batches(len(x), batch_size):
        xb = x[s].to(device)
        eps_b = eps[s] if isinstance(eps, torch.Tensor) and eps.dim() > 0 else eps
        if attack.kind == "budgeted" and not isinstance(eps_b, torch.Tensor) and float(eps_b) == 0:
            out.append(x[s].clone())  # no budget, no change: the eps = 0 row is clean accuracy exactly
        else:
            tb = target[s].to(device) if target is not None else None
            out.append(attack(model, xb, y[s].to(device), eps_b, target=tb).cpu())
        if advance is not None:
            advance(1)
    return torch.cat(out)


def success_mask(pred, y, target):
    """Untargeted: misclassified; targeted: the target is predicted."""
    return pred != y if target is None else pred == target


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Outcome:
    """An attack's result on the whole set at one eps (eps = inf for a minimal attack)."""

    eps: float
    x_adv: torch.Tensor
    pred: torch.Tensor
    success: torch.Tensor
    seconds: float


def curve_row(attack, eps, y, clean_pred, outcome_pred, success, sizes, seconds) -> dict:
    clean_ok = clean_pred == y
    robust_ok = clean_ok & (outcome_pred == y)  # already misclassified counts as an error
    fooled = success & clean_ok
    mean = (lambda v: float(v[fooled].mean())) if fooled.any() else (lambda v: float("nan"))
    return {
        "attack": attack.name,
        "norm": attack.norm,
        "targeted": attack.targeted or "false",
        "eps": float(eps),
        "n": int(len(y)),
        "clean_accuracy": float(clean_ok.double().mean()),
        "robust_accuracy": float(robust_ok.double().mean()),
        "success_rate": float(fooled.sum()) / max(int(clean_ok.sum()), 1),  # among the correctly classified
        "mean_l2": mean(sizes["l2"]),
        "mean_linf": mean(sizes["linf"]),
        "mean_distortion": mean(sizes["distortion"]),
        "seconds": float(seconds),
    }


def example_rows(eps, y, clean_pred, pred, target, success, sizes) -> list[dict]:
    t = target.tolist() if target is not None else [-1] * len(y)
    cols = {k: sizes[k].tolist() for k in SIZE_COLUMNS}
    return [
        {"index": i, "eps": float(eps), "label": int(y[i]), "clean_pred": int(clean_pred[i]), "adv_pred": int(pred[i]),
         "target": int(t[i]), "success": bool(success[i]), **{k: cols[k][i] for k in SIZE_COLUMNS}}
        for i in range(len(y))
    ]


def accuracy_curve(model, attack, x, y, eps_list, clean_pred=None, target=None, batch_size=256, device=None, advance=None):
    """One Outcome per eps for a budgeted attack (targets shared by all eps)."""
    clean_pred = predict(model, x, device=device) if clean_pred is None else clean_pred
    outcomes = []
    for eps in eps_list:
        start = time.perf_counter()
        x_adv = run_attack(model, attack, x, y, eps, target, batch_size, device, advance)
        if x_adv.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        pred = predict(model, x_adv, device=device)
        outcomes.append(Outcome(float(eps), x_adv, pred, success_mask(pred, y, target), seconds))
    return outcomes


def minimal_distances(y, clean_pred, success, sizes) -> dict:
    """Per-example distances of a minimal attack: 0 where already misclassified, +inf where the attack failed."""
    clean_wrong = clean_pred != y
    out = {}
    for k in SIZE_COLUMNS:
        d = sizes[k].clone()
        d[~success] = float("inf")
        d[clean_wrong] = 0.0
        out[k] = d
    return out


def binary_search_eps(model, attack, x, y, target=None, tol=1e-3, max_eps=1.0, batch_size=256, device=None, advance=None):
    """Smallest eps (to `tol`) at which the budgeted attack succeeds, per example, by bisection on [0, max_eps].

    Returns (eps_found, x_adv at eps_found): eps_found is +inf where even max_eps fails and 0 where x is already
    adversarial. Success is judged by re-running the model. Attacks with random starts are not monotone in eps;
    bisection then returns an eps at which it did succeed, not necessarily the smallest one.
    """
    n = len(y)
    clean = predict(model, x, device=device)
    hi = torch.full((n,), float(max_eps))
    lo = torch.zeros(n)
    x_best = run_attack(model, attack, x, y, hi, target, batch_size, device, advance)
    ok = success_mask(predict(model, x_best, device=device), y, target)
    found = torch.where(ok, hi, torch.full_like(hi, float("inf")))
    already = success_mask(clean, y, target)
    found[already], x_best[already] = 0.0, x[already]
    todo = ok & ~already
    while todo.any() and float((hi - lo)[todo].max()) > tol:
        idx = todo.nonzero().squeeze(1)
        mid = (lo[idx] + hi[idx]) / 2
        x_mid = run_attack(model, attack, x[idx], y[idx], mid, None if target is None else target[idx], batch_size, device, advance)
        good = success_mask(predict(model, x_mid, device=device), y[idx], None if target is None else target[idx])
        hi[idx[good]], found[idx[good]], x_best[idx[good]] = mid[good], mid[good], x_mid[good]
        lo[idx[~good]] = mid[~good]
        todo[idx] = (hi[idx] - lo[idx]) > tol
    return found, x_best


def distance_summary(distances: torch.Tensor, y, clean_pred) -> dict:
    """Oberman's median (misclassified = 0, failures = +inf), the mean over the successful attacks on correctly
    classified inputs (Bell's average distortion), and the failure count."""
    d = distances.double()
    fooled = torch.isfinite(d) & (clean_pred == y)
    return {
        "median": float(d.median()) if len(d) else float("nan"),
        "mean_over_successes": float(d[fooled].mean()) if fooled.any() else float("nan"),
        "failures": int((~torch.isfinite(d)).sum()),
    }


def curve_from_distances(attack, distances, y, clean_pred, eps_list, sizes, seconds) -> list[dict]:
    """Robust accuracy at radius eps from minimal distances (in the attack's norm): broken iff distance <= eps."""
    rows = []
    for eps in eps_list:
        broken = distances <= eps
        rows.append(curve_row(attack, eps, y, clean_pred, torch.where(broken, -1, y), broken, sizes, seconds))
    return rows


# ----------------------------------------------------------------------------------------------- masking checks
def reference_attacks(attack):
    """(single-step version an iterative attack must beat, same-norm noise baseline, margin-loss twin of a CE attack)."""
    common = {"targeted": attack.targeted or False, "bounds": attack.bounds}
    single = margin = None
    if attack.iterative:
        single = FGSM(**common) if attack.norm == "linf" else FGM(norm=attack.norm, **common)
    if getattr(attack, "loss", None) == "ce" and attack.iterative:
        margin = copy.copy(attack)
        margin.loss = "margin"
    return single, Noise(norm=attack.norm, distribution="uniform", **common), margin


def masking_warnings(rows, single_rows, noise_rows, input_dim: int, bounded: bool, margin_rows=None, tol: float = 0.01) -> list[str]:
    """Signs of gradient masking (Athalye et al.; Carlini et al.'s checklist) in a robust-accuracy curve."""
    warnings = []
    rows = sorted(rows, key=lambda r: r["eps"])
    for a, b in zip(rows, rows[1:]):
        if b["robust_accuracy"] > a["robust_accuracy"] + tol:
            warnings.append(f"robust accuracy rises with eps ({a['robust_accuracy']:.3f} at eps={a['eps']:g} -> {b['robust_accuracy']:.3f} at eps={b['eps']:g}): possible gradient masking")
    by_eps = {r["eps"]: r for r in rows}
    for ref, what in ((single_rows or [], "its single-step version"), (noise_rows or [], "random noise of the same norm")):
        for r in ref:
            mine = by_eps.get(r["eps"])
            if mine is not None and r["eps"] > 0 and mine["robust_accuracy"] > r["robust_accuracy"] + tol:
                warnings.append(f"{mine['attack']} is weaker than {what} at eps={r['eps']:g} ({mine['robust_accuracy']:.3f} vs {r['robust_accuracy']:.3f}): possible gradient masking or a too-small step/step count")
    for r in margin_rows or []:
        mine = by_eps.get(r["eps"])
        if mine is not None and mine["robust_accuracy"] > r["robust_accuracy"] + tol:
            warnings.append(f"{mine['attack']} with the CE loss is weaker than with loss=margin at eps={r['eps']:g} ({mine['robust_accuracy']:.3f} vs {r['robust_accuracy']:.3f}): "
                            "CE saturates on this confident model; rerun with attack.loss=margin for a tighter bound")
    if bounded and rows:
        last = rows[-1]
        # a perturbation of half the box (linf 0.5, or l2 distortion 0.5) can turn any input grey
        scale = last["eps"] if last["norm"] == "linf" else last["eps"] / math.sqrt(input_dim)
        if last["norm"] in ("linf", "l2") and scale >= 0.5 and last["robust_accuracy"] > 0.05:
            warnings.append(f"robust accuracy is still {last['robust_accuracy']:.3f} at the large eps={last['eps']:g}; an unbounded attack should reach ~0: possible gradient masking")
    return warnings

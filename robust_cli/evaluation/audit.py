"""The evaluation audit: every check for the signs of gradient masking and of a too-weak attack, at every eps.

Each check gives rows `{check, eps, status (ok | warn | fail), detail}` for audit.csv; the command turns every
non-ok row into a warning line (console and run.json). The checks state what they measured and never guess a cause
they did not test (Athalye et al. 2018; Carlini et al. 2019's checklist; Croce & Hein 2020).

  monotone        robust accuracy must not rise with eps
  single_step     an iterative attack must not be weaker than its single-step version (FGSM / FGM)
  noise           ... nor than random noise of the same norm and size
  stronger_than_ce  a gradient-free (Square), targeted or margin/DLR attack breaking > 1 pp more than the CE attack
  gradients       zero or non-finite input gradients on > 1 % of examples at the random start
  logits          the model returns probabilities (non-negative rows summing to 1) instead of logits
  randomised      two forward passes of one batch differ (use EoT: autoattack version=rand)
  train_mode      the model was handed over in train mode
  more_effort     the strongest member with 2x steps/queries breaks > 0.5 pp more of the survivors
  box_eps         at the box-sized eps (linf 0.5; l2 0.5 sqrt(n)) robust accuracy must be ~0
  reference       a single attack against a cheap reference (APGD-T with 3 targets, then untargeted APGD-DLR, on
                  its survivors among up to 200 seeded examples): > 1 pp more broken -> use attack=autoattack
  ledger          examples this run calls robust that an earlier run of the same model broke at the same or a
                  smaller eps (robust_cli/evaluation/ledger.py)
"""

from __future__ import annotations

import copy
import math
import time

import torch

from robust_cli.attacks import APGD, FGM, FGSM, Noise, model_mode, norms
from robust_cli.attacks.base import Attack
from robust_cli.evaluation import evaluate as ev

CE_GAP = 0.01  # > 1 pp: another attack stronger than the CE attack
EFFORT_GAP = 0.005  # > 0.5 pp: more steps still help
GRAD_FRACTION = 0.01  # > 1 % of examples with a zero / non-finite gradient
BOX_ACCURACY = 0.02  # robust accuracy at the box-sized eps above this is not "~0"
TOL = 0.005  # monotonicity / reference comparisons
REFERENCE_GAP = 0.01  # > 1 pp more broken by the reference attacks than by the run's attack
REFERENCE_N = 200  # examples of the reference check (its cost: at most this x 400 gradient steps per eps)
REFERENCE_ITER = 100  # APGD iterations of each reference run (AutoAttack's)
REFERENCE_TARGETS = 3  # APGD-T target classes (AutoAttack's fast setting; the standard one takes 9)


def row(check, eps, bad, detail, status_bad="warn", seconds=""):
    return {"check": check, "eps": eps, "status": status_bad if bad else "ok", "detail": detail, "seconds": seconds}


def _curve(model, attack, x, y, clean_pred, epsilons, bs, device):
    return {r["eps"]: r for r in ev.curve_rows(model, attack, x, y, clean_pred, epsilons, bs, device)}


def _more_effort(attack: Attack) -> Attack:
    """A copy with twice the iterations (steps, n_iter) or queries."""
    twin = copy.copy(attack)
    for key in ("steps", "n_iter", "n_queries"):
        if getattr(twin, key, None):
            setattr(twin, key, 2 * getattr(twin, key))
    return twin


# ----------------------------------------------------------------------------------------------- model checks
@torch.no_grad()
def model_checks(model, x, device, bs=256) -> list[dict]:
    xb = x[: min(256, bs)].to(device)
    was_training = any(m.training for m in model.modules())
    rows = [row("train_mode", "", was_training, "the model was in train mode; attacks evaluate it in eval mode" if was_training else "eval mode")]
    with model_mode(model, "eval"):
        a, b = model(xb), model(xb)
    randomised = not torch.equal(a, b)
    rows.append(
        row(
            "randomised",
            "",
            randomised,
            f"two forward passes of one batch differ (max |diff| {float((a - b).abs().max()):.3g}): the model is randomised; "
            "attack it with EoT (attack=autoattack attack.version=rand, or attack.eot_iter=K) and judge over draws (attack.eval_draws)"
            if randomised
            else "deterministic",
        )
    )
    probs = bool((a >= 0).all() and torch.allclose(a.sum(dim=1), torch.ones(len(a), device=a.device), atol=1e-4))
    rows.append(
        row(
            "logits",
            "",
            probs,
            "the model's outputs are probabilities (rows >= 0 summing to 1), not logits: CE/DLR/margin attacks on them are weakened; remove the final softmax"
            if probs
            else "outputs are logits",
            status_bad="fail",
        )
    )
    return rows


def gradient_check(model, attack, x, y, clean_pred, eps, device, bs) -> dict:
    """Fraction of correctly classified examples whose CE input gradient at a random start in the eps-ball is 0 or not finite."""
    probe = APGD(norm="linf", n_iter=1, bounds=attack.bounds)  # only its CE gradient is used
    ball = attack.norm if attack.norm in norms.L1_NORMS else "linf"  # l0 (JSMA): the linf ball
    ok = (clean_pred == y).nonzero().squeeze(1)
    bad = total = 0
    with model_mode(model, "eval"):
        for s in range(0, len(ok), bs):
            idx = ok[s : s + bs]
            xb, yb = x[idx].to(device), y[idx].to(device)
            start = norms.random_start(xb, eps, ball, probe.bounds) if eps > 0 else xb
            with torch.enable_grad():
                g = probe.loss_gradient(model, start, yb, None).flatten(1)
            bad += int(((g == 0).all(dim=1) | ~torch.isfinite(g).all(dim=1)).sum())
            total += len(idx)
    frac = bad / max(total, 1)
    return row(
        "gradients",
        eps,
        frac > GRAD_FRACTION,
        f"{bad} of {total} correctly classified examples ({100 * frac:.1f} %) have a zero or non-finite input gradient at the random start",
    )


# ----------------------------------------------------------------------------------------------- the audit
def run_audit(model, attack, x, y, clean_pred, epsilons, rows, outcomes, bs, device, bounded, reference=True) -> list[dict]:
    """All checks for a budgeted attack's curve (`rows`, `outcomes` per eps); returns the audit.csv rows.
    `reference`: also the reference check of a single attack (see `reference_check`)."""
    out = model_checks(model, x, device, bs)
    by_eps = {r["eps"]: r for r in rows if r["attack"] == attack.name}
    ordered = sorted(by_eps.values(), key=lambda r: r["eps"])
    for a, b in zip(ordered, ordered[1:]):
        rises = b["robust_accuracy"] > a["robust_accuracy"] + TOL
        out.append(
            row(
                "monotone", b["eps"], rises, f"robust accuracy {a['robust_accuracy']:.3f} at eps={a['eps']:g} -> {b['robust_accuracy']:.3f} at eps={b['eps']:g}"
            )
        )
    positive = [e for e in epsilons if e > 0]
    if not positive:
        return out
    n = len(y)
    common = {"bounds": attack.bounds}
    if attack.iterative and attack.norm in ("linf", "l2"):
        single = FGSM(**common) if attack.norm == "linf" else FGM(norm=attack.norm, **common)
        for ref, check in ((single, "single_step"), (Noise(norm=attack.norm, **common), "noise")):
            ref_rows = _curve(model, ref, x, y, clean_pred, positive, bs, device)
            for e in positive:
                mine, theirs = by_eps[e]["robust_accuracy"], ref_rows[e]["robust_accuracy"]
                out.append(row(check, e, mine > theirs + TOL, f"{attack.name} {mine:.3f} vs {ref.name} {theirs:.3f}"))
    for e in positive if attack.norm != "l0" else []:  # an l0 budget (pixels) has no ball to start a gradient in
        out.append(gradient_check(model, attack, x, y, clean_pred, e, device, bs))
    out += _ce_comparison(model, attack, x, y, clean_pred, positive, by_eps, outcomes, n, bs, device)
    out += _effort_check(model, attack, x, y, clean_pred, positive, outcomes, n, bs, device)
    if bounded and attack.norm in norms.L1_NORMS:
        out.append(_box_check(model, attack, x, y, clean_pred, bs, device))
    if reference:
        out += reference_check(model, attack, x, y, clean_pred, outcomes, bs, device)
    return out


def reference_check(model, attack, x, y, clean_pred, outcomes, bs, device, n_max=REFERENCE_N) -> list[dict]:
    """A single budgeted attack (not an ensemble) against a cheap, strong reference on a fixed subset: up to n_max
    correctly classified examples (drawn from torch's generator, which the caller seeds), at every eps.

    On the examples the run left robust, APGD-T (3 targets, targeted DLR) runs first and untargeted APGD-DLR then on
    what it left: the DLR count is what AutoAttack's standard version would miss too (its plus version adds untargeted
    APGD-DLR). Warns when the references break > 1 pp of the subset that the run called robust. The cost is at most
    n_max x 400 gradient steps per eps; its seconds are in the row and in audit.csv."""
    from robust_cli.attacks import APGDT

    if getattr(attack, "members", None) or attack.name == "noise" or attack.norm not in norms.L1_NORMS:
        return []
    correct = (clean_pred == y).nonzero().squeeze(1)
    subset = correct[torch.randperm(len(correct))[:n_max]].sort().values
    n = len(subset)
    common = {"norm": attack.norm, "n_iter": REFERENCE_ITER, "bounds": attack.bounds}
    targeted = APGDT(n_target_classes=REFERENCE_TARGETS, **common)
    untargeted = APGD(loss="dlr", **common)
    run_seconds = sum(o.seconds for o in outcomes)
    out = []
    for o in outcomes:
        if o.eps == 0:
            continue
        if n == 0:
            out.append(row("reference", o.eps, False, "no correctly classified examples"))
            continue
        started = time.perf_counter()
        survivors = subset[o.pred[subset] == y[subset]]
        broke = []  # APGD-T, then APGD-DLR
        for ref in (targeted, untargeted):
            if len(survivors) == 0:
                broke.append(0)
                continue
            adv = ev.run_attack(model, ref, x[survivors], y[survivors], o.eps, None, bs, device)
            fooled = ev.judge(model, ref, adv, y[survivors], device) != y[survivors]
            broke.append(int(fooled.sum()))
            survivors = survivors[~fooled]
        seconds = time.perf_counter() - started
        mine = float((o.pred[subset] == y[subset]).double().mean())
        worst = len(survivors) / n
        gap = mine - worst
        dlr_only = broke[1]
        advice = ""
        if gap > REFERENCE_GAP:
            advice = "; run attack=autoattack" + (
                f" attack.version=plus (untargeted APGD-DLR alone broke {dlr_only}, which the standard version does not run)" if dlr_only else ""
            )
        cost = f"; cost {seconds:.1f} s" + (f" = {100 * seconds / run_seconds:.0f} % of the attack's {run_seconds:.1f} s" if run_seconds > 0 else "")
        notes = sorted({m for ref in (targeted, untargeted) for m in getattr(ref, "notes", [])})
        out.append(
            row(
                "reference",
                o.eps,
                gap > REFERENCE_GAP,
                f"on {n} seeded correctly classified examples: {attack.name} leaves {mine:.3f} robust, APGD-T ({REFERENCE_TARGETS} targets) then "
                f"APGD-DLR on its survivors {worst:.3f} ({-100 * gap:+.1f} pp; APGD-T broke {broke[0]}, APGD-DLR {dlr_only})"
                + advice
                + cost
                + (f" ({'; '.join(notes)})" if notes else ""),
                seconds=round(seconds, 3),
            )
        )
    return out


def ledger_check(outcomes, y, clean_pred, examples, known: dict) -> list[dict]:
    """Examples this run calls robust that the ledger has as broken (by another evaluation of the same model and
    norm) at the same or a smaller eps. `examples`: dataset indices of the run's rows; `known`: ledger.smallest_radius."""
    from robust_cli.evaluation.ledger import broken_at

    out = []
    index = examples.tolist()
    for o in outcomes:
        if o.eps == 0 or not math.isfinite(o.eps):
            continue
        robust = ((clean_pred == y) & (o.pred == y)).nonzero().squeeze(1).tolist()
        hits = [known[index[i]] for i in robust if index[i] in known and broken_at(known[index[i]][0], o.eps)]
        attacks = {}
        for _, name, _ in hits:
            attacks[name] = attacks.get(name, 0) + 1
        named = ", ".join(f"{a} {k}" for a, k in sorted(attacks.items(), key=lambda t: -t[1]))
        out.append(
            row(
                "ledger",
                o.eps,
                bool(hits),
                f"{len(hits)} examples this run calls robust were broken at eps <= {o.eps:g} by earlier runs of this model ({named}); "
                f"the worst case over all runs counts them (robust ledger)"
                if hits
                else f"no example this run calls robust was broken at eps <= {o.eps:g} by an earlier run of this model in the ledger",
            )
        )
    return out


def _ce_comparison(model, attack, x, y, clean_pred, positive, by_eps, outcomes, n, bs, device):
    """Ensembles: what each later member broke that the first (CE) member left robust. A single CE attack: its
    margin-loss twin at every eps."""
    out = []
    members = getattr(attack, "members", None)
    if members:
        first = members[0].name
        for o in outcomes:
            if o.eps == 0 or o.broken_by is None:
                continue
            for i, m in enumerate(members[1:], start=1):
                k = int((o.broken_by == i).sum())
                kind = "gradient-free" if m.name == "square" else "targeted" if m.name in ("apgd_t", "fab_t") else "another loss"
                out.append(
                    row("stronger_than_ce", o.eps, k / n > CE_GAP, f"{m.name} ({kind}) broke {k} examples ({100 * k / n:.1f} pp) that {first} left robust")
                )
        return out
    if getattr(attack, "loss", None) == "ce" and attack.iterative:
        twin = copy.copy(attack)
        twin.loss = "margin"
        twin_rows = _curve(model, twin, x, y, clean_pred, positive, bs, device)
        for e in positive:
            mine, theirs = by_eps[e]["robust_accuracy"], twin_rows[e]["robust_accuracy"]
            out.append(
                row(
                    "stronger_than_ce",
                    e,
                    mine > theirs + CE_GAP,
                    f"{attack.name} with loss=ce {mine:.3f} vs loss=margin {theirs:.3f} "
                    f"({100 * (mine - theirs):+.1f} pp)" + ("; use attack=autoattack or attack.loss=margin" if mine > theirs + CE_GAP else ""),
                )
            )
    return out


def _effort_check(model, attack, x, y, clean_pred, positive, outcomes, n, bs, device):
    """The strongest member (the one that broke the most, or the attack itself) with 2x effort, on the survivors."""
    members = getattr(attack, "members", None)
    if members:
        counts = [sum(int((o.broken_by == i).sum()) for o in outcomes if o.broken_by is not None) for i in range(len(members))]
        strongest = members[max(range(len(members)), key=lambda i: counts[i])]
    elif attack.iterative and any(getattr(attack, k, None) for k in ("steps", "n_iter", "n_queries")):
        strongest = attack
    else:
        return []
    twin = _more_effort(strongest)
    out = []
    for o in outcomes:
        if o.eps == 0:
            continue
        survivors = ((clean_pred == y) & (o.pred == y)).nonzero().squeeze(1)
        if len(survivors) == 0:
            out.append(row("more_effort", o.eps, False, "no survivors"))
            continue
        xs, ys = x[survivors], y[survivors]
        adv = ev.run_attack(model, twin, xs, ys, o.eps, None, bs, device)
        k = int((ev.judge(model, twin, adv, ys, device) != ys).sum())
        out.append(row("more_effort", o.eps, k / n > EFFORT_GAP, f"{strongest.name} with 2x steps/queries broke {k} more examples ({100 * k / n:.1f} pp)"))
    return out


def _box_check(model, attack, x, y, clean_pred, bs, device, n_max=200):
    """APGD-CE at half the box (linf 0.5, l2 0.5 sqrt(n), l1 0.5 n: enough to turn any input grey) must break ~everything."""
    dim = math.prod(x.shape[1:])
    eps = {"linf": 0.5, "l2": 0.5 * math.sqrt(dim), "l1": 0.5 * dim}[attack.norm]
    ok = (clean_pred == y).nonzero().squeeze(1)[:n_max]
    if len(ok) == 0:
        return row("box_eps", eps, False, "no correctly classified examples")
    probe = APGD(norm=attack.norm, n_iter=100, bounds=attack.bounds)
    adv = ev.run_attack(model, probe, x[ok], y[ok], eps, None, bs, device)
    acc = float((ev.predict(model, adv, device=device) == y[ok]).double().mean())
    return row("box_eps", eps, acc > BOX_ACCURACY, f"APGD-CE at eps={eps:g} (half the box) leaves {acc:.3f} of {len(ok)} correctly classified examples robust")

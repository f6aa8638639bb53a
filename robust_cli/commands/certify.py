"""`robust certify`: randomized smoothing certificates (Cohen et al. 2019) of this config's model, per sigma, and
with an attack the per-point sandwich: certified L2 radius of the smoothed classifier <= L2 distance the attack needs
to change the base classifier (and, with persistence=true, Bell's gamma-persistence of the same point)."""

from __future__ import annotations

import math
import time

import torch
from omegaconf import ListConfig
from scipy.stats import norm

from robust_cli.analysis.certify import ABSTAIN, certified_accuracy, certify, predict
from robust_cli.analysis.persistence import persistence
from robust_cli.commands import build
from robust_cli.core.engine import AUTO_SAMPLE_START, BatchSize
from robust_cli.core.errors import UserError
from robust_cli.evaluation import evaluate as ev

CHUNK = 32  # points certified together between progress-bar updates (draws do not depend on it)
PERSISTENCE_POOL = 8192  # the fast persistence's largest pool of rays (its n_samples default)

BATCH_SETTINGS = "batch_size"  # named by the out-of-memory error


def sigma_list(cfg) -> list[float]:
    values = list(cfg.sigma) if isinstance(cfg.sigma, (list, tuple, ListConfig)) else [cfg.sigma]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"sigma must be numbers > 0, got {v!r}; e.g. 'sigma=[0.25,0.5]'")
        out.append(float(v))
    if not out:
        raise UserError("sigma is an empty list; give a number or a list like 'sigma=[0.25,0.5]'")
    return sorted(set(out))


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def validate(cfg):
    sigma_list(cfg)
    for key in ("n0", "n"):
        _positive_int(cfg[key], key)
    BatchSize(cfg.batch_size, "batch_size", torch.device("cpu"))
    if not isinstance(cfg.alpha, (int, float)) or not 0 < cfg.alpha < 1:
        raise UserError(f"alpha must be in (0, 1), got {cfg.alpha!r}; Cohen et al. use 0.001")
    if not isinstance(cfg.radius_step, (int, float)) or not cfg.radius_step > 0:
        raise UserError(f"radius_step must be > 0, got {cfg.radius_step!r}")
    if not isinstance(cfg.gamma, (int, float)) or not 0 < cfg.gamma < 1:
        raise UserError(f"gamma must be in (0, 1), got {cfg.gamma!r}")
    if cfg.persistence and "attack" not in cfg:
        raise UserError("persistence=true belongs to the sandwich: add a minimal L2 attack, e.g. attack=deepfool")
    if "attack" in cfg:
        attack = _attack(cfg)
        if attack.kind != "minimal" or attack.norm != "l2":
            raise UserError(
                f"the sandwich needs a minimal L2 attack (deepfool, cw, lbfgs, or fab_t with attack.norm=l2 attack.minimal=true), got {attack.name} ({attack.kind}, {attack.norm})"
            )


def _attack(cfg):
    from robust_cli.commands.attack import build_attack

    return build_attack(cfg)


def run(cfg, ctx):
    model, data, _ = build.trained_model(cfg, ctx)
    x, y, device = data.test_x, data.test_y, ctx.device
    base_pred = ev.predict(model, x, device=device)
    # certificates are about the fp32 model (no reduced precision here); batch_size=auto halves on out-of-memory
    sample_batch = BatchSize(cfg.batch_size, "batch_size", device, start=AUTO_SAMPLE_START)
    sigmas, options = sigma_list(cfg), {"seed": int(cfg.seed), "batch_size": sample_batch}
    # with persistence, the labels of the first draws are kept: persistence's rays are the same draws (same seed
    # and index), and it need not classify them again at these sigmas
    keep = PERSISTENCE_POOL if cfg.persistence else 0  # validate: persistence comes with an attack
    rows, results = [], {}
    for sigma in sigmas:
        parts, seconds = [], []
        with ctx.progress(len(x), f"certify sigma={sigma:g} (n={cfg.n})") as advance:
            for start in range(0, len(x), CHUNK):
                began = time.perf_counter()
                xb = x[start : start + CHUNK].to(device)  # index_offset=start: each point's draws are its own
                cert = certify(model, xb, sigma, int(cfg.n0), int(cfg.n), float(cfg.alpha), index_offset=start, keep=keep, **options)
                smoothed = predict(model, xb, sigma, int(cfg.n), float(cfg.alpha), index_offset=start, **options) if cfg.predict else None
                parts.append((cert, smoothed))
                seconds += [(time.perf_counter() - began) / len(xb)] * len(xb)
                advance(len(xb))
        predicted = torch.cat([c.predicted for c, _ in parts])
        radius = torch.cat([c.radius for c, _ in parts])
        p_low = torch.cat([c.p_a_lower for c, _ in parts])
        evaluations = torch.cat([c.evaluations for c, _ in parts])
        smoothed = torch.cat([s for _, s in parts]) if cfg.predict else None
        results[sigma] = {"predicted": predicted, "radius": radius, "draws": torch.cat([c.draws for c, _ in parts]) if keep else None}
        for i in range(len(y)):
            row = {
                "index": i,
                "label": int(y[i]),
                "sigma": sigma,
                "predicted": "abstain" if predicted[i] == ABSTAIN else int(predicted[i]),
                "base_pred": int(base_pred[i]),
                "p_a_lower": float(p_low[i]),
                "radius": float(radius[i]),
                "correct": bool(predicted[i] == y[i]),
                "evaluations": int(evaluations[i]),
                "seconds": seconds[i],
            }
            if smoothed is not None:
                row["predict"] = "abstain" if smoothed[i] == ABSTAIN else int(smoothed[i])
            rows.append(row)
    ctx.write_csv("certify.csv", rows)

    top = max((float(torch.nan_to_num(r["radius"], nan=0).max()) for r in results.values()), default=0.0)
    step = float(cfg.radius_step)
    radii = [round(step * j, 10) for j in range(int(top / step) + 2)]
    curve = []
    for sigma, r in results.items():
        correct = r["predicted"] == y
        for level, acc in zip(radii, certified_accuracy(r["radius"], correct, radii)):
            curve.append(
                {"sigma": sigma, "radius": level, "certified_accuracy": acc, "n": len(y), "abstain_rate": float((r["predicted"] == ABSTAIN).double().mean())}
            )
    ctx.write_csv("certified_accuracy.csv", curve)
    _accuracy_figure(ctx, results, y, top)

    headline = {"n": len(y), "clean_accuracy": float((base_pred == y).double().mean())}
    for sigma, r in results.items():
        correct = r["predicted"] == y
        for level in (0.0, 0.5, 1.0):
            headline[f"certified_accuracy@{level:g} (sigma={sigma:g})"] = certified_accuracy(r["radius"], correct, [level])[0]
        headline[f"abstain_rate (sigma={sigma:g})"] = float((r["predicted"] == ABSTAIN).double().mean())
    if "attack" in cfg:
        headline["sandwich_violations"] = _sandwich(cfg, ctx, model, x, y, base_pred, results, sample_batch)  # unexplained ones
    ctx.headline(**headline)


def _sandwich(cfg, ctx, model, x, y, base_pred, results, sample_batch=None) -> int:
    """sandwich.csv/png: per point and sigma, certified radius vs the attack's L2 distance to change the base
    prediction; returns the number of points where the certificate exceeds that distance unexplained."""
    device = ctx.device
    attack = _attack(cfg)
    sample_batch = sample_batch or BatchSize(cfg.batch_size, "batch_size", device, start=AUTO_SAMPLE_START)
    torch.manual_seed(int(cfg.seed))
    bs = min(sample_batch.size, 256)  # examples per attack call
    with ctx.progress(math.ceil(len(x) / bs), f"{attack.name} on the base classifier") as advance:
        # the label to move away from is the base prediction: the distance is to the base decision boundary
        x_adv = ev.run_attack(model, attack, x, base_pred, math.inf, None, bs, device, advance)
    moved = ev.predict(model, x_adv, device=device) != base_pred
    distance = torch.where(moved, ev.perturbation_sizes(x, x_adv)["l2"], torch.tensor(math.inf, dtype=torch.float64))
    sigma_star = None
    if cfg.persistence:
        found = []
        for s in range(0, len(x), CHUNK):
            shared = [[(sigma, r["draws"][i]) for sigma, r in results.items()] for i in range(s, min(s + CHUNK, len(x)))]
            found.append(
                persistence(
                    model,
                    x[s : s + CHUNK].to(device),
                    float(cfg.gamma),
                    method="fast",
                    seed=int(cfg.seed),
                    index_offset=s,
                    batch_size=sample_batch,
                    n_samples=PERSISTENCE_POOL,
                    shared=shared,
                )
            )
        sigma_star = torch.cat([f.sigma for f in found]).double()
        persistence_evaluations = torch.cat([f.evaluations for f in found])
    rows, violations = [], []
    for sigma, r in results.items():
        for i in range(len(y)):
            agree = bool(r["predicted"][i] != ABSTAIN and r["predicted"][i] == base_pred[i])
            holds = bool(r["radius"][i] <= distance[i] * (1 + 1e-6)) if agree else None
            row = {
                "index": i,
                "label": int(y[i]),
                "base_pred": int(base_pred[i]),
                "sigma": sigma,
                "smoothed_pred": "abstain" if r["predicted"][i] == ABSTAIN else int(r["predicted"][i]),
                "certified_radius": float(r["radius"][i]),
                "attacked_distance": float(distance[i]),
                "holds": holds,
            }
            if sigma_star is not None:  # at sigma = sigma*, p_A = gamma, so Cohen's formula gives sigma* Phi^-1(gamma)
                row["persistence"] = float(sigma_star[i])
                row["persistence_radius"] = float(sigma_star[i] * norm.ppf(float(cfg.gamma)))
                row["persistence_evaluations"] = int(persistence_evaluations[i])  # beyond the certify draws it reused
            rows.append(row)
            if holds is False:
                violations.append(row)
    # a violation is explained when the smoothed classifier still says c_A at the attacked point itself: then f's
    # boundary is simply not g's there (g is certified, f is not). Fresh draws (other seed indices) decide it.
    for sigma in {v["sigma"] for v in violations}:
        mine = [v for v in violations if v["sigma"] == sigma]
        idx = [v["index"] for v in mine]
        at_adv = certify(
            model, x_adv[idx].to(device), sigma, int(cfg.n0), int(cfg.n), float(cfg.alpha), seed=int(cfg.seed) + 1, index_offset=idx, batch_size=sample_batch
        )
        for v, pred, p_low in zip(mine, at_adv.predicted.tolist(), at_adv.p_a_lower.tolist()):
            v["explained"] = pred == v["smoothed_pred"]
            v["p_a_lower_at_attack"] = p_low
    for r in rows:
        r.setdefault("explained", None)
    unexplained = [v for v in violations if not v["explained"]]
    ctx.write_csv("sandwich.csv", rows)
    for v in unexplained[:5]:
        ctx.warn(
            f"sandwich check failed at point {v['index']} (sigma={v['sigma']:g}): certified radius {v['certified_radius']:.4f} > "
            f"{attack.name} distance {v['attacked_distance']:.4f}, and the smoothed classifier does not keep its class at the "
            "attacked point: the certificate or the attack is wrong there, inspect it"
        )
    if len(unexplained) > 5:
        ctx.warn(f"sandwich check failed at {len(unexplained)} points in all (see sandwich.csv: holds false, explained false)")
    explained = len(violations) - len(unexplained)
    ctx.record.setdefault("checks", []).append(
        {
            "check": "sandwich",
            "status": "fail" if unexplained else "ok",
            "detail": f"{len(violations)} of {sum(r['holds'] is not None for r in rows)} comparable points have a certified radius beyond the "
            f"attacked distance; {explained} explained (the smoothed classifier keeps its class at the attacked point)",
        }
    )
    _sandwich_figure(ctx, rows, attack.name)
    ctx.headline(sandwich_explained=explained)
    return len(unexplained)


def _accuracy_figure(ctx, results, y, top):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    grid = torch.linspace(0, max(top, 1e-3) * 1.05, 200)
    for sigma, r in results.items():
        ax.plot(grid.numpy(), certified_accuracy(r["radius"], r["predicted"] == y, grid.tolist()), label=f"sigma = {sigma:g}")
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1.02), title="certified accuracy (Cohen et al. 2019, Figure 4 layout)")
    ax.legend()
    ctx.save_figure("certified_accuracy.png", fig)


def _sandwich_figure(ctx, rows, attack_name):
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["holds"] is not None and math.isfinite(r["attacked_distance"])]
    fig, ax = plt.subplots(figsize=(5, 5))
    for sigma in sorted({r["sigma"] for r in shown}):
        pts = [r for r in shown if r["sigma"] == sigma]
        ax.scatter([r["certified_radius"] for r in pts], [r["attacked_distance"] for r in pts], s=8, label=f"sigma = {sigma:g}")
    top = max([r["attacked_distance"] for r in shown] + [r["certified_radius"] for r in shown] + [1e-3])
    ax.plot([0, top], [0, top], color="0.3", lw=0.8, ls="--", label="certified = attacked")
    ax.set(
        xlabel="certified L2 radius (smoothed)",
        ylabel=f"{attack_name} L2 distance (base)",
        title="certified radius vs attacked distance (below the diagonal: see explained)",
    )
    ax.legend(fontsize=8)
    ctx.save_figure("sandwich.png", fig)

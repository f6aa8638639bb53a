"""`robust persistence`: gamma-persistence of natural test points vs their adversarial examples (Bell, section 5).

Points: `n_points` correctly classified test images (seeded choice; an adversarial example of a misclassified image
means nothing), each attacked once with the configured attack (Bell's Table 1: L-BFGS, random targets). Natural
point i and its adversarial example share their Gaussian draws (common random numbers across the pair).
Mean persistence is over finite values; +inf values (past persistence.sigma_cap) are counted in n_inf_*.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from robust_cli.analysis.persistence import DISTRIBUTIONS, INTERVALS, METHODS, persistence, stability_curve
from robust_cli.commands import build
from robust_cli.core.engine import AUTO_SAMPLE_START, BatchSize, fit_batch
from robust_cli.core.errors import UserError
from robust_cli.evaluation import evaluate as ev

CHUNK = 32  # points searched together between progress-bar updates

FAST_KEYS = ("n_init", "confidence", "rtol", "antithetic")  # and max_samples, fast_persistence's n_samples
BRACKETING_KEYS = ("n_samples", "precision", "max_steps", "confidence", "interval")
COMMON_KEYS = ("clip", "distribution", "sigma_floor", "sigma_cap", "batch_size")

BATCH_SETTINGS = "batch_size (attacks) or persistence.batch_size (samples)"  # named by the out-of-memory error


def persistence_options(cfg, sample_batch=None) -> dict:
    """Keyword arguments of the configured method, from cfg.persistence (sample_batch: one BatchSize for the run,
    so that a size found by batch_size=auto is remembered)."""
    p = cfg.persistence
    keys = (FAST_KEYS if p.method == "fast" else BRACKETING_KEYS) + COMMON_KEYS
    pool = {"n_samples": p.max_samples} if p.method == "fast" else {}
    return {k: p[k] for k in keys} | pool | {"seed": int(cfg.seed)} | ({"batch_size": sample_batch} if sample_batch is not None else {})


def _positive_int(value, name, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def validate(cfg):
    from robust_cli.commands.attack import build_attack

    if not isinstance(cfg.gamma, (int, float)) or not 0 < cfg.gamma < 1:
        raise UserError(f"gamma must be in (0, 1), got {cfg.gamma!r}; Bell uses gamma=0.7")
    _positive_int(cfg.n_points, "n_points")
    BatchSize(cfg.batch_size, "batch_size", torch.device("cpu"))
    p = cfg.persistence
    if p.method not in METHODS:
        raise UserError(f"persistence.method must be one of {', '.join(METHODS)}, got {p.method!r}")
    _positive_int(p.n_samples, "persistence.n_samples", 2)
    _positive_int(p.n_init, "persistence.n_init")
    _positive_int(p.max_steps, "persistence.max_steps")
    _positive_int(p.max_samples, "persistence.max_samples", 2)
    BatchSize(p.batch_size, "persistence.batch_size", torch.device("cpu"))
    checks = [
        (p.n_init <= p.max_samples, f"persistence.n_init ({p.n_init}) must not exceed persistence.max_samples ({p.max_samples})"),
        (isinstance(p.precision, (int, float)) and 0 < p.precision < 1, f"persistence.precision must be in (0, 1), got {p.precision!r}"),
        (isinstance(p.confidence, (int, float)) and 0 < p.confidence < 1, f"persistence.confidence must be in (0, 1), got {p.confidence!r}"),
        (p.interval in INTERVALS, f"persistence.interval must be one of {', '.join(INTERVALS)}, got {p.interval!r}"),
        (p.distribution in DISTRIBUTIONS, f"persistence.distribution must be one of {', '.join(DISTRIBUTIONS)}, got {p.distribution!r}"),
        (isinstance(p.rtol, (int, float)) and p.rtol > 0, f"persistence.rtol must be > 0, got {p.rtol!r}"),
        (
            isinstance(p.sigma_floor, (int, float)) and isinstance(p.sigma_cap, (int, float)) and 0 < p.sigma_floor < p.sigma_cap,
            f"need 0 < persistence.sigma_floor < persistence.sigma_cap, got {p.sigma_floor!r}, {p.sigma_cap!r}",
        ),
        (isinstance(cfg.sigma_grid.max, (int, float)) and cfg.sigma_grid.max > 0, f"sigma_grid.max must be > 0, got {cfg.sigma_grid.max!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    _positive_int(cfg.sigma_grid.num, "sigma_grid.num")
    _positive_int(cfg.stability.points, "stability.points", 0)
    _positive_int(cfg.stability.n_samples, "stability.n_samples")
    _positive_int(cfg.line.points, "line.points", 0)
    _positive_int(cfg.line.steps, "line.steps", 2)
    attack = build_attack(cfg)
    _positive_int(cfg.targets_per_point, "targets_per_point")
    if cfg.targets_per_point > 1 and attack.targeted != "random":
        raise UserError(
            f"targets_per_point={cfg.targets_per_point} draws distinct random targets: add attack.targeted=random (it is {attack.targeted or 'untargeted'} now)"
        )
    classes = cfg.dataset.get("num_classes")  # known before any data is read, except for an image folder
    if isinstance(classes, int):
        _check_targets_per_point(cfg.targets_per_point, classes)
    if attack.kind == "budgeted" and cfg.get("eps") is None:
        raise UserError(f"{attack.name} is a budgeted attack: give its budget with eps=..., or use a minimal attack such as attack=lbfgs")


def _check_targets_per_point(per_point: int, classes: int):
    if per_point > classes - 1:
        raise UserError(f"targets_per_point={per_point}, but {classes} classes leave {classes - 1} other classes to aim at")


# ----------------------------------------------------------------------------------------------- run
def _persist(model, x, indices, cfg, ctx, description, sample_batch=None):
    """Persistence of x (on the CPU) in chunks with a progress bar; draws seeded by `indices`."""
    options, parts = persistence_options(cfg, sample_batch), []
    with ctx.progress(len(x), description) as advance:
        for start in range(0, len(x), CHUNK):
            part = persistence(
                model,
                x[start : start + CHUNK].to(ctx.device),
                float(cfg.gamma),
                method=cfg.persistence.method,
                index_offset=indices[start : start + CHUNK],
                **options,
            )
            parts.append(part)
            advance(len(part.sigma))
    cat = lambda name: torch.cat([getattr(p, name) for p in parts]) if parts else torch.zeros(0)
    return {name: cat(name) for name in ("sigma", "ci_low", "ci_high", "evaluations", "labels")}


def run(cfg, ctx):
    from robust_cli.commands.attack import build_attack

    model, data, checkpoint = build.trained_model(cfg, ctx)
    device, gamma, method = ctx.device, float(cfg.gamma), cfg.persistence.method
    engine = build.make_engine(cfg, device, ctx.warn)
    fast = engine.fast(model)  # the attack and the noisy samples run this; clean and adversarial labels are fp32
    ctx.record["engine"] = engine.describe(model)
    sample_batch = BatchSize(cfg.persistence.batch_size, "persistence.batch_size", device, start=AUTO_SAMPLE_START)
    bounded = bool(data.test_x.min() >= 0 and data.test_x.max() <= 1)
    attack = build_attack(cfg, bounds=(0.0, 1.0) if bounded else None)
    test_pred = ev.predict(model, data.test_x, device=device)
    test_acc = (test_pred == data.test_y).double().mean().item()

    gen = torch.Generator().manual_seed(int(cfg.seed))
    correct = (test_pred == data.test_y).nonzero().squeeze(1)
    chosen = correct[torch.randperm(len(correct), generator=gen)[: int(cfg.n_points)]].sort().values
    if len(chosen) == 0:
        raise UserError(
            f"the model classifies none of the {len(data.test_y)} test points correctly: persistence compares correctly classified "
            "points with their adversarial examples; check the model's weights, its normalisation and the dataset's labels"
        )
    if len(chosen) < cfg.n_points:
        ctx.warn(f"only {len(chosen)} correctly classified test points (n_points={cfg.n_points}): using them all")
    x, y = data.test_x[chosen], data.test_y[chosen]
    per_point = int(cfg.targets_per_point)
    _check_targets_per_point(per_point, data.meta.num_classes)
    # the attacked pairs: point_of[j] is the natural point of adversarial example j (each point once, or per target)
    point_of = torch.arange(len(x)).repeat_interleave(per_point)

    torch.manual_seed(int(cfg.seed))
    started = time.perf_counter()
    if per_point > 1:  # distinct targets per point, uniform over the other classes (Bell: 28 per ImageNet image)
        others = torch.rand(len(x), data.meta.num_classes, generator=gen).scatter(1, y.view(-1, 1), math.inf)
        target = others.argsort(dim=1)[:, :per_point].reshape(-1)
    else:
        target = ev.choose_targets(attack, model, x, y, device=device)
    x_nat, y_pair = x[point_of], y[point_of]
    eps = float(cfg.eps) if attack.kind == "budgeted" else None
    attack_batch = BatchSize(cfg.batch_size, "batch_size", device, limit=len(x_nat))

    def attack_all(bs):
        with ctx.progress(math.ceil(len(x_nat) / bs), f"{attack.name} on {len(x_nat)} points") as advance:
            return ev.run_attack(fast, attack, x_nat, y_pair, eps, target, bs, device, advance)

    x_adv = fit_batch(attack_all, attack_batch)
    attack_seconds = time.perf_counter() - started
    adv_pred = ev.predict(model, x_adv, device=device)
    success = ev.success_mask(adv_pred, y_pair, target)
    sizes = ev.perturbation_sizes(x_nat, x_adv)
    if not success.any():
        raise UserError(
            f"{attack.name} found no adversarial example among {len(x_nat)} points: strengthen the attack (see conf/attack/{build.choice(cfg, 'attack')}.yaml)"
        )
    if not success.all():
        ctx.warn(f"{attack.name} failed on {int((~success).sum())} of {len(x_nat)} points: their adversarial rows have persistence NaN")

    started = time.perf_counter()
    nat = _persist(fast, x, list(range(len(x))), cfg, ctx, f"persistence ({method}) natural", sample_batch)
    ok = success.nonzero().squeeze(1)
    # an adversarial example shares its natural point's draws
    adv_part = _persist(fast, x_adv[ok], point_of[ok].tolist(), cfg, ctx, f"persistence ({method}) adversarial", sample_batch)
    adv = {k: torch.full((len(x_nat),), math.nan, dtype=torch.float64) for k in ("sigma", "ci_low", "ci_high")}
    adv["evaluations"] = torch.zeros(len(x_nat), dtype=torch.int64)
    for k in adv:
        adv[k][ok] = adv_part[k].to(adv[k].dtype)
    persistence_seconds = time.perf_counter() - started

    # ---- persistence.csv
    attack_name = build.choice(cfg, "attack")
    rows = []
    for kind, res, pred in (("natural", nat, test_pred[chosen]), ("adversarial", adv, adv_pred)):
        perturbed = kind == "adversarial"
        for i in range(len(x_nat) if perturbed else len(x)):
            point = int(point_of[i]) if perturbed else i
            aimed = target is not None and (perturbed or per_point == 1)
            rows.append(
                {
                    "index": int(chosen[point]),
                    "kind": kind,
                    "label": int(y[point]),
                    "pred": int(pred[i]),
                    "target": int(target[i]) if aimed else -1,
                    "attack": attack_name,
                    "success": bool(success[i]) if perturbed else math.nan,
                    "distortion": (sizes["distortion"][i].item() if success[i] else math.inf) if perturbed else math.nan,
                    "l2": sizes["l2"][i].item() if perturbed else math.nan,
                    "linf": sizes["linf"][i].item() if perturbed else math.nan,
                    "gamma": gamma,
                    "persistence": res["sigma"][i].item(),
                    "ci_low": res["ci_low"][i].item(),
                    "ci_high": res["ci_high"][i].item(),
                    "evaluations": int(res["evaluations"][i]),
                    "method": method,
                }
            )
    ctx.write_csv("persistence.csv", rows)

    # ---- summary.csv: one row with Bell's Table 1 columns first
    def stats(values):
        finite = values[torch.isfinite(values)]
        return (
            finite.mean().item() if len(finite) else math.nan,
            values[~values.isnan()].median().item() if (~values.isnan()).any() else math.nan,
            int((~values.isnan()).sum()),
            int(torch.isinf(values).sum()),
        )

    mean_nat, median_nat, n_nat, inf_nat = stats(nat["sigma"])
    mean_adv, median_adv, n_adv, inf_adv = stats(adv["sigma"][ok])
    evaluations = torch.cat([nat["evaluations"], adv["evaluations"][ok]]).double().mean().item()
    summary = {
        "network": build.choice(cfg, "model"),
        "test_acc": 100.0 * test_acc,
        "avg_distortion": sizes["distortion"][success].mean().item(),
        "persistence_nat": mean_nat,
        "persistence_adv": mean_adv,
        "median_nat": median_nat,
        "median_adv": median_adv,
        "n_nat": n_nat,
        "n_adv": n_adv,
        "n_inf_nat": inf_nat,
        "n_inf_adv": inf_adv,
        "attack_success": success.double().mean().item(),
        "dataset": build.choice(cfg, "dataset"),
        "defense": build.choice(cfg, "defense"),
        "attack": attack_name,
        "gamma": gamma,
        "method": method,
        "n_samples": int(cfg.persistence.max_samples if method == "fast" else cfg.persistence.n_samples),
        "evaluations_per_point": evaluations,
        "attack_seconds": attack_seconds,
        "persistence_seconds": persistence_seconds,
        "seed": int(cfg.seed),
    }
    ctx.write_csv("summary.csv", [summary])

    pairs = ok[: max(int(cfg.stability.points), int(cfg.line.points))]
    _stability_outputs(
        cfg, ctx, fast, x_nat, x_adv, y_pair, adv_pred, target, chosen[point_of], pairs[: int(cfg.stability.points)], data.meta.num_classes, sample_batch
    )
    _line_outputs(cfg, ctx, fast, x_nat, x_adv, chosen[point_of], pairs[: int(cfg.line.points)])
    _histogram(ctx, nat["sigma"], adv["sigma"][ok], cfg)
    ctx.headline(
        network=summary["network"],
        test_acc=summary["test_acc"],
        avg_distortion=summary["avg_distortion"],
        persistence_nat=mean_nat,
        persistence_adv=mean_adv,
        median_nat=median_nat,
        median_adv=median_adv,
        n_points=len(x),
        n_adversarial=len(x_nat),
        method=method,
        evaluations_per_point=evaluations,
        seconds=attack_seconds + persistence_seconds,
    )


# ----------------------------------------------------------------------------------------------- figures
def _stability_outputs(cfg, ctx, model, x, x_adv, y, adv_pred, target, chosen, pairs, num_classes, sample_batch):
    """Figure 9: fraction of samples in each class vs sigma around a natural point and its adversarial example."""
    if len(pairs) == 0:
        return
    import matplotlib.pyplot as plt

    sigmas = [float(cfg.sigma_grid.max) * j / int(cfg.sigma_grid.num) for j in range(1, int(cfg.sigma_grid.num) + 1)]
    options = {k: cfg.persistence[k] for k in ("clip", "distribution")} | {"seed": int(cfg.seed), "num_classes": num_classes, "batch_size": sample_batch}
    rows = []
    fig, axes = plt.subplots(len(pairs), 2, figsize=(10, 3.2 * len(pairs)), squeeze=False)
    for row, i in enumerate(pairs.tolist()):
        for col, (kind, point) in enumerate((("natural", x[i]), ("adversarial", x_adv[i]))):
            freq, _, labels = stability_curve(model, point[None].to(ctx.device), sigmas, int(cfg.stability.n_samples), index_offset=[i], **options)
            for s, sigma in enumerate(sigmas):
                for c in range(freq.shape[2]):
                    rows.append(
                        {
                            "pair": row,
                            "index": int(chosen[i]),
                            "kind": kind,
                            "label": int(y[i]),
                            "pred": int(labels[0]),
                            "target": int(target[i]) if target is not None else -1,
                            "sigma": sigma,
                            "class": c,
                            "frequency": freq[0, s, c].item(),
                        }
                    )
            ax = axes[row, col]
            other_labelled = False
            for c in range(freq.shape[2]):  # each panel's own legend: every row is a different pair of points
                special = {
                    int(y[i]): ("black", f"class {int(y[i])} (true label)"),
                    int(adv_pred[i]): ("red", f"class {int(adv_pred[i])} (adversarial prediction)"),
                }
                color, name = special.get(c, (None, None))
                if color is None and not other_labelled:
                    name, other_labelled = "other classes", True
                ax.plot(sigmas, freq[0, :, c].numpy(), color=color or "0.7", lw=2 if color else 0.8, label=name)
            ax.set(title=f"{kind} #{int(chosen[i])} (predicted {int(labels[0])})", xlabel="sigma", ylabel="fraction of samples", ylim=(-0.02, 1.02))
            ax.axhline(float(cfg.gamma), color="0.5", ls=":", lw=0.8, label=f"gamma = {float(cfg.gamma):g}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.write_csv("stability.csv", rows)
    ctx.save_figure("stability.png", fig)


def _line_outputs(cfg, ctx, model, x, x_adv, chosen, pairs):
    """Persistence along x + t (x_adv - x), t in [0, 1], with the first t classified differently from x marked."""
    if len(pairs) == 0:
        return
    import matplotlib.pyplot as plt

    t = torch.linspace(0, 1, int(cfg.line.steps))
    pts = torch.cat([x[i][None] + t.view(-1, *([1] * x[i].dim())) * (x_adv[i] - x[i])[None] for i in pairs.tolist()])
    # every point of a segment uses its pair's draws: the curve is smooth in t, not noise
    seeds = [i for i in pairs.tolist() for _ in t]
    res = _persist(model, pts, seeds, cfg, ctx, "persistence along the lines")
    pred = ev.predict(model, pts, device=ctx.device)
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for p, i in enumerate(pairs.tolist()):
        sl = slice(p * len(t), (p + 1) * len(t))
        crossed = pred[sl] != pred[sl][0]
        for j in range(len(t)):
            rows.append(
                {
                    "pair": p,
                    "index": int(chosen[i]),
                    "t": t[j].item(),
                    "pred": int(pred[sl][j]),
                    "crossed": bool(crossed[: j + 1].any()),
                    "persistence": res["sigma"][sl][j].item(),
                    "ci_low": res["ci_low"][sl][j].item(),
                    "ci_high": res["ci_high"][sl][j].item(),
                    "evaluations": int(res["evaluations"][sl][j]),
                }
            )
        line = ax.plot(t.numpy(), res["sigma"][sl].numpy(), marker="o", ms=3, label=f"#{int(chosen[i])}")[0]
        if crossed.any():
            ax.axvline(t[crossed.nonzero()[0, 0]].item(), color=line.get_color(), ls="--", lw=0.8)
    ax.set(xlabel="t (0: natural, 1: adversarial)", ylabel=f"{cfg.gamma}-persistence", title="persistence along the segment (dashed: class changes)")
    ax.legend(fontsize=8)
    ctx.write_csv("line.csv", rows)
    ctx.save_figure("line.png", fig)


def _histogram(ctx, nat, adv, cfg):
    """Figures 14-16: natural (blue) and adversarial (red) persistence; +inf values are left out and counted."""
    import matplotlib.pyplot as plt

    nat, adv = nat[torch.isfinite(nat)].numpy(), adv[torch.isfinite(adv)].numpy()
    both = np.concatenate([nat, adv])
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(both, bins=30) if len(both) else 10
    ax.hist(nat, bins=bins, color="tab:blue", alpha=0.6, label=f"natural (n={len(nat)})")
    ax.hist(adv, bins=bins, color="tab:red", alpha=0.6, label=f"adversarial (n={len(adv)})")
    ax.set(xlabel=f"{cfg.gamma}-persistence", ylabel="count", title=f"{build.choice(cfg, 'model')}, {build.choice(cfg, 'attack')}")
    ax.legend()
    ctx.save_figure("persistence_hist.png", fig)

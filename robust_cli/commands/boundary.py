"""`robust boundary`: decision-boundary geometry around crossings (Bell Part III, section 31).

For each of `n_points` pairs (x1, x2) of differently classified points, bisect to the boundary point between them,
draw `n_samples` points around it (Gaussian and/or Flat SVD, std `sigma`), project them back onto the boundary
(`method`), and read the local dimension off the SVD of their differences: one dropped singular value = a locally
planar crossing. Writes boundary.csv (one row per boundary point and distribution), singular_values.csv,
singular_values.png, dimension_hist.png and, for image data, boundary_points.png.

Samples are not clipped to [0, 1]: the geometry studied is the classifier's on R^n, and clipping would flatten the
sample cloud against the box faces, i.e. fake degenerate directions.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from robust_cli.analysis.boundary import boundary_dimension, boundary_point, project_to_boundary, sample_around
from robust_cli.commands import build
from robust_cli.core.errors import UserError

PAIRS = ("auto", "natural_natural", "natural_adversarial", "centerline", "parallel")
METHODS = ("auto", "interpolate", "descent")
DISTRIBUTIONS = ("gaussian", "flat_svd")


def _positive_int(cfg, key, minimum=1):
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{key} must be an integer >= {minimum}, got {value!r}")


def validate(cfg):
    if cfg.pairs not in PAIRS:
        raise UserError(f"pairs must be one of {', '.join(PAIRS)}, got {cfg.pairs!r}")
    _positive_int(cfg, "n_points")
    _positive_int(cfg, "n_samples", 3)
    _positive_int(cfg, "max_steps")
    _positive_int(cfg, "n_grid", 0)
    for key in ("sigma", "tol"):
        if not isinstance(cfg[key], (int, float)) or not cfg[key] > 0:
            raise UserError(f"{key} must be a number > 0, got {cfg[key]!r}")
    if not isinstance(cfg.min_gap, (int, float)) or not cfg.min_gap > 1:
        raise UserError(f"min_gap must be a ratio > 1, got {cfg.min_gap!r}")
    if cfg.method not in METHODS:
        raise UserError(f"method must be auto, interpolate or descent, got {cfg.method!r}")
    distributions = list(cfg.distributions) if not isinstance(cfg.distributions, str) else [cfg.distributions]
    if not distributions or any(d not in DISTRIBUTIONS for d in distributions):
        raise UserError(f"distributions must be a list drawn from gaussian, flat_svd, got {cfg.distributions!r}")
    if cfg.pairs in ("centerline", "parallel"):  # cheap: build the (untrained) model on the dataset's metadata
        from robust_cli.commands import build

        model = build.make_model(cfg, build.make_dataset(cfg).meta)
        if not hasattr(model.net, "centerline"):
            raise UserError(f"pairs={cfg.pairs} needs a cone model: model=orthant or model=theta_wedge")
        if model.mean is not None:
            raise UserError(f"pairs={cfg.pairs} needs the cone in data space: set model.normalize=false")
    if cfg.pairs == "natural_adversarial":
        if cfg.get("attack") is None:
            raise UserError("pairs=natural_adversarial needs an attack: add attack=pgd (or another attack)")
        if not isinstance(cfg.eps, (int, float)) or cfg.eps < 0:
            raise UserError(f"eps must be a number >= 0, got {cfg.eps!r}")
        _attack(cfg)


def _attack(cfg):
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.attack)
    except Exception as exc:  # noqa: BLE001 - a bad attack parameter is the user's to fix
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"attack: {cause}") from None


# ---------------------------------------------------------------------------------------------- model and pairs
def _model_and_data(cfg, ctx):
    """Parameter-free test objects (orthant, wedge, Voronoi) are built directly; trained nets come from the registry."""

    probe = build.make_model(cfg, build.make_dataset(cfg).meta)
    if next(probe.parameters(), None) is None:
        return probe.to(ctx.device).eval(), build.make_data(cfg)
    model, data, _ = build.trained_model(cfg, ctx)
    return model, data


def _predict(model, x, batch_size=1000):
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def _natural_natural(cfg, model, data, device, gen):
    """Each pair: a test point and the nearest test point (L2) that the model classifies differently, in a seeded
    pool of test points (the seed interpolates between two test images; the nearest one keeps the crossing local)."""
    order = torch.randperm(len(data.test_x), generator=gen)
    pool = order[: min(len(order), max(10 * cfg.n_points, 500))]
    xs = data.test_x[pool].to(device)
    pred = _predict(model, xs)
    dist = torch.cdist(xs.flatten(1), xs.flatten(1))
    dist[pred[:, None] == pred[None, :]] = math.inf
    partner = dist.argmin(1)
    usable = torch.isfinite(dist.min(1).values).nonzero()[:, 0][: cfg.n_points]
    return xs[usable], xs[partner[usable]], pool[usable.cpu()], pool[partner[usable].cpu()]


def _natural_adversarial(cfg, model, data, device, gen, ctx):
    """Correctly classified test points and their successful adversarial examples (success re-checked here)."""
    attack = _attack(cfg)
    order = torch.randperm(len(data.test_x), generator=gen)
    found_x, found_adv, found_idx, tried = [], [], [], 0
    chunk = max(2 * cfg.n_points, 100)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        x, y = data.test_x[idx].to(device), data.test_y[idx].to(device)
        correct = _predict(model, x) == y
        x, y, idx = x[correct], y[correct], idx[correct.cpu()]
        x_adv = attack(model, x, y, float(cfg.eps)) if attack.kind == "budgeted" else attack(model, x, y)
        success = _predict(model, x_adv) != y
        tried += len(y)
        found_x.append(x[success]), found_adv.append(x_adv[success]), found_idx.append(idx[success.cpu()])
        if sum(len(f) for f in found_idx) >= cfg.n_points:
            break
    x1, x2, idx = (torch.cat(f)[: cfg.n_points] for f in (found_x, found_adv, found_idx))
    ctx.record["attack_success_rate"] = sum(len(f) for f in found_idx) / max(tried, 1)
    return x1, x2, idx, idx


def _cone_crossings(pairs, offset, n_points, model, device, gen):
    """Definition 30.9's crossings of a cone (orthant, wedge) from inside (x1) to outside (x2), each translated by
    a random vector in the coordinates the cone ignores (i > k), so the boundary points differ but the geometry not."""
    cone = model.net  # checked in validate: a cone without normalisation
    if pairs == "centerline":
        x1, x2 = cone.centerline(torch.tensor([1.0])), cone.centerline(torch.tensor([-1.0]))
    else:
        steepest = float(cone.slopes.max()) if cone.k > 1 else 0.0
        t_in = min(1.0, offset / (2 * steepest)) if steepest > 0 else 1.0
        x1, x2 = cone.parallel(torch.tensor([t_in]), offset), cone.parallel(torch.tensor([-1.0]), offset)
    shift = torch.randn(n_points, cone.n, generator=gen, dtype=torch.float64)
    shift[:, : cone.k] = 0
    shift = shift.reshape(n_points, *x1.shape[1:])
    x1, x2 = (x + shift for x in (x1, x2))
    none = torch.full((n_points,), -1)
    return x1.float().to(device), x2.float().to(device), none, none


# ---------------------------------------------------------------------------------------------- references
def _margin_gradient(model, x, a, b):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    rows = torch.arange(len(x), device=x.device)
    (grad,) = torch.autograd.grad((logits[rows, a] - logits[rows, b]).sum(), x)
    return grad


def _attack_gradient(model, x, y):
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def _cos(u, v):
    u, v = u.flatten(1).double(), v.flatten(1).double()
    return ((u * v).sum(1).abs() / (u.norm(dim=1) * v.norm(dim=1)).clamp(min=1e-300)).cpu()


# ---------------------------------------------------------------------------------------------- run
def run(cfg, ctx):
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    model, data = _model_and_data(cfg, ctx)
    device = ctx.device
    pairs = cfg.pairs
    cone = hasattr(getattr(model, "net", model), "centerline")  # model=orthant / theta_wedge
    if pairs == "auto":
        pairs = "centerline" if cone else "natural_natural"
    # auto: the cones' crossings are corners where k faces meet; bisecting towards the opposite parent is a central
    # projection from it, which spreads the samples over the k faces instead of onto their common (n-k)-flat, so
    # only the nearest-point projection (descent) drops the k singular values Bell states (section 31)
    method = cfg.method if cfg.method != "auto" else ("descent" if cone else "interpolate")
    if pairs in ("centerline", "parallel"):
        x1, x2, idx1, idx2 = _cone_crossings(pairs, float(cfg.offset), cfg.n_points, model, device, gen)
    elif pairs == "natural_adversarial":
        x1, x2, idx1, idx2 = _natural_adversarial(cfg, model, data, device, gen, ctx)
    else:
        x1, x2, idx1, idx2 = _natural_natural(cfg, model, data, device, gen)
    if len(x1) == 0:
        raise UserError(f"no differently classified pairs found for pairs={pairs}; try another pairs= or a stronger attack/eps")
    if len(x1) < cfg.n_points:
        ctx.warn(f"only {len(x1)} of n_points={cfg.n_points} pairs found for pairs={pairs}")
    n_inputs = x1[0].numel()
    if cfg.n_samples - 1 < n_inputs:
        ctx.warn(
            f"n_samples={cfg.n_samples} is not above the input dimension {n_inputs}: a flat boundary then lowers one "
            f"singular value only to about sqrt(1 - n_samples/{n_inputs}) of the rest, not to 0, and the normal is "
            f"estimated within the samples' span; use n_samples > {n_inputs} or method=descent for clean answers"
        )

    found = boundary_point(model, x1, x2, cfg.tol)
    a, b = found.class_a, found.class_b
    references = {
        "gradient": _margin_gradient(model, found.points, a, b),  # the exact local normal at the boundary point
        "attack_gradient": _attack_gradient(model, x1, a),  # FGSM's direction at x1
        "direction": x2 - x1,
    }
    incidence = torch.rad2deg(torch.arccos(_cos(references["direction"], references["gradient"]).clamp(max=1)))
    distributions = [cfg.distributions] if isinstance(cfg.distributions, str) else list(cfg.distributions)
    names = data.meta.class_names
    rows, spectra = [], []
    with ctx.progress(len(x1) * len(distributions), "boundary points") as advance:
        for i in range(len(x1)):
            for dist in distributions:
                samples = sample_around(found.points[i], cfg.n_samples, cfg.sigma, dist, gen)
                proj = project_to_boundary(model, samples, x1[i], x2[i], method, cfg.tol, cfg.max_steps, classes=(a[i], b[i]))
                ok = proj.converged
                row = {
                    "index": i,
                    "pair": pairs,
                    "distribution": dist,
                    "x1_index": int(idx1[i]),
                    "x2_index": int(idx2[i]),
                    "class_a": int(a[i]),
                    "class_b": int(b[i]),
                    "class_a_name": names[int(a[i])] if int(a[i]) < len(names) else str(int(a[i])),
                    "class_b_name": names[int(b[i])] if int(b[i]) < len(names) else str(int(b[i])),
                    "distance_from_x1": float(found.distance_from_x1[i]),
                    "segment_length": float((x2[i] - x1[i]).norm()),
                    "incidence_angle_deg": float(incidence[i]),
                    "n_projected": int(ok.sum()),
                }
                if int(ok.sum()) >= 3:
                    dim = boundary_dimension(samples[ok], proj.points[ok], {k: v[i] for k, v in references.items()}, cfg.min_gap)
                    s = dim.singular_values
                    median = float(s.median())
                    row.update(
                        n_degenerate=dim.n_degenerate,
                        smallest_sv_ratio=float(s[-1]) / median,
                        normal_vs_gradient_cos=dim.cosines["gradient"],
                        normal_vs_attack_gradient_cos=dim.cosines["attack_gradient"],
                        normal_vs_direction_cos=dim.cosines["direction"],
                        mean_projection_distance=float((samples[ok] - proj.points[ok]).flatten(1).norm(dim=1).mean()),
                    )
                    spectra += [
                        {"index": i, "distribution": dist, "rank": r + 1, "singular_value": float(v), "relative": float(v) / median}
                        for r, v in enumerate(s.tolist())
                    ]
                else:
                    row.update(
                        n_degenerate=-1,
                        smallest_sv_ratio=math.nan,
                        normal_vs_gradient_cos=math.nan,
                        normal_vs_attack_gradient_cos=math.nan,
                        normal_vs_direction_cos=math.nan,
                        mean_projection_distance=math.nan,
                    )
                rows.append(row)
                advance()

    import pandas as pd

    table, spectra = pd.DataFrame(rows), pd.DataFrame(spectra)
    ctx.write_csv("boundary.csv", table)
    ctx.write_csv("singular_values.csv", spectra)
    _plot_spectra(ctx, spectra, distributions)
    _plot_dimensions(ctx, table, distributions)
    if data.meta.shape and len(data.meta.shape) == 3 and cfg.n_grid > 0:
        _plot_points(ctx, found.points[: cfg.n_grid].cpu(), table.drop_duplicates("index"), cfg.n_grid)
    failed = int((table.n_degenerate < 0).sum())
    if failed:
        ctx.warn(f"{failed} (point, distribution) rows had fewer than 3 converged projections (n_degenerate=-1)")
    headline = {"pairs": pairs, "n_points": len(x1), "method": method, "sigma": float(cfg.sigma), "n_samples": cfg.n_samples}
    for dist in distributions:
        part = table[(table.distribution == dist) & (table.n_degenerate >= 0)]
        headline[f"planar_fraction_{dist}"] = float((part.n_degenerate == 1).mean()) if len(part) else math.nan
        headline[f"median_n_degenerate_{dist}"] = float(part.n_degenerate.median()) if len(part) else math.nan
        headline[f"median_normal_vs_gradient_cos_{dist}"] = float(part.normal_vs_gradient_cos.median()) if len(part) else math.nan
    headline["median_incidence_angle_deg"] = float(incidence.median())
    headline["seconds"] = round(time.perf_counter() - started, 1)
    ctx.headline(**headline)


# ---------------------------------------------------------------------------------------------- figures
def _plot_spectra(ctx, spectra, distributions):
    """Section 31's figures: sorted singular values (relative to their median), one thin line per boundary point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"gaussian": "Gaussian samples", "flat_svd": "Flat SVD samples"}
    fig, axes = plt.subplots(1, len(distributions), figsize=(5.5 * len(distributions), 4), squeeze=False)
    for ax, dist in zip(axes[0], distributions):
        part = spectra[spectra.distribution == dist] if len(spectra) else spectra
        for _, curve in part.groupby("index"):
            ax.plot(curve["rank"], curve["relative"], color="tab:blue", alpha=0.25, lw=0.8)
        if len(part):
            median = part.groupby("rank")["relative"].median()
            ax.plot(median.index, median.values, color="black", lw=1.5, label="median over points")
            ax.legend(loc="upper right")
        ax.set(title=titles[dist], xlabel="rank", ylabel="singular value / median", ylim=(0, None))
    fig.suptitle("SVD of differences of projected boundary samples")
    ctx.save_figure("singular_values.png", fig)


def _plot_dimensions(ctx, table, distributions):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    valid = table[table.n_degenerate >= 0]
    values = np.arange(0, int(valid.n_degenerate.max()) + 1 if len(valid) else 1)
    width = 0.8 / len(distributions)
    for j, dist in enumerate(distributions):
        counts = valid[valid.distribution == dist].n_degenerate.value_counts().reindex(values, fill_value=0)
        ax.bar(values + (j - (len(distributions) - 1) / 2) * width, counts.values, width, label=dist)
    ax.set(xlabel="number of dropped (degenerate) singular values", ylabel="boundary points", xticks=values)
    ax.legend()
    ctx.save_figure("dimension_hist.png", fig)


def _plot_points(ctx, points, table, n_grid):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(points), n_grid)
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    labels = table.set_index("index")
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = points[i].clamp(0, 1)
        ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
        ax.set_title(f"{labels.class_a_name[i]}|{labels.class_b_name[i]}", fontsize=8)
    fig.suptitle("boundary points (class of x1 | class across)")
    ctx.save_figure("boundary_points.png", fig)

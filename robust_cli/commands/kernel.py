"""`robust kernel`: train a net by forward Euler, then write it as the exact kernel machine of Bell's Theorem 14.5.

    yhat_N(x) = b + sum_s sum_i K_s(x, x_i) a_{i,s},  K_s(x, x_i) = int_0^1 J_{w_s(t)}(x) J_{w_s}(x_i)^T dt,
    a_{i,s} = -eps dL/dyhat(x_i)  (robust_cli/analysis/kernel.py has the derivation and the fast evaluation).

Outputs: path_log.csv (loss/accuracy per step), kernel_agreement.csv + agreement.png (network vs kernel output per
test point and class, Figure 23), kernel_values.csv + kernel_map.png (kernel value of a few in-distribution and
out-of-distribution points to every training point, Figure 21), ood.csv (their kernel sums), top_influences.csv
(training points contributing most to each explained prediction) and, for images, neighbours.png (nearest training
image in kernel space vs pixel space, Figure 22).

The scalar kernel value of a pair (x, x_i) is K(x, x_i)[k, k] for the class k the network predicts at x: the path
kernel of that output with itself (for two softmax classes it is half the trace sum_k K[k, k]; computing one row
instead of all K is K times cheaper on MNIST). A training point's contribution to the prediction is
sum_s sum_c K_s[k, c] a_{i,s,c}; these sum over i to yhat_k(x) - b_k. Kernel-space distance (neighbours.png):
K(x,x) + K(x_i,x_i) - 2 K(x,x_i) with the same scalar kernel.
"""

from __future__ import annotations

import math
import time

import pandas as pd
import torch

from robust_cli.analysis.kernel import VARIANTS, DiscretePathKernel
from robust_cli.analysis.training_path import OUTPUTS, train_path
from robust_cli.core.errors import UserError

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def _int(value, name, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def validate(cfg):
    k = cfg.kernel
    _int(k.steps, "kernel.steps", 1)
    _int(k.quadrature_points, "kernel.quadrature_points", 1)
    _int(k.n_agreement, "kernel.n_agreement", 1)
    for name in ("n_explain", "n_ood", "top_k", "n_ood_reference"):
        _int(k[name], f"kernel.{name}", 0)
    if k.batch_size is not None:
        _int(k.batch_size, "kernel.batch_size", 1)
    if not isinstance(k.step_size, (int, float)) or isinstance(k.step_size, bool) or not k.step_size > 0:
        raise UserError(f"kernel.step_size must be a number > 0, got {k.step_size!r}")
    if k.tolerance is not None and (not isinstance(k.tolerance, (int, float)) or not k.tolerance > 0):
        raise UserError(f"kernel.tolerance must be a number > 0 or null (fixed quadrature rule), got {k.tolerance!r}")
    for key, allowed in (("output", OUTPUTS), ("variant", VARIANTS), ("precision", tuple(PRECISIONS))):
        if k[key] not in allowed:
            raise UserError(f"kernel.{key} must be one of {', '.join(allowed)}, got {k[key]!r}")
    if k.ood_points is not None:
        try:
            points = torch.tensor([[float(v) for v in p] for p in k.ood_points])
        except (TypeError, ValueError):
            raise UserError(f"kernel.ood_points must be a list of points like [[4.0, 15.0]], got {k.ood_points!r}") from None
        if points.ndim != 2:
            raise UserError(f"kernel.ood_points must be a list of points like [[4.0, 15.0]], got {k.ood_points!r}")
        shape = list(cfg.dataset.get("shape") or [])
        if len(shape) == 1 and len(points) and points.shape[1] != shape[0]:
            raise UserError(f"kernel.ood_points must have {shape[0]} coordinates each for dataset {cfg.dataset.name}, got {points.shape[1]}")


def _ood_points(cfg, data, dtype, gen):
    """2-D data: the configured points (checked against the input size); images: uniform noise in [0, 1]."""
    k, shape = cfg.kernel, tuple(data.meta.shape)
    if len(shape) == 3:
        return torch.rand(k.n_ood, *shape, generator=gen).to(dtype), [f"noise_{j}" for j in range(k.n_ood)]
    if not k.ood_points:
        return torch.zeros(0, *shape, dtype=dtype), []
    points = torch.tensor([[float(v) for v in p] for p in k.ood_points], dtype=dtype)
    if points.shape[1:] != shape:
        raise UserError(f"kernel.ood_points must have {shape[0]} coordinates each for dataset {data.meta.name}, got {points.shape[1]}")
    return points, ["(" + ", ".join(f"{v:g}" for v in p.tolist()) + ")" for p in points]


def run(cfg, ctx):
    from robust_cli.commands import build

    started = time.perf_counter()
    k = cfg.kernel
    torch.manual_seed(int(cfg.seed))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    dtype, device = PRECISIONS[k.precision], ctx.device
    data = build.make_data(cfg)
    model = build.make_model(cfg, data.meta).to(device=device, dtype=dtype)
    train_x, train_y = data.train_x.to(device, dtype), data.train_y.to(device)
    d = sum(p.numel() for p in model.parameters())
    path_mb = ((k.steps + 1) * d + k.steps * len(train_y) * data.meta.num_classes) * torch.finfo(dtype).bits / 8 / 2**20
    if path_mb > 4096:
        ctx.warn(f"the recorded path needs {path_mb:.0f} MiB in memory; lower kernel.steps, data.n_train or the model size")

    with ctx.progress(k.steps, "gradient descent (recording every step)") as advance:
        path = train_path(model, train_x, train_y, k.steps, float(k.step_size), output=k.output, batch_size=k.batch_size, seed=int(cfg.seed), progress=advance)
    if path.initial_spread > 0:
        ctx.warn(f"the initial output is not constant (spread {path.initial_spread:.3g}): the representation is approximate (Remark 2)")
    ctx.write_csv("path_log.csv", pd.DataFrame({"step": range(k.steps + 1), "loss": path.losses.tolist(), "train_accuracy": path.accuracies.tolist()}))
    if k.save_path:
        ctx.save_torch(
            "path.pt",
            {
                "weights": path.weights.cpu(),
                "coefficients": path.coefficients.cpu(),
                "bias": path.bias.cpu(),
                "step_size": path.step_size,
                "names": path.flat.names,
                "shapes": [list(s) for s in path.flat.shapes],
                "output": k.output,
            },
        )
    kernel = DiscretePathKernel(path, k.quadrature_points, k.variant, k.tolerance)

    # ---- agreement of the network with its kernel machine (Figure 23)
    order = torch.randperm(len(data.test_y), generator=gen)
    agree_idx = order[: k.n_agreement]
    test_x, test_y = data.test_x[agree_idx].to(device, dtype), data.test_y[agree_idx].to(device)
    net_out = kernel.network_output(test_x)
    with ctx.progress(1, f"kernel outputs of {len(agree_idx)} test points") as advance:
        ker_out = kernel.predict(test_x)
        advance()
    err = (net_out - ker_out).abs()
    n_classes = net_out.shape[1]
    ctx.write_csv(
        "kernel_agreement.csv",
        pd.DataFrame(
            {
                "index": agree_idx.repeat_interleave(n_classes).tolist(),
                "class": torch.arange(n_classes).repeat(len(agree_idx)).tolist(),
                "network_output": net_out.flatten().tolist(),
                "kernel_output": ker_out.flatten().tolist(),
                "abs_error": err.flatten().tolist(),
            }
        ),
    )
    _plot_agreement(ctx, net_out.cpu(), ker_out.cpu(), k.output)

    # ---- kernel values for in-distribution and out-of-distribution points (Figure 21, Figure 22)
    explain_idx = order[: k.n_explain]
    ood_x, ood_names = _ood_points(cfg, data, dtype, gen)
    probes = torch.cat([data.test_x[explain_idx].to(dtype), ood_x]).to(device)
    names = [f"test_{int(i)}" for i in explain_idx] + ood_names
    kinds = ["in"] * len(explain_idx) + ["ood"] * len(ood_names)
    if len(probes):
        with ctx.progress(k.steps, f"kernel values of {len(probes)} points to {len(train_y)} training points") as advance:
            values = kernel.values(probes, classes=kernel.network_output(probes).argmax(1), progress=advance)
        _explain(cfg, ctx, kernel, data, probes, names, kinds, values, explain_idx)
    n_ref = k.n_ood_reference
    ood_summary = _ood(ctx, kernel, test_x[:n_ref], agree_idx[:n_ref], net_out[:n_ref], ood_x.to(device), ood_names)

    max_err = float(err.max()) if err.numel() else math.nan
    scale = float(net_out.abs().max()) if net_out.numel() else math.nan
    headline = {
        "steps": k.steps,
        "step_size": float(k.step_size),
        "output": k.output,
        "train_accuracy": round(float(path.accuracies[-1]), 4),
        "test_accuracy": round(float((net_out.argmax(1) == test_y).double().mean()), 4) if len(test_y) else math.nan,
        "kernel_test_accuracy": round(float((ker_out.argmax(1) == test_y).double().mean()), 4) if len(test_y) else math.nan,
        "max_abs_error": max_err,
        "relative_error": max_err / scale if scale else math.nan,
        "path_mb": round(path.nbytes / 2**20, 1),
    }
    ctx.headline(**headline, **ood_summary, seconds=round(time.perf_counter() - started, 1))


def _explain(cfg, ctx, kernel, data, probes, names, kinds, values, explain_idx):
    """Write kernel_values.csv, top_influences.csv, kernel_map.png and (images) neighbours.png."""
    k = cfg.kernel
    path = kernel.path
    out = kernel.network_output(probes).cpu()
    predicted = out.argmax(1)
    trace = values.diagonal[:, :, 0].cpu()  # (P, M): K(x, x_i)[k, k], k predicted at x
    contrib = values.contributions[:, :, 0].cpu()  # (P, M): contributions to yhat_k(x)
    train_y = path.train_y.cpu()
    n_train = len(train_y)

    rows = {"probe": [], "kind": [], "train_index": [], "train_label": [], "kernel_value": [], "contribution": []}
    for j, (name, kind) in enumerate(zip(names, kinds)):
        rows["probe"] += [name] * n_train
        rows["kind"] += [kind] * n_train
        rows["train_index"] += list(range(n_train))
        rows["train_label"] += train_y.tolist()
        rows["kernel_value"] += trace[j].tolist()
        rows["contribution"] += contrib[j].tolist()
    ctx.write_csv("kernel_values.csv", pd.DataFrame(rows))

    top = []
    bias = path.bias.cpu()
    for j, name in enumerate(names):
        total = float(out[j, predicted[j]] - bias[predicted[j]])
        for rank, i in enumerate(contrib[j].abs().argsort(descending=True)[: k.top_k].tolist()):
            top.append(
                {
                    "probe": name,
                    "kind": kinds[j],
                    "predicted": int(predicted[j]),
                    "rank": rank + 1,
                    "train_index": i,
                    "train_label": int(train_y[i]),
                    "contribution": float(contrib[j, i]),
                    "share_of_output_change": float(contrib[j, i]) / total if total else math.nan,
                    "kernel_value": float(trace[j, i]),
                }
            )
    ctx.write_csv("top_influences.csv", top)

    _plot_kernel_map(ctx, data, path, probes.cpu(), names, trace)
    if len(data.meta.shape) == 3 and len(explain_idx):
        n_in = len(explain_idx)
        # nearest in kernel space: smallest kernel distance K(x,x) + K(x_i,x_i) - 2 K(x,x_i) (the scalar kernel of the
        # class predicted at x); the largest raw kernel value would pick the training points with the largest
        # gradients (hard, unconfident ones), not the most similar. K(x_i,x_i): one per-sample gradient per point
        # and step, once per distinct predicted class.
        classes = predicted[:n_in].tolist()
        self_train = torch.stack([kernel.train_self_values(int(c)).cpu() for c in classes])
        gram = kernel.matrix(probes[:n_in])
        self_probe = torch.stack([gram[j, c, j, c] for j, c in enumerate(classes)]).cpu()
        kernel_dist = self_probe[:, None] + self_train - 2 * trace[:n_in]
        pixel_dist = torch.cdist(probes[:n_in].flatten(1).cpu(), path.train_x.flatten(1).cpu())
        _plot_neighbours(ctx, probes[:n_in].cpu(), path.train_x.cpu(), train_y, kernel_dist.argmin(1), pixel_dist.argmin(1), data.meta.class_names)


def _ood(ctx, kernel, test_x, test_idx, test_out, ood_x, ood_names) -> dict:
    """ood.csv: the kernel sum sum_i K(x, x_i)[k, k] (k predicted at x) of n_ood_reference test points (in-distribution) and of every OOD
    point; the headline gives each OOD point's sum and the fraction of test points that score higher."""
    with ctx.progress(1, f"kernel sums of {len(test_x) + len(ood_x)} points") as advance:
        out_ood = kernel.network_output(ood_x) if len(ood_x) else test_out[:0]
        sums_in = kernel.kernel_sums(test_x, test_out.argmax(1)).cpu() if len(test_x) else torch.zeros(0)
        sums_ood = kernel.kernel_sums(ood_x, out_ood.argmax(1)).cpu() if len(ood_x) else torch.zeros(0)
        out_ood = out_ood.cpu()
        advance()
    rows = []
    for name, kind, x, s, o in [(f"test_{int(i)}", "in", x, s, o) for i, x, s, o in zip(test_idx, test_x.cpu(), sums_in, test_out.cpu())] + [
        (n, "ood", x, s, o) for n, x, s, o in zip(ood_names, ood_x.cpu(), sums_ood, out_ood)
    ]:
        row = {"probe": name, "kind": kind, "kernel_sum": float(s), "predicted": int(o.argmax()), "output_predicted": float(o.max())}
        if x.shape == (2,):
            row["x0"], row["x1"] = float(x[0]), float(x[1])
        rows.append(row)
    ctx.write_csv("ood.csv", rows)
    summary = {"kernel_sum_in_median": float(sums_in.median()) if len(sums_in) else math.nan}
    for name, s in zip(ood_names, sums_ood):
        summary[f"kernel_sum_ood_{name}"] = float(s)
        if len(sums_in):
            summary[f"in_above_ood_{name}"] = round(float((sums_in > s).double().mean()), 4)
    return summary


# ---------------------------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_agreement(ctx, net_out, ker_out, output):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for c in range(net_out.shape[1]):
        ax.scatter(net_out[:, c], ker_out[:, c], s=6, alpha=0.6, label=f"class {c}" if net_out.shape[1] <= 10 else None)
    lo, hi = float(min(net_out.min(), ker_out.min())), float(max(net_out.max(), ker_out.max()))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    err = float((net_out - ker_out).abs().max())
    ax.set(xlabel=f"network output ({output})", ylabel=f"kernel output ({output})", title=f"max |difference| = {err:.2e}")
    if net_out.shape[1] <= 10:
        ax.legend(fontsize=7, markerscale=2)
    ctx.save_figure("agreement.png", fig)


def _plot_kernel_map(ctx, data, path, probes, names, trace):
    """2-D: training points coloured by their kernel value to each probe (Figure 21). Images: kernel value to each
    training point, grouped by the training label."""
    plt = _plt()
    n = len(names)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    train_x, train_y = path.train_x.cpu(), path.train_y.cpu()
    for j, ax in enumerate(axes.flat):
        if j >= n:
            ax.axis("off")
            continue
        if train_x.shape[1:] == (2,):
            sc = ax.scatter(train_x[:, 0], train_x[:, 1], c=trace[j], s=4, cmap="viridis")
            ax.scatter([probes[j, 0]], [probes[j, 1]], marker="*", s=160, color="red", edgecolor="black", label="probe")
            fig.colorbar(sc, ax=ax, shrink=0.8, label="kernel value to the probe")
            ax.set(xlabel="x1", ylabel="x2")
            ax.legend(fontsize=7, loc="upper right")
        else:
            order = torch.argsort(train_y, stable=True)
            sc = ax.scatter(range(len(order)), trace[j, order], c=train_y[order], s=3, cmap="tab10")
            fig.colorbar(sc, ax=ax, shrink=0.8, label="training label")
            ax.set(xlabel="training point (sorted by label)", ylabel="kernel value to the probe")
        ax.set_title(f"{names[j]}: sum = {float(trace[j].sum()):.3g}", fontsize=9)
    fig.suptitle("discrete path kernel value to every training point")
    ctx.save_figure("kernel_map.png", fig)


def _plot_neighbours(ctx, probes, train_x, train_y, by_kernel, by_pixel, class_names):
    plt = _plt()
    n = len(probes)
    fig, axes = plt.subplots(n, 3, figsize=(5.4, 1.9 * n), squeeze=False)
    label = lambda c: class_names[c] if c < len(class_names) else str(c)
    for j in range(n):
        images = [
            (probes[j], "test point"),
            (train_x[by_kernel[j]], f"kernel: {label(int(train_y[by_kernel[j]]))}"),
            (train_x[by_pixel[j]], f"pixel: {label(int(train_y[by_pixel[j]]))}"),
        ]
        for ax, (img, title) in zip(axes[j], images):
            img = img.clamp(0, 1)
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("nearest training sample: kernel space vs pixel space", fontsize=9)
    ctx.save_figure("neighbours.png", fig)

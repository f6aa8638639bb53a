"""The paper tables as robust_cli/results/collect.py built them in Python before they moved into the experiment presets'
`table:` blocks: a second implementation, the oracle the YAML-rendered tables are compared against."""

import math

import numpy as np
import pandas as pd

# ---- the sources' numbers, printed beside ours
BELL_TABLE1 = {  # Bell (2023) Table 1, MNIST, L-BFGS: test acc %, avg distortion, mean 0.7-persistence nat / adv
    "FC10-4": (92.09, 0.123, 0.93, 1.68),
    "FC10-2": (90.77, 0.178, 1.37, 4.25),
    "FC10-0": (86.89, 0.278, 1.92, 12.22),
    "FC100-100-10": (97.31, 0.086, 0.65, 0.56),
    "FC200-200-10": (97.61, 0.087, 0.73, 0.56),
    "C-2": (95.94, 0.09, 3.33, 0.027),
    "C-4": (97.36, 0.12, 0.35, 0.027),
    "C-8": (98.50, 0.11, 0.43, 0.0517),
    "C-16": (98.90, 0.11, 0.53, 0.0994),
    "C-32": (98.96, 0.11, 0.78, 0.0836),
    "C-64": (99.00, 0.10, 0.81, 0.0865),
    "C-128": (99.17, 0.11, 0.77, 0.0883),
    "C-256": (99.09, 0.11, 0.83, 0.0900),
    "C-512": (99.22, 0.10, 0.793, 0.0929),
}
OBERMAN_CIFAR10 = {  # Oberman/Finlay/Calder table, CIFAR-10 ResNeXt: (name, median L2 distance, % error at L2 eps 0.1)
    "none": ("J0 (baseline)", 0.09, 53.98),
    "fgsm_at": ("J1 (AT, FGSM)", 0.18, 24.63),
    "l2_at": ("J2 (AT, L2)", 0.30, 13.54),
    "tulip": ("J2-Lip & tanh", 0.56, 12.12),
}
OBERMAN_EPS = 0.1
DEMYANOV_ORDER = ("none", "loss_ibp", "prediction_ibp", "tangent_prop", "fast_tangent_prop", "fgsm_at", "fast_at")


def bell_name(model: str) -> str:
    """fc10_4 -> FC10-4, fc100_100_10 -> FC100-100-10, c_32 -> C-32 (Bell's spelling)."""
    return str(model).upper().replace("_", "-")


def szegedy_table(c):
    """Bell's Table 1: per network, ours (mean over seeds) beside Bell's values."""
    s = c.frames.get("summary")
    if s is None or "persistence_nat" not in s:
        return None
    key = "network" if "network" in s else "model"
    cols = ["test_acc", "avg_distortion", "persistence_nat", "persistence_adv"]
    g = s.groupby(key, sort=False)
    ours = g[cols].mean().join(g.size().rename("runs"))
    if "n_nat" in s:
        ours = ours.join(g["n_nat"].sum().rename("points"))
    rows = []
    for model, r in ours.iterrows():
        name = bell_name(model)
        ref = BELL_TABLE1.get(name, (math.nan,) * 4)
        rows.append(
            {
                "network": name,
                "test_acc": r.test_acc,
                "bell_test_acc": ref[0],
                "avg_dist": r.avg_distortion,
                "bell_avg_dist": ref[1],
                "persist_nat": r.persistence_nat,
                "bell_persist_nat": ref[2],
                "persist_adv": r.persistence_adv,
                "bell_persist_adv": ref[3],
                "nat>adv": bool(r.persistence_nat > r.persistence_adv),
                "bell_nat>adv": bool(ref[2] > ref[3]) if name in BELL_TABLE1 else None,
                "points": int(r.points) if "points" in r else None,
                "runs": int(r.runs),
            }
        )
    order = {n: i for i, n in enumerate(BELL_TABLE1)}
    return pd.DataFrame(rows).sort_values("network", key=lambda col: col.map(lambda n: order.get(n, len(order)))).reset_index(drop=True)


BELL_TABLE2 = {  # Bell (2023) Table 2, ImageNet goldfinch images: avg distortion, mean 0.7-persistence nat / adv
    ("alexnet", "total"): (0.0194, 0.0155, 0.0049),
    ("alexnet", "bim"): (0.0188, 0.0162, 0.0050),
    ("alexnet", "mifgsm"): (0.0240, 0.0159, 0.0053),
    ("alexnet", "pgd"): (0.0188, 0.0162, 0.0050),
    ("vgg16", "total"): (0.0154, 0.0146, 0.0011),
    ("vgg16", "bim"): (0.0181, 0.0145, 0.0012),
    ("vgg16", "mifgsm"): (0.0238, 0.0149, 0.0018),
    ("vgg16", "pgd"): (0.0181, 0.0145, 0.0012),
}


def bell_table2(c):
    """Bell's Table 2: per network and attack (and the network's total over all its attacks), ours beside hers.

    Means are over the adversarial points that succeeded (points_adv) and their natural points, pooled over runs;
    'total' pools every attack of the network, as her totals do."""
    p = c.frames.get("persistence")
    if p is None or "model.arch" not in p or "kind" not in p:
        return None
    rows = []
    for arch, frame in p.groupby("model.arch", sort=False):
        parts = [("total", frame)] + [(a, f) for a, f in frame.groupby("attack", sort=False)]
        for attack, f in parts:
            adv = f[(f.kind == "adversarial") & (f.success.astype(str).str.lower() == "true")]
            ok = set(zip(adv.run, adv["index"]))  # the natural images whose attack succeeded, as hers
            nat = f[(f.kind == "natural").to_numpy() & np.array([(r, i) in ok for r, i in zip(f.run, f["index"])], dtype=bool)]
            ref = BELL_TABLE2.get((arch, attack), (math.nan,) * 3)
            finite = lambda v: v[np.isfinite(v)].mean() if np.isfinite(v).any() else math.nan
            rows.append(
                {
                    "network": arch,
                    "attack": attack,
                    "avg_dist": finite(adv["distortion"]),
                    "bell_avg_dist": ref[0],
                    "persist_nat": finite(nat["persistence"]),
                    "bell_persist_nat": ref[1],
                    "persist_adv": finite(adv["persistence"]),
                    "bell_persist_adv": ref[2],
                    "nat>adv": bool(finite(nat["persistence"]) > finite(adv["persistence"])),
                    "points_nat": len(nat),
                    "points_adv": len(adv),
                    "not_finite": int((~np.isfinite(f["persistence"])).sum()),
                }
            )
    return pd.DataFrame(rows)


def _series_mean(frame: pd.DataFrame, by: list[str], value: str) -> pd.Series:
    """Mean over seeds of a per-run value (first per run, then over runs)."""
    per_run = frame.groupby(by + ["run"], sort=False)[value].first()
    return per_run.groupby(level=list(range(len(by))), sort=False).mean()


def oberman_table(c):
    """Oberman's table: per defense, the median minimal L2 distance and % error at L2 eps 0.1 (mean over seeds),
    beside the source's CIFAR-10 values; plus % error at every eps of the collected curves (the source's figure)."""
    d, curve = c.frames.get("distances"), c.frames.get("curve")
    if d is None or curve is None or "defense" not in d:
        return None
    by = ["defense"] + [k for k in ("model", "dataset") if k in d and d[k].nunique() > 1]
    median = d.groupby(by + ["run"], sort=False)["l2"].median().groupby(level=list(range(len(by))), sort=False).mean()
    l2 = curve[(curve["norm"] == "l2") & np.isfinite(curve["eps"])].copy()
    l2["error"] = 100.0 * (1.0 - l2["robust_accuracy"])
    l2["clean_error"] = 100.0 * (1.0 - l2["clean_accuracy"])
    at = l2[np.isclose(l2["eps"], OBERMAN_EPS)]
    err = _series_mean(at, by, "error") if len(at) else pd.Series(dtype=float)
    clean = _series_mean(l2, by, "clean_error")
    runs = d.groupby(by, sort=False)["run"].nunique()
    rows = []
    for idx in median.index:
        key = idx if isinstance(idx, tuple) else (idx,)
        name, ref_median, ref_err = OBERMAN_CIFAR10.get(key[0], (key[0], math.nan, math.nan))
        rows.append(
            {
                **dict(zip(by, key)),
                "objective": name,
                "median_l2": median[idx],
                "error_at_0.1": err.get(idx, math.nan),
                "clean_error": clean.get(idx, math.nan),
                "oberman_median_l2": ref_median,
                "oberman_error_at_0.1": ref_err,
                "runs": int(runs[idx]),
            }
        )
    order = {n: i for i, n in enumerate(OBERMAN_CIFAR10)}
    table = pd.DataFrame(rows).sort_values("defense", key=lambda col: col.map(lambda n: order.get(n, len(order)))).reset_index(drop=True)
    grid = l2.groupby(by + ["eps", "run"], sort=False)["error"].first().groupby(level=list(range(len(by) + 1))).mean().unstack("eps")
    grid.columns = [f"err@{e:g}" for e in grid.columns]
    grid = grid.reset_index()
    grid = grid.sort_values("defense", key=lambda col: col.map(lambda n: order.get(n, len(order)))).reset_index(drop=True)
    return {"oberman_table": table, "oberman_error_vs_eps": grid}


def ibp_comparison(c):
    """Demyanov's comparison: per defense (and training-set size), test error, seconds per epoch (and relative to
    none), and error under each collected attack at each eps (adversarial: fgsm; random: noise)."""
    curve, log = c.frames.get("curve"), c.frames.get("train_log")
    if curve is None or "defense" not in curve:
        return None
    by = ["defense"] + [k for k in ("data.n_train", "model", "dataset") if k in curve and curve[k].nunique() > 1]
    curve = curve[np.isfinite(curve["eps"])].copy()
    curve["error"] = 100.0 * (1.0 - curve["robust_accuracy"])
    table = (100.0 * (1.0 - _series_mean(curve, by, "clean_accuracy"))).rename("test_error").to_frame()
    if log is not None and "seconds" in log and "defense" in log:
        log_by = [k for k in by if k in log]
        seconds = log.groupby(log_by, sort=False)["seconds"].mean()
        table = table.join(seconds.rename("seconds_per_epoch"), on=log_by)
        if "none" in set(log["defense"]):  # relative to none at the same training-set size (and model, dataset)
            others = [k for k in log_by if k != "defense"]
            none = log[log["defense"] == "none"]
            base = none.groupby(others)["seconds"].mean() if others else pd.Series(none["seconds"].mean(), index=table.index)
            table["time_vs_none"] = table["seconds_per_epoch"] / (table.join(base.rename("base"), on=others)["base"] if others else base)
    for (attack, eps), part in curve.groupby(["attack", "eps"], sort=True):
        if eps == 0:
            continue
        table[f"err_{attack}@{eps:g}"] = _series_mean(part, by, "error")
    order = {n: i for i, n in enumerate(DEMYANOV_ORDER)}
    return (
        table.reset_index()
        .sort_values(by, key=lambda col: col.map(lambda n: order.get(n, len(order))) if col.name == "defense" else col)
        .reset_index(drop=True)
    )

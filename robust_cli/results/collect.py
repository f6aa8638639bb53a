"""`robust collect`: merge the CSVs of many run directories into one tidy table per kind.

A run directory is any folder holding `run.json` (every command writes one). Each CSV row gets its run's swept
config values as columns: the config-group choices (model, dataset, defense, attack, experiment), the seed, every
`key=value` override of the run (a sweep's axes, e.g. `data.n_train`), and `run` (the directory). A CSV column of
the same name wins over the config value (they describe the same run). Runs that did not complete go to
failed_runs.csv, and so do Hydra job folders that never wrote run.json (a job killed before it started).

Outputs in the collection folder: <kind>.<fmt> for train_log, curve, distances, persistence, summary; runs.<fmt>
(one row per run with its headline numbers); failed_runs.<fmt>; table_<name>.<fmt> for the paper tables that the
runs' experiment presets declare in their `table:` block (robust_cli/results/paper_tables.py renders them), with the sources'
values beside ours; curves.png, persistence.png, train_log.png.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from robust_cli.core import store
from robust_cli.core.errors import UserError
from robust_cli.results import paper_tables
from robust_cli.results import summary as summaries

KINDS = ("train_log", "curve", "distances", "persistence", "summary", "certified_accuracy")
FORMATS = ("csv", "parquet", "markdown", "markdown-raw", "latex", "latex-raw", "robustbench")
SUFFIX = {"csv": ".csv", "parquet": ".parquet", "markdown": ".md", "markdown-raw": ".md", "latex": ".tex", "latex-raw": ".tex"}
# collected file names that differ from the runs' CSV names: summary.csv is the collection's own results summary
FILE_NAMES = {"summary": "persistence_summary"}
CHOICE_COLUMNS = ("model", "dataset", "defense", "attack", "experiment")
# columns that identify a run but are never a series of their own in figures
NOT_SERIES = {"run", "status", "command", "seed", "checkpoint", "job", "scale"}


@dataclass
class Collection:
    out: Path
    frames: dict[str, pd.DataFrame]
    runs: pd.DataFrame
    failed: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)  # the config columns (choices, seed, overrides) of the runs
    table_specs: dict[str, dict] = field(default_factory=dict)  # the paper tables' specs (experiment presets' table: blocks)
    blocks: dict[str, dict] = field(default_factory=dict)  # {experiment: its table block, as recorded in the runs' config}
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)  # results.summary: one row per configuration
    summary_keys: list[str] = field(default_factory=list)
    summary_metrics: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- finding runs
def find_run_dirs(paths) -> tuple[list[Path], list[Path]]:
    """(run directories with run.json, Hydra job folders without one) under the given paths, sorted."""
    runs, orphans = set(), set()
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"'{p}' does not exist; give run or sweep directories, e.g. robust collect outputs/train/multirun/2024-01-01")
        if not p.is_dir():
            raise UserError(f"'{p}' is not a directory; give run or sweep directories (folders holding run.json)")
        runs.update(f.parent for f in p.rglob("run.json") if "collected" not in f.relative_to(p).parts)
        orphans.update(f.parent.parent for f in p.rglob(".hydra/config.yaml"))
    return sorted(runs), sorted(orphans - runs)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_columns(record: dict, run_dir: Path) -> dict:
    """The config values that tell this run apart from its neighbours in a sweep."""
    config = record.get("config") or {}
    cols = {"run": str(run_dir), "command": record.get("command"), "status": store.run_status(record, run_dir)}
    cols.update({g: v for g, v in (record.get("choices") or {}).items() if g in CHOICE_COLUMNS and v})
    if "seed" in config:
        cols["seed"] = config["seed"]
    for override in record.get("overrides") or []:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and not key.startswith("hydra"):
            cols.setdefault(key, _parse_value(value))  # group choices are already there, under the same name
    return cols


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError):
        return None


def _with_columns(frame: pd.DataFrame, cols: dict) -> pd.DataFrame:
    extra = {k: v for k, v in cols.items() if k not in frame.columns}
    front = pd.DataFrame({k: [v] * len(frame) for k, v in extra.items()}, index=frame.index)
    return pd.concat([front, frame], axis=1)


# ----------------------------------------------------------------------------------------------- collect
def collect(paths, out=None, fmt: str = "csv", table: str = "auto", figures: bool = True, write: bool = True, rows=None, columns=None) -> Collection:
    """Walk `paths` for run directories, write the collected tables (and figures) into `out`, return them.
    `rows` / `columns`: the summary's row keys and metrics (default: the keys that vary, every headline metric)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("give at least one run or sweep directory: robust collect DIR [DIR ...]")
    run_dirs, orphans = find_run_dirs(paths)
    if not run_dirs and not orphans:
        raise UserError(f"no run directories (folders with run.json) under {', '.join(map(str, paths))}")
    out = Path(out) if out is not None else (paths[0] / "collected" if len(paths) == 1 else Path("collected"))

    pieces = {k: [] for k in KINDS}
    runs, failed, seen_logs, swept, shards, blocks = [], [], set(), {}, {}, {}
    for run_dir in run_dirs:
        try:
            record = json.loads((run_dir / "run.json").read_text())
        except (OSError, ValueError) as exc:
            failed.append({"run": str(run_dir), "status": "unreadable", "error": f"run.json: {exc}"})
            continue
        cols = run_columns(record, run_dir)
        swept.update(dict.fromkeys(cols))
        if cols.get("experiment") and (record.get("config") or {}).get("table"):
            blocks.setdefault(cols["experiment"], record["config"]["table"])
        headline = {k: v for k, v in (record.get("headline") or {}).items() if k not in cols}
        runs.append({**cols, **headline})
        if cols["status"] != "completed":
            error = record.get("error") or (
                "the process is gone without a word (killed with SIGKILL, out of memory, or its node lost)" if cols["status"] == "died" else None
            )
            failed.append({**cols, "error": error, "overrides": " ".join(record.get("overrides") or [])})
            continue
        if record.get("shard"):
            shards.setdefault(_shard_group(record), []).append((record, run_dir, cols))
        for kind in KINDS:
            path = run_dir / f"{kind}.csv"
            if kind == "train_log" and not path.is_file() and record.get("checkpoint"):
                # attack/persistence runs that trained (or reused) a registry checkpoint: its log, once per checkpoint
                path = Path(record["checkpoint"]).parent / "train_log.csv"
                if path.resolve() in seen_logs:
                    continue
            frame = _read_csv(path) if path.is_file() else None
            if frame is None or frame.empty:
                continue
            if kind == "train_log":
                seen_logs.add(path.resolve())
            pieces[kind].append(_with_columns(frame, cols))
    for orphan in orphans:
        failed.append({"run": str(orphan), "status": "missing", "error": "no run.json: the job died before it started (see its .hydra/ and log)"})

    frames = {k: pd.concat(v, ignore_index=True) for k, v in pieces.items() if v}
    merged = [merge_shards(group) for group in shards.values()]
    for name in ("merged_curve", "merged_examples"):
        parts = [m[name] for m in merged if m is not None]
        if parts:
            frames[name] = pd.concat(parts, ignore_index=True)
    collection = Collection(
        out=out,
        frames=frames,
        runs=pd.DataFrame(runs),
        failed=pd.DataFrame(failed) if failed else pd.DataFrame(columns=["run", "status", "error"]),
        swept=list(swept),
        blocks=blocks,
    )
    collection.tables = build_paper_tables(collection, table)
    if len(collection.runs):
        collection.summary, collection.summary_keys, collection.summary_metrics = summaries.summarize(collection.runs, collection.swept, rows, columns)
    if write:
        _write(collection, fmt)
        if figures:
            collection.files += draw_figures(collection)
    return collection


# ----------------------------------------------------------------------------------------------- shards
def _shard_group(record: dict) -> str:
    """Runs that differ only in data.shard (and resume) are parts of one evaluation."""
    config = json.loads(json.dumps(record.get("config") or {}))
    config.get("data", {}).pop("shard", None)
    config.pop("resume", None)
    return json.dumps(config, sort_keys=True)


def merge_shards(group) -> dict | None:
    """One evaluation from its shards' examples.csv: the curve computed as the unsharded run computes it (seconds: the
    shards' sum). None, with a line on the console, while shards are missing."""
    from types import SimpleNamespace

    from robust_cli.core.engine import parse_shard
    from robust_cli.evaluation import evaluate as ev

    parts = {parse_shard(record["shard"]["spec"]): (record, run_dir, cols) for record, run_dir, cols in group}
    counts = {n for _, n in parts}
    have = sorted(i for i, _ in parts)
    if len(counts) != 1 or have != list(range(next(iter(counts)))):
        store.console.print(f"[yellow]shards {have} of {sorted(counts)} found for one evaluation: merged_curve needs all of them[/]")
        return None
    ordered = [parts[key] for key in sorted(parts)]
    examples = pd.concat([pd.read_csv(run_dir / "examples.csv") for _, run_dir, _ in ordered], ignore_index=True)
    curves = pd.concat([pd.read_csv(run_dir / "curve.csv") for _, run_dir, _ in ordered], ignore_index=True)
    first = curves.iloc[0]
    attack = SimpleNamespace(name=first["attack"], norm=first["norm"], targeted=False if first["targeted"] in (False, "false") else first["targeted"])
    main = curves[curves.attack == first["attack"]]
    seconds = main.groupby("eps")["seconds"].sum()
    # shards may run on different devices: one precision if they agree, else the list; rejections add up
    precision = {eps: "+".join(sorted(set(map(str, f["precision"])))) for eps, f in main.groupby("eps")} if "precision" in main else {}
    rejected = main.groupby("eps")["fp32_rejected"].sum() if "fp32_rejected" in main else {}
    rows = []
    for eps, frame in examples.groupby("eps", sort=True):
        frame = frame.sort_values("index")
        y, clean, pred = (torch.tensor(frame[c].to_numpy()) for c in ("label", "clean_pred", "adv_pred"))
        success = torch.tensor(frame["success"].to_numpy(dtype=bool))
        # a column a shard's version did not write (l1 before FAB-L1) is NaN, not a KeyError
        sizes = {k: torch.tensor(frame[k].to_numpy(dtype="float64") if k in frame else np.full(len(frame), np.nan)) for k in ev.SIZE_COLUMNS}
        if math.isinf(eps):  # a minimal attack: the curve is read off the distances, as in the run
            dist = ev.minimal_distances(y, clean, success, sizes)[attack.norm]
            radii = sorted(e for e in main.eps.unique() if math.isfinite(e))
            rows += ev.curve_from_distances(attack, dist, y, clean, radii, sizes, float(seconds[eps]), precision.get(eps, "fp32"))
        rows.append(ev.curve_row(attack, eps, y, clean, pred, success, sizes, float(seconds[eps]), precision.get(eps, "fp32"), int(rejected.get(eps, 0))))
    label = {k: v for k, v in ordered[0][2].items() if k not in ("run", "data.shard", "status")}
    label["shards"] = len(ordered)
    return {"merged_curve": _with_columns(pd.DataFrame(rows), label), "merged_examples": _with_columns(examples.sort_values(["eps", "index"]), label)}


def _write(c: Collection, fmt: str) -> None:
    if len(c.summary):  # what a reader came for, whatever the format
        c.files.append(store.write_csv(c.out / "summary.csv", c.summary))
        c.files.append(store.write_text(c.out / "summary.md", summaries.to_markdown(c.summary, c.summary_keys, c.summary_metrics) + "\n"))
    if fmt == "robustbench":
        c.files += robustbench_entries(c)
        return
    papers = {f"table_{n}": t for n, t in c.tables.items()}
    if fmt == "latex":  # the summary as a paper's table, and the paper tables; the raw dump is latex-raw
        if len(c.summary):
            caption = summaries.caption(c.summary, c.summary_keys, c.summary_metrics, c.runs)
            c.files.append(store.write_text(c.out / "summary.tex", summaries.to_latex(c.summary, c.summary_keys, c.summary_metrics, caption) + "\n"))
        outputs = papers
    elif fmt == "markdown":  # summary.md is written above
        outputs = papers
    else:
        outputs = {**{FILE_NAMES.get(k, k): v for k, v in c.frames.items()}, "runs": c.runs, "failed_runs": c.failed, **papers}
    for name, frame in outputs.items():
        path = c.out / f"{name}{SUFFIX[fmt]}"
        if fmt in ("latex", "latex-raw"):
            c.files.append(store.write_text(path, to_latex(frame, name) + "\n"))
        elif fmt == "csv":
            c.files.append(store.write_csv(path, frame))
        elif fmt in ("markdown", "markdown-raw"):
            c.files.append(store.write_text(path, to_markdown(frame) + "\n"))
        else:
            import io

            buf = io.BytesIO()
            frame.to_parquet(buf, index=False)
            c.files.append(store.atomic_write(path, lambda f, data=buf.getvalue(): f.write(data)))


def to_latex(frame: pd.DataFrame, name: str) -> str:
    """A booktabs table (\\usepackage{booktabs}), numbers formatted as in the console table; numeric columns right-aligned."""
    numeric = [pd.api.types.is_numeric_dtype(frame[col]) and not pd.api.types.is_bool_dtype(frame[col]) for col in frame.columns]
    spec = "".join("r" if n else "l" for n in numeric) or "l"
    lines = [
        f"% robust collect: {summaries.latex_escape(name)} ({len(frame)} rows)",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(summaries.latex_escape(col) for col in frame.columns) + r" \\",
        "\\midrule",
    ]
    lines += [" & ".join(summaries.latex_escape(format_value(v)) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def _eps_text(eps: float) -> str:
    """RobustBench writes Linf budgets as k/255 and L2 ones as decimals."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-4 and round(k) > 0 else f"{eps:g}"


# the number of test images a RobustBench leaderboard entry is evaluated on (its datasets; ImageNet: its 5,000-image subset)
ROBUSTBENCH_N = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 5_000}
# model_info fields RobustBench needs that no run knows: written as null, listed under "to_fill"
ROBUSTBENCH_TO_FILL = ("name", "link", "authors", "venue", "reported")


def robustbench_entries(c: Collection) -> list[Path]:
    """One JSON per (run, eps > 0) of an autoattack evaluation, in RobustBench's model_info fields (accuracies as
    percent strings, eps as k/255), plus robust's own: threat model, number of examples, version, run directory."""
    import robust_cli

    curve = c.frames.get("curve")
    if curve is None or not curve["attack"].astype(str).str.startswith("autoattack").any():
        raise UserError("--format robustbench needs autoattack evaluations (robust attack attack=autoattack ...) under the given directories: none found")
    rows = curve[curve["attack"].astype(str).str.startswith("autoattack") & (curve["eps"] > 0) & np.isfinite(curve["eps"])]
    folder = c.out / "robustbench"
    written = []
    for r in rows.itertuples(index=False):
        try:
            record = json.loads((Path(r.run) / "run.json").read_text())
        except (OSError, ValueError):
            record = {}
        config = record.get("config") or {}
        choices = record.get("choices") or {}
        draws = int(((config.get("attack") or {}).get("eval_draws")) or 1)
        entry = {
            "name": f"{choices.get('model')} under {choices.get('defense')} (robust)",
            "additional_data": False,
            "number_forward_passes": draws,  # forward passes per prediction: > 1 only for a randomised model judged over draws
            "dataset": choices.get("dataset"),
            "architecture": choices.get("model"),
            "eps": _eps_text(float(r.eps)),
            "clean_acc": f"{100 * float(r.clean_accuracy):.2f}",
            "autoattack_acc": f"{100 * float(r.robust_accuracy):.2f}",
            "threat_model": {"linf": "Linf", "l2": "L2", "l1": "L1"}.get(str(r.norm), str(r.norm)),
            "n_examples": int(r.n),
            "autoattack_version": str(r.attack).removeprefix("autoattack_"),
            "robust_version": (record.get("versions") or {}).get("robust", robust_cli.__version__),
            "run_dirs": [str(r.run)],
            "link": None,
            "authors": None,
            "venue": None,
            "reported": None,
            "to_fill": list(ROBUSTBENCH_TO_FILL),  # name is a placeholder; the others are the paper's to give
            "warnings": [],
        }
        needed = ROBUSTBENCH_N.get(str(choices.get("dataset")))
        if needed is None:
            entry["warnings"].append(f"RobustBench has no leaderboard for dataset {choices.get('dataset')} (it has {', '.join(ROBUSTBENCH_N)})")
        elif int(r.n) < needed:
            entry["warnings"].append(
                f"evaluated on {int(r.n)} of the {needed:,} test images a leaderboard entry uses: run the evaluation with data.n_test=null"
                + (" (ImageNet: RobustBench's 5,000-image subset)" if needed == 5_000 else "")
            )
        for warning in entry["warnings"]:
            store.console.print(f"[yellow]warning:[/] robustbench export of {Path(str(r.run)).name}, eps {entry['eps']}: {warning}")
        name = f"{choices.get('model')}-{choices.get('dataset')}-{choices.get('defense')}-s{config.get('seed', 0)}-eps{float(r.eps):g}-{Path(str(r.run)).name}.json"
        written.append(store.write_json(folder / name, entry))
    return written


def format_value(v) -> str:
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return ""
        return f"{v:.4g}"
    return "" if v is None else str(v)


def to_markdown(frame: pd.DataFrame) -> str:
    """A collected table as markdown, numbers formatted as in the console table."""
    return summaries.markdown_table(list(frame.columns), [[format_value(v) for v in row] for row in frame.itertuples(index=False)])


# ----------------------------------------------------------------------------------------------- paper tables
def build_paper_tables(c: Collection, which: str = "auto") -> dict[str, pd.DataFrame]:
    """The tables of the runs' experiment presets (auto), none, or the one named; their specs go into c.table_specs."""
    if which == "none":
        return {}
    experiments = set(c.runs["experiment"].dropna()) if "experiment" in c.runs else set()
    specs = {}
    for experiment in sorted(experiments):
        block = c.blocks.get(experiment)  # what the runs were configured with; older runs: the shipped preset's
        block = paper_tables.validate_block(block, f"experiment={experiment}") if block else paper_tables.preset_block(experiment)
        specs.update(block or {})
    if which != "auto":
        known = {**paper_tables.shipped_tables(), **specs}
        if which not in known:
            raise UserError(f"--table must be auto, none or a table of an experiment preset ({', '.join(sorted(known))}), got {which!r}")
        specs = {which: known[which]}
    tables = {}
    for name, spec in specs.items():
        table = paper_tables.render(spec, c.frames)
        if table is None:
            if which != "auto":
                raise UserError(f"the runs under the given directories have no {spec['frame']} data for the {name} table")
            continue
        tables[name] = table
        c.table_specs[name] = spec
    return tables


# ----------------------------------------------------------------------------------------------- figures
def series_columns(frame: pd.DataFrame, c: Collection) -> list[str]:
    """The swept config columns (other than seed) that vary across the collected runs: one line per combination."""
    return [k for k in c.swept if k not in NOT_SERIES and k in frame and c.runs[k].astype(str).nunique() > 1]


def draw_figures(c: Collection) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    files = []
    if "curve" in c.frames:
        files.append(_curves_figure(c))
    if "persistence" in c.frames:
        files.append(_persistence_figure(c))
    if "train_log" in c.frames:
        files.append(_train_figure(c))
    return [f for f in files if f is not None]


def _save(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return store.atomic_write(path, lambda f: f.write(buf.getvalue()))


def _band_plot(ax, frame, x, y, series, c: Collection, pooled: bool = False):
    """Mean over seeds (runs) per series as a line, and a band: with `pooled` (robust accuracy, `n` examples per row)
    the 95 % Clopper-Pearson interval of the examples pooled over seeds, else the min-max over seeds. Colour = the
    first swept column that varies within this panel (e.g. defense), line style = the others (e.g. data.n_train)."""
    import matplotlib.pyplot as plt

    from robust_cli.evaluation.evaluate import clopper_pearson

    keys = [k for k in series_columns(frame, c) if k not in ("attack", "eps") and frame[k].astype(str).nunique() > 1]
    groups = list(frame.groupby(keys, sort=False)) if keys else [((), frame)]
    known = {d: i for i, d in enumerate(paper_tables.orders(c.table_specs).get("defense", []))}  # the paper table's row order
    groups.sort(
        key=lambda g: [
            (known.get(v, len(known)), str(v)) if k == "defense" else (0, _sortable(v)) for k, v in zip(keys, g[0] if isinstance(g[0], tuple) else (g[0],))
        ]
    )
    first = list(dict.fromkeys(str((k if isinstance(k, tuple) else (k,))[0]) for k, _ in groups)) if keys else [""]
    rest = list(dict.fromkeys(str((k if isinstance(k, tuple) else (k,))[1:]) for k, _ in groups))
    palette = plt.get_cmap("tab10" if len(first) <= 10 else "tab20").colors
    styles = ["-", "--", ":", "-."]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        per = part.groupby(x)[y]
        mean, lo, hi = per.mean(), per.min(), per.max()
        if pooled and "n" in part:
            k = (part[y] * part["n"]).round().groupby(part[x]).sum()
            total = part["n"].groupby(part[x]).sum()
            bounds = [clopper_pearson(int(k[e]), int(total[e])) for e in mean.index]
            lo, hi = pd.Series([b[0] for b in bounds], index=mean.index), pd.Series([b[1] for b in bounds], index=mean.index)
        label = ", ".join(f"{k}={v}" if k not in ("defense", "model") else str(v) for k, v in zip(keys, key)) or series
        n = part["run"].nunique()
        color = palette[first.index(str(key[0])) % len(palette)] if keys else None
        style = styles[rest.index(str(key[1:])) % len(styles)]
        ax.plot(mean.index, mean.values, style, marker="o", ms=3, color=color, label=label + (f" ({n} runs)" if n > 1 else ""))
        if n > 1 or pooled:
            ax.fill_between(mean.index, lo.values, hi.values, color=ax.lines[-1].get_color(), alpha=0.2, lw=0)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _sortable(v):
    return (0, float(v), "") if isinstance(v, (int, float, np.number)) else (1, 0.0, str(v))


def _curves_figure(c: Collection) -> Path | None:
    import matplotlib.pyplot as plt

    curve = c.frames["curve"]
    curve = curve[np.isfinite(curve["eps"])]
    if curve.empty:
        return None
    panels = list(curve.groupby(["attack", "norm"], sort=False))
    # one panel per attack side by side (two per row), each with its legend at its right; constrained layout keeps
    # every label, title and legend clear of its neighbours
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = 7.0 * cols if cols > 1 else 11.0  # one panel spans the page too
    fig, axes = plt.subplots(rows, cols, figsize=(width, 4.2 * rows), squeeze=False, layout="constrained")
    for ax, ((attack, norm), part) in zip(axes.flat, panels):
        _band_plot(ax, part, "eps", "robust_accuracy", attack, c, pooled=True)
        about = " / ".join(f"{part[k].iloc[0]}" for k in ("model", "dataset") if k in part and part[k].astype(str).nunique() == 1)
        ax.set(xlabel=f"eps ({norm})", ylabel="robust accuracy", ylim=(-0.02, 1.02))
        ax.set_title(f"{attack}" + (f" on {about}" if about else "") + "\nmean over seeds; band: pooled 95 % Clopper-Pearson interval", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, c.out / "curves.png")


def _persistence_figure(c: Collection) -> Path | None:
    import matplotlib.pyplot as plt

    p = c.frames["persistence"]
    p = p[np.isfinite(p["persistence"]) & (p["persistence"] > 0)]
    if p.empty or "model" not in p:
        return None
    names = {k: v for spec in c.table_specs.values() for k, v in (spec.get("names") or {}).items()}  # the source's spelling
    order = {n: i for i, n in enumerate(paper_tables.orders(c.table_specs).get("network", []))}
    label = lambda m: names.get(m, m)
    nets = sorted(p["model"].unique(), key=lambda m: (order.get(label(m), len(order)), str(m)))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(nets)), 4.5))
    for k, (kind, color) in enumerate((("natural", "tab:blue"), ("adversarial", "tab:red"))):
        data = [p[(p["model"] == n) & (p["kind"] == kind)]["persistence"].values for n in nets]
        pos = [i + (k - 0.5) * 0.35 for i in range(len(nets))]
        keep = [(d, x) for d, x in zip(data, pos) if len(d)]
        if keep:
            box = ax.boxplot([d for d, _ in keep], positions=[x for _, x in keep], widths=0.3, patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(color)
                patch.set_alpha(0.5)
        ax.plot([], [], color=color, lw=6, alpha=0.5, label=kind)
    ax.set_xticks(range(len(nets)), [label(n) for n in nets], rotation=30)
    ax.set_yscale("log")
    gamma = p["gamma"].iloc[0] if "gamma" in p else ""
    ax.set(ylabel=f"{gamma}-persistence (log)", title="persistence per network: natural vs adversarial")
    ax.legend()
    return _save(fig, c.out / "persistence.png")


def _train_figure(c: Collection) -> Path | None:
    import matplotlib.pyplot as plt

    log = c.frames["train_log"]
    if "test_accuracy" not in log:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 4.2), layout="constrained")
    _band_plot(ax, log, "epoch", "test_accuracy", "test accuracy", c)
    ax.set(xlabel="epoch", ylabel="test accuracy", title="training: mean over seeds, band = min-max")
    return _save(fig, c.out / "train_log.png")


# ----------------------------------------------------------------------------------------------- printing
def display_table(table: pd.DataFrame, prefix: str | None = None) -> pd.DataFrame:
    """A paper table for the terminal: each value beside the source's (column prefix + name), 'ours / source', in one column."""
    out = pd.DataFrame(index=table.index)
    refs = {c for c in table.columns if prefix and c.startswith(prefix) and c.removeprefix(prefix) in table.columns}
    for col in table.columns:
        if col in refs:
            continue
        if prefix and prefix + col in refs:
            out[f"{col} (ours / {prefix.rstrip('_')})"] = [f"{format_value(a)} / {format_value(b)}" for a, b in zip(table[col], table[prefix + col])]
        else:
            out[col] = table[col].map(format_value)
    return out


def check_lines(name: str, table: pd.DataFrame, spec: dict) -> list[str]:
    """One line per check column of a paper table: in how many rows it holds (rows where it cannot be told: apart)."""
    lines = []
    for col, c in spec.get("columns", {}).items():
        if "check" in c and col in table:
            told = [v for v in table[col] if v is not None and not (isinstance(v, float) and math.isnan(v))]
            a, op, b = c["check"]
            unknown = len(table) - len(told)
            lines.append(f"{name}: {a} {op} {b} in {sum(map(bool, told))} of {len(told)} rows" + (f" ({unknown} without both values)" if unknown else ""))
    return lines


def print_summary(c: Collection, console=None, max_rows: int = 40) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    overview = Table(title=f"robust collect: {c.runs['run'].nunique() if len(c.runs) else 0} runs -> {c.out}")
    for col in ("file", "rows", "runs"):
        overview.add_column(col)
    suffix = next((p.suffix for p in c.files if p.suffix not in (".png", ".json") and p.stem != "summary"), ".csv")
    frames = {FILE_NAMES.get(k, k): v for k, v in c.frames.items()}
    frames.update({"summary": c.summary, "runs": c.runs, "failed_runs": c.failed, **{f"table_{n}": t for n, t in c.tables.items()}})
    for p in c.files:
        frame = frames.get(p.stem) if p.suffix not in (".png", ".json") else None
        n_runs = frame["run"].nunique() if frame is not None and "run" in frame and len(frame) else ""
        overview.add_row(p.name, "" if frame is None else str(len(frame)), str(n_runs))
    console.print(overview)
    if len(c.summary):
        table = Table(title="summary: mean ± sd over seeds (n) [pooled 95 % interval]")
        text = summaries.readable(c.summary, c.summary_keys, c.summary_metrics)
        for col in text.columns:
            table.add_column(str(col), overflow="fold")
        for row in text.head(max_rows).itertuples(index=False):
            table.add_row(*map(str, row))
        console.print(table)
    specs = c.table_specs
    shown = [(f"table_{n}", display_table(t, (specs.get(n, {}).get("source") or {}).get("prefix"))) for n, t in c.tables.items()]
    if not shown and not len(c.summary) and 0 < len(c.runs) <= max_rows:
        shown = [("runs", _compact(c.runs))]
    for name, frame in shown:
        table = Table(title=name)
        for col in frame.columns:
            table.add_column(str(col), overflow="fold")
        for row in frame.itertuples(index=False):
            table.add_row(*(format_value(v) for v in row))
        console.print(table)
        name = name.removeprefix("table_")
        if name in specs:
            for line in check_lines(name, c.tables[name], specs[name]):
                console.print(line)
    if len(c.failed):
        console.print(f"[bold red]{len(c.failed)} run(s) did not complete[/]: see {c.out / ('failed_runs' + suffix)}")


def _compact(runs: pd.DataFrame) -> pd.DataFrame:
    """runs without the columns that are the same in every run (status stays) and without paths."""
    keep = [c for c in runs.columns if c == "status" or (runs[c].astype(str).nunique() > 1 and c not in ("run", "checkpoint"))]
    return runs[keep]

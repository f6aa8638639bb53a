"""The summary a reader came for: one row per configuration (everything but the seed), each headline metric as
mean +- sd over its runs with n, and for robust accuracy the exact interval of the pooled examples.

Built from the runs' headline numbers (`run.json`, what each run printed at its end): `robust collect` writes it as
summary.csv (numbers) and summary.md (formatted), `--format latex` as a booktabs `table`, and `robust report` opens
with it.

Pooled interval: the runs of a configuration evaluated n_i examples each and found k_i robust; the 95 % Clopper-Pearson
interval of sum k_i / sum n_i. It covers the configuration's robust accuracy on the test distribution when the seeds
share it (the seed changes the subset and the attack's draws, not the model's expected accuracy); the sd over seeds
shows what the seeds do change.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from robust_cli.core.errors import UserError

# run columns that never label a configuration
NOT_KEYS = {"run", "status", "seed", "checkpoint", "job", "command", "data.shard", "resume", "outputs_root"}
# headline values that are counts or bookkeeping, not results to average
NOT_METRICS = {"n", "failures", "epochs", "best_epoch", "shards"}
ROBUST = re.compile(r"^robust_accuracy@(.+)$")
HIGHER_IS_BETTER = ("accuracy", "persistence", "certified", "success_rate")
LOWER_IS_BETTER = ("seconds", "loss", "error")


def metric_order(metric: str) -> tuple:
    """Clean accuracy first, robust accuracy by eps, the rest by name, seconds last."""
    m = ROBUST.match(metric)
    if metric in ("clean_accuracy", "test_accuracy"):
        return (0, 0.0, metric)
    if m:
        try:
            return (1, float(m.group(1)), metric)
        except ValueError:
            return (1, math.inf, metric)
    return (3 if "seconds" in metric else 2, 0.0, metric)


def direction(metric: str) -> int:
    """+1 when a higher value is better, -1 when lower is, 0 when neither (no bold)."""
    if any(w in metric for w in LOWER_IS_BETTER):
        return -1
    if any(w in metric for w in HIGHER_IS_BETTER):
        return 1
    return 0


def default_keys(runs: pd.DataFrame, swept: list[str]) -> list[str]:
    """The swept config columns that vary across the runs; with none, the config groups that name the runs."""
    present = [k for k in swept if k in runs and k not in NOT_KEYS]
    varying = [k for k in present if runs[k].astype(str).nunique() > 1]
    if "command" in runs and runs["command"].astype(str).nunique() > 1:
        varying.insert(0, "command")
    return varying or [k for k in ("model", "dataset", "defense", "attack") if k in runs]


def metrics_of(runs: pd.DataFrame, swept: list[str]) -> list[str]:
    skip = set(swept) | NOT_KEYS | NOT_METRICS
    found = [
        c
        for c in runs.columns
        if c not in skip and pd.api.types.is_numeric_dtype(runs[c]) and not pd.api.types.is_bool_dtype(runs[c]) and runs[c].notna().any()
    ]
    return sorted(found, key=metric_order)


def summarize(
    runs: pd.DataFrame, swept: list[str], keys: list[str] | None = None, metrics: list[str] | None = None
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(summary, its key columns, its metrics): one row per value of `keys` among the completed runs."""
    from robust_cli.evaluation.evaluate import clopper_pearson

    done = runs[runs["status"] == "completed"] if "status" in runs else runs
    if done.empty:
        return pd.DataFrame(), [], []
    keys = default_keys(done, swept) if keys is None else keys
    unknown = [k for k in keys if k not in done]
    if unknown:
        raise UserError(f"--rows {','.join(unknown)}: not a column of these runs; they have {', '.join(default_keys(done, swept) or ['no swept keys'])}")
    all_metrics = metrics_of(done, swept)
    if metrics is None:  # robust accuracy at eps 0 is clean accuracy by construction: shown once
        metrics = [m for m in all_metrics if not (m == "robust_accuracy@0" and "clean_accuracy" in all_metrics)]
    else:
        missing = [m for m in metrics if m not in all_metrics]
        if missing:
            raise UserError(f"--columns {','.join(missing)}: not a headline metric of these runs; they have {', '.join(all_metrics)}")
    rows = []
    groups = done.groupby([done[k].astype(str) for k in keys], sort=False, dropna=False) if keys else [((), done)]
    for _, part in groups:
        row = {k: part[k].iloc[0] for k in keys}
        row["runs"] = len(part)
        for m in metrics:
            values = part[m].dropna().astype(float)
            row[m] = float(values.mean()) if len(values) else math.nan
            row[f"{m}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row[f"{m}_n"] = len(values)
            if ROBUST.match(m) and "n" in part:
                both = part[[m, "n"]].dropna()
                k, n = int(np.round(both[m] * both["n"]).sum()), int(both["n"].sum())
                row[f"{m}_low"], row[f"{m}_high"] = clopper_pearson(k, n) if n else (math.nan, math.nan)
                row[f"{m}_examples"] = n
        rows.append(row)
    frame = pd.DataFrame(rows)
    if keys:
        frame = frame.sort_values(keys, key=lambda s: s.map(_sortable), kind="stable").reset_index(drop=True)
    return frame, keys, metrics


def _sortable(v):
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


# ----------------------------------------------------------------------------------------------- rendering
def cell_parts(row, metric: str, digits: int = 3) -> tuple[str, str]:
    """('0.393 ± 0.012 (n=2)', '[0.360, 0.420]'): the mean ± sd over runs with n, and the pooled interval (robust
    accuracy; '' otherwise)."""
    mean, sd, n = row.get(metric), row.get(f"{metric}_sd"), row.get(f"{metric}_n", 0)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "", ""
    text = _number(mean, digits)
    if sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
        text += f" ± {_number(sd, digits)}"
    if n and n > 1:
        text += f" (n={int(n)})"
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    interval = f"[{_number(low, digits)}, {_number(high, digits)}]" if low is not None and not (isinstance(low, float) and math.isnan(low)) else ""
    return text, interval


def cell(row, metric: str, digits: int = 3) -> str:
    """'0.393 ± 0.012 (n=2) [0.360, 0.420]'."""
    text, interval = cell_parts(row, metric, digits)
    return f"{text} {interval}" if interval else text


def _number(v: float, digits: int) -> str:
    return f"{v:.{digits}f}" if abs(v) < 1000 and (v == 0 or abs(v) >= 10**-digits) else f"{v:.{digits}g}"


def readable(summary: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """The summary as text cells: the keys, then one column per metric ('mean ± sd (n) [low, high]')."""
    out = pd.DataFrame({k: summary[k].astype(str) for k in keys})
    out["runs"] = summary["runs"].astype(int).astype(str)
    for m in metrics:
        out[m] = [cell(r, m) for r in summary.to_dict("records")]
    return out


def best_rows(summary: pd.DataFrame, metric: str) -> set[int]:
    """Rows holding the best mean of a metric (ties all bold); none when the metric has no better direction. Rows of
    different attacks are not compared (the highest robust accuracy over attacks is the weakest attack's)."""
    d = direction(metric)
    if d == 0:
        return set()
    out = set()
    groups = summary.groupby(summary["attack"].astype(str), sort=False) if "attack" in summary else [(None, summary)]
    for _, part in groups:
        values = part[metric]
        if values.notna().sum() < 2:
            continue
        best = values.max() if d > 0 else values.min()
        out |= set(part.index[np.isclose(values, best, rtol=0, atol=1e-12)])
    return out


def to_markdown(summary: pd.DataFrame, keys: list[str], metrics: list[str]) -> str:
    text = readable(summary, keys, metrics)
    for m in metrics:
        for i in best_rows(summary, m):
            text.loc[i, m] = f"**{text.loc[i, m]}**"
    return markdown_table(list(text.columns), [[str(v) for v in row] for row in text.itertuples(index=False)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table of text cells, columns padded (pandas' to_markdown needs `tabulate`)."""
    cells = [[str(c) for c in header]] + [[v.replace("|", "\\|") for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(s.ljust(w) for s, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_header(metric: str) -> str:
    m = ROBUST.match(metric)
    if m:
        return f"robust acc.\\ ($\\epsilon={latex_escape(m.group(1))}$)"
    return latex_escape(metric.replace("_", " "))


def to_latex(summary: pd.DataFrame, keys: list[str], metrics: list[str], caption: str, label: str = "tab:robust-summary") -> str:
    """A float `table` with booktabs rules, caption and label: mean $\\pm$ sd per cell, the best mean per column in
    bold, the pooled 95 % interval of robust accuracy in the caption's terms (a second line per row would crowd it)."""
    spec = "l" * len(keys) + "r" + "r" * len(metrics)
    shown = latex_escape(caption).replace("±", "$\\pm$")
    header = [latex_escape(k) for k in keys] + ["runs"] + [_latex_header(m) for m in metrics]
    lines = [
        "% robust collect: needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{shown}}}",
        f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(header) + r" \\",
        "\\midrule",
    ]
    bold = {m: best_rows(summary, m) for m in metrics}
    for i, row in summary.iterrows():
        cells = [latex_escape(row[k]) for k in keys] + [str(int(row["runs"]))]
        for m in metrics:
            mean, sd = row[m], row.get(f"{m}_sd")
            if isinstance(mean, float) and math.isnan(mean):
                cells.append("--")
                continue
            value = _number(mean, 3)
            text = f"\\textbf{{{value}}}" if i in bold[m] else value
            if sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
                text += f" $\\pm$ {_number(sd, 3)}"
            cells.append(text)
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines)


def caption(summary: pd.DataFrame, keys: list[str], metrics: list[str], runs: pd.DataFrame) -> str:
    """What the table shows, in words: the fixed settings, mean +- sd over seeds, the pooled intervals."""
    fixed = []
    for k in ("model", "dataset", "defense", "attack"):
        if k in runs and k not in keys and runs[k].astype(str).nunique() == 1:
            fixed.append(f"{k} {runs[k].iloc[0]}")
    seeds = int(summary["runs"].max()) if len(summary) else 0
    text = ("; ".join(fixed) + ". ") if fixed else ""
    text += f"Mean ± sd over up to {seeds} runs (seeds) per row; best mean per column in bold" + (" (per attack)." if "attack" in keys else ".")
    intervals = [m for m in metrics if f"{m}_low" in summary]
    if intervals:
        parts = []
        for m in intervals:
            for _, r in summary.iterrows():
                if not math.isnan(r.get(f"{m}_low", math.nan)):
                    label = ", ".join(str(r[k]) for k in keys)
                    parts.append(f"{label} {_header_text(m)} [{r[f'{m}_low']:.3f}, {r[f'{m}_high']:.3f}]")
        text += " Pooled 95 % Clopper-Pearson intervals: " + "; ".join(parts[:12]) + ("; ..." if len(parts) > 12 else "") + "."
    return text


def _header_text(metric: str) -> str:
    m = ROBUST.match(metric)
    return f"at eps {m.group(1)}" if m else metric

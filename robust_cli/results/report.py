"""`robust report DIR [DIR ...]`: one self-contained report.html per collection, to share with co-authors.

No network: figures are embedded as PNG data, tables as HTML. The page reads top-down as a reader asks:
the summary (one row per configuration, mean ± sd over seeds, pooled intervals) and the figures at full width on the
first screen; then what went wrong (failed runs, audit warnings and failures, each once with its run; a toggle shows
every audit row); what was run; and last the raw collected tables (sticky headers, the run path as the last column).
Built on `robust collect`, whose files it writes too.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import pandas as pd

from robust_cli.core import store
from robust_cli.core.errors import UserError
from robust_cli.results import summary as summaries
from robust_cli.results.collect import collect, format_value

MAX_ROWS = 200  # rows shown per raw table; the CSV beside it has them all

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.2em auto; max-width: 1320px; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
p.lead { margin: 0 0 .8em; color: #555; }
table { border-collapse: collapse; margin: .4em 0 1.2em; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; } th { background: #f3f3f3; }
td.text, th.text { text-align: left; } .warn { color: #9a6700; } .fail { color: #b00020; } .ok { color: #116329; }
table.summary { font-size: .95em; } table.summary b { color: #000; } table.summary .ci { color: #555; font-size: .9em; }
figure { margin: .5em 0 1em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .8em; color: #555; } code { background: #f6f6f6; padding: 0 .2em; }
.scroll { overflow: auto; max-height: 32em; } .scroll thead th { position: sticky; top: 0; z-index: 1; }
details > summary { cursor: pointer; color: #0550ae; margin: .3em 0; }
"""


def _cell(v) -> tuple[str, bool]:
    numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
    return format_value(v), numeric


def _table(frame: pd.DataFrame, caption: str) -> str:
    """A raw collected table: the run path moved to the last column, numbers right-aligned, sticky header."""
    if "run" in frame.columns:
        frame = frame[[c for c in frame.columns if c != "run"] + ["run"]]
    shown = frame.head(MAX_ROWS)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    rows = []
    for row in shown.itertuples(index=False):
        cells = []
        for v in row:
            text, numeric = _cell(v)
            cells.append(f"<td{'' if numeric else ' class=text'}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>{len(frame) - MAX_ROWS} more rows in the CSV.</p>" if len(frame) > MAX_ROWS else ""
    return (
        f"<h3>{html.escape(caption)} <small>({len(frame)} rows)</small></h3><div class='scroll'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>{more}"
    )


def _summary_table(c) -> str:
    """The summary: keys, runs, then 'mean ± sd (n) [pooled interval]' per metric; the best mean per column in bold."""
    if not len(c.summary):
        return "<p>No completed run has headline numbers to summarise.</p>"
    keys, metrics = c.summary_keys, c.summary_metrics
    bold = {m: summaries.best_rows(c.summary, m) for m in metrics}
    head = "".join(f"<th class=text>{html.escape(k)}</th>" for k in keys) + "<th>runs</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    body = []
    for i, row in c.summary.iterrows():
        cells = [f"<td class=text>{html.escape(str(row[k]))}</td>" for k in keys] + [f"<td>{int(row['runs'])}</td>"]
        for m in metrics:
            value, interval = (html.escape(part) for part in summaries.cell_parts(row.to_dict(), m))
            value = f"<b>{value}</b>" if i in bold[m] else value
            cells.append(f"<td>{value}" + (f"<br><span class=ci>{interval}</span>" if interval else "") + "</td>")  # the interval on its own line
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = "mean ± sd over the runs (seeds) of each configuration, (n) runs; [95 % Clopper-Pearson interval of the pooled examples] for robust accuracy; best mean in bold (among the rows of one attack)"
    return f"<table class='summary' id='summary'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table><p class='lead'>{html.escape(note)}</p>"


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(str(path))}</figcaption></figure>'


def _records(runs: pd.DataFrame) -> list[tuple[Path, dict]]:
    out = []
    for run in runs["run"] if "run" in runs else []:
        try:
            out.append((Path(run), json.loads((Path(run) / "run.json").read_text())))
        except (OSError, ValueError):
            out.append((Path(run), {}))
    return out


def _what_was_run(runs: pd.DataFrame, records) -> str:
    commands = sorted({str(r.get("command")) for _, r in records if r.get("command")})
    # a failed run has no value for most keys: its empty cells are not a swept value
    values = {c: sorted(set(runs[c].dropna().map(str)))[:20] for c in runs.columns if c not in ("run", "status") and not pd.api.types.is_float_dtype(runs[c])}
    axes = dict([(c, v) for c, v in values.items() if len(v) > 1][:12])
    versions = {}
    for _, r in records:
        for k, v in (r.get("versions") or {}).items():
            versions.setdefault(k, set()).add(str(v))
    commits = sorted({str(r.get("git_commit")) for _, r in records if r.get("git_commit")})
    items = [f"<li>commands: {', '.join(f'<code>robust {html.escape(c)}</code>' for c in commands) or 'none'}; {len(records)} runs</li>"]
    items += [f"<li>swept <code>{html.escape(k)}</code>: {html.escape(', '.join(v))}</li>" for k, v in axes.items()]
    items.append("<li>versions: " + html.escape("; ".join(f"{k} {', '.join(sorted(v))}" for k, v in sorted(versions.items()))) + "</li>")
    if commits:
        items.append(f"<li>git commit: {html.escape(', '.join(commits))}</li>")
    overrides = sorted({" ".join(r.get("overrides") or []) for _, r in records})[:50]
    items.append("<li>overrides per run:<ul>" + "".join(f"<li><code>{html.escape(o) or '(defaults)'}</code></li>" for o in overrides) + "</ul></li>")
    return "<ul>" + "".join(items) + "</ul>"


def _check_rows(records) -> list[tuple[str, str, str, str]]:
    """(run, check, status, detail) of every audit row, run warning and recorded check, in run order."""
    rows = []
    for run_dir, record in records:
        for message in record.get("warnings") or []:
            rows.append((run_dir.name, "warning", "warn", message))
        audit = run_dir / "audit.csv"
        if audit.is_file():
            try:
                frame = pd.read_csv(audit)
            except (OSError, ValueError, pd.errors.EmptyDataError):
                frame = pd.DataFrame()
            for r in frame.itertuples(index=False):
                eps = "" if pd.isna(r.eps) or r.eps == "" else f" at eps={r.eps}"
                rows.append((run_dir.name, f"audit {r.check}{eps}", str(r.status), str(r.detail)))
        for check in record.get("checks") or []:
            rows.append((run_dir.name, str(check.get("check", "check")), str(check.get("status", "")), str(check.get("detail", ""))))
    return rows


def _rows_html(rows) -> str:
    body = "".join(
        f"<tr><td class='text'>{html.escape(a)}</td><td class='text'>{html.escape(b)}</td><td class='text {html.escape(c)}'>{html.escape(c)}</td>"
        f"<td class='text'>{html.escape(d)}</td></tr>"
        for a, b, c, d in rows
    )
    return f"<div class='scroll'><table><thead><tr><th class=text>run</th><th class=text>check</th><th class=text>status</th><th class=text>detail</th></tr></thead><tbody>{body}</tbody></table></div>"


def _checks(records) -> str:
    """Warnings and failures only, each once with its run (a non-ok audit row is also a run warning: one of the two
    is kept); every row, ok included, behind a toggle."""
    rows = _check_rows(records)
    problems, seen = [], set()
    for run, check, status, detail in rows:
        if status == "ok":
            continue
        key = (run, detail.strip())
        audit_twin = check == "warning" and any(r == run and c.startswith("audit ") and d.strip() in detail for r, c, s, d in rows if s != "ok")
        if key in seen or audit_twin:
            continue
        seen.add(key)
        problems.append((run, check, status, detail))
    text = f"<p class='ok'>No warnings, and all {len(rows)} audit checks passed.</p>" if not problems else _rows_html(problems)
    if rows:
        text += f"<details><summary>show all {len(rows)} checks of {len(records)} runs, ok included</summary>{_rows_html(rows)}</details>"
    return text


def build_report(paths, out=None) -> Path:
    """Collect `paths` and write report.html into the collection folder; returns its path."""
    c = collect(paths, out=out, figures=True)
    records = _records(c.runs)
    title = f"robust report: {', '.join(str(p) for p in paths)}"
    failed = f"<b class='fail'>{len(c.failed)} not completed</b>" if len(c.failed) else "all completed"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='lead'>{len(c.runs)} runs, {failed}; generated {time.strftime('%Y-%m-%d %H:%M:%S')}; files in <code>{html.escape(str(c.out))}</code>.</p>",
        "<h2>Summary</h2>",
        _summary_table(c),
    ]
    for name, frame in c.tables.items():  # the experiment presets' paper tables are results too
        parts.append(_table(frame, f"paper table {name}"))
    figures = [p for p in (c.out / n for n in ("curves.png", "train_log.png", "persistence.png")) if p.is_file()]
    figures += [p for p in sorted(c.out.glob("*.png")) if p not in figures]
    parts += ["<h2>Figures</h2>"] + ([_figure(p) for p in figures] or ["<p>No figures were collected.</p>"])
    parts.append("<h2>Failures and warnings</h2>")
    if len(c.failed):
        parts.append(_table(c.failed, "failed runs"))
    parts.append(_checks(records))
    parts += ["<h2>What was run</h2>", _what_was_run(c.runs, records)]
    parts.append("<h2>Tables</h2>")
    for name, frame in c.frames.items():
        parts.append(_table(frame, name))
    parts.append(_table(c.runs, "runs"))
    # what a headless browser check reads back: images decoded, and where the summary and first figure sit
    script = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images]; const b = document.body.dataset; "
        "b.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length; b.images = imgs.length; "
        "const s = document.getElementById('summary'); if (s) { b.summaryBottom = Math.round(s.getBoundingClientRect().bottom); } "
        "if (imgs.length) { const r = imgs[0].getBoundingClientRect(); b.figureTop = Math.round(r.top); b.figureWidth = Math.round(r.width); } "
        "b.pageWidth = document.documentElement.scrollWidth; });</script>"
    )
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(parts)}{script}</body></html>\n"
    )
    return store.write_text(c.out / "report.html", page)


def main(argv: list[str]) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="robust report", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep directories, searched recursively")
    p.add_argument("--out", "-o", default=None, help="the collection folder (default: DIR/collected for one DIR, else ./collected)")
    args = p.parse_args(argv)
    try:
        path = build_report(args.dirs, out=args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store.results.print(f"report: {path}", soft_wrap=True, highlight=False)
    return 0

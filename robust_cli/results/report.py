"""`robust report DIR [DIR ...]`: one self-contained report.html per collection, to share with co-authors.

No network: figures are embedded as PNG data, tables as HTML. Sections: what was run (commands, the swept
values, versions), every collected table (the paper tables first), every collected figure, the audit and the
warnings of every run, failed runs. Built on `robust collect`, whose files it writes too.
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
from robust_cli.results.collect import collect, format_value

MAX_ROWS = 200  # rows shown per table; the CSV beside it has them all

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; } th { background: #f3f3f3; }
td.text { text-align: left; } .warn { color: #9a6700; } .fail { color: #b00020; } .ok { color: #116329; }
figure { display: inline-block; margin: .5em 1em 1em 0; } figure img { max-width: 560px; border: 1px solid #eee; }
figcaption { font-size: .8em; color: #555; } code { background: #f6f6f6; padding: 0 .2em; }
.scroll { overflow-x: auto; }
"""


def _table(frame: pd.DataFrame, caption: str) -> str:
    shown = frame.head(MAX_ROWS)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    rows = []
    for row in shown.itertuples(index=False):
        cells = []
        for v in row:
            text = format_value(v)
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            cls = "" if numeric else ' class="text"'
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>{len(frame) - MAX_ROWS} more rows in the CSV.</p>" if len(frame) > MAX_ROWS else ""
    return (
        f"<h3>{html.escape(caption)} <small>({len(frame)} rows)</small></h3><div class='scroll'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>{more}"
    )


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


def _checks(records) -> str:
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
    if not rows:
        return "<p class='ok'>No warnings, and every audit check passed.</p>"
    body = "".join(
        f"<tr><td class='text'>{html.escape(a)}</td><td class='text'>{html.escape(b)}</td><td class='text {html.escape(c)}'>{html.escape(c)}</td>"
        f"<td class='text'>{html.escape(d)}</td></tr>"
        for a, b, c, d in rows
    )
    return f"<table><thead><tr><th>run</th><th>check</th><th>status</th><th>detail</th></tr></thead><tbody>{body}</tbody></table>"


def build_report(paths, out=None) -> Path:
    """Collect `paths` and write report.html into the collection folder; returns its path."""
    c = collect(paths, out=out, figures=True)
    records = _records(c.runs)
    title = f"robust report: {', '.join(str(p) for p in paths)}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(c.runs)} runs, {len(c.failed)} not completed; generated {time.strftime('%Y-%m-%d %H:%M:%S')}; files in <code>{html.escape(str(c.out))}</code>.</p>",
    ]
    parts += ["<h2>What was run</h2>", _what_was_run(c.runs, records)]
    parts.append("<h2>Tables</h2>")
    for name, frame in c.tables.items():
        parts.append(_table(frame, f"paper table {name}"))
    for name, frame in c.frames.items():
        parts.append(_table(frame, name))
    parts.append(_table(c.runs, "runs"))
    figures = sorted(c.out.glob("*.png"))
    parts += ["<h2>Figures</h2>"] + ([_figure(p) for p in figures] or ["<p>No figures were collected.</p>"])
    parts += ["<h2>Audit and warnings</h2>", _checks(records)]
    parts.append("<h2>Failed runs</h2>")
    parts.append(_table(c.failed, "failed_runs") if len(c.failed) else "<p class='ok'>None: every run completed.</p>")
    # what a headless browser check reads back: how many embedded images decoded
    script = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
        "document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length; "
        "document.body.dataset.images = imgs.length; });</script>"
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

"""Paper tables declared in YAML: the `table:` block of an experiment preset, rendered by `render` from collected frames.

A block maps table names to specs. A spec says which collected frame gives the rows, how ours are aggregated over
seeds, the source's values, and the column order, e.g. (abridged from experiment/szegedy_table.yaml):

    table:
      szegedy_table:
        title: Bell (2023) Table 1
        frame: summary                     # the collected frame whose groups are the rows
        rows: {network: network}           # output column: frame column (the first is the source's row key)
        names: {fc10_4: FC10-4}            # how the first row key is written (the source's spelling)
        sort: {network: source}            # per key: source (its row order), value, or a list of values
        source: {prefix: bell_, columns: [test_acc], rows: {FC10-4: [92.09]}}
        columns:
          test_acc: {value: test_acc, per_run: first, agg: mean}     # per run first, then the mean over runs
          bell_test_acc: {source: test_acc}
          better: {check: [test_acc, ">", bell_test_acc]}            # True/False, None where a side is missing
          runs: {agg: runs}

Column keys: `frame` (default the table's), `where` (filter: {column: value | [values] | finite | {not: value}}; a
number matches within 1e-8, true/false match booleans however written), `value` (a column or a pandas expression
of columns), `per_run` (aggregate within each run first), `agg` (over the rows, or over runs after per_run),
`per` + `name` (one column per combination of those columns' values, named by the template, e.g. "err@{eps:g}"),
`source` (a source column; `or_key: true` writes the row key where the source has no such row), `check`, and
`relative_to` ({column: C, where: {key: value}}: C divided by C of the row with that key value and the same other
keys). Spec keys besides those in the example: `where` (rows), `split_by` (frame columns that become row keys
where they vary), `totals` ({key: label}: first, per other keys, a row pooling every value of key) and `flags`
({name: {key: [columns], where: filter}}: a column true on rows whose `key` values match some row of the filter).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from robust_cli.core.errors import UserError

AGGREGATIONS = {
    "mean": lambda v: v.mean(),
    "median": lambda v: v.median(),
    "sum": lambda v: v.sum(),
    "first": lambda v: v.iloc[0] if len(v) else math.nan,
    "count": len,
    "finite_mean": lambda v: v[np.isfinite(v)].mean() if np.isfinite(v).any() else math.nan,
    "not_finite": lambda v: int((~np.isfinite(v.astype(float))).sum()),
}
ROW_AGGREGATIONS = ("runs",)  # computed from the rows themselves, not from a value column
SPEC_KEYS = {"title", "frame", "where", "rows", "split_by", "names", "sort", "totals", "flags", "source", "columns"}
COLUMN_KEYS = {"frame", "where", "value", "per_run", "agg", "per", "name", "source", "or_key", "check", "relative_to"}
OPERATORS = {">": np.greater, "<": np.less, ">=": np.greater_equal, "<=": np.less_equal}
PRESETS = Path(__file__).parents[1] / "conf" / "experiment"


# ----------------------------------------------------------------------------------------------- validation
def validate_block(block, where: str) -> dict:
    """The `table:` block as plain dicts, or one UserError line naming the first thing wrong in it."""
    from omegaconf import OmegaConf

    block = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else block
    if not isinstance(block, dict) or not block:
        raise UserError(f"{where}: table: must map table names to specs (see robust_cli/results/paper_tables.py)")
    for name, spec in block.items():
        _validate_spec(spec, f"{where}: table {name}")
    return block


def _validate_spec(spec, at: str) -> None:
    def fail(text):
        raise UserError(f"{at}: {text} (see robust_cli/results/paper_tables.py)")

    if not isinstance(spec, dict):
        fail("a spec is a mapping with frame, rows and columns")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        fail(f"unknown key(s) {', '.join(sorted(unknown))}; a spec has {', '.join(sorted(SPEC_KEYS))}")
    for key in ("frame", "rows", "columns"):
        if not spec.get(key):
            fail(f"{key}: is missing")
    if not isinstance(spec["frame"], str):
        fail(f"frame: must name a collected CSV kind (curve, distances, summary, persistence, train_log, ...), got {spec['frame']!r}")
    for key in ("rows", "columns"):
        if not isinstance(spec[key], dict):
            fail(f"{key}: must be a mapping, got {spec[key]!r}")
    if not all(isinstance(v, str) for v in spec["rows"].values()):
        fail(f"rows: maps each row key to the collected column it comes from, e.g. {{defense: defense}}, got {spec['rows']!r}")
    rows = _rows(spec)
    for key, how in (spec.get("sort") or {}).items():
        if key not in rows and key not in (spec.get("split_by") or []):
            fail(f"sort: {key} is not a row key ({', '.join([*rows, *(spec.get('split_by') or [])])})")
        if not (how in ("source", "value") or isinstance(how, list)):
            fail(f"sort: {key} must be source, value or a list of values, got {how!r}")
    source = spec.get("source") or {}
    fields = source.get("columns") or []
    source_key = source.get("key") or list(rows)[:1]
    if not set(source_key) <= set(rows):
        fail(f"source.key {source_key} must name row keys ({', '.join(rows)})")

    def check_rows(node, depth, path):
        for key, values in (node or {}).items():
            if depth + 1 < len(source_key):
                if not isinstance(values, dict):
                    fail(f"source row {'/'.join(map(str, [*path, key]))}: rows nest by {', '.join(source_key)}")
                check_rows(values, depth + 1, [*path, key])
            elif not isinstance(values, list) or len(values) != len(fields):
                fail(
                    f"source row {'/'.join(map(str, [*path, key]))} has {len(values) if isinstance(values, list) else 'no list of'} values for the {len(fields)} source columns"
                )

    check_rows(source.get("rows"), 0, [])
    names = list(rows)
    for col, c in spec["columns"].items():
        if not isinstance(c, dict):
            fail(f"column {col}: a mapping such as {{value: x, agg: mean}}")
        unknown = set(c) - COLUMN_KEYS
        if unknown:
            fail(f"column {col}: unknown key(s) {', '.join(sorted(unknown))}; a column has {', '.join(sorted(COLUMN_KEYS))}")
        for key in ("per_run", "agg"):
            if key in c and c[key] not in AGGREGATIONS and not (key == "agg" and c[key] in ROW_AGGREGATIONS):
                fail(f"column {col}: {key} must be one of {', '.join([*AGGREGATIONS, *ROW_AGGREGATIONS])}, got {c[key]!r}")
        if "source" in c and c["source"] not in fields:
            fail(f"column {col}: source column {c['source']!r} is not one of source.columns ({', '.join(fields) or 'none'})")
        if "check" in c:
            check = c["check"]
            if not (isinstance(check, list) and len(check) == 3 and check[1] in OPERATORS and {check[0], check[2]} <= set(names)):
                fail(f"column {col}: check is [earlier column, one of {' '.join(OPERATORS)}, earlier column], got {check!r}")
        if "relative_to" in c and (not isinstance(c["relative_to"], dict) or c["relative_to"].get("column") not in names or not c["relative_to"].get("where")):
            fail(f"column {col}: relative_to needs column (an earlier column) and where ({{row key: value}})")
        if "per" in c and "name" not in c:
            fail(f"column {col}: per needs a name template, e.g. name: 'err@{{eps:g}}'")
        if not ({"value", "source", "check", "relative_to"} & set(c)) and c.get("agg") not in (*ROW_AGGREGATIONS, "count"):
            fail(f"column {col}: says neither value, source, check, relative_to nor agg: runs | count")
        names.append(col)


def _rows(spec) -> dict:
    rows = spec["rows"]
    return dict(rows) if isinstance(rows, dict) else {r: r for r in rows}


# ----------------------------------------------------------------------------------------------- finding specs
def preset_block(experiment: str) -> dict | None:
    """The table block of a preset shipped with robust (for runs recorded before their config held one)."""
    from omegaconf import OmegaConf

    path = PRESETS / f"{experiment}.yaml"
    if not path.is_file():
        return None
    block = OmegaConf.load(path).get("table")
    return validate_block(block, f"experiment={experiment}") if block is not None else None


def shipped_tables() -> dict[str, dict]:
    """Every table of the presets shipped with robust, by name."""
    tables = {}
    for path in sorted(PRESETS.glob("*.yaml")):
        tables.update(preset_block(path.stem) or {})
    return tables


# ----------------------------------------------------------------------------------------------- rendering
def matches(frame: pd.DataFrame, where: dict | None) -> np.ndarray:
    """Rows of `frame` that pass the filter (a column the frame lacks passes nothing)."""
    keep = np.ones(len(frame), dtype=bool)
    for col, want in (where or {}).items():
        if col not in frame:
            return np.zeros(len(frame), dtype=bool)
        keep &= _match(frame[col], want)
    return keep


def _match(values: pd.Series, want) -> np.ndarray:
    if isinstance(want, dict) and set(want) == {"not"}:
        return ~_match(values, want["not"])
    if isinstance(want, list):
        return np.logical_or.reduce([_match(values, w) for w in want]) if want else np.zeros(len(values), dtype=bool)
    if want == "finite":
        return np.isfinite(pd.to_numeric(values, errors="coerce").to_numpy(dtype=float))
    if isinstance(want, bool):  # booleans read back from CSV as bools, strings or objects beside NaN
        return (values.astype(str).str.lower() == str(want).lower()).to_numpy()
    if isinstance(want, (int, float)):
        return np.isclose(pd.to_numeric(values, errors="coerce").to_numpy(dtype=float), want, rtol=0, atol=1e-8)
    return (values.astype(str) == str(want)).to_numpy()


def _values(frame: pd.DataFrame, value: str) -> pd.Series:
    if value in frame:
        return frame[value]
    try:
        return frame.eval(value, engine="python")
    except Exception:  # noqa: BLE001 - a column this frame lacks: nothing to aggregate, the cell stays empty
        return pd.Series(math.nan, index=frame.index)


def _aggregate(part: pd.DataFrame, c: dict):
    agg = c.get("agg", "mean")
    if agg == "runs":
        return int(part["run"].nunique()) if "run" in part else len(part)
    if agg == "count" and "value" not in c:
        return len(part)
    if not len(part):
        return math.nan
    values = _values(part, c["value"])
    if "per_run" in c and "run" in part:
        values = values.groupby(part["run"], sort=False).agg(AGGREGATIONS[c["per_run"]])
    return AGGREGATIONS[agg](values)


def _with_flags(frame: pd.DataFrame, flags: dict | None) -> pd.DataFrame:
    for name, flag in (flags or {}).items():
        on = list(flag["key"])
        if not set(on) <= set(frame.columns):
            frame = frame.assign(**{name: False})
            continue
        marked = set(map(tuple, frame.loc[matches(frame, flag.get("where")), on].to_numpy().tolist()))
        frame = frame.assign(**{name: [tuple(r) in marked for r in frame[on].to_numpy().tolist()]})
    return frame


def _row_groups(table_rows: pd.DataFrame, rows: dict, totals: dict) -> list[tuple[dict, dict]]:
    """(the row's key values, {frame column: value} its rows match), in order of appearance; a totals row first."""
    keys = list(rows)
    outer = [k for k in keys if k not in totals]
    inner = [k for k in keys if k in totals]
    groups = []
    for outer_values, part in table_rows.groupby([rows[k] for k in outer], sort=False) if outer else [((), table_rows)]:
        fixed = dict(zip(outer, outer_values if isinstance(outer_values, tuple) else (outer_values,)))
        constraints = {rows[k]: v for k, v in fixed.items()}
        if not inner:
            groups.append((fixed, constraints))
            continue
        groups.append(({**fixed, **totals}, constraints))
        for inner_values, _ in part.groupby([rows[k] for k in inner], sort=False):
            values = {**fixed, **dict(zip(inner, inner_values if isinstance(inner_values, tuple) else (inner_values,)))}
            groups.append((values, {rows[k]: v for k, v in values.items()}))
    return groups


def render(spec: dict, frames: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    """The table a spec declares, from the collected frames; None when its frame was not collected."""
    base = frames.get(spec["frame"])
    rows = _rows(spec)
    if base is None or not set(rows.values()) <= set(base.columns):
        return None
    flags = spec.get("flags")
    base = _with_flags(base, flags)
    for col in spec.get("split_by") or []:
        if col in base and base[col].astype(str).nunique() > 1:
            rows[col] = col
    table_rows = base[matches(base, spec.get("where"))]
    if table_rows.empty:
        return None
    keys = list(rows)
    groups = _row_groups(table_rows, rows, spec.get("totals") or {})
    source = spec.get("source") or {}
    fields = source.get("columns") or []
    names = spec.get("names") or {}
    first = keys[0]
    filtered = {}  # (frame, where) -> the rows a column aggregates: the table's own rows when it reads the table's frame

    def frame_for(c):
        name = c.get("frame", spec["frame"])
        cache_key = (name, repr(c.get("where")))
        if cache_key not in filtered:
            f = table_rows if name == spec["frame"] else frames.get(name)
            f = _with_flags(f, flags) if f is not None and name != spec["frame"] else f
            filtered[cache_key] = f[matches(f, c.get("where"))] if f is not None else None
        return filtered[cache_key]

    def select(f: pd.DataFrame, constraints: dict) -> pd.DataFrame:
        keep = np.ones(len(f), dtype=bool)
        for col, v in constraints.items():
            if col in f:
                keep &= (f[col] == v).to_numpy()
        return f[keep]

    order = list(keys)  # the output columns in the spec's order (a `per` column stands for the ones it makes)
    for col, c in spec["columns"].items():
        if "per" in c:
            f = frame_for(c)
            combos = [] if f is None else [k if isinstance(k, tuple) else (k,) for k, _ in f.groupby(list(c["per"]), sort=True)]
            order += [c["name"].format(**dict(zip(c["per"], combo))) for combo in combos]
        else:
            order.append(col)
    out = []
    for values, constraints in groups:
        row = dict(values)
        row[first] = names.get(row[first], row[first])
        found = _source_row(source, row, first)
        known = found is not None
        ref = dict(zip(fields, found or [math.nan] * len(fields)))
        for col, c in spec["columns"].items():
            if "source" in c:
                row[col] = ref[c["source"]] if known or not c.get("or_key") else row[first]
            elif "check" in c:
                a, op, b = c["check"]
                x, y = row.get(a), row.get(b)
                missing = any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (x, y))
                row[col] = None if missing else bool(OPERATORS[op](x, y))
            elif "relative_to" not in c:  # relative_to needs the other rows: below
                f = frame_for(c)
                if f is None:
                    row[col] = math.nan
                elif "per" in c:
                    for combo, sub in f.groupby(list(c["per"]), sort=True):
                        combo = combo if isinstance(combo, tuple) else (combo,)
                        row[c["name"].format(**dict(zip(c["per"], combo)))] = _aggregate(select(sub, constraints), c)
                else:
                    row[col] = _aggregate(select(f, constraints), c)
        out.append(row)
    table = pd.DataFrame(out)
    for col, c in spec["columns"].items():
        if "relative_to" in c:
            table[col] = _relative(table, keys, c["relative_to"])
    table = table.reindex(columns=order)
    return _sorted(table, spec, names)


def _source_row(source: dict, row: dict, first: str) -> list | None:
    """The source's values for this row: its rows nest by the keys of source.key (default: the first row key)."""
    node = source.get("rows") or {}
    for key in source.get("key") or [first]:
        if not isinstance(node, dict) or row.get(key) not in node:
            return None
        node = node[row[key]]
    return node


def _relative(table: pd.DataFrame, keys: list[str], rel: dict) -> pd.Series:
    """table[column] divided by the value of the row matching rel['where'] with the same other row keys."""
    others = [k for k in keys if k not in rel["where"]]
    base = table[matches(table, rel["where"])]
    if not others:
        return table[rel["column"]] / (base[rel["column"]].iloc[0] if len(base) else math.nan)
    denominators = table[others].merge(base[others + [rel["column"]]].drop_duplicates(others), on=others, how="left")[rel["column"]]
    return table[rel["column"]] / denominators.to_numpy()


def _sorted(table: pd.DataFrame, spec: dict, names: dict) -> pd.DataFrame:
    sort = {k: how for k, how in (spec.get("sort") or {}).items() if k in table}
    if not sort:
        return table.reset_index(drop=True)
    source_order = list((spec.get("source") or {}).get("rows") or {})

    def key(col: pd.Series) -> pd.Series:
        how = sort[col.name]
        if how == "value":
            return col
        order = {v: i for i, v in enumerate(source_order if how == "source" else how)}
        return col.map(lambda v: order.get(v, len(order)))

    return table.sort_values(list(sort), key=key, kind="stable").reset_index(drop=True)


def orders(specs: dict[str, dict]) -> dict[str, list]:
    """{row key: the values in the order a spec sorts them}, e.g. {'defense': ['none', 'loss_ibp', ...]}, for figures."""
    found = {}
    for spec in specs.values():
        source_order = list((spec.get("source") or {}).get("rows") or {})
        for key, how in (spec.get("sort") or {}).items():
            if how != "value":
                found.setdefault(key, source_order if how == "source" else list(how))
    return found

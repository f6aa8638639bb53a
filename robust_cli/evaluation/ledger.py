"""The ledger: every example's outcome under every attack ever run on a model, and the per-example worst case.

A model is attacked many times (a PGD curve today, AutoAttack tomorrow, an adaptive attack next week); the honest
robust accuracy is, per example, the worst case over all of them. The ledger keeps one row per

    (model = sha256 of its weights, dataset + split + example index in the split, norm, eps, evaluation)

with whether the example was broken (misclassified, as robust accuracy counts it: an example already misclassified
is broken at every eps), the size of the perturbation in the norm, and where its adversarial example is kept.

It is one SQLite file per outputs_root (`ledger.sqlite`), not a CSV: a sweep writes it from many processes at once
(joblib, SLURM array jobs), and SQLite gives transactions and a lock that holds across processes and machines sharing
a file system (in WAL mode readers never wait for writers). The adversarial examples of broken rows are tensors in
`ledger/adversarial/<evaluation>/`, written atomically beside it. A resumed run has the same evaluation key as the
run it continues, so its batches are not written twice (INSERT OR IGNORE on the key).

An example is broken at radius E when some row broke it with `radius` <= E, where radius is the size of the
perturbation found in the row's norm, capped at the row's budget eps (a budgeted attack stays inside its ball;
the cap only absorbs float rounding). The examples counted at E are those some run evaluated at budget E, or with a
minimal attack (which answers every E).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from robust_cli.core import store
from robust_cli.core.errors import UserError

FILE = "ledger.sqlite"
ADVERSARIAL_DIR = Path("ledger") / "adversarial"
TOLERANCE = 1e-9  # relative: radius <= E (1 + TOLERANCE) counts as inside the ball of radius E
NORMS = ("linf", "l2", "l1", "l0")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    model TEXT NOT NULL,        -- sha256 of the weights (16 hex digits)
    dataset TEXT NOT NULL,
    split TEXT NOT NULL,
    example INTEGER NOT NULL,   -- index in the dataset's split, not in a run's subset
    norm TEXT NOT NULL,
    eps REAL NOT NULL,          -- the run's budget; inf for a minimal attack
    evaluation TEXT NOT NULL,   -- what decides the result: checkpoint, attack + settings, data, seed, batches
    attack TEXT NOT NULL,
    label INTEGER NOT NULL,
    clean_pred INTEGER NOT NULL,
    adv_pred INTEGER NOT NULL,
    broken INTEGER NOT NULL,    -- 1: misclassified (adversarial, or already misclassified clean)
    radius REAL NOT NULL,       -- size of the perturbation in `norm`, capped at eps
    adversarial TEXT,           -- file of its x_adv (relative to the outputs_root), NULL when not kept
    position INTEGER,           -- row of that file
    run TEXT NOT NULL,          -- the run directory that wrote it
    recorded REAL NOT NULL,     -- unix time
    PRIMARY KEY (model, dataset, split, example, norm, eps, evaluation)
);
CREATE TABLE IF NOT EXISTS evaluations (
    evaluation TEXT PRIMARY KEY,
    model TEXT NOT NULL, dataset TEXT NOT NULL, split TEXT NOT NULL, norm TEXT NOT NULL,
    attack TEXT NOT NULL,
    settings TEXT NOT NULL,     -- the attack's config (JSON)
    eps TEXT NOT NULL,          -- JSON list of the eps values the run reports
    run TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY,
    description TEXT NOT NULL   -- JSON: model, dataset, defense, seed, checkpoint of the run that first saw it
);
CREATE INDEX IF NOT EXISTS outcomes_by_model ON outcomes (model, dataset, split, norm);
"""


def weights_digest(model: torch.nn.Module) -> str:
    """The model's identity in the ledger: sha256 over its state dict (names, dtypes, shapes, values), 16 hex digits.
    The same weights give the same identity whatever the checkpoint file, path or config that loaded them."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim buffers too
    return h.hexdigest()[:16]


def radius_of(eps: float, size: float) -> float:
    return min(float(eps), float(size))


def broken_at(radius, eps: float):
    """radius <= eps with the relative tolerance (works on floats and tensors/arrays)."""
    return radius <= eps * (1 + TOLERANCE) + 1e-15


class Ledger:
    """`<outputs_root>/ledger.sqlite` and the adversarial examples beside it."""

    def __init__(self, root):
        self.root = Path(root)
        self.path = self.root / FILE

    # ------------------------------------------------------------------------------------------- connection
    def connect(self, create: bool = True) -> sqlite3.Connection:
        if not create and not self.path.is_file():
            raise UserError(f"no ledger at {self.path}: it is written by `robust attack` runs with outputs_root={self.root}; give --root of those runs")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=300, isolation_level=None)  # autocommit; BEGIN IMMEDIATE below
            con.execute("PRAGMA busy_timeout = 300000")
            con.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer; one writer at a time
            con.execute("PRAGMA synchronous = NORMAL")  # WAL: a power cut may lose the last commit, never corrupt the file
            con.executescript(SCHEMA)
            return con
        except sqlite3.DatabaseError as exc:
            raise self._error(exc) from None
        except OSError as exc:
            if exc.errno in store.DISK_FULL_ERRNOS:
                raise store.DiskFull(store.disk_full_line(self.path)) from None
            raise UserError(f"cannot open the ledger {self.path} ({exc.strerror}); set outputs_root= to a writable folder") from None

    def _error(self, exc: sqlite3.Error) -> Exception:
        text = str(exc)
        if "full" in text:
            return store.DiskFull(store.disk_full_line(self.path))
        if "malformed" in text or "not a database" in text or "encrypted" in text:
            return UserError(f"the ledger {self.path} is damaged ({text}): move it aside (mv {self.path} {self.path}.bad) and the next run starts a new one")
        return UserError(f"the ledger {self.path}: {text}")

    def _write(self, statements: Iterable[tuple[str, list]]) -> int:
        """Run the statements in one transaction (all or nothing); the number of rows they changed."""
        con = self.connect()
        try:
            con.execute("BEGIN IMMEDIATE")  # take the write lock now: no deadlock between two upgrading readers
            changed = 0
            for sql, rows in statements:
                before = con.total_changes
                con.executemany(sql, rows)
                changed += con.total_changes - before
            con.execute("COMMIT")
            return changed
        except sqlite3.Error as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise self._error(exc) from None
        finally:
            con.close()

    # ------------------------------------------------------------------------------------------- writing
    def register(self, evaluation: str, model: str, description: dict, dataset: str, split: str, norm: str, attack: str, settings: dict, eps, run) -> None:
        self._write(
            [
                ("INSERT OR IGNORE INTO models VALUES (?, ?)", [(model, json.dumps(description, sort_keys=True, default=str))]),
                (
                    "INSERT OR IGNORE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            evaluation,
                            model,
                            dataset,
                            split,
                            norm,
                            attack,
                            json.dumps(settings, sort_keys=True, default=str),
                            json.dumps(list(eps)),
                            str(run),
                            time.time(),
                        )
                    ],
                ),
            ]
        )

    def record(self, rows: list[dict]) -> int:
        """Insert outcome rows (dicts with the table's columns); rows already there (a resumed run) are skipped."""
        if not rows:
            return 0
        columns = list(rows[0])
        sql = f"INSERT OR IGNORE INTO outcomes ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        return self._write([(sql, [tuple(r[c] for c in columns) for r in rows])])

    # ------------------------------------------------------------------------------------------- reading
    def frame(self, table: str = "outcomes", model: str | None = None):
        import pandas as pd

        con = self.connect(create=False)
        try:
            where, args = ("WHERE model = ?", [model]) if model else ("", [])
            return pd.read_sql_query(f"SELECT * FROM {table} {where}", con, params=args)
        except (sqlite3.Error, pd.errors.DatabaseError) as exc:
            raise self._error(exc) from None
        finally:
            con.close()

    def smallest_radius(self, model: str, dataset: str, split: str, norm: str, exclude: str | None = None) -> dict[int, tuple[float, str, str]]:
        """Per example broken by some row: (smallest radius, the attack, the run) over every evaluation but `exclude`."""
        con = self.connect()
        try:
            rows = con.execute(
                "SELECT example, radius, attack, run FROM outcomes WHERE model = ? AND dataset = ? AND split = ? AND norm = ? AND broken = 1 AND evaluation != ?"
                " ORDER BY radius, recorded",
                (model, dataset, split, norm, exclude or ""),
            ).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            con.close()
        out = {}
        for example, radius, attack, run in rows:
            out.setdefault(int(example), (float(radius), attack, run))
        return out


# ----------------------------------------------------------------------------------------------- one run's rows
class RunRecorder:
    """What one `robust attack` run writes to the ledger, batch by batch (BatchPlan calls `batch`)."""

    def __init__(
        self, ledger: Ledger, evaluation: str, model: str, dataset: str, split: str, norm: str, attack: str, run, examples, y, clean_pred, keep_adversarial=True
    ):
        self.ledger, self.evaluation, self.model, self.dataset, self.split, self.norm, self.attack = ledger, evaluation, model, dataset, split, norm, attack
        self.run, self.examples, self.y, self.clean_pred, self.keep = str(run), examples, y, clean_pred, keep_adversarial
        self.written = 0

    def batch(self, eps: float, batch: int, rows: slice, x, x_adv, pred) -> None:
        """Record one finished batch: rows `rows` of this run's examples, attacked at budget eps."""
        from robust_cli.evaluation.evaluate import perturbation_sizes

        y, clean = self.y[rows], self.clean_pred[rows]
        sizes = perturbation_sizes(x, x_adv)[self.norm].tolist()
        broken = ((clean != y) | (pred != y)).tolist()
        adversarial = (clean == y) & (pred != y)  # a new point worth keeping; a misclassified clean input is x itself
        where, positions = None, {}
        if self.keep and bool(adversarial.any()):
            keep = adversarial.nonzero().squeeze(1)
            rel = ADVERSARIAL_DIR / self.evaluation / f"eps={float(eps)!r}_batch={batch:06d}.pt"
            store.save_torch(self.ledger.root / rel, {"example": self.examples[rows][keep].clone(), "x_adv": x_adv[keep].clone()})
            where, positions = str(rel), {int(i): p for p, i in enumerate(keep.tolist())}
        now = time.time()
        out = []
        for i, example in enumerate(self.examples[rows].tolist()):
            clean_wrong = int(clean[i]) != int(y[i])
            out.append(
                {
                    "model": self.model,
                    "dataset": self.dataset,
                    "split": self.split,
                    "example": int(example),
                    "norm": self.norm,
                    "eps": float(eps),
                    "evaluation": self.evaluation,
                    "attack": self.attack,
                    "label": int(y[i]),
                    "clean_pred": int(clean[i]),
                    "adv_pred": int(pred[i]),
                    "broken": int(broken[i]),
                    "radius": 0.0 if clean_wrong else radius_of(eps, sizes[i]),
                    "adversarial": where if i in positions else None,
                    "position": positions.get(i),
                    "run": self.run,
                    "recorded": now,
                }
            )
        self.written += self.ledger.record(out)


# ----------------------------------------------------------------------------------------------- the worst case
def eps_grid(outcomes, evaluations) -> dict[tuple, list[float]]:
    """Per (model, dataset, split, norm): the radii to report, the finite budgets run, and the eps lists that
    minimal attacks reported their curves at."""
    grid: dict[tuple, set] = {}
    for key, group in outcomes.groupby(["model", "dataset", "split", "norm"]):
        grid.setdefault(key, set()).update(float(e) for e in group["eps"].unique() if math.isfinite(e))
    for r in evaluations.itertuples():
        key = (r.model, r.dataset, r.split, r.norm)
        if key in grid:
            grid[key].update(float(e) for e in json.loads(r.eps) if math.isfinite(float(e)))
    return {k: sorted(v) for k, v in grid.items()}


def worst_case(outcomes, evaluations, models=None) -> tuple[list[dict], list[dict]]:
    """(one row per model, dataset, split, norm and eps: the worst-case robust accuracy over every recorded run;
    one row per attack there: how many it broke, how many it broke first (earliest in the ledger), how many only it broke)."""
    import numpy as np

    described = {}
    if models is not None:
        described = {r.model: json.loads(r.description) for r in models.itertuples()}
    summary, by_attack = [], []
    grid = eps_grid(outcomes, evaluations)
    for key, group in outcomes.groupby(["model", "dataset", "split", "norm"]):
        model, dataset, split, norm = key
        about = described.get(model, {})
        for eps in grid.get(key, []):
            asked = group[(np.isclose(group["eps"], eps, rtol=1e-12, atol=0)) | np.isinf(group["eps"])]
            examples = np.unique(asked["example"].to_numpy())
            breaking = group[(group["broken"] == 1) & broken_at(group["radius"], eps) & group["example"].isin(examples)]
            broken = np.unique(breaking["example"].to_numpy())
            n = len(examples)
            hit = asked.assign(hit=(asked["broken"] == 1) & broken_at(asked["radius"], eps))
            own = {a: round(1.0 - float(g.groupby("example")["hit"].max().mean()), 12) for a, g in hit.groupby("attack")}
            first = breaking.sort_values(["recorded", "radius"]).drop_duplicates("example")
            only = breaking.drop_duplicates(["example", "attack"]).groupby("example")["attack"].agg(lambda s: s.iloc[0] if len(s) == 1 else None).dropna()
            runs = sorted(set(asked["run"]) | set(breaking["run"]))
            summary.append(
                {
                    "model": model,
                    "model_name": about.get("model", ""),
                    "defense": about.get("defense", ""),
                    "dataset": dataset,
                    "split": split,
                    "norm": norm,
                    "eps": eps,
                    "n": n,
                    "worst_case_robust_accuracy": (n - len(broken)) / n if n else float("nan"),
                    "best_single_attack": min(own, key=own.get) if own else "",
                    "best_single_robust_accuracy": min(own.values()) if own else float("nan"),
                    "attacks": len(own),
                    "runs": len(runs),
                }
            )
            for attack in sorted(set(asked["attack"]) | set(breaking["attack"])):
                mine = breaking[breaking["attack"] == attack]
                by_attack.append(
                    {
                        "model": model,
                        "dataset": dataset,
                        "norm": norm,
                        "eps": eps,
                        "attack": attack,
                        "robust_accuracy_alone": own.get(attack, float("nan")),
                        "broke": int(mine["example"].nunique()),
                        "broke_first": int((first["attack"] == attack).sum()),
                        "broke_alone": int((only == attack).sum()),
                        "runs": ";".join(sorted(set(mine["run"]) | set(asked.loc[asked["attack"] == attack, "run"]))),
                    }
                )
    return summary, by_attack


def advice(by_attack: list[dict]) -> list[str]:
    """What to run next, from what the attacks broke alone: untargeted APGD-DLR breaks -> AutoAttack's plus version."""
    lines = []
    for r in by_attack:
        if r["attack"] in ("apgd_dlr", "apgd_ce_dlr") and r["broke_alone"] > 0 and r["eps"] > 0:
            lines.append(
                f"eps={r['eps']:g}: untargeted APGD-DLR alone broke {r['broke_alone']} examples of model {r['model'][:8]}; "
                "attack=autoattack attack.version=plus runs it (the standard version does not)"
            )
    return lines


def per_example(outcomes, model: str, eps: float, norm: str | None = None) -> list[dict]:
    """The worst case per example at radius eps for one model: broken or not, by what, and where its x_adv is."""
    import numpy as np

    rows = []
    frame = outcomes[outcomes["model"] == model]
    if norm is not None:
        frame = frame[frame["norm"] == norm]
    for (dataset, split, nrm), group in frame.groupby(["dataset", "split", "norm"]):
        asked = group[np.isclose(group["eps"], eps, rtol=1e-12, atol=0) | np.isinf(group["eps"])]
        breaking = group[(group["broken"] == 1) & broken_at(group["radius"], eps)]
        best = breaking.sort_values(["radius", "recorded"]).drop_duplicates("example").set_index("example")
        for example, g in asked.groupby("example"):
            hit = best.loc[example] if example in best.index else None
            rows.append(
                {
                    "model": model,
                    "dataset": dataset,
                    "split": split,
                    "example": int(example),
                    "label": int(g["label"].iloc[0]),
                    "norm": nrm,
                    "eps": eps,
                    "broken": hit is not None,
                    "radius": float(hit["radius"]) if hit is not None else float("inf"),
                    "broken_by": hit["attack"] if hit is not None else "",
                    "adv_pred": int(hit["adv_pred"]) if hit is not None else int(g["adv_pred"].iloc[0]),
                    "clean_correct": bool((g["clean_pred"] == g["label"]).all()),
                    "run": hit["run"] if hit is not None else "",
                    "adversarial": hit["adversarial"] if hit is not None and isinstance(hit["adversarial"], str) else "",
                    "position": int(hit["position"]) if hit is not None and hit["position"] == hit["position"] and hit["position"] is not None else -1,
                }
            )
    return rows

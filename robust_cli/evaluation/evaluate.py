"""Evaluate an attack on a dataset: accuracy-vs-eps curves, minimal distances, binary eps search
(the masking checks are in `audit`).

Conventions (DESIGN.md): success and accuracy are always computed by re-running the model (eval mode) on the
returned adversarial batch; robust accuracy counts an already-misclassified input as an error; a minimal
distance is 0 for an already-misclassified input and +inf where the attack failed; distortion = ||d||_2/sqrt(n).
Data stay on the CPU and move to the device one batch at a time.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from robust_cli.attacks import model_mode, vote_labels
from robust_cli.core.engine import BatchSize, FastModel, chunked, exact

SIZE_COLUMNS = ("l2", "linf", "l1", "distortion", "l0")


# ----------------------------------------------------------------------------------------------- basics
def perturbation_sizes(x: torch.Tensor, x_adv: torch.Tensor) -> dict:
    """Per-example l2, linf, l1, distortion (l2 / sqrt(n), Szegedy/Bell) and l0 of x_adv - x."""
    delta = (x_adv - x).flatten(1).double()  # double: tiny perturbations stay exact
    l2 = delta.norm(dim=1)
    return {
        "l2": l2,
        "linf": delta.abs().amax(dim=1),
        "l1": delta.abs().sum(dim=1),
        "distortion": l2 / math.sqrt(delta.shape[1]),
        "l0": (delta != 0).sum(dim=1).double(),
    }


def model_device(model) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any, e.g. a wrapper)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _batches(n, batch_size):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def predict(model, x, batch_size=1000, device=None, y=None, draws=1, vote="majority", precise=True) -> torch.Tensor:
    """Labels predicted in eval mode (the caller's mode is restored), on the CPU; over `draws` forward passes by
    `vote` for randomised models (see `attacks.vote_labels`). `precise`: by the fp32 eager model behind a FastModel
    (what every reported number uses), else by the model as the attack ran it."""
    model = exact(model) if precise else model
    device = device or model_device(model)
    rows = torch.arange(len(x))
    with model_mode(model, "eval"):  # chunks halve on out-of-memory: labels do not depend on them
        return chunked(
            lambda r: vote_labels(model, x[r].to(device), None if y is None else y[r].to(device), draws, vote).cpu(),
            rows,
            BatchSize.halving(batch_size, "data.eval_batch_size", device),
        )


def judge(model, attack, x, y, device=None) -> torch.Tensor:
    """The labels that decide success for this attack: its eval_draws and vote (one pass for deterministic models)."""
    return predict(model, x, device=device, y=y, draws=getattr(attack, "eval_draws", 1), vote=getattr(attack, "vote", "majority"))


def choose_targets(attack, model, x, y, batch_size=1000, device=None):
    """The attack's targets for every example (None for untargeted attacks), drawn once per dataset."""
    if attack.targeted is None:
        return None
    device = device or model_device(model)
    return torch.cat([attack.choose_target(model, x[s].to(device), y[s].to(device)).cpu() for s in _batches(len(x), batch_size)])


@dataclass
class BatchPlan:
    """How a long evaluation runs its batches so that it can be resumed and split (`robust attack`).

    Each batch is seeded from (seed, eps, its index in the whole test set), so a resumed run or a shard draws exactly
    what the uninterrupted, unsharded run draws for the same examples. With `directory`, each finished batch
    (x_adv, judged labels, ensemble member, seconds) is written there atomically; `resume` reads them back."""

    seed: int
    first_batch: int = 0  # index of this shard's first batch in the whole test set
    directory: Path | None = None
    resume: bool = False
    saved: int = 0  # batches written by this run (for the test hook below)
    batch_size: int | None = None  # recorded beside the batches, so that a resume with batch_size=auto reuses it
    resumed_stages: list = field(default_factory=list)  # the steps after the curve that a resume read back
    recorder: object | None = None  # ledger.RunRecorder: each finished batch goes to the ledger (read-back ones too)

    def batch_seed(self, eps, batch: int, what: str = "attack") -> int:
        digest = hashlib.sha256(f"{self.seed}|{float(eps)!r}|{self.first_batch + batch}|{what}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def _file(self, eps, batch: int) -> Path:
        return Path(self.directory) / f"eps={float(eps)!r}_batch={self.first_batch + batch:06d}.pt"

    def load(self, eps, batch: int):
        if self.directory is None or not self.resume:
            return None
        path = self._file(eps, batch)
        try:
            return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        except Exception:  # noqa: BLE001 - a file cut by a kill (cannot happen with atomic writes, but cheap to allow)
            return None

    def save(self, eps, batch: int, result: dict) -> None:
        if self.directory is not None:
            from robust_cli.core import store

            if self.batch_size is not None and self.saved_batch_size() != self.batch_size:
                store.write_text(Path(self.directory) / "batch_size.txt", f"{self.batch_size}\n")
            store.save_torch(self._file(eps, batch), result)
            self.saved += 1
            if os.environ.get("ROBUST_STOP_AFTER_BATCHES") == str(self.saved):  # test hook: a kill between batches
                raise SystemExit(3)

    def stage(self, name: str, compute):
        """The result of a step after the curve (report_each, the eps search, the audit): seeded by its name, so that
        it draws the same whether or not an earlier step was read back; kept beside the batches; resume reads it."""
        torch.manual_seed(self.batch_seed(0, 0, name))
        path = Path(self.directory) / f"stage={name}.pt" if self.directory is not None else None
        if path is not None and self.resume and path.is_file():
            try:
                result = torch.load(path, map_location="cpu", weights_only=True)
                self.resumed_stages.append(name)
                return result
            except Exception:  # noqa: BLE001 - unreadable: compute it again
                pass
        result = compute()
        if path is not None:
            from robust_cli.core import store

            store.save_torch(path, result)
            if os.environ.get("ROBUST_STOP_AFTER_STAGE") == name:  # test hook: a kill between the steps
                raise SystemExit(3)
        return result

    def saved_batch_size(self) -> int | None:
        path = Path(self.directory) / "batch_size.txt" if self.directory is not None else None
        try:
            return int(path.read_text()) if path is not None and path.is_file() else None
        except ValueError:
            return None

    def restart(self, batch_size: int) -> None:
        """Start over at another batch size (the kept batches were cut at the old one)."""
        self.discard()
        self.batch_size = batch_size

    def discard(self) -> None:
        """Remove the kept batches once the run's results are written (they are in adversarial.pt and the CSVs)."""
        if self.directory is not None and Path(self.directory).is_dir():
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)

    def finished(self) -> int:
        return len(list(Path(self.directory).glob("eps=*_batch=*.pt"))) if self.directory is not None and Path(self.directory).is_dir() else 0


def run_attack(model, attack, x, y, eps=None, target=None, batch_size=256, device=None, advance=None, info=None, plan=None):
    """x_adv for the whole set, batch by batch; eps a number or a (N,) tensor; eps == 0 returns x itself.

    info (a dict) receives `broken_by` for an ensemble: per example the index of the member that broke it first.
    With a BatchPlan each batch is seeded by its own index, judged right away (info["pred"]), kept for a resume,
    and info["cached_seconds"] sums the compute time of the batches read back."""
    device = device or model_device(model)
    out, broken, preds, cached_seconds = [], [], [], 0.0
    for b, s in enumerate(_batches(len(x), batch_size)):
        done = plan.load(eps, b) if plan is not None else None
        if done is not None:
            out.append(done["x_adv"])
            broken.append(done["broken_by"])
            preds.append(done["pred"])
            cached_seconds += float(done["seconds"])
            if plan.recorder is not None:  # the interrupted run wrote it already: the ledger skips it
                plan.recorder.batch(eps, plan.first_batch + b, s, x[s], out[-1], preds[-1])
            if advance is not None:
                advance(1)
            continue
        started = time.perf_counter()
        if plan is not None:
            torch.manual_seed(plan.batch_seed(eps, b))
        xb = x[s].to(device)
        eps_b = eps[s] if isinstance(eps, torch.Tensor) and eps.dim() > 0 else eps
        if attack.kind == "budgeted" and not isinstance(eps_b, torch.Tensor) and float(eps_b) == 0:
            out.append(x[s].clone())  # no budget, no change: the eps = 0 row is clean accuracy exactly
            broken.append(torch.full((len(xb),), -1, dtype=torch.long))
        else:
            tb = target[s].to(device) if target is not None else None
            out.append(attack(model, xb, y[s].to(device), eps_b, target=tb).cpu())
            broken.append(attack.last_broken_by.cpu() if getattr(attack, "last_broken_by", None) is not None else torch.full((len(xb),), -1, dtype=torch.long))
        if plan is not None:
            torch.manual_seed(plan.batch_seed(eps, b, "judge"))  # randomised models: the vote's draws, per batch too
            preds.append(judge(model, attack, out[-1], y[s], device))
            if out[-1].is_cuda:
                torch.cuda.synchronize()
            plan.save(eps, b, {"x_adv": out[-1], "broken_by": broken[-1], "pred": preds[-1], "seconds": time.perf_counter() - started})
            if plan.recorder is not None:
                plan.recorder.batch(eps, plan.first_batch + b, s, x[s], out[-1], preds[-1])
        if advance is not None:
            advance(1)
    if info is not None:
        if hasattr(attack, "members"):
            info["broken_by"] = torch.cat(broken)
        if plan is not None:
            info["pred"] = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
            info["cached_seconds"] = cached_seconds
    return torch.cat(out)


def success_mask(pred, y, target):
    """Untargeted: misclassified; targeted: the target is predicted."""
    return pred != y if target is None else pred == target


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Outcome:
    """An attack's result on the whole set at one eps (eps = inf for a minimal attack)."""

    eps: float
    x_adv: torch.Tensor
    pred: torch.Tensor
    success: torch.Tensor
    seconds: float
    broken_by: torch.Tensor | None = None  # ensembles: index of the member that broke each example first, -1 none
    precision: str = "fp32"  # the precision the attack ran at (success is always judged in fp32)
    fp32_rejected: int = 0  # examples the reduced-precision model misclassified but the fp32 model did not


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (coverage >= level for every true proportion)."""
    from scipy.stats import beta

    if n == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def curve_row(attack, eps, y, clean_pred, outcome_pred, success, sizes, seconds, precision="fp32", fp32_rejected=0) -> dict:
    clean_ok = clean_pred == y
    robust_ok = clean_ok & (outcome_pred == y)  # already misclassified counts as an error
    fooled = success & clean_ok
    mean = (lambda v: float(v[fooled].mean())) if fooled.any() else (lambda v: float("nan"))
    low, high = clopper_pearson(int(robust_ok.sum()), len(y))
    return {
        "attack": attack.name,
        "norm": attack.norm,
        "targeted": attack.targeted or "false",
        "eps": float(eps),
        "n": int(len(y)),
        "clean_accuracy": float(clean_ok.double().mean()),
        "robust_accuracy": float(robust_ok.double().mean()),
        "robust_accuracy_low": low,  # 95 % Clopper-Pearson interval over the n test examples
        "robust_accuracy_high": high,
        "success_rate": float(fooled.sum()) / max(int(clean_ok.sum()), 1),  # among the correctly classified
        "mean_l2": mean(sizes["l2"]),
        "mean_linf": mean(sizes["linf"]),
        "mean_distortion": mean(sizes["distortion"]),
        "seconds": float(seconds),
        "precision": precision,  # of the attack's forward/backward passes; success is judged by the fp32 model
        "fp32_rejected": int(fp32_rejected),  # adversarial for the reduced-precision model only: counted robust
    }


def example_rows(eps, y, clean_pred, pred, target, success, sizes, broken_by=None, member_names=None, index_offset=0) -> list[dict]:
    t = target.tolist() if target is not None else [-1] * len(y)
    cols = {k: sizes[k].tolist() for k in SIZE_COLUMNS}
    rows = [
        {
            "index": index_offset + i,
            "eps": float(eps),
            "label": int(y[i]),
            "clean_pred": int(clean_pred[i]),
            "adv_pred": int(pred[i]),
            "target": int(t[i]),
            "success": bool(success[i]),
            **{k: cols[k][i] for k in SIZE_COLUMNS},
        }
        for i in range(len(y))
    ]
    if broken_by is not None:  # which member of the ensemble first succeeded; empty when robust or clean-wrong
        for r, b in zip(rows, broken_by.tolist()):
            r["broken_by"] = member_names[b] if b >= 0 and r["success"] else ""
    return rows


def accuracy_curve(model, attack, x, y, eps_list, clean_pred=None, target=None, batch_size=256, device=None, advance=None, plan=None, on_outcome=None):
    """One Outcome per eps for a budgeted attack (targets shared by all eps); `plan`: see BatchPlan; `on_outcome` is
    called with each Outcome as it finishes (live tracking)."""
    clean_pred = predict(model, x, device=device) if clean_pred is None else clean_pred
    outcomes = []
    for eps in eps_list:
        start = time.perf_counter()
        info = {}
        x_adv = run_attack(model, attack, x, y, eps, target, batch_size, device, advance, info, plan)
        if x_adv.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start + info.get("cached_seconds", 0.0)
        pred = info["pred"] if "pred" in info else judge(model, attack, x_adv, y, device)
        precision, rejected = "fp32", 0
        if isinstance(model, FastModel) and model.precision != "fp32":
            precision = model.precision
            fast_pred = predict(model, x_adv, device=device, precise=False)
            rejected = int((success_mask(fast_pred, y, target) & ~success_mask(pred, y, target)).sum())
        outcomes.append(Outcome(float(eps), x_adv, pred, success_mask(pred, y, target), seconds, info.get("broken_by"), precision, rejected))
        if on_outcome is not None:
            on_outcome(outcomes[-1])
    return outcomes


def curve_rows(model, attack, x, y, clean_pred, eps_list, batch_size=256, device=None) -> list[dict]:
    """curve.csv rows of a budgeted attack run alone on every example (references, ensemble members)."""
    outcomes = accuracy_curve(model, attack, x, y, eps_list, clean_pred, None, batch_size, device)
    return [
        curve_row(attack, o.eps, y, clean_pred, o.pred, o.success, perturbation_sizes(x, o.x_adv), o.seconds, o.precision, o.fp32_rejected) for o in outcomes
    ]


def minimal_distances(y, clean_pred, success, sizes) -> dict:
    """Per-example distances of a minimal attack: 0 where already misclassified, +inf where the attack failed."""
    clean_wrong = clean_pred != y
    out = {}
    for k in SIZE_COLUMNS:
        d = sizes[k].clone()
        d[~success] = float("inf")
        d[clean_wrong] = 0.0
        out[k] = d
    return out


def binary_search_eps(model, attack, x, y, target=None, tol=1e-3, max_eps=1.0, batch_size=256, device=None, advance=None):
    """Smallest eps (to `tol`) at which the budgeted attack succeeds, per example, by bisection on [0, max_eps].

    Returns (eps_found, x_adv at eps_found): eps_found is +inf where even max_eps fails and 0 where x is already
    adversarial. Success is judged by re-running the model. Attacks with random starts are not monotone in eps;
    bisection then returns an eps at which it did succeed, not necessarily the smallest one.
    """
    n = len(y)
    clean = predict(model, x, device=device)
    hi = torch.full((n,), float(max_eps))
    lo = torch.zeros(n)
    x_best = run_attack(model, attack, x, y, hi, target, batch_size, device, advance)
    ok = success_mask(predict(model, x_best, device=device), y, target)
    found = torch.where(ok, hi, torch.full_like(hi, float("inf")))
    already = success_mask(clean, y, target)
    found[already], x_best[already] = 0.0, x[already]
    todo = ok & ~already
    while todo.any() and float((hi - lo)[todo].max()) > tol:
        idx = todo.nonzero().squeeze(1)
        mid = (lo[idx] + hi[idx]) / 2
        x_mid = run_attack(model, attack, x[idx], y[idx], mid, None if target is None else target[idx], batch_size, device, advance)
        good = success_mask(predict(model, x_mid, device=device), y[idx], None if target is None else target[idx])
        hi[idx[good]], found[idx[good]], x_best[idx[good]] = mid[good], mid[good], x_mid[good]
        lo[idx[~good]] = mid[~good]
        todo[idx] = (hi[idx] - lo[idx]) > tol
    return found, x_best


def distance_summary(distances: torch.Tensor, y, clean_pred) -> dict:
    """Oberman's median (misclassified = 0, failures = +inf), the mean over the successful attacks on correctly
    classified inputs (Bell's average distortion), and the failure count."""
    d = distances.double()
    fooled = torch.isfinite(d) & (clean_pred == y)
    return {
        "median": float(d.median()) if len(d) else float("nan"),
        "mean_over_successes": float(d[fooled].mean()) if fooled.any() else float("nan"),
        "failures": int((~torch.isfinite(d)).sum()),
    }


def curve_from_distances(attack, distances, y, clean_pred, eps_list, sizes, seconds, precision="fp32") -> list[dict]:
    """Robust accuracy at radius eps from minimal distances (in the attack's norm): broken iff distance <= eps."""
    rows = []
    for eps in eps_list:
        broken = distances <= eps
        rows.append(curve_row(attack, eps, y, clean_pred, torch.where(broken, -1, y), broken, sizes, seconds, precision))
    return rows

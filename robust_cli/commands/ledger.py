"""`robust ledger [show | import | export]`: the per-example worst case over every attack run on each model.

`robust attack` writes every example's outcome to `<outputs_root>/ledger.sqlite` (see evaluation/ledger.py). This
command reads it (plain argparse, like `collect`):

  robust ledger [--root outputs]                       per model and eps: the worst-case robust accuracy, what each
                                                       attack broke (first, alone) and which runs contributed;
                                                       writes ledger.csv and ledger_attacks.csv in its run directory
  robust ledger import FILE --model RUN --norm linf --eps 0.3
                                                       adversarial examples made elsewhere (a .pt of x_adv and the
                                                       examples' test-set indices), re-checked with the model
  robust ledger export [--model ID] [--eps E]          the worst case per example as CSV, and its adversarial tensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from robust_cli.core import store
from robust_cli.core.errors import UserError
from robust_cli.evaluation import ledger as ledgers

WRITES_RUN_DIR = False  # its own folder under <root>/ledger/, not a Hydra run directory
BUDGET_TOLERANCE = 1e-5  # AutoAttack's check of an external x_adv's perturbation size


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="robust ledger",
        description="The per-example worst case over every attack run on a model (the ledger that `robust attack` writes to <outputs_root>/ledger.sqlite).",
    )
    p.add_argument("--root", default="outputs", help="the outputs_root of the runs (default: outputs)")
    p.add_argument("--out", "-o", default=None, help="where to write (default: a new folder <root>/ledger/<date>/<time>)")
    p.add_argument("--model", default=None, help="only this model (its identity, or the first digits of it)")
    sub = p.add_subparsers(dest="action", metavar="{show,import,export}")
    show = sub.add_parser("show", help="(the default) worst case per model and eps; writes ledger.csv and ledger_attacks.csv")
    show.add_argument("--root", default=argparse.SUPPRESS)
    show.add_argument("--out", "-o", default=argparse.SUPPRESS, help="where to write (default: a new folder <root>/ledger/<date>/<time>)")
    show.add_argument("--model", default=argparse.SUPPRESS, help="only this model (its identity, or the first digits of it)")
    imp = sub.add_parser("import", help="adversarial examples made elsewhere, re-checked with the model")
    imp.add_argument("--root", default=argparse.SUPPRESS)
    imp.add_argument("file", help="a .pt holding x_adv (N, C, H, W) and index (N,) = the examples' indices in the test split (default 0..N-1)")
    imp.add_argument("--model", required=True, help="a `robust attack` or `robust train` run directory, or a checkpoint robust saved")
    imp.add_argument("--norm", required=True, choices=ledgers.NORMS, help="the threat model the examples were made for")
    imp.add_argument("--eps", required=True, type=float, help="the budget in that norm (data units)")
    imp.add_argument("--name", default=None, help="the attack's name in the ledger (default: import:<file name>)")
    exp = sub.add_parser("export", help="the worst case per example (CSV) and its adversarial examples (.pt)")
    exp.add_argument("--root", default=argparse.SUPPRESS)
    exp.add_argument("--model", default=argparse.SUPPRESS, help="the model's identity (or its first digits); needed when the ledger has several")
    exp.add_argument("--eps", type=float, action="append", default=None, help="radius (repeatable; default: every eps in the ledger)")
    exp.add_argument("--norm", default=None, choices=ledgers.NORMS, help="only this norm")
    exp.add_argument("--out", "-o", default=argparse.SUPPRESS, help="where to write (default: a new folder <root>/ledger/<date>/<time>)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)  # argparse exits 2 on its own for bad flags
    try:
        ledger = ledgers.Ledger(args.root)
        if args.action == "import":
            return import_examples(ledger, args)
        if args.action == "export":
            return export(ledger, args)
        return show(ledger, args)
    except store.DiskFull as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _out_dir(ledger: ledgers.Ledger, out: str | None) -> Path:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out)
    return store.claim_run_dir(str(ledger.root / "ledger" / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")))


def _model_id(outcomes, wanted: str | None) -> str | None:
    known = sorted(outcomes["model"].unique())
    if wanted is None:
        return None
    matches = [m for m in known if m.startswith(wanted)]
    if len(matches) != 1:
        listed = ", ".join(known[:10]) or "none"
        raise UserError(f"--model {wanted} matches {len(matches)} of the ledger's models ({listed}); give more digits of one of them")
    return matches[0]


# ----------------------------------------------------------------------------------------------- show
def show(ledger: ledgers.Ledger, args) -> int:
    outcomes = ledger.frame("outcomes")
    if outcomes.empty:
        raise UserError(f"the ledger {ledger.path} has no outcomes yet: run `robust attack ... outputs_root={ledger.root}` first")
    model = _model_id(outcomes, args.model)
    if model:
        outcomes = outcomes[outcomes["model"] == model]
    summary, by_attack = ledgers.worst_case(outcomes, ledger.frame("evaluations"), ledger.frame("models"))
    out = _out_dir(ledger, args.out)
    store.write_csv(out / "ledger.csv", summary)
    store.write_csv(out / "ledger_attacks.csv", by_attack)
    _print(summary, by_attack)
    for line in ledgers.advice(by_attack):
        store.results.print(f"[yellow]{line}[/]", soft_wrap=True)
    store.results.print(f"written: {out / 'ledger.csv'}, {out / 'ledger_attacks.csv'}", soft_wrap=True, highlight=False)
    return 0


def _print(summary, by_attack) -> None:
    from rich.table import Table

    table = Table(title="worst case over every recorded attack (robust ledger)")
    for col in ("model", "defense", "dataset", "norm", "eps", "n", "worst case", "best single attack", "runs"):
        table.add_column(col, overflow="fold")
    for r in summary:
        table.add_row(
            r["model"][:8] + (f" {r['model_name']}" if r["model_name"] else ""),
            r["defense"],
            r["dataset"],
            r["norm"],
            f"{r['eps']:g}",
            str(r["n"]),
            f"{r['worst_case_robust_accuracy']:.4f}",
            f"{r['best_single_attack']} {r['best_single_robust_accuracy']:.4f}",
            str(r["runs"]),
        )
    store.results.print(table)
    attacks = Table(title="what each attack broke (first: earliest in the ledger; alone: no other attack broke it)")
    for col in ("model", "eps", "attack", "robust alone", "broke", "first", "alone"):
        attacks.add_column(col, overflow="fold")
    for r in by_attack:
        if r["eps"] > 0:
            alone = r["robust_accuracy_alone"]
            attacks.add_row(
                r["model"][:8],
                f"{r['eps']:g}",
                r["attack"],
                "" if math.isnan(alone) else f"{alone:.4f}",
                str(r["broke"]),
                str(r["broke_first"]),
                str(r["broke_alone"]),
            )
    store.results.print(attacks)


# ----------------------------------------------------------------------------------------------- import
def _load_run_model(spec: str):
    """(model in eval mode on the CPU, the whole test split, the config) from a run directory or a robust checkpoint."""
    from omegaconf import OmegaConf

    from robust_cli.commands import build
    from robust_cli.core import registry
    from robust_cli.core.batches import load_data

    path = Path(spec)
    if path.is_dir():
        run_json = path / "run.json"
        if not run_json.is_file():
            raise UserError(f"--model {spec}: a folder without run.json; give a `robust attack`/`robust train` run directory or a checkpoint file")
        record = json.loads(run_json.read_text())
        config, checkpoint = record.get("config"), record.get("checkpoint")
        if checkpoint is None and (path / "model.pt").is_file():
            checkpoint = str(path / "model.pt")
    elif path.is_file():
        state = registry.load_checkpoint(path)
        config, checkpoint = state.get("config"), str(path)
    else:
        raise UserError(f"--model {spec}: no such run directory or checkpoint")
    if not isinstance(config, dict) or "model" not in config or "dataset" not in config:
        raise UserError(f"--model {spec}: its config (model, dataset) is not recorded; give a run directory of robust or a checkpoint robust saved")
    cfg = OmegaConf.create(config)
    bundle = load_data(build.make_dataset(cfg), str(cfg.data.root), bool(cfg.data.download), int(cfg.seed))
    model = build.make_model(cfg, bundle.meta)
    if not build.pretrained(cfg):
        if not checkpoint:
            raise UserError(f"--model {spec}: no checkpoint is recorded for it")
        state = registry.load_checkpoint(checkpoint)
        registry.check_checkpoint_matches(state, model, checkpoint)
        model.load_state_dict(state["state_dict"])
    return model.eval(), bundle, cfg, checkpoint


def _read_examples(file: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    path = Path(file)
    if not path.is_file():
        raise UserError(f"{file}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise UserError(f"{file} cannot be read as a torch file ({type(exc).__name__}); save x_adv and index with torch.save") from None
    if isinstance(obj, torch.Tensor):
        return obj, None, None
    if not isinstance(obj, dict) or not isinstance(obj.get("x_adv"), torch.Tensor):
        raise UserError(f"{file} must hold a tensor x_adv (N, C, H, W), or a dict with x_adv and index (the test-set indices)")
    index = next((obj[k] for k in ("index", "indices", "example") if isinstance(obj.get(k), torch.Tensor)), None)
    label = obj.get("y") if isinstance(obj.get("y"), torch.Tensor) else None
    return obj["x_adv"], index, label


def import_examples(ledger: ledgers.Ledger, args) -> int:
    from robust_cli.evaluation import evaluate as ev

    if not math.isfinite(args.eps) or args.eps < 0:
        raise UserError(f"--eps must be finite and >= 0, got {args.eps}")
    x_adv, index, labels = _read_examples(args.file)
    model, bundle, cfg, checkpoint = _load_run_model(args.model)
    x_all, y_all = bundle.test_x, bundle.test_y
    n = len(x_adv)
    index = torch.arange(n) if index is None else index.long().flatten()
    if len(index) != n:
        raise UserError(f"{args.file}: x_adv has {n} examples but index has {len(index)}")
    if tuple(x_adv.shape[1:]) != tuple(x_all.shape[1:]):
        raise UserError(f"{args.file}: x_adv has examples of shape {tuple(x_adv.shape[1:])}; {bundle.meta.name} has {tuple(x_all.shape[1:])}")
    if n and (int(index.min()) < 0 or int(index.max()) >= len(y_all)):
        raise UserError(f"{args.file}: index must be in 0..{len(y_all) - 1} (the {bundle.meta.name} test split), got {int(index.min())}..{int(index.max())}")
    if len(torch.unique(index)) != n:
        raise UserError(f"{args.file}: index has repeated examples; give each example once")
    y = y_all[index]
    if labels is not None and not torch.equal(labels.long().flatten(), y):
        raise UserError(
            f"{args.file}: its y differs from the {bundle.meta.name} test labels at {int((labels.long().flatten() != y).sum())} examples: are the indices right?"
        )
    x = x_all[index]
    x_adv = x_adv.float()
    sizes = ev.perturbation_sizes(x, x_adv)[args.norm]
    finite = torch.isfinite(x_adv.flatten(1)).all(dim=1)
    in_box = (x_adv.flatten(1).amin(dim=1) >= -BUDGET_TOLERANCE) & (x_adv.flatten(1).amax(dim=1) <= 1 + BUDGET_TOLERANCE)
    in_budget = sizes <= args.eps + BUDGET_TOLERANCE
    reasons = {
        "not finite": ~finite,
        "outside the [0, 1] box": finite & ~in_box,
        f"over the {args.norm} budget {args.eps:g}": finite & in_box & ~in_budget,
    }
    accepted = finite & in_box & in_budget
    clean_pred = ev.predict(model, x)
    pred = ev.predict(model, x_adv.clamp(0, 1))
    model_id = ledgers.weights_digest(model)
    digest = hashlib.sha256(Path(args.file).read_bytes() + f"|{model_id}|{args.norm}|{args.eps!r}".encode()).hexdigest()[:10]
    evaluation = f"import-{Path(args.file).stem}-{digest}"
    name = args.name or f"import:{Path(args.file).name}"
    description = {
        "model": cfg.get("choices", {}).get("model", ""),
        "dataset": bundle.meta.name,
        "defense": cfg.get("choices", {}).get("defense", ""),
        "seed": int(cfg.seed),
        "checkpoint": str(checkpoint),
    }
    source = str(Path(args.file).resolve())
    ledger.register(evaluation, model_id, description, bundle.meta.name, "test", args.norm, name, {"file": source}, [args.eps], source)
    keep = accepted.nonzero().squeeze(1)
    recorder = ledgers.RunRecorder(ledger, evaluation, model_id, bundle.meta.name, "test", args.norm, name, source, index[keep], y[keep], clean_pred[keep])
    recorder.batch(args.eps, 0, slice(0, len(keep)), x[keep], x_adv[keep].clamp(0, 1), pred[keep])
    adversarial = int(((clean_pred[keep] == y[keep]) & (pred[keep] != y[keep])).sum())
    store.results.print(
        f"{args.file}: {n} examples for model {model_id} ({bundle.meta.name}, {args.norm} eps={args.eps:g}); accepted {len(keep)}, "
        f"of which {adversarial} are adversarial and {int((clean_pred[keep] != y[keep]).sum())} already misclassified clean; "
        f"{recorder.written} new rows in {ledger.path}",
        soft_wrap=True,
        highlight=False,
    )
    rejected = {why: int(mask.sum()) for why, mask in reasons.items() if int(mask.sum())}
    for why, k in rejected.items():
        examples = index[reasons[why]][:5].tolist()
        store.console.print(f"[yellow]rejected {k}: {why} (examples {', '.join(map(str, examples))}{', ...' if k > 5 else ''})[/]", soft_wrap=True)
    return 0


# ----------------------------------------------------------------------------------------------- export
def export(ledger: ledgers.Ledger, args) -> int:
    outcomes = ledger.frame("outcomes")
    if outcomes.empty:
        raise UserError(f"the ledger {ledger.path} has no outcomes yet")
    models = sorted(outcomes["model"].unique())
    model = _model_id(outcomes, args.model) if args.model else (models[0] if len(models) == 1 else None)
    if model is None:
        raise UserError(f"the ledger has {len(models)} models ({', '.join(models[:10])}): choose one with --model")
    frame = outcomes[outcomes["model"] == model]
    if args.norm:
        frame = frame[frame["norm"] == args.norm]
    grid = sorted({e for values in ledgers.eps_grid(frame, ledger.frame("evaluations")).values() for e in values})
    wanted = args.eps or grid
    unknown = [e for e in wanted if not any(math.isclose(e, g, rel_tol=1e-12) for g in grid)]
    if unknown:
        raise UserError(f"--eps {', '.join(f'{e:g}' for e in unknown)}: the ledger has this model at eps {', '.join(f'{g:g}' for g in grid)}")
    out = _out_dir(ledger, args.out)
    rows = []
    for eps in wanted:
        per = ledgers.per_example(frame, model, eps, args.norm)
        rows += per
        kept = [r for r in per if r["broken"] and r["adversarial"]]
        tensors, files = [], {}
        for r in kept:
            if r["adversarial"] not in files:
                files[r["adversarial"]] = torch.load(ledger.root / r["adversarial"], map_location="cpu", weights_only=True)
            tensors.append(files[r["adversarial"]]["x_adv"][r["position"]])
        for norm in sorted({r["norm"] for r in kept}):  # the format `robust ledger import` reads
            mine = [i for i, r in enumerate(kept) if r["norm"] == norm]
            store.save_torch(
                out / f"adversarial_{norm}_eps={eps:g}.pt",
                {
                    "x_adv": torch.stack([tensors[i] for i in mine]),
                    "index": torch.tensor([kept[i]["example"] for i in mine]),
                    "y": torch.tensor([kept[i]["label"] for i in mine]),
                    "eps": eps,
                    "norm": norm,
                    "model": model,
                },
            )
    store.write_csv(out / "worst_case_examples.csv", rows)
    store.results.print(
        f"written: {out} (worst_case_examples.csv: {len(rows)} rows; adversarial_*.pt: x_adv and index of each broken example)", soft_wrap=True, highlight=False
    )
    return 0

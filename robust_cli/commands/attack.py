"""`robust attack`: attack this config's trained model; curve, per-example sizes, distances, figures, warnings."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import ListConfig, OmegaConf

from robust_cli.commands import build
from robust_cli.core import store
from robust_cli.core.engine import BatchSize, fit_batch
from robust_cli.core.errors import UserError
from robust_cli.evaluation import audit
from robust_cli.evaluation import evaluate as ev
from robust_cli.evaluation import ledger as ledgers

SHARDABLE = True  # data.shard=I/N: this command evaluates one part of the test set; robust collect merges the parts
BATCH_SETTINGS = "batch_size"  # named by the out-of-memory error


# ----------------------------------------------------------------------------------------------- config
def eps_list(cfg) -> list[float]:
    raw = cfg.eps
    values = list(raw) if isinstance(raw, (list, tuple, ListConfig)) else [raw]
    if not values:
        raise UserError("eps is an empty list; give a number or a list like eps=[0,0.1,0.2]")
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise UserError(f"eps must be numbers, got {v!r}; e.g. eps=0.1 or 'eps=[0,0.1,0.2]'") from None
        if not math.isfinite(f) or f < 0:
            raise UserError(f"eps must be finite and >= 0, got {v!r}")
        out.append(f)
    return sorted(set(out))


def build_attack(cfg, bounds=(0.0, 1.0)):
    """The configured attack; constructor errors (bad parameter names or values) become one-line user errors."""
    spec = OmegaConf.to_container(cfg.attack, resolve=True)
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise UserError("no attack chosen: pick one with attack=<name> (see `robust --help` for the list)")
    try:
        return instantiate(spec, bounds=bounds)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - hydra wraps constructor errors: ours surface, others stay loud below
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"attack: {cause}") from None


def _switches(node, keys: tuple[str, ...]) -> dict[str, bool]:
    """A node of on/off settings that may also be given as one value (audit=false turns every key off)."""

    def on(value) -> bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise UserError(f"expected true or false, got {value!r}")
            return value.lower() == "true"
        return bool(value)

    if node is None or isinstance(node, (bool, str, int)):
        return dict.fromkeys(keys, on(True if node is None else node))
    return {k: on(node.get(k, True)) for k in keys}


def audit_settings(cfg) -> dict[str, bool]:
    return _switches(cfg.get("audit"), ("checks", "reference"))


def ledger_settings(cfg) -> dict[str, bool]:
    return _switches(cfg.get("ledger"), ("record", "keep_adversarial"))


def validate(cfg):
    eps_list(cfg)
    audit_settings(cfg)
    ledger_settings(cfg)
    batch = BatchSize(cfg.batch_size, "batch_size", torch.device("cpu"))
    attack = build_attack(cfg)
    if cfg.data.get("shard") is not None and batch.auto:
        raise UserError("data.shard needs a fixed batch_size (the shards are whole batches, the same in every job): set batch_size=N, e.g. 256")
    if cfg.data.get("shard") is not None and cfg.data.n_test is not None:  # too many shards for the batches: before training
        shard_range(cfg, int(cfg.data.n_test), int(cfg.batch_size))
    mode = cfg.search.get("mode", "none") if cfg.get("search") else "none"
    if mode not in ("none", "binary"):
        raise UserError(f"search must be none or binary, got {mode!r}")
    if mode == "binary":
        if attack.kind != "budgeted":
            raise UserError(f"search=binary needs a budgeted attack; {attack.name} is minimal and gives distances already")
        if not float(cfg.search.tol) > 0 or not float(cfg.search.max_eps) > 0:
            raise UserError(f"search.tol and search.max_eps must be > 0, got {cfg.search.tol}, {cfg.search.max_eps}")


# ----------------------------------------------------------------------------------------------- run
def run(cfg, ctx):
    model, data, checkpoint = build.trained_model(cfg, ctx)
    x, y = data.test_x, data.test_y
    bounded = bool(x.min() >= 0 and x.max() <= 1)
    attack = build_attack(cfg, bounds=(0.0, 1.0) if bounded else None)
    if not bounded:
        ctx.warn(f"{data.meta.name} inputs are not in [0, 1]: attacking without a box constraint")
    if getattr(attack, "iterative", False) and getattr(attack, "steps", None) == 0:
        ctx.warn(f"attack.steps=0: {attack.name} takes no gradient step and returns its random start (the noise baseline); set attack.steps >= 1 to attack")
    torch.manual_seed(int(cfg.seed))  # after any training, so the attack's randomness depends on the seed only
    device, epsilons = ctx.device, eps_list(cfg)
    engine = build.make_engine(cfg, device, ctx.warn)
    fast = engine.fast(model)  # attacks run this one; every success is judged by the fp32 model (ev.predict)
    ctx.record["engine"] = engine.describe(model)

    clean_pred = ev.predict(model, x, device=device)
    target = ev.choose_targets(attack, model, x, y, device=device)  # on the whole test set: the same for every shard
    batch = BatchSize(cfg.batch_size, "batch_size", device, limit=len(y))
    start, stop, first_batch = shard_range(cfg, len(y), batch.size)
    if (start, stop) != (0, len(y)):
        x, y, clean_pred = x[start:stop], y[start:stop], clean_pred[start:stop]
        target = target[start:stop] if target is not None else None
        ctx.record["shard"] = {"spec": str(cfg.data.shard), "start": start, "stop": stop, "of": len(data.test_y)}
    plan = _batch_plan(cfg, ctx, checkpoint, first_batch, batch)
    dataset_index = data.test_index[start:stop]  # the examples' indices in the dataset's test split: the ledger's identity
    if ledger_settings(cfg)["record"]:
        plan.recorder = _ledger_recorder(cfg, ctx, model, data, attack, epsilons, plan, checkpoint, dataset_index, y, clean_pred)
    rows, examples, distances_rows, tensors = [], [], None, {}
    summary = {}
    runs = len(epsilons) if attack.kind == "budgeted" else 1

    def evaluate(bs):  # the whole curve at one batch size (batch_size=auto: again at half the size on out-of-memory)
        with ctx.progress(
            math.ceil(len(y) / bs) * runs, f"{attack.name} over {len(epsilons)} eps" if attack.kind == "budgeted" else f"{attack.name} (minimal)"
        ) as advance:
            return ev.accuracy_curve(
                fast,
                attack,
                x,
                y,
                epsilons if attack.kind == "budgeted" else [math.inf],
                clean_pred,
                target,
                bs,
                device,
                advance,
                plan,
                _live_outcome(attack, y, clean_pred),
            )

    def halved(size):
        store.console.print(f"[yellow]out of memory: batch_size=auto continues at {size}[/]")
        plan.restart(size)

    outcomes = fit_batch(evaluate, batch, halved)
    bs = batch.size
    n_batches = math.ceil(len(y) / bs)
    ctx.record["batch_size"] = batch.describe()
    if attack.kind == "budgeted":
        torch.manual_seed(plan.batch_seed(0, 0, "after the curve"))  # what follows draws the same after a resume
        names = getattr(attack, "member_names", None)
        for o in outcomes:
            sizes = ev.perturbation_sizes(x, o.x_adv)
            rows.append(ev.curve_row(attack, o.eps, y, clean_pred, o.pred, o.success, sizes, o.seconds, o.precision, o.fp32_rejected))
            examples += ev.example_rows(o.eps, y, clean_pred, o.pred, target, o.success, sizes, o.broken_by, names, index_offset=start)
        # each step after the curve is a stage of the plan: kept when done, read back by a resume
        if names and getattr(attack, "report_each", False):  # every member alone on every example
            rows += plan.stage(
                "report_each", lambda: [r for member in attack.members for r in ev.curve_rows(fast, member, x, y, clean_pred, epsilons, bs, device)]
            )
        shown = outcomes[-1]
        if cfg.search.mode == "binary":

            def search():
                with ctx.progress(n_batches * 12, f"binary eps search ({attack.norm})") as advance:
                    return list(ev.binary_search_eps(fast, attack, x, y, target, float(cfg.search.tol), float(cfg.search.max_eps), bs, device, advance))

            found, x_found = plan.stage("search", search)
            sizes = ev.perturbation_sizes(x, x_found)
            distances_rows = _distance_rows(y, found, sizes, clean_pred)
            summary = ev.distance_summary(found, y, clean_pred)
            tensors["search_eps"] = found
        # what earlier runs of this model broke, read once now (not kept with the stages: the ledger grows between runs)
        known = _known_breaks(plan.recorder) if plan.recorder is not None else None
        checks = audit_settings(cfg)
        if checks["checks"] and attack.name != "noise":
            audit_rows = plan.stage(
                "audit", lambda: audit.run_audit(fast, attack, x, y, clean_pred, epsilons, rows, outcomes, bs, device, bounded, checks["reference"])
            )
            if known is not None:
                audit_rows += audit.ledger_check(outcomes, y, clean_pred, dataset_index, known)
            ctx.write_csv("audit.csv", audit_rows)
            for r in audit_rows:
                if r["status"] != "ok":
                    ctx.warn(f"audit {r['check']}" + (f" at eps={r['eps']:g}" if r["eps"] != "" else "") + f": {r['detail']}")
            _print_audit(audit_rows)
    else:
        (o,) = outcomes
        sizes = ev.perturbation_sizes(x, o.x_adv)
        dist = ev.minimal_distances(y, clean_pred, o.success, sizes)
        key = attack.norm  # robust accuracy at radius eps in the attack's own norm
        rows = ev.curve_from_distances(attack, dist[key], y, clean_pred, epsilons, sizes, o.seconds, o.precision)
        rows.append(ev.curve_row(attack, math.inf, y, clean_pred, o.pred, o.success, sizes, o.seconds, o.precision, o.fp32_rejected))
        names = getattr(attack, "member_names", None)  # minimal_ensemble: broken_by is the member whose result was kept
        examples = ev.example_rows(math.inf, y, clean_pred, o.pred, target, o.success, sizes, o.broken_by if names else None, names, index_offset=start)
        distances_rows = _distance_rows(y, dist[key], sizes, clean_pred, dist)
        summary = ev.distance_summary(dist[key], y, clean_pred)
        shown = o

    if plan.recorder is not None and attack.kind == "budgeted":
        _ledger_line(ctx, plan.recorder, known, outcomes, y, clean_pred, dataset_index)
    for message in getattr(attack, "notes", []):  # what the attack changed on its own (few classes, ...)
        ctx.warn(message)
    ctx.write_csv("curve.csv", rows)
    ctx.write_csv("examples.csv", examples)
    if distances_rows is not None:
        ctx.write_csv("distances.csv", distances_rows)
    if cfg.save_adversarial:
        ctx.save_torch(
            "adversarial.pt",
            {
                "x": x,
                "y": y,
                "clean_pred": clean_pred,
                "target": target if target is not None else torch.full_like(y, -1),
                "eps": torch.tensor([o.eps for o in outcomes], dtype=torch.float64),
                "x_adv": torch.stack([o.x_adv for o in outcomes]),
                "pred": torch.stack([o.pred for o in outcomes]),
                **tensors,
            },
        )
    _curve_figure(ctx, attack, rows, distances_rows, summary)
    if len(data.meta.shape) == 3:
        _examples_figure(ctx, data.meta, x, y, clean_pred, shown, target, int(cfg.n_figure), cfg.amplify)

    last = rows[-1]
    headline = {"attack": attack.name, "norm": attack.norm, "targeted": attack.targeted or "false", "n": len(y), "clean_accuracy": rows[0]["clean_accuracy"]}
    if attack.kind == "budgeted":
        headline.update({f"robust_accuracy@{r['eps']:g}": r["robust_accuracy"] for r in rows})
    else:
        headline.update(success_rate=last["success_rate"], mean_l2=last["mean_l2"], mean_distortion=last["mean_distortion"])
    if summary:
        headline.update({f"{k}_{attack.norm if attack.kind == 'minimal' else 'eps'}": v for k, v in summary.items()})
    headline["seconds"] = sum(o.seconds for o in outcomes)
    ctx.headline(**headline)
    if plan.resumed_stages:
        ctx.record["resumed_stages"] = list(plan.resumed_stages)
        store.console.print(f"[cyan]read back from the interrupted run: {', '.join(plan.resumed_stages)}[/]")
    plan.discard()  # the results are in the run directory now


def _live_outcome(attack, y, clean_pred):
    """Each eps's robust accuracy to the tracking sinks as it finishes (step: its place in the eps list)."""
    done = []

    def send(o):
        if attack.kind == "budgeted":
            robust = float(((clean_pred == y) & (o.pred == y)).double().mean())
            store.live("attack", {"eps": o.eps, "robust_accuracy": robust, "seconds": o.seconds}, len(done))
        done.append(o.eps)

    return send


def shard_range(cfg, n: int, batch_size: int) -> tuple[int, int, int]:
    """(start, stop, first batch) of this run's part of the n test examples: whole batches, so that the batches (and
    their seeds) are those of the unsharded run."""
    if cfg.data.get("shard") is None:
        return 0, n, 0
    from robust_cli.core.engine import parse_shard

    index, parts = parse_shard(cfg.data.shard)
    n_batches = math.ceil(n / batch_size)
    if parts > n_batches:
        raise UserError(
            f"data.shard={cfg.data.shard}: the {n} test examples make only {n_batches} batches of batch_size={batch_size}; use at most {n_batches} shards or a smaller batch_size"
        )
    first, last = index * n_batches // parts, (index + 1) * n_batches // parts
    return first * batch_size, min(last * batch_size, n), first


def evaluation_key(cfg, checkpoint) -> str:
    """Names everything that decides the per-batch results: checkpoint (path and file), data, attack, seed, batches."""
    path = Path(checkpoint)
    stat = path.stat()
    identity = {
        "checkpoint": [str(path.resolve()), stat.st_size, stat.st_mtime_ns],
        "attack": OmegaConf.to_container(cfg.attack, resolve=True),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "n_test": cfg.data.n_test,
        "seed": int(cfg.seed),
        "batch_size": cfg.batch_size,
        "precision": cfg.get("precision", "fp32"),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{build.choice(cfg, 'attack')}-{build.choice(cfg, 'model')}-{build.choice(cfg, 'dataset')}-{build.choice(cfg, 'defense')}-s{cfg.seed}-{digest}"


def _batch_plan(cfg, ctx, checkpoint, first_batch: int, batch: BatchSize) -> ev.BatchPlan:
    """Per-batch results under <outputs_root>/evaluations/<key>/ while the run lasts; resume=true reads them back
    (batch_size=auto: at the size the interrupted run had found)."""
    directory = Path(str(cfg.outputs_root)) / "evaluations" / evaluation_key(cfg, checkpoint)
    plan = ev.BatchPlan(seed=int(cfg.seed), first_batch=first_batch, directory=directory, resume=bool(cfg.get("resume")))
    if batch.auto and plan.resume and plan.saved_batch_size():
        batch.size = plan.saved_batch_size()
    plan.batch_size = batch.size
    done = plan.finished()
    if plan.resume and done:
        store.console.print(f"[cyan]resuming the evaluation {directory.name}: {done} finished batches are read back[/]")
    elif plan.resume:
        ctx.warn(f"resume=true but there is no interrupted evaluation of this config ({directory.name}): starting from the first batch")
    elif done:
        ctx.warn(f"an interrupted evaluation of this config left {done} finished batches in {directory}; starting again (resume=true continues it)")
    ctx.record["evaluation_state"] = str(directory)
    return plan


def attack_label(attack) -> str:
    """The attack as the ledger names it: its name, plus a loss or targeting its name does not already say."""
    label = attack.name
    loss = getattr(attack, "loss", None)
    if loss and loss != "ce" and loss not in label:
        label += f"_{loss}"
    if attack.targeted and "_t" not in label:
        label += "_targeted"
    return label


def _ledger_recorder(cfg, ctx, model, data, attack, epsilons, plan, checkpoint, examples, y, clean_pred) -> ledgers.RunRecorder:
    """Register this evaluation in <outputs_root>/ledger.sqlite and return what writes its batches there."""
    ledger = ledgers.Ledger(cfg.outputs_root)
    model_id = ledgers.weights_digest(model)
    evaluation = Path(plan.directory).name
    label, norm = attack_label(attack), attack.norm
    description = {k: build.choice(cfg, k) for k in ("model", "dataset", "defense")} | {"seed": int(cfg.seed), "checkpoint": str(checkpoint)}
    settings = OmegaConf.to_container(cfg.attack, resolve=True)
    ledger.register(evaluation, model_id, description, data.meta.name, "test", norm, label, settings, epsilons, ctx.dir)
    ctx.record["ledger"] = {"file": str(ledger.path), "model": model_id, "evaluation": evaluation}
    keep = ledger_settings(cfg)["keep_adversarial"]
    return ledgers.RunRecorder(ledger, evaluation, model_id, data.meta.name, "test", norm, label, ctx.dir, examples, y, clean_pred, keep)


def _known_breaks(recorder: ledgers.RunRecorder) -> dict:
    return recorder.ledger.smallest_radius(recorder.model, recorder.dataset, recorder.split, recorder.norm, exclude=recorder.evaluation)


def _ledger_line(ctx, recorder, known, outcomes, y, clean_pred, examples) -> None:
    """The worst case over every run of this model on this run's examples, printed beside the run's own number."""
    index = examples.tolist()
    worst = {}
    for o in outcomes:
        robust = ((clean_pred == y) & (o.pred == y)).tolist()
        still = sum(1 for i, r in enumerate(robust) if r and not (index[i] in known and ledgers.broken_at(known[index[i]][0], o.eps)))
        worst[o.eps] = (sum(robust) / len(y), still / len(y))
    ctx.record["ledger"]["worst_case_robust_accuracy"] = {f"{e:g}": w for e, (_, w) in worst.items()}
    differ = {e: v for e, v in worst.items() if v[1] < v[0]}
    if differ:
        shown = ", ".join(f"eps={e:g}: {w:.4f} (this run {own:.4f})" for e, (own, w) in differ.items())
        store.results.print(
            f"[bold]ledger[/]: the worst case over every run of this model on these examples is lower: {shown}  (robust ledger --root {recorder.ledger.root})"
        )


def _distance_rows(y, primary, sizes, clean_pred, dist=None):
    """distances.csv: the sizes of the perturbation found, 0 for misclassified inputs, +inf for failures."""
    failed = ~torch.isfinite(primary)
    wrong = clean_pred != y
    cols = {}
    for k in ev.SIZE_COLUMNS:
        d = (dist[k] if dist is not None else sizes[k]).clone()
        d[failed], d[wrong] = float("inf"), 0.0
        cols[k] = d.tolist()
    rows = [{"index": i, "label": int(y[i]), **{k: cols[k][i] for k in ev.SIZE_COLUMNS}} for i in range(len(y))]
    if dist is None:  # binary search: also the eps found
        for r, e in zip(rows, primary.tolist()):
            r["eps"] = e
    return rows


def _print_audit(audit_rows):
    from rich.table import Table

    table = Table(title="audit", show_header=True)
    for col in ("check", "eps", "status", "detail"):
        table.add_column(col, overflow="fold", no_wrap=col != "detail")
    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    for r in audit_rows:
        eps = "" if r["eps"] == "" else f"{r['eps']:g}"
        table.add_row(r["check"], eps, f"[{style[r['status']]}]{r['status']}[/]", r["detail"])
    store.results.print(table)


# ----------------------------------------------------------------------------------------------- figures
def _curve_figure(ctx, attack, rows, distances_rows, summary):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    finite = [r for r in rows if math.isfinite(r["eps"])]
    clean = rows[0]["clean_accuracy"]
    if attack.kind == "minimal" and distances_rows:
        # the whole curve from the distances: accuracy at radius eps = correct and distance > eps
        d = torch.tensor([r[attack.norm] for r in distances_rows], dtype=torch.float64)
        top = float(d[torch.isfinite(d)].max()) if torch.isfinite(d).any() else 1.0
        grid = torch.linspace(0, top * 1.05 if top > 0 else 1.0, 200, dtype=torch.float64)
        acc = [(d > g).double().mean().item() for g in grid]
        ax.plot(grid.numpy(), acc, label=f"{attack.name} (from distances)")
        ax.axvline(summary.get("median", float("nan")), color="gray", lw=0.8, ls=":", label="median distance")
    else:
        for name in dict.fromkeys(r["attack"] for r in finite):  # the attack, then any members reported alone
            mine = [r for r in finite if r["attack"] == name]
            ax.plot([r["eps"] for r in mine], [r["robust_accuracy"] for r in mine], "o-" if name == attack.name else ".:", label=name)
    ax.axhline(clean, color="k", ls="--", lw=1, label="clean accuracy")
    ax.set_xlabel(f"eps ({attack.norm})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"{attack.name}, targeted={attack.targeted or 'false'}")
    ctx.save_figure("curve.png", fig)


def _examples_figure(ctx, meta, x, y, clean_pred, outcome, target, n, amplify):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fooled = ((clean_pred == y) & outcome.success).nonzero().squeeze(1)
    idx = (fooled if len(fooled) else torch.arange(len(y)))[:n].tolist()
    if not idx:
        return
    names = meta.class_names or [str(i) for i in range(meta.num_classes)]
    if amplify is None:  # the largest change shown at half contrast around grey
        biggest = float((outcome.x_adv[idx] - x[idx]).abs().max())
        amplify = 0.5 / biggest if biggest > 0 else 1.0
    amplify = float(amplify)
    fig, axes = plt.subplots(3, len(idx), figsize=(1.6 * len(idx), 5.2), squeeze=False)

    def show(ax, img):
        img = img.clamp(0, 1)
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])

    for col, i in enumerate(idx):
        delta = outcome.x_adv[i] - x[i]
        show(axes[0][col], x[i])
        axes[0][col].set_title(f"y={names[int(y[i])]}\npred={names[int(clean_pred[i])]}", fontsize=8)
        show(axes[1][col], outcome.x_adv[i])
        tgt = f" (t={names[int(target[i])]})" if target is not None else ""
        axes[1][col].set_title(f"adv pred={names[int(outcome.pred[i])]}{tgt}", fontsize=8)
        show(axes[2][col], 0.5 + amplify * delta)
        axes[2][col].set_title(f"{amplify:.3g}x perturbation", fontsize=7)
    axes[0][0].set_ylabel("natural")
    axes[1][0].set_ylabel("adversarial")
    axes[2][0].set_ylabel("perturbation")
    eps = "" if not math.isfinite(outcome.eps) else f" at eps={outcome.eps:g}"
    fig.suptitle(f"natural, adversarial{eps}, amplified perturbation", fontsize=9)
    ctx.save_figure("adversarial_examples.png", fig)

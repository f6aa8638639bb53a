"""The one training loop. A defense supplies only the loss: `loss, stats = defense(model, x, y)`.

Per epoch the loop writes `train_log.csv` and a checkpoint (atomically) holding weights, optimizer, scheduler,
RNG states and the log so far, so `resume=true` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

import robust_cli
from robust_cli.core import registry, store
from robust_cli.core.batches import check_augment, crop_flip, iterate_batches, place_on_device
from robust_cli.core.data import DataBundle
from robust_cli.core.engine import Engine, Ranks, average_gradients, broadcast_object, broadcast_parameters
from robust_cli.core.errors import UserError
from robust_cli.core.models import build_model
from robust_cli.training.schedules import piecewise_milestones
from robust_cli.training.selection import BestCheckpoint, Validation, WeightAverage

OPTIMIZERS = ("sgd", "adam", "adamw")  # the shipped optimizer/ YAMLs; any torch optimizer through one of the user's own
SCHEDULERS = ("none", "step", "cosine", "cyclic", "piecewise", "onecycle")
SELECTIONS = ("last", "best_clean", "best_robust")
CYCLIC_PEAK = 0.4  # Wong et al. 2020: linear from 0 up to train.lr at 2/5 of the epochs, then down to 0, per step


@dataclass(frozen=True)
class TrainSettings:
    """The config's `train` node as plain values (conf/common.yaml documents each key)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: dict | str  # a `_target_` spec (the optimizer group's YAML) or a shipped one's name
    momentum: float
    nesterov: bool
    weight_decay: float
    scheduler: dict | str | None  # likewise (the scheduler group); `_target_: null` or None: a constant lr
    lr_step: int
    lr_gamma: float
    # the later features, off unless set
    milestones: list | None = None
    eval_train: bool = True
    validate: bool = False
    validate_every: int = 1
    val_eps: float | None = None
    val_attack: dict | None = None
    select: str = "last"
    ema: float | None = None

    @classmethod
    def from_dict(cls, train: dict) -> TrainSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in train.items() if k in names})


@dataclass(frozen=True)
class Defended:
    """What the validation checks read about the defense: its config-group name and its resolved settings."""

    name: str
    settings: dict


def validate_training(t: TrainSettings, val_fraction: float, defense: Defended | None) -> dict:
    """Every training setting checked before any work (one line for a bad value); returns validation_settings."""
    checks = [
        (isinstance(t.epochs, int) and t.epochs >= 1, f"train.epochs must be an integer >= 1, got {t.epochs!r}"),
        (isinstance(t.batch_size, int) and t.batch_size >= 1, f"train.batch_size must be an integer >= 1, got {t.batch_size!r}"),
        (isinstance(t.lr, (int, float)) and t.lr > 0, f"train.lr must be a number > 0, got {t.lr!r}"),
        (isinstance(t.weight_decay, (int, float)) and t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay!r}"),
        (isinstance(t.momentum, (int, float)) and 0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum!r}"),
        (isinstance(t.lr_step, int) and t.lr_step >= 1, f"train.lr_step must be an integer >= 1, got {t.lr_step!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    _check_spec("train.optimizer", t.optimizer, OPTIMIZERS)
    if t.scheduler is not None:
        _check_spec("train.scheduler", t.scheduler, SCHEDULERS)
    piecewise_milestones(t.milestones, t.epochs)
    settings = validation_settings(t, val_fraction, defense)
    ema = t.ema
    if ema is not None and not (isinstance(ema, (int, float)) and not isinstance(ema, bool) and 0 < ema < 1):
        raise UserError(f"train.ema is the decay of the weight average, a number in (0, 1) such as 0.995, or null (off); got {ema!r}")
    return settings


def validation_settings(t: TrainSettings, val_fraction: float, defense: Defended | None) -> dict:
    """The checked validation and selection keys: {validate, every, select, eps}; one line for a bad combination."""
    validate, every, select = t.validate, t.validate_every, t.select
    if not isinstance(validate, bool):
        raise UserError(f"train.validate must be true or false, got {validate!r}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise UserError(f"train.validate_every must be an integer >= 1 (epochs), got {every!r}")
    if select not in SELECTIONS:
        raise UserError(f"train.select must be one of {', '.join(SELECTIONS)}, got {select!r}")
    fraction = val_fraction or 0.0
    if (validate or select != "last") and not fraction > 0:
        raise UserError(
            f"train.validate=true and train.select={select} need a held-out validation split: set data.val_fraction (e.g. 0.1; stratified and seeded)"
        )
    if select == "best_robust" and not validate:
        raise UserError(
            "train.select=best_robust needs the robust validation accuracy: set train.validate=true "
            "(PGD-10 on the data.val_fraction split every train.validate_every epochs)"
        )
    eps = t.val_eps
    if validate:
        defense_settings = defense.settings if defense is not None else {}
        if eps is None:
            eps = defense_settings.get("eps")
            if eps is None:
                name = defense.name if defense is not None else "custom"
                raise UserError(
                    f"train.validate=true: the defense '{name}' has no eps to validate at; set train.val_eps=<budget in the validation attack's norm>"
                )
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
            raise UserError(f"train.val_eps must be a number >= 0 or null (the defense's eps), got {eps!r}")
        if t.val_attack is None or "_target_" not in t.val_attack:
            raise UserError(
                "train.validate=true needs a validation attack: train.val_attack is set by the defaults "
                "(attack@train.val_attack=pgd); choose another with attack@train.val_attack=<attack>"
            )
        attack = validation_attack(t)
        if getattr(attack, "kind", "budgeted") != "budgeted":
            raise UserError(
                f"train.val_attack must be a budgeted attack (pgd, apgd, fgsm, ...): {type(attack).__name__} finds minimal perturbations and has no eps"
            )
        trained_norm = defense_settings.get("norm") or (defense_settings.get("attack") or {}).get("norm")
        val_norm = t.val_attack.get("norm", "linf")
        if t.val_eps is None and trained_norm and val_norm != trained_norm:
            raise UserError(
                f"train.validate=true: the defense trains in {trained_norm} but the validation attack is {val_norm}; "
                f"set train.val_attack.norm={trained_norm} (or give train.val_eps in {val_norm})"
            )
    return {"validate": validate, "every": every, "select": select, "eps": eps}


def validation_attack(t: TrainSettings):
    try:
        return instantiate(t.val_attack)
    except Exception as exc:  # noqa: BLE001 - a bad validation-attack setting is the user's to fix
        raise UserError(f"train.val_attack: {exc.__cause__ or exc}") from None


@dataclass
class TrainingPlan:
    """Everything the loop reads, as plain values and objects (commands/build.py makes it from the config)."""

    entry: Path  # the registry entry <outputs_root>/checkpoints/<key>
    identity: dict  # registry.training_identity: stored in the checkpoint
    config: dict  # the resolved config: stored in the checkpoint and as config.yaml
    seed: int
    train: TrainSettings
    validation: dict  # validation_settings
    model: dict  # the model's settings, for build_model
    defense: Callable  # the training objective: loss, stats = defense(model, x, y)
    engine: Engine
    augment: str  # none | crop_flip
    eval_batch_size: int = 256
    resume: bool = False
    retrain: bool = False
    sync_batchnorm: bool = False
    dataset: str | None = None  # the dataset's config-group name: a resumed checkpoint must have been trained on it
    n_train: Any = None  # data.n_train and data.val_fraction, named in a warning about thin classes
    val_fraction: float = 0.0


def builtin_optimizer(name: str, t: TrainSettings) -> dict:
    """The shipped optimizer `name` as conf/optimizer/<name>.yaml writes it, resolved with `t`'s values."""
    common = {"_partial_": True, "lr": t.lr, "weight_decay": t.weight_decay}
    if name == "sgd":
        return {"_target_": "torch.optim.SGD", "_partial_": True, "lr": t.lr, "momentum": t.momentum, "nesterov": t.nesterov, "weight_decay": t.weight_decay}
    return {"_target_": {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}[name], **common}


def builtin_scheduler(name: str, t: TrainSettings) -> dict:
    """The shipped scheduler `name` as conf/scheduler/<name>.yaml writes it, resolved with `t`'s values."""
    specs = {
        "none": {"_target_": None},
        "cosine": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": t.epochs, "interval": "epoch"},
        "step": {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": t.lr_step, "gamma": t.lr_gamma, "interval": "epoch"},
        "piecewise": {
            "_target_": "robust_cli.training.schedules.Piecewise",
            "_partial_": True,
            "epochs": t.epochs,
            "milestones": t.milestones,
            "gamma": t.lr_gamma,
            "interval": "epoch",
        },
        "cyclic": {"_target_": "robust_cli.training.schedules.Cyclic", "_partial_": True, "epochs": t.epochs, "peak": CYCLIC_PEAK, "interval": "step"},
        "onecycle": {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True, "max_lr": t.lr, "epochs": t.epochs, "interval": "step"},
    }
    return specs[name]


def optimizer_spec(t: TrainSettings) -> dict:
    """train.optimizer as a `_target_` spec: the optimizer group's node, or a shipped one's name (the Python API)."""
    return builtin_optimizer(t.optimizer, t) if isinstance(t.optimizer, str) else dict(t.optimizer)


def scheduler_spec(t: TrainSettings) -> dict:
    if t.scheduler is None:
        return {"_target_": None}
    return builtin_scheduler(t.scheduler, t) if isinstance(t.scheduler, str) else dict(t.scheduler)


def shipped_names(train: dict) -> dict:
    """`train` with an optimizer or scheduler spec that is exactly a shipped one (as its group YAML resolves it) replaced
    by that one's name: the checkpoint identity then reads as it did when these were names, and keys stay."""
    from types import SimpleNamespace

    t = SimpleNamespace(**{f.name: train.get(f.name) for f in fields(TrainSettings)})  # a partial node reads as None
    out = dict(train)
    for key, names, builtin in (("optimizer", OPTIMIZERS, builtin_optimizer), ("scheduler", SCHEDULERS, builtin_scheduler)):
        if isinstance(out.get(key), dict):
            out[key] = next((name for name in names if builtin(name, t) == out[key]), out[key])
    return out


def _importable(path: str) -> bool:
    """Whether a dotted path names something: its longest importable module, then attributes."""
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def _check_spec(key: str, spec, names) -> None:
    group = key.split(".")[-1]
    if isinstance(spec, str):
        if spec not in names:
            raise UserError(f"{key} must be one of {', '.join(names)}, or a YAML of one's own with a _target_ (choose either with {group}=NAME), got {spec!r}")
        return
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise UserError(f"{key} must be a YAML with a _target_ (choose one with {group}=NAME: {', '.join(names)}), got {spec!r}")
    target = spec["_target_"]
    if target is None:
        if group == "optimizer":
            raise UserError(f"{key}: an optimizer needs a _target_ (e.g. torch.optim.SGD)")
        return
    if not _importable(str(target)):
        raise UserError(f"{key}: _target_ {target!r} cannot be imported; give a class such as torch.optim.AdamW")
    if group == "scheduler" and spec.get("interval", "epoch") not in ("epoch", "step"):
        raise UserError(f"{key}.interval must be epoch or step, got {spec.get('interval')!r}")


def make_optimizer(t: TrainSettings, model, steps_per_epoch: int = 1):
    """(optimizer, scheduler, per_step) from the `_target_` specs of train.optimizer and train.scheduler: per_step
    schedulers (interval: step) step after every batch and receive steps_per_epoch, the others step per epoch."""
    spec = optimizer_spec(t)
    if spec.get("_target_") == "torch.optim.SGD" and not spec.get("momentum"):
        spec.pop("nesterov", None)  # torch refuses Nesterov without momentum; it means plain SGD then
    try:
        opt = instantiate(spec)(model.parameters())
        sched_spec = scheduler_spec(t)
        if sched_spec.get("_target_") is None:
            return opt, None, False
        per_step = sched_spec.pop("interval", "epoch") == "step"
        sched = instantiate(sched_spec)(opt, **({"steps_per_epoch": steps_per_epoch} if per_step else {}))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a constructor's complaint about its arguments is the user's to fix
        cause = exc.__cause__ or exc
        raise UserError(f"train.optimizer / train.scheduler: {type(cause).__name__}: {cause}") from None
    return opt, sched, per_step


@torch.no_grad()
def evaluate(model, x, y, device, batch_size=1000):
    """(mean cross-entropy, accuracy) of the model in eval mode; restores the caller's mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for xb, yb in iterate_batches(x, y, batch_size, device):
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    return loss_sum / max(len(y), 1), correct / max(len(y), 1)


def _rng_state(shuffle_gen, augment_gen):
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle_gen.get_state(), "augment": augment_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, shuffle_gen, augment_gen):
    torch.set_rng_state(state["torch"])
    shuffle_gen.set_state(state["shuffle"])
    if "augment" in state:
        augment_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(plan: TrainingPlan, data: DataBundle, device: torch.device, run_dir: Path | None = None, ctx=None, ranks: Ranks = Ranks()) -> dict:
    """Train the plan's model under its defense; publish the checkpoint in the registry; return a summary.

    With several processes (`ranks`, torchrun or SLURM tasks) each takes its part of every batch of train.batch_size
    and the gradients are averaged, so the update is that of one process on the whole batch; rank 0 alone writes."""
    entry, t, seed, augment = plan.entry, plan.train, int(plan.seed), plan.augment
    last_path = entry / "last.pt"
    torch.manual_seed(seed)
    shuffle_gen = torch.Generator().manual_seed(seed + 1)  # the same order on every rank and every device
    augment_gen = torch.Generator().manual_seed(seed + 3)
    check_augment(augment, data.meta.shape)
    model = build_model(plan.model, data.meta).to(device)
    if plan.sync_batchnorm and ranks.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    engine = plan.engine
    fast = engine.fast(model)  # the defense's forward and backward passes; the weights are model's
    scaler = torch.amp.GradScaler(device.type, enabled=engine.precision == "fp16")  # fp16 gradients underflow otherwise
    defense = plan.defense
    epochs, bs = int(t.epochs), int(t.batch_size)
    steps_per_epoch = math.ceil(len(data.train_y) / bs)
    optimizer, scheduler, per_step = make_optimizer(t, model, steps_per_epoch)
    log, start_epoch = [], 1
    on_device = place_on_device(data, device)
    settings = plan.validation
    validation = None
    if settings["validate"]:
        validation = Validation(validation_attack(t), settings["eps"], settings["every"], data.val_x, data.val_y, int(plan.eval_batch_size))
    # the best epoch is tracked for the selection, and with validation also when the last epoch is published
    criterion = settings["select"] if settings["select"] != "last" else ("best_robust" if validation else None)
    best = BestCheckpoint(criterion) if criterion else None
    average = WeightAverage(model, t.ema) if t.ema else None
    scored = average.model if average is not None else model  # the weights that are validated, tested and published
    hooks = defense if hasattr(defense, "after_step") else None

    if plan.resume and last_path.is_file():
        state = registry.load_checkpoint(last_path)
        registry.check_checkpoint_matches(state, model, last_path, plan.dataset)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if average is not None and state.get("average"):
            average.load_state_dict(state["average"])
        if best is not None:
            best.load(state.get("best"))
        _set_rng_state(state["rng"], shuffle_gen, augment_gen)
        log, start_epoch = list(state["log"]), int(state["epoch"]) + 1
        store.console.print(f"[cyan]resuming {entry.name} after epoch {state['epoch']}[/]")
    elif last_path.is_file() and ranks.main:  # an interrupted run of this key: say that it is being replaced, and how to keep it
        epoch = _epoch_of(last_path)
        message = (
            f"resume=true but the interrupted training of {entry.name} cannot be read; training from scratch"
            if plan.resume
            else (f"an interrupted training of {entry.name} stopped after epoch {epoch}; training from scratch (resume=true continues it)")
        )
        _say(ctx, message)
    elif plan.resume and ranks.main:
        _say(ctx, f"resume=true but there is nothing to resume for {entry.name}: training from scratch")
    if ranks.distributed:
        broadcast_parameters(model)
        torch.manual_seed(seed * 7919 + ranks.rank)  # each rank its own draws (attack starts, noise) for its examples

    counts = torch.bincount(data.train_y.cpu(), minlength=data.meta.num_classes)
    if int(counts.min()) < 5 and ranks.main:  # a subset or a validation split this large leaves a class almost untrained
        cls = int(counts.argmin())
        _say(
            ctx,
            f"class {cls} has {int(counts[cls])} training examples (data.n_train={plan.n_train}, data.val_fraction={plan.val_fraction}); "
            "fewer than 5 per class trains a model that cannot learn it: raise data.n_train or lower data.val_fraction",
        )
    config = plan.config
    environment = {
        **registry.environment(),
        "device": str(device),
        **engine.describe(model),
        "augment": augment,
        "data_on_device": on_device,
        "processes": ranks.world,
    }

    def checkpoint(epoch, complete):
        if not ranks.main:
            return
        state = {
            "state_dict": model.state_dict(),
            "average": average.state_dict() if average is not None else None,
            "best": best.state() if best is not None else None,
            "config": config,
            "identity": plan.identity,
            "epoch": epoch,
            "epochs": epochs,
            "complete": complete,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "rng": _rng_state(shuffle_gen, augment_gen),
            "log": log,
            "versions": {"robust": robust_cli.__version__, "torch": str(torch.__version__)},
            "environment": environment,
        }
        store.save_torch(last_path, state)
        if run_dir:
            store.save_torch(Path(run_dir) / "model.pt", published_state(state, "last"))
        for target_dir in {entry, *([Path(run_dir)] if run_dir else [])}:
            store.write_csv(target_dir / "train_log.csv", log)

    remaining = max(epochs - start_epoch + 1, 0)
    progress = ctx.progress(remaining * steps_per_epoch, "training") if ctx else _null_progress()
    with progress as advance:
        for epoch in range(start_epoch, epochs + 1):
            model.train()
            if hooks is not None:
                hooks.begin_epoch(epoch)
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum = torch.zeros((), device=device)
            stat_sums: dict[str, float] = {}
            seen = 0
            for step, (xb, yb) in enumerate(iterate_batches(data.train_x, data.train_y, bs, device, shuffle_gen), 1):
                if augment == "crop_flip":  # drawn for the whole batch, so every rank draws the same
                    xb = crop_flip(xb, augment_gen)
                if ranks.distributed:  # this rank's part of the batch
                    xb, yb = xb.tensor_split(ranks.world)[ranks.rank], yb.tensor_split(ranks.world)[ranks.rank]
                optimizer.zero_grad(set_to_none=True)
                loss, stats = defense(fast, xb, yb)
                total = loss + model.regularization()
                if not torch.isfinite(total):
                    raise UserError(
                        f"training diverged: loss is {total.item()} at epoch {epoch}, step {step}; the last good checkpoint "
                        f"(epoch {epoch - 1}) is kept at '{last_path}'; lower train.lr or check the defense parameters"
                    )
                scaler.scale(total).backward()
                if ranks.distributed:
                    average_gradients(model, ranks.world)
                scaler.step(optimizer)
                scaler.update()
                if hooks is not None:  # AWP takes its weight perturbation off again
                    hooks.after_step()
                if average is not None:
                    average.update(model)
                if per_step:
                    scheduler.step()
                n = len(yb)
                seen += n
                loss_sum += loss.detach() * n
                for name, value in stats.items():
                    stat_sums[name] = stat_sums.get(name, 0.0) + float(value) * n
                advance()
            if scheduler is not None and not per_step:
                scheduler.step()
            if ranks.distributed:  # the epoch's loss over all ranks' parts
                import torch.distributed as dist

                totals = torch.stack([loss_sum, torch.tensor(float(seen), device=device)])
                dist.all_reduce(totals)
                loss_sum, seen = totals[0], int(totals[1].item())
            train_loss, train_acc = evaluate(scored, data.train_x, data.train_y, device) if t.eval_train else (loss_sum.item() / seen, float("nan"))
            test_loss, test_acc = evaluate(scored, data.test_x, data.test_y, device)
            row = {"epoch": epoch, "train_loss": loss_sum.item() / seen, "train_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc}
            if data.val_x is not None:
                row["val_loss"], row["val_accuracy"] = evaluate(scored, data.val_x, data.val_y, device)
            if validation is not None:
                row["val_robust_accuracy"] = float("nan")
                if validation.due(epoch, epochs):
                    row["val_accuracy"], row["val_robust_accuracy"] = validation(scored, device)
            if best is not None:
                best.offer(epoch, row, scored)
            row["lr"] = lr
            row.update({name: total / seen for name, total in stat_sums.items()})
            row["seconds"] = time.perf_counter() - started
            log.append(row)
            checkpoint(epoch, complete=epoch == epochs)
            if ranks.main:
                store.live("train", row, epoch)  # MLflow / TensorBoard, when a tracking callback is on
            advance(0, description=_epoch_line(epoch, epochs, row, best))
            if os.environ.get("ROBUST_STOP_AFTER_EPOCH") == str(epoch):  # test hook: simulate a kill between epochs
                raise SystemExit(3)

    if start_epoch > epochs:  # resume of an already complete run: nothing to train, republish
        store.console.print(f"[cyan]{entry.name} already trained for {epochs} epochs[/]")
    selected = None
    if ranks.main:
        store.write_text(entry / "config.yaml", OmegaConf.to_yaml(plan.config))
        selected = publish(last_path, entry, settings["select"], Path(run_dir) if run_dir else None)
    return summary_of({"epochs": epochs, "log": log, "selected": selected}, entry / "model.pt")


def _epoch_line(epoch, epochs, row, best) -> str:
    """The progress line after an epoch: its test and validation accuracies, and the best epoch so far."""
    parts = [f"training · epoch {epoch}/{epochs}", f"test {row['test_accuracy']:.3f}"]
    if row.get("val_accuracy") is not None:
        parts.append(f"val {row['val_accuracy']:.3f}")
    robust = row.get("val_robust_accuracy")
    if robust is not None and robust == robust:
        parts.append(f"val robust {robust:.3f}")
    if best is not None and best.epoch is not None:
        parts.append(f"best {best.column} {best.value:.3f} @ {best.epoch}")
    return " · ".join(parts)


def published_state(state: dict, which: str) -> dict:
    """The checkpoint later commands load, from the resumable one: `last` = the final weights (their average when
    train.ema is set), `best` = the best validation epoch's. Optimizer and RNG states stay (resume reads last.pt)."""
    out = {k: v for k, v in state.items() if k not in ("average", "best")}
    if which == "best":
        out.update(state_dict=state["best"]["state_dict"], epoch=state["best"]["epoch"])
    elif state.get("average") is not None:
        out["state_dict"] = state["average"]
    if state.get("best") is not None or state.get("average") is not None:
        out["selected"] = selection_record(state, which)
    return out


def selection_record(state: dict, which: str) -> dict:
    """What run.json and the published checkpoint say about the chosen epoch, and why."""
    if which == "best":
        best = state["best"]
        return {
            "checkpoint": "best",
            "epoch": best["epoch"],
            "criterion": best["column"],
            "value": best["value"],
            "why": f"highest {best['column']} of the validated epochs (ties: the earlier)",
        }
    why = "the final epoch's weight average (train.ema)" if state.get("average") is not None else "train.select=last: the final epoch"
    return {"checkpoint": "last", "epoch": state.get("epoch"), "criterion": None, "value": None, "why": why}


def publish(last_path: Path, entry: Path, select: str, run_dir: Path | None) -> dict | None:
    """Publish the selected checkpoint as entry/model.pt (and run_dir/model.pt); with validation also keep
    model.best.pt and model.last.pt beside it. Returns what was selected (None: the last epoch, no validation)."""
    state = registry.load_checkpoint(last_path)
    if state.get("best") is None and state.get("average") is None:
        _publish(last_path, entry / "model.pt")
        return None
    validated = state.get("best") is not None and state["best"].get("epoch") is not None  # not when resumed at the end
    chosen = published_state(state, "best" if validated and select != "last" else "last")
    if validated:
        store.save_torch(entry / "model.best.pt", published_state(state, "best"))
        store.save_torch(entry / "model.last.pt", published_state(state, "last"))
    store.save_torch(entry / "model.pt", chosen)
    if run_dir is not None:
        store.save_torch(run_dir / "model.pt", chosen)
    return chosen["selected"]


def _publish(source: Path, target: Path) -> None:
    """Make the finished checkpoint visible under its registry name in one atomic rename."""
    tmp = target.with_name(f".{target.name}.publish")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        import shutil

        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class _null_progress:
    def __enter__(self):
        return lambda n=1, description=None: None

    def __exit__(self, *exc):
        return False


def _epoch_of(path: Path):
    try:
        return registry.load_checkpoint(path).get("epoch")
    except UserError:
        return None


def _say(ctx, message: str) -> None:
    if ctx is not None:
        ctx.warn(message)
    else:
        store.console.print(f"[yellow]{message}[/]")


def summary_of(state: dict, path: Path) -> dict:
    log = state.get("log") or [{}]
    selected = state.get("selected")
    chosen = next((row for row in log if selected and row.get("epoch") == selected.get("epoch")), log[-1])
    out = {"epochs": state.get("epochs"), "test_accuracy": chosen.get("test_accuracy"), "train_accuracy": chosen.get("train_accuracy"), "checkpoint": str(path)}
    if selected:
        out["selected"] = selected
    return out


def train_or_reuse(plan: TrainingPlan, data: DataBundle, device: torch.device, run_dir: Path | None = None, ctx=None, ranks: Ranks = Ranks()) -> dict:
    """`robust train`: the registry's finished checkpoint for this key if there is one (unless retrain=true, which
    first moves it to a numbered version), else train. Rank 0 holds the key's lock throughout and decides for all."""
    entry = plan.entry
    published = entry / "model.pt"
    with registry.training_lock(entry) if ranks.main else contextlib.nullcontext():
        if ranks.main:
            registry.clean_stale_temporaries(entry)  # a kill -9 leaves them; nobody else can be writing while we hold the lock
        reuse = broadcast_object(published.is_file() and not plan.retrain, ranks)
        if reuse:
            state = registry.load_checkpoint(published)
            summary = summary_of(state, published)
            if ranks.main:
                _say(
                    ctx,
                    f"{entry.name} is already trained (test accuracy {summary['test_accuracy']:.4f}): reusing {published}; "
                    "retrain=true trains it again and keeps this one as a numbered version",
                )
            if run_dir is not None and ranks.main:
                import shutil

                shutil.copyfile(published, Path(run_dir) / "model.pt")
                store.write_csv(Path(run_dir) / "train_log.csv", state.get("log") or [])
            summary["reused"] = True
            return summary
        if published.is_file() and ranks.main:
            version = registry.archive_published(entry)
            _say(ctx, f"retrain=true: the previous checkpoint of {entry.name} is kept as {entry / f'model.v{version}.pt'}")
        summary = train(plan, data, device, run_dir=run_dir, ctx=ctx, ranks=ranks)
        summary["reused"] = False
        return summary

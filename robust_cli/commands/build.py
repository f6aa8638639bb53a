"""The config becomes plain objects here, once per command: dataset, data, model, engine, checkpoint entry,
training plan. Every layer below `commands/` takes these objects and values, never the composed config, so a
reader of a function sees every setting it depends on in its signature.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from robust_cli.core import registry, store
from robust_cli.core.batches import load_data, resolve_augment
from robust_cli.core.data import DataBundle, Dataset
from robust_cli.core.engine import Engine
from robust_cli.core.errors import UserError
from robust_cli.core.models import Classifier, build_model, weights_file, weights_preprocessing
from robust_cli.training.loop import Defended, TrainingPlan, TrainSettings, shipped_names, train, validate_training


def resolved(node):
    """A config node as plain Python values, its interpolations resolved inside the full config."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def choice(cfg, group: str) -> str:
    """The option chosen for a config group ('fc200_200_10'), or 'custom'."""
    return store.choice(cfg.get("choices"), group)


def described(cfg) -> dict:
    """{group: option} that every figure names: model, dataset, defense, and the attack when one was chosen."""
    out = {group: choice(cfg, group) for group in ("model", "dataset", "defense") if group in cfg}
    if "attack" in cfg and (cfg.get("choices") or {}).get("attack"):
        out["attack"] = choice(cfg, "attack")
    return out


# ----------------------------------------------------------------------------------------------- data
def make_dataset(cfg) -> Dataset:
    """cfg.dataset instantiated, with the resize and centre crop of the model's torchvision weights (weights_sizes)."""
    applied, _ = weights_sizes(cfg)
    node = cfg.dataset
    if applied:
        node = OmegaConf.create({**OmegaConf.to_container(cfg.dataset, resolve=False), **applied}, parent=cfg)
    return instantiate(node)


def weights_sizes(cfg) -> tuple[dict, list[str]]:
    """(the dataset sizes to take from the model's torchvision weights, one warning per size kept against them).

    resnet50's IMAGENET1K_V2 is evaluated at resize 232 / crop 224, efficientnet_b3's at 320/300: accuracy under any
    other preprocessing is not the published model's. A size given on the command line wins, with a warning."""
    sizes = weights_preprocessing(cfg.get("model"))
    if not sizes or not all(k in cfg.dataset for k in sizes):
        return {}, []
    given = _command_line_keys()
    applied = {k: v for k, v in sizes.items() if f"dataset.{k}" not in given}
    kept = [
        f"dataset.{k}={cfg.dataset[k]} as given; model.weights={cfg.model.weights} was evaluated with {k} {v}"
        for k, v in sizes.items()
        if k not in applied and int(cfg.dataset[k]) != v
    ]
    return applied, kept


def _command_line_keys() -> set[str]:
    """The keys the user set on the command line (Hydra's task overrides), when Hydra runs this job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.lstrip("+~").partition("=")[0] for o in HydraConfig.get().overrides.task}


def make_data(cfg, dataset: Dataset | None = None) -> DataBundle:
    """The dataset of the config with the `data.n_train/n_test/val_fraction` subsets applied."""
    d = cfg.data
    return load_data(
        dataset or make_dataset(cfg),
        str(d.root),
        bool(d.download),
        int(cfg.seed),
        d.n_train,
        d.n_test,
        float(d.val_fraction or 0.0),
        float(d.get("memory_gb", 8)),
    )


def augment(cfg, dataset: Dataset | None = None) -> str:
    """data.augment with auto resolved to the dataset's default."""
    return resolve_augment(cfg.data.get("augment", "none"), lambda: (dataset or make_dataset(cfg)).default_augment)


# ----------------------------------------------------------------------------------------------- model and engine
def make_model(cfg, meta) -> Classifier:
    return build_model(resolved(cfg.model), meta)


def pretrained(cfg) -> bool:
    """Whether the configured model brings its own weights (model.weights): then nothing is trained for it."""
    return bool(cfg.model.get("weights")) if "model" in cfg else False


def make_engine(cfg, device: torch.device, warn=None) -> Engine:
    return Engine.create(device, cfg.get("precision", "fp32"), cfg.get("compile", False), cfg.get("channels_last", "auto"), warn)


# ----------------------------------------------------------------------------------------------- checkpoints
def identity(cfg) -> dict:
    """registry.training_identity of the config: what decides the trained weights."""
    return registry.training_identity(
        resolved(cfg.model),
        resolved(cfg.dataset),
        resolved(cfg.defense),
        shipped_names(resolved(cfg.train)),
        cfg.seed,
        cfg.data.n_train,
        cfg.data.val_fraction,
        augment(cfg) if "dataset" in cfg else "none",
    )


def checkpoint_key(cfg) -> str:
    return registry.checkpoint_key(identity(cfg), cfg.get("choices"))


def checkpoint_dir(cfg) -> Path:
    return registry.checkpoint_dir(cfg.outputs_root, checkpoint_key(cfg))


def published_checkpoint(cfg) -> Path:
    """The checkpoint later commands use: `checkpoint=PATH` if given, else this config's registry entry."""
    if cfg.get("checkpoint"):
        return Path(str(cfg.checkpoint))
    return checkpoint_dir(cfg) / "model.pt"


# ----------------------------------------------------------------------------------------------- training
def train_settings(cfg) -> TrainSettings:
    return TrainSettings.from_dict(resolved(cfg.train))


def check_training(cfg) -> dict:
    """The training settings checked (one line for a bad value); returns the validation settings."""
    defense = Defended(choice(cfg, "defense"), resolved(cfg.defense) or {}) if cfg.get("defense") is not None else None
    return validate_training(train_settings(cfg), cfg.data.get("val_fraction", 0.0) or 0.0, defense)


def make_training_plan(cfg, device: torch.device, warn=None) -> TrainingPlan:
    dataset = make_dataset(cfg)
    return TrainingPlan(
        entry=checkpoint_dir(cfg),
        identity=identity(cfg),
        config=resolved(cfg),
        seed=int(cfg.seed),
        train=train_settings(cfg),
        validation=check_training(cfg),
        model=resolved(cfg.model),
        defense=instantiate(cfg.defense),
        engine=make_engine(cfg, device, warn),
        augment=augment(cfg, dataset),
        eval_batch_size=int(cfg.data.get("eval_batch_size", 256) or 256),
        resume=bool(cfg.get("resume")),
        retrain=bool(cfg.get("retrain")),
        sync_batchnorm=bool(cfg.get("sync_batchnorm")),
        dataset=choice(cfg, "dataset"),
        n_train=cfg.data.n_train,
        val_fraction=cfg.data.val_fraction,
    )


def trained_model(cfg, ctx):
    """(model in eval mode on ctx.device, data, checkpoint path) for this config; trains it first if missing."""
    data = make_data(cfg)
    if pretrained(cfg) and not cfg.get("checkpoint"):  # the model brings its weights (model.weights): use it as it is
        model = make_model(cfg, data.meta).to(ctx.device).eval()
        path = weights_file(resolved(cfg.model))
        ctx.record["checkpoint"] = str(path)
        return model, data, path
    path = published_checkpoint(cfg)
    if not path.is_file():
        if cfg.get("checkpoint"):
            registry.load_checkpoint(path)  # raises the one-line error that fits (missing file, a directory)
        if not cfg.get("train_if_missing", True):
            raise UserError(f"no trained checkpoint for this config at '{path}'; run `robust train` with the same overrides or set train_if_missing=true")
        with registry.training_lock(path.parent):
            if not path.is_file():  # another job may have trained it while we waited
                registry.clean_stale_temporaries(path.parent)
                store.console.print(f"[cyan]no checkpoint for this config: training it first ({path.parent.name})[/]")
                train(make_training_plan(cfg, ctx.device), data, ctx.device, run_dir=None)
    state = registry.load_checkpoint(path)
    model = make_model(cfg, data.meta)
    registry.check_checkpoint_matches(state, model, path, choice(cfg, "dataset"))
    model.load_state_dict(state["state_dict"])
    model.to(ctx.device).eval()
    ctx.record["checkpoint"] = str(path)
    return model, data, path

"""Every check of a job's values that needs no data, before any work: one line for a bad value."""

import torch

from robust_cli.commands import GROUPS, build
from robust_cli.core.engine import parse_shard, shard_device
from robust_cli.core.errors import UserError


def validate_common(cfg) -> None:

    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2^32) (numpy and torch seed generators take no other), got {cfg.seed!r}")
    for key in ("n_train", "n_test"):
        value = cfg.data[key]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"data.{key} must be a positive integer or null, got {value!r}")
    if cfg.data.get("shard") is not None:
        parse_shard(cfg.data.shard)
    if not isinstance(cfg.data.val_fraction, (int, float)) or not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction!r}")
    if "train" in cfg:  # every command may train its model first (train_if_missing): its settings, before any work
        build.check_training(cfg)
    if "dataset" in cfg:
        dataset = build.make_dataset(cfg)
        if "model" in cfg:  # the model must fit the dataset: build it once on the metadata (cheap)
            build.make_model(cfg, dataset.meta)
        dataset.check_available(str(cfg.data.root), bool(cfg.data.download))


def chosen_options(hydra_choices) -> dict:
    """{group: option} of the config groups that were chosen, as recorded in cfg.choices and run.json."""
    return {g: hydra_choices.get(g) for g in GROUPS if hydra_choices.get(g)}


def validate_job(module, cfg) -> torch.device:
    """Every check of a job's values that needs no data: device, threads, common keys, the command's own."""
    device = shard_device(cfg.get("device", "auto"), cfg.data.get("shard") if "data" in cfg else None)
    threads = cfg.get("threads")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise UserError(f"threads must be a positive integer or null, got {threads!r}")
        torch.set_num_threads(threads)
    if "precision" in cfg:  # precision, compile, channels_last: one line now, not after training
        build.make_engine(cfg, device)
    if getattr(module, "NEEDS_COMMON_VALIDATION", True):
        validate_common(cfg)
    from robust_cli.core.engine import ranks_from_environment

    if ranks_from_environment().distributed and not getattr(module, "DISTRIBUTED", False):
        raise UserError(
            "only robust train runs as several processes (torchrun, SLURM tasks); split an evaluation by examples "
            "instead: one job per GPU with data.shard=I/N, merged by robust collect"
        )
    if "data" in cfg and cfg.data.get("shard") is not None and not getattr(module, "SHARDABLE", False):
        raise UserError(f"data.shard splits the evaluation of robust attack only; drop it here (got data.shard={cfg.data.shard})")
    if cfg.get("table") is not None:  # an experiment preset's paper tables: a mistake in one shows now, not at collect
        from robust_cli.results.paper_tables import validate_block

        validate_block(cfg.table, f"experiment={build.choice(cfg, 'experiment')}")
    if hasattr(module, "validate"):
        module.validate(cfg)
    return device

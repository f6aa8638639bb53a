"""`robust train`: train the configured model under the configured defense."""

from hydra.utils import instantiate

from robust_cli.commands import build
from robust_cli.core.engine import init_distributed, ranks_from_environment
from robust_cli.core.errors import UserError
from robust_cli.training.loop import train_or_reuse

DISTRIBUTED = True  # torchrun --nproc_per_node=N -m robust_cli train ...: data-parallel over N processes
BATCH_SETTINGS = "train.batch_size"


def validate(cfg):
    # the training settings themselves are checked for every command by commands/checks.validate_common (any command may train)
    if cfg.get("checkpoint"):
        raise UserError(
            f"robust train does not read checkpoint= (got '{cfg.checkpoint}'): it trains this config's registry entry, "
            "and resume=true continues that entry's interrupted run; drop checkpoint="
        )
    if cfg.get("resume") and cfg.get("retrain"):
        raise UserError("resume=true and retrain=true contradict each other: resume continues the interrupted training, retrain starts again")
    try:
        instantiate(cfg.defense)
    except Exception as exc:  # noqa: BLE001 - a bad defense parameter is the user's to fix
        cause = exc.__cause__ or exc
        raise UserError(f"defense: {cause}") from None


def run(cfg, ctx):
    data = build.make_data(cfg)
    ranks = ranks_from_environment()
    if ranks.distributed:
        init_distributed(ranks, ctx.device)
        if cfg.train.batch_size < ranks.world:
            raise UserError(f"train.batch_size={cfg.train.batch_size} is split over {ranks.world} processes: it must be at least {ranks.world}")
        ctx.record["processes"] = ranks.world
    try:
        summary = train_or_reuse(
            build.make_training_plan(cfg, ctx.device, ctx.warn), data, ctx.device, run_dir=ctx.dir if ranks.main else None, ctx=ctx, ranks=ranks
        )
        if ranks.distributed:
            import torch.distributed as dist

            # rank 0 still publishes the checkpoint when the others are done: a rank that tears gloo down while its
            # peer is still connected can abort at exit (SIGABRT), so on success all leave together
            dist.barrier()
    finally:
        if ranks.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    selected = summary.get("selected")
    if selected:  # which epoch the registry publishes, and why (train.select, train.ema)
        ctx.record["selected"] = selected
    ctx.headline(
        model=build.choice(cfg, "model"),
        dataset=build.choice(cfg, "dataset"),
        defense=build.choice(cfg, "defense"),
        epochs=summary["epochs"],
        train_accuracy=summary["train_accuracy"],
        test_accuracy=summary["test_accuracy"],
        checkpoint=summary["checkpoint"],
        reused=summary["reused"],
        **({"selected_epoch": selected["epoch"], "selected_by": selected["criterion"] or "last"} if selected else {}),
    )

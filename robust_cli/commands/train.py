"""`robust train`: train the configured model under the configured defense."""
from hydra.utils import instantiate

from robust_cli import store
from robust_cli.data import load_data
from robust_cli.errors import UserError
from robust_cli.train import train_or_reuse, validate_training


def validate(cfg):
    validate_training(cfg)
    if cfg.get("checkpoint"):
        raise UserError(f"robust train does not read checkpoint= (got '{cfg.checkpoint}'): it trains this config's registry entry, "
                        "and resume=true continues that entry's interrupted run; drop checkpoint=")
    if cfg.get("resume") and cfg.get("retrain"):
        raise UserError("resume=true and retrain=true contradict each other: resume continues the interrupted training, retrain starts again")
    try:
        instantiate(cfg.defense)
    except Exception as exc:  # a bad defense parameter is the user's to fix
        cause = exc.__cause__ or exc
        raise UserError(f"defense: {cause}") from None


def run(cfg, ctx):
    data = load_data(cfg)
    summary = train_or_reuse(cfg, data, ctx.device, run_dir=ctx.dir, ctx=ctx)
    ctx.headline(
        model=store.choice(cfg, "model"),
        dataset=store.choice(cfg, "dataset"),
        defense=store.choice(cfg, "defense"),
        epochs=summary["epochs"],
        train_accuracy=summary["train_accuracy"],
        test_accuracy=summary["test_accuracy"],
        checkpoint=summary["checkpoint"],
        reused=summary["reused"],
    )

"""`robust info`: the composed config and the checkpoint this config resolves to. Writes nothing."""
from omegaconf import OmegaConf
from rich.console import Console

from robust_cli import store

WRITES_RUN_DIR = False


def run(cfg, ctx):
    out = Console()
    out.print(OmegaConf.to_yaml(cfg, resolve=True), highlight=False, markup=False)
    path = store.published_checkpoint(cfg)
    if path.is_file():
        state = store.load_checkpoint(path)
        status = f"exists (epoch {state.get('epoch')} of {state.get('epochs')})"
    elif not cfg.get("checkpoint") and (path.parent / "last.pt").is_file():
        status = "not finished: an interrupted training exists (robust train resume=true continues it)"
    else:
        status = "missing: " + ("commands train it first (train_if_missing=true)" if cfg.train_if_missing else "run robust train with these overrides")
    out.print(f"checkpoint: {path}\nstatus: {status}", highlight=False)

"""`robust info`: the composed config and the checkpoint this config resolves to. Writes nothing."""
from omegaconf import OmegaConf
from rich.console import Console

from robust_cli import registry

WRITES_RUN_DIR = False


def run(cfg, ctx):
    out = Console()
    out.print(OmegaConf.to_yaml(cfg, resolve=True), highlight=False, markup=False)
    path = registry.published_checkpoint(cfg)
    training = registry.lock_owner(path.parent) if not cfg.get("checkpoint") else None
    if path.is_file():
        state = registry.load_checkpoint(path)
        status = f"exists (epoch {state.get('epoch')} of {state.get('epochs')})"
        versions = sorted(path.parent.glob("model.v*.pt"))
        if versions and not cfg.get("checkpoint"):
            status += f"; earlier versions kept: {', '.join(v.name for v in versions)}"
    elif cfg.get("checkpoint") and path.is_dir():
        status = "not a file: checkpoint= names a directory, so every command refuses it; point it at a .pt file"
    elif cfg.get("checkpoint"):
        status = "missing: checkpoint= names no file here, so every command refuses it; fix the path or drop checkpoint="
    elif training is not None:
        status = f"being trained now by pid {training['pid']} on {training['host']}"
    elif (path.parent / "last.pt").is_file():
        status = "not finished: its training was interrupted or died (robust train resume=true continues it)"
    else:
        status = "missing: " + ("commands train it first (train_if_missing=true)" if cfg.train_if_missing else "run robust train with these overrides")
    out.print(f"checkpoint: {path}\nstatus: {status}", highlight=False)

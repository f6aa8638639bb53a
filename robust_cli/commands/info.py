"""`robust info`: the composed config and the checkpoint this config resolves to. Writes nothing."""

from omegaconf import OmegaConf
from rich.console import Console

from robust_cli.commands import build
from robust_cli.core import registry

WRITES_RUN_DIR = False


def run(cfg, ctx):
    out = Console()
    out.print(OmegaConf.to_yaml(cfg, resolve=True), highlight=False, markup=False)
    path = build.published_checkpoint(cfg)
    lock = registry.lock_state(path.parent) if not cfg.get("checkpoint") else None
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
    elif lock is not None and lock[0] == "live":
        status = f"being trained now by pid {lock[1].get('pid')} on {lock[1].get('host')}"
    elif (path.parent / "last.pt").is_file():
        epoch = registry.load_checkpoint(path.parent / "last.pt").get("epoch")
        how = f"died (pid {lock[1].get('pid')} on {lock[1].get('host')} is gone)" if lock is not None else "was interrupted"
        status = f"not finished: its training {how} after epoch {epoch}; robust train resume=true continues it"
    else:
        status = "missing: " + ("commands train it first (train_if_missing=true)" if cfg.train_if_missing else "run robust train with these overrides")
    out.print(f"checkpoint: {path}\nstatus: {status}", highlight=False)

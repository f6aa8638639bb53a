"""Run directories, atomic files, checkpoints and the fingerprint registry.

A finished training run publishes its checkpoint at `<outputs_root>/checkpoints/<key>/model.pt`, where <key> names
model, dataset, defense, seed and a hash of everything that changes the trained weights. Later commands find
"the model for this config" there; `checkpoint=PATH` overrides. While training, `last.pt` beside it holds the
latest epoch (for `resume=true`), and `lock` keeps two jobs from training the same key at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from robust_cli.errors import UserError

console = Console(stderr=True)


# ----------------------------------------------------------------------------------------------- atomic files
def atomic_write(path, write) -> Path:
    """Write through `write(file_object)` into a temporary file beside `path`, then rename over it.

    A crash mid-write leaves the previous file (or none), never a truncated one that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def _json_safe(obj):
    """NaN and +-inf are not JSON (JSON.parse rejects them): write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(_json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")


def write_csv(path, rows) -> Path:
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return atomic_write(path, lambda f: f.write(frame.to_csv(index=False).encode()))


def save_torch(path, obj) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def load_checkpoint(path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint '{path}' does not exist; check the path or drop checkpoint= to use this config's own") from None
    except Exception as exc:
        raise UserError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}); it is corrupt or not a robust checkpoint: retrain it") from None


# ----------------------------------------------------------------------------------------------- fingerprints
def training_identity(cfg) -> dict:
    """The part of a config that decides the trained weights (not the device, paths or evaluation settings)."""
    # resolve each node inside the full config: an interpolation such as model.k: ${k} points outside the node
    resolved = lambda node: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node  # noqa: E731
    keep = {k: resolved(cfg[k]) for k in ("model", "dataset", "defense", "train", "seed")}
    if isinstance(keep["model"], dict):  # test-time noise changes the evaluation, not the trained weights
        keep["model"] = {k: v for k, v in keep["model"].items() if k != "test_noise"}
    keep["data"] = {k: resolved(cfg.data[k]) for k in ("n_train", "val_fraction")}
    return keep


def choice(cfg, group: str) -> str:
    """The option name chosen for a config group (e.g. 'fc200_200_10'), recorded by the CLI in `cfg.choices`."""
    choices = cfg.get("choices") or {}
    return str(choices.get(group) or "custom")


def checkpoint_key(cfg) -> str:
    digest = hashlib.sha256(json.dumps(training_identity(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"{choice(cfg, 'model')}-{choice(cfg, 'dataset')}-{choice(cfg, 'defense')}-s{cfg.seed}-{digest}"


def checkpoint_dir(cfg) -> Path:
    return Path(str(cfg.outputs_root)) / "checkpoints" / checkpoint_key(cfg)


def published_checkpoint(cfg) -> Path:
    """The checkpoint later commands use: `checkpoint=PATH` if given, else this config's registry entry."""
    if cfg.get("checkpoint"):
        return Path(str(cfg.checkpoint))
    return checkpoint_dir(cfg) / "model.pt"


@contextlib.contextmanager
def training_lock(directory: Path, poll_seconds: float = 2.0):
    """Hold `directory/lock` (atomic O_EXCL create). Waits while another live process holds it; clears stale ones."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    announced = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        except FileExistsError:
            if _lock_is_stale(lock):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            if not announced:
                console.print(f"[yellow]waiting for another job training {directory.name}[/]")
                announced = True
            time.sleep(poll_seconds)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _lock_is_stale(lock: Path) -> bool:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        # a lock being written right now has no content yet; only an old unreadable one is stale
        with contextlib.suppress(OSError):
            return time.time() - lock.stat().st_mtime > 60
        return False
    if owner.get("host") != socket.gethostname():
        return False  # cannot check a process on another node; the lock is released when that job ends
    try:
        os.kill(int(owner["pid"]), 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


# ----------------------------------------------------------------------------------------------- run context
class RunContext:
    """What a command gets besides its config: its directory, device, atomic writers, warnings and headline."""

    def __init__(self, cfg, directory: Path, device: torch.device, record: dict):
        self.cfg = cfg
        self.dir = Path(directory)
        self.device = device
        self.record = record  # run.json contents, rewritten by the CLI at the end
        self.headline_values: dict = {}

    def path(self, name) -> Path:
        return self.dir / name

    def write_csv(self, name, rows) -> Path:
        return write_csv(self.path(name), rows)

    def save_figure(self, name, fig) -> Path:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format=Path(name).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        return atomic_write(self.path(name), lambda f: f.write(buf.getvalue()))

    def save_torch(self, name, obj) -> Path:
        return save_torch(self.path(name), obj)

    def warn(self, message: str) -> None:
        console.print(f"[bold yellow]warning:[/] {message}")
        self.record.setdefault("warnings", []).append(message)

    def headline(self, **values) -> None:
        self.headline_values.update(values)
        self.record["headline"] = self.headline_values

    @contextlib.contextmanager
    def progress(self, total: int, description: str):
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and os.environ.get("ROBUST_PROGRESS") != "1") as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


def load_trained_model(cfg, ctx: RunContext):
    """(model in eval mode on ctx.device, data, checkpoint path) for this config; trains it first if missing."""
    from robust_cli.data import load_data
    from robust_cli.models import build_model
    from robust_cli.train import check_checkpoint_matches, train

    data = load_data(cfg)
    path = published_checkpoint(cfg)
    if not path.is_file():
        if cfg.get("checkpoint"):
            raise UserError(f"checkpoint '{path}' does not exist; check the path or drop checkpoint= to use this config's own")
        if not cfg.get("train_if_missing", True):
            raise UserError(f"no trained checkpoint for this config at '{path}'; run `robust train` with the same overrides or set train_if_missing=true")
        with training_lock(path.parent):
            if not path.is_file():  # another job may have trained it while we waited
                console.print(f"[cyan]no checkpoint for this config: training it first ({path.parent.name})[/]")
                train(cfg, data, ctx.device, run_dir=None)
    state = load_checkpoint(path)
    model = build_model(cfg, data.meta)
    check_checkpoint_matches(state, model, path)
    model.load_state_dict(state["state_dict"])
    model.to(ctx.device).eval()
    ctx.record["checkpoint"] = str(path)
    return model, data, path

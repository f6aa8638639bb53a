"""The checkpoint registry: where "the model for this config" lives, and the rules that keep it trustworthy.

A finished training run publishes its checkpoint at `<outputs_root>/checkpoints/<key>/model.pt`, where <key> names
model, dataset, defense, seed and a hash of everything that changes the trained weights. Later commands find it
there; `checkpoint=PATH` overrides. While training, `last.pt` beside it holds the latest epoch (for `resume=true`),
and `lock` keeps two jobs from training the same key at once. A published checkpoint is never replaced silently:
`retrain=true` first moves it to `model.v1.pt` (then v2, ...) with its log and config.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
import warnings
from pathlib import Path

from omegaconf import OmegaConf

from robust_cli import store
from robust_cli.errors import UserError


def load_checkpoint(path) -> dict:
    import torch

    path = Path(path)
    if path.is_dir():
        inside = " (model.pt inside it is the published one)" if (path / "model.pt").is_file() else ""
        raise UserError(f"checkpoint '{path}' is a directory, not a checkpoint file; point checkpoint= at a .pt file{inside}")
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist; check the path or drop checkpoint= to use this config's own")
    try:
        with warnings.catch_warnings():  # torch warns in two lines before raising on a bad file: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}); it is corrupt or not a robust checkpoint: retrain it") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"checkpoint '{path}' is not a robust checkpoint (no state_dict); train it with robust train")
    return state


def check_checkpoint_matches(state: dict, model, path, cfg=None) -> None:
    """A checkpoint must fit the config: trained on the same dataset, same parameter names and shapes."""
    trained = (state.get("config") or {}).get("choices", {}).get("dataset") if isinstance(state.get("config"), dict) else None
    wanted = store.choice(cfg, "dataset") if cfg is not None else None
    if trained and wanted and wanted != "custom" and trained != wanted:
        raise UserError(f"checkpoint '{path}' was trained on dataset={trained}, but this run uses dataset={wanted}; add dataset={trained} (or train one for {wanted})")
    have = {k: tuple(v.shape) for k, v in state.get("state_dict", {}).items()}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))[:2]
        model_name = (state.get("config") or {}).get("choices", {}).get("model") if isinstance(state.get("config"), dict) else None
        hint = f"it was trained with model={model_name}" if model_name else "pick the model= it was trained with"
        raise UserError(f"checkpoint '{path}' does not match the configured model (first differences: {diff}); {hint}")


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


def checkpoint_key(cfg) -> str:
    digest = hashlib.sha256(json.dumps(training_identity(cfg), sort_keys=True).encode()).hexdigest()[:10]
    return f"{store.choice(cfg, 'model')}-{store.choice(cfg, 'dataset')}-{store.choice(cfg, 'defense')}-s{cfg.seed}-{digest}"


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
                store.console.print(f"[yellow]waiting for another job training {directory.name}[/]")
                announced = True
            time.sleep(poll_seconds)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def lock_state(directory: Path) -> tuple[str, dict] | None:
    """("live" | "stale", {pid, host, since}) of the lock on this registry entry, or None without a lock.

    A stale lock is what a training killed with SIGKILL leaves (a clean exit, Ctrl-C or SIGTERM removes it)."""
    lock = Path(directory) / "lock"
    if not lock.is_file():
        return None
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        owner = {}
    return ("stale" if _lock_is_stale(lock) else "live"), owner


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


# ----------------------------------------------------------------------------------------------- registry hygiene
def clean_stale_temporaries(directory: Path) -> list[Path]:
    """Remove temporaries a killed writer left in a registry entry (`.last.pt.*.tmp`, `.model.pt.publish`).

    Call only while holding the entry's lock: then no live process can be writing them."""
    removed = []
    for tmp in [*Path(directory).glob(".*.tmp"), *Path(directory).glob(".*.publish")]:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def archive_published(directory: Path) -> int:
    """Move the published checkpoint (and its log and config) to the next free version number; return it.

    `retrain=true` calls this first, so a retrained key never destroys the checkpoint earlier results came from."""
    directory = Path(directory)
    taken = [int(m.group(1)) for f in directory.glob("model.v*.pt") if (m := re.fullmatch(r"model\.v(\d+)\.pt", f.name))]
    version = max(taken, default=0) + 1
    for name, suffix in (("train_log", ".csv"), ("config", ".yaml"), ("model", ".pt")):  # model last: it marks the version as taken
        source = directory / f"{name}{suffix}"
        if source.is_file():
            os.replace(source, directory / f"{name}.v{version}{suffix}")
    with contextlib.suppress(FileNotFoundError):
        (directory / "last.pt").unlink()
    return version


def environment() -> dict:
    """What a CPU/GPU result can depend on besides the config: recorded in every checkpoint and run.json.

    Same seed, config, device, thread count and library versions give bitwise the same weights; a different thread
    count can change the rounding of convolution gradients (the README's Determinism section)."""
    import platform

    import numpy
    import torch

    env = {"threads": torch.get_num_threads(), "python": platform.python_version(), "torch": str(torch.__version__),
           "numpy": numpy.__version__, "cpu": platform.machine(), "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env

"""The checkpoint registry: where "the model for this config" lives, and the rules that keep it trustworthy.

A finished training run publishes its checkpoint at `<outputs_root>/checkpoints/<key>/model.pt`, where <key> names
model, dataset, defense, seed and a hash of everything that changes the trained weights. Later commands find it
there; `checkpoint=PATH` overrides. While training, `last.pt` beside it holds the latest epoch (for `resume=true`),
and `lock` keeps two jobs from training the same key at once. A published checkpoint is never replaced silently:
`retrain=true` first moves it to `model.v1.pt` (then v2, ...) with its log and config.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import socket
import time
import warnings
from pathlib import Path

import robust_cli
from robust_cli.core import store
from robust_cli.core.errors import UserError

WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict", "last")  # where other codebases put the weights ("last": RobustBench's last-epoch ones)


def load_checkpoint(path) -> dict:
    """A checkpoint as robust's dict (`state_dict` plus, for robust's own, config, epoch, log, ...).

    Accepts robust's format, a bare state dict, a {'state_dict' | 'model' | 'net' | 'model_state_dict': ...} wrapper,
    DataParallel's `module.` prefixes, in .pt/.pth (always weights_only=True: loading runs no code) or .safetensors."""
    import torch

    path = Path(path)
    if path.is_dir():
        inside = " (model.pt inside it is the published one)" if (path / "model.pt").is_file() else ""
        raise UserError(f"checkpoint '{path}' is a directory, not a checkpoint file; point checkpoint= at a .pt file{inside}")
    if not path.exists():
        raise UserError(f"checkpoint '{path}' does not exist; check the path or drop checkpoint= to use this config's own")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"checkpoint '{path}' is a safetensors file: pip install safetensors") from None
        try:
            return {"state_dict": _strip_prefix(load_file(str(path)))}
        except Exception as exc:  # noqa: BLE001 - a damaged file is the user's to replace
            raise UserError(f"checkpoint '{path}' cannot be read as safetensors ({type(exc).__name__}): it is damaged or not safetensors") from None
    try:
        with warnings.catch_warnings():  # torch warns in two lines before raising on a bad file: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a damaged file; all are one line
        if _pickle_imports_code(path):
            raise UserError(
                f"checkpoint '{path}' is a pickle that stores Python objects, not only tensors: loading it would run code from the "
                "file, so it is refused; where it was made, save the weights alone: torch.save(model.state_dict(), 'weights.pt')"
            ) from None
        raise UserError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}); it is corrupt or not a checkpoint: retrain it or copy it again") from None
    return _as_robust_checkpoint(state, path)


def _pickle_imports_code(path: Path) -> bool:
    """Whether the file is a well-formed pickle (bare, or torch's zip with data.pkl) that imports a global: what
    weights_only refuses. Read with pickletools, which parses opcodes and runs nothing."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
        return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ") for op, _, _ in pickletools.genops(data))
    except Exception:  # noqa: BLE001 - not a pickle at all: the caller says it cannot be read
        return False


def _is_state_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefix(state_dict: dict) -> dict:
    """DataParallel / DistributedDataParallel save every key as `module.<name>`."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _as_robust_checkpoint(state, path) -> dict:
    if isinstance(state, dict) and _is_state_dict(state.get("state_dict")) and "identity" in state:
        return state  # robust's own
    if _is_state_dict(state):
        return {"state_dict": _strip_prefix(state)}
    if isinstance(state, dict):
        for key in WRAPPER_KEYS:
            if _is_state_dict(state.get(key)):
                return {**{k: v for k, v in state.items() if k != key}, "state_dict": _strip_prefix(state[key])}
    found = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
    raise UserError(
        f"checkpoint '{path}' holds no state dict (found: {found}); expected tensors by parameter name, or one of them under {', '.join(WRAPPER_KEYS)}"
    )


def check_checkpoint_matches(state: dict, model, path, dataset: str | None = None) -> None:
    """A checkpoint must fit the run: trained on the same dataset (its config-group name), same parameter names and shapes."""
    trained = (state.get("config") or {}).get("choices", {}).get("dataset") if isinstance(state.get("config"), dict) else None
    wanted = dataset
    if trained and wanted and wanted != "custom" and trained != wanted:
        raise UserError(
            f"checkpoint '{path}' was trained on dataset={trained}, but this run uses dataset={wanted}; add dataset={trained} (or train one for {wanted})"
        )
    weights, own = state.get("state_dict", {}), model.state_dict()
    for name in ("mean", "std"):  # normalisation buffers come from the dataset: weights from elsewhere do not carry them
        if name in own and name not in weights:
            weights[name] = own[name]
    have = {k: tuple(v.shape) for k, v in weights.items()}
    want = {k: tuple(v.shape) for k, v in own.items()}
    if have != want:
        missing = [k for k in want if k not in have][:2]
        unexpected = [k for k in have if k not in want][:2]
        shapes = [f"{k} {list(have[k])} here {list(want[k])}" for k in want if k in have and have[k] != want[k]][:2]
        found = "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"unexpected {unexpected}" if unexpected else "",
                f"shape {', '.join(shapes)}" if shapes else "",
            )
            if part
        )
        model_name = (state.get("config") or {}).get("choices", {}).get("model") if isinstance(state.get("config"), dict) else None
        hint = f"it was trained with model={model_name}" if model_name else "pick the model= it was trained with"
        raise UserError(f"checkpoint '{path}' does not match the configured model ({found}); {hint}")


# ----------------------------------------------------------------------------------------------- fingerprints
def training_identity(model: dict, dataset: dict, defense: dict, train: dict, seed: int, n_train: int | None, val_fraction: float, augment: str) -> dict:
    """The settings that decide the trained weights (not the device, paths or evaluation settings), each a resolved
    config node; the checkpoint key hashes them."""
    keep = copy.deepcopy({"model": model, "dataset": dataset, "defense": defense, "train": train, "seed": seed})
    if isinstance(keep["model"], dict):  # test-time noise changes the evaluation, not the trained weights
        keep["model"] = {k: v for k, v in keep["model"].items() if k != "test_noise"}
    keep["data"] = {"n_train": n_train, "val_fraction": val_fraction}
    _drop_later_defaults(keep)
    _historical_targets(keep)
    if augment != "none":  # only then: the keys of models trained without augmentation stay what they were
        keep["data"]["augment"] = augment
    return keep


def _drop_later_defaults(keep: dict) -> None:
    """Settings added after checkpoints were trained, at values that train the same weights, leave the key as it was:
    validation only observes unless it selects, AWP with gamma 0 is off, and AdversarialTraining always crafted in the
    loop's (train) mode. The validation attack decides the published weights only with select=best_robust."""
    train = keep.get("train")
    if isinstance(train, dict):
        select = train.get("select", "last")
        for key, default in (("select", "last"), ("ema", None), ("milestones", None)):
            if train.get(key, default) == default:
                train.pop(key, None)
        if select == "last":
            for key in ("validate", "validate_every", "val_eps", "val_attack"):
                train.pop(key, None)
        elif select == "best_clean":
            for key in ("val_eps", "val_attack"):
                train.pop(key, None)
    defense = keep.get("defense")
    if isinstance(defense, dict):
        awp = defense.get("awp")
        if isinstance(awp, dict) and not awp.get("gamma"):
            defense.pop("awp")
        if str(defense.get("_target_", "")).endswith("AdversarialTraining") and defense.get("attack_bn") == "train":
            defense.pop("attack_bn")


def _historical_targets(node) -> None:
    """Every `_target_` under its name before the package's modules moved into layers, so the keys stay."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str):
                node[key] = robust_cli.historical_name(value)
            else:
                _historical_targets(value)
    elif isinstance(node, list):
        for value in node:
            _historical_targets(value)


def checkpoint_key(identity: dict, choices: dict) -> str:
    """`<model>-<dataset>-<defense>-s<seed>-<hash of the identity>`: the registry entry's name."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    names = "-".join(store.choice(choices, group) for group in ("model", "dataset", "defense"))
    return f"{names}-s{identity['seed']}-{digest}"


def checkpoint_dir(outputs_root, key: str) -> Path:
    return Path(str(outputs_root)) / "checkpoints" / key


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
    count can change the rounding of convolution gradients (docs/configuration.md, Determinism)."""
    import platform

    import numpy
    import torch

    env = {
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": numpy.__version__,
        "cpu": platform.machine(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env

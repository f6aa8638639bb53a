"""Atomic files and the run context (directory, device, warnings, headline, progress) every command gets.

The checkpoint registry is `core/registry.py`; the training loop is `training/loop.py`. This module imports neither.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from robust_cli.core.errors import UserError

# progress, warnings and logs go to stderr; the results a script captures (final table, run directory) to stdout.
# Piped, rich lays both out at 80 columns (COLUMNS overrides).
console = Console(stderr=True)
results = Console()


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


# mkstemp creates files 0600; results on shared storage must be readable as the user's umask allows (0644 by default)
FILE_MODE = 0o666 & ~_current_umask()


# ----------------------------------------------------------------------------------------------- atomic files
class DiskFull(UserError):
    """No space left (or the quota reached) while writing a file: what was written before stays as it was."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_line(path, nbytes: int | None = None) -> str:
    """The one line for a write that found no space: which file, how much, that nothing was lost, what to do."""
    path = Path(path)
    size = f" ({_human_bytes(nbytes)})" if nbytes else ""
    return (
        f"no space left on the device writing '{path}'{size}; nothing already written was changed and the partial file "
        f"was removed: free space there (df -h '{path.parent}') or set outputs_root= to a disk with room, then run again "
        "(resume=true continues a training from its last epoch)"
    )


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"


_written_by_this_process = 0


class _Counted:
    """The file object a writer sees: counts what it is asked to write (for the disk-full line).

    Test hook: with ROBUST_FAULT_DISK_FULL_AFTER_BYTES=N the process's writes fail with ENOSPC once they pass N bytes
    in all, as on a full disk, wherever they happen (tests/test_faults.py; a real full tmpfs is tested too)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def write(self, data):
        global _written_by_this_process
        self.n += len(data)
        _written_by_this_process += len(data)
        limit = os.environ.get("ROBUST_FAULT_DISK_FULL_AFTER_BYTES")
        if limit is not None and _written_by_this_process > int(limit):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path, write, replace: bool = True) -> Path:
    """Write through `write(file_object)` into a temporary file beside `path`, then rename over it.

    A crash mid-write leaves the previous file (or none), never a truncated one that looks complete.
    replace=False publishes the file only if `path` does not exist, decided by the file system at that moment (a
    hard link fails on an existing name), so of two processes writing the same new file one wins and the other
    gets FileExistsError; nothing is overwritten.
    """
    path = Path(path)
    counted = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFull(disk_full_line(path)) from None
        raise
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            counted = _Counted(f)
            write(counted)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise DiskFull(disk_full_line(path, counted.n if counted is not None else None)) from None
        raise
    return path


def _publish_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name exclusively, then fill it by rename
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_text(path, text: str, replace: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), replace)


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


def save_torch(path, obj, replace: bool = True) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, lambda f: f.write(buf.getvalue()), replace)


def claim_run_dir(run_dir: str) -> Path:
    """Create the run directory exclusively; on a collision (two runs started in the same second) add -1, -2, ...

    mkdir is atomic, so two processes can never get the same directory (their files would overwrite each other)."""
    base = Path(run_dir)
    candidate, i = base, 0
    while True:
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
            return candidate
        except FileExistsError:
            i += 1
            candidate = base.with_name(f"{base.name}-{i}")
        except OSError as exc:
            raise UserError(f"cannot create the run directory '{candidate}' ({exc.strerror}); set outputs_root= to a writable folder") from None


def choice(choices, group: str) -> str:
    """The option name chosen for a config group (e.g. 'fc200_200_10') in {group: option} (the CLI records them in
    the config's `choices`); 'custom' when none was chosen."""
    return str((choices or {}).get(group) or "custom")


# ----------------------------------------------------------------------------------------------- run.log
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LIVE = ("\x1b[2K", "\x1b[1A", "\x1b[?25l", "\r")  # a progress bar redrawing itself


class _Tee:
    """A text stream that writes to the terminal as before and, without colours and redraws, to a log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        n = self.stream.write(text)
        if not any(code in text for code in _LIVE):
            with contextlib.suppress(OSError, ValueError):  # a full disk or a closed log never stops the run
                self.log.write(_ANSI.sub("", text))
                self.log.flush()
        return n

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding: the terminal's
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_output(path):
    """Keep what the run prints (stdout and stderr: warnings, errors, the results table) in `path` as well; a live
    progress bar is left out (its final state is in run.json and the CSVs)."""
    import sys

    try:
        log = open(path, "a", encoding="utf-8")
    except OSError:
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        log.close()


# ----------------------------------------------------------------------------------------------- heartbeat
HEARTBEAT_SECONDS = float(os.environ.get("ROBUST_HEARTBEAT_SECONDS", "30"))


class Heartbeat:
    """Rewrites `heartbeat.json` (pid, host, updated) every HEARTBEAT_SECONDS from a daemon thread while a run lives.

    A run killed with SIGKILL (or its node lost) cannot say so; its run.json stays `running`. `run_status` then tells
    it apart from a live one: on this host by its pid, elsewhere by a heartbeat older than 4 intervals."""

    def __init__(self, directory: Path):
        import socket
        import threading

        self.path = Path(directory) / "heartbeat.json"
        self.beat = {"pid": os.getpid(), "host": socket.gethostname(), "interval_s": HEARTBEAT_SECONDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="robust-heartbeat", daemon=True)

    def _write(self) -> None:
        import time

        with contextlib.suppress(OSError, DiskFull):  # a full disk is said once, by the write that matters
            write_json(self.path, {**self.beat, "updated": time.time()})

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self._write()

    def start(self) -> None:
        self._write()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def run_status(record: dict, run_dir: Path) -> str:
    """run.json's status, except that a `running` run whose process is gone is `died`."""
    import socket
    import time

    status = record.get("status")
    if status != "running":
        return status
    try:
        beat = json.loads((Path(run_dir) / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return status  # written by a version without heartbeats, or starting right now: cannot tell
    if beat.get("host") == socket.gethostname():
        try:
            os.kill(int(beat["pid"]), 0)
        except ProcessLookupError:
            return "died"
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
    age = time.time() - float(beat.get("updated") or 0)
    return "died" if age > 4 * float(beat.get("interval_s") or HEARTBEAT_SECONDS) + 10 else status


# ----------------------------------------------------------------------------------------------- live tracking
LIVE_SINKS: list = []  # objects with .log(kind, metrics, step): tracking callbacks register them for their job


def live(kind: str, metrics: dict, step: int) -> None:
    """Send numbers as they are made (kind 'train': a train_log row per epoch; 'attack': one eps's robust accuracy)
    to the tracking sinks of this job. A sink that fails is dropped with one warning: tracking never stops a run."""
    for sink in list(LIVE_SINKS):
        try:
            sink.log(kind, metrics, step)
        except Exception as exc:  # noqa: BLE001 - any tracking failure: the run's own files are what counts
            LIVE_SINKS.remove(sink)
            console.print(f"[bold yellow]warning:[/] live tracking stopped ({type(exc).__name__}: {exc}); the run goes on", soft_wrap=True)


# ----------------------------------------------------------------------------------------------- run context
class RunContext:
    """What a command gets besides its config: its directory, device, atomic writers, warnings and headline."""

    def __init__(self, directory: Path, device: torch.device, record: dict, described: dict | None = None):
        self.described = dict(described or {})  # {group: option} the figures name: model, dataset, defense, attack
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

        # every figure says what it shows: model, dataset, defense (and attack), under its own title
        what = fig.get_suptitle()
        fig.suptitle(f"{what}\n{self.description()}" if what else self.description(), fontsize=9)
        from matplotlib.layout_engine import PlaceHolderLayoutEngine, TightLayoutEngine

        if fig.get_layout_engine() is None or isinstance(fig.get_layout_engine(), (TightLayoutEngine, PlaceHolderLayoutEngine)):
            import warnings

            with warnings.catch_warnings():  # "not compatible with tight_layout" for odd axes: the figure is still fine
                warnings.simplefilter("ignore")
                fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=Path(name).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        return atomic_write(self.path(name), lambda f: f.write(buf.getvalue()))

    def save_torch(self, name, obj) -> Path:
        return save_torch(self.path(name), obj)

    def description(self) -> str:
        """'model fc200_200_10, dataset mnist, defense tulip, attack pgd': the line every figure carries."""
        return ", ".join(f"{group} {option}" for group, option in self.described.items())

    def warn(self, message: str) -> None:
        from rich.markup import escape

        console.print(f"[bold yellow]warning:[/] {escape(message)}")  # a message may hold [brackets]: printed as written
        self.record.setdefault("warnings", []).append(message)

    def headline(self, **values) -> None:
        self.headline_values.update(values)
        self.record["headline"] = self.headline_values

    @contextlib.contextmanager
    def progress(self, total: int, description: str):
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal and os.environ.get("ROBUST_PROGRESS") != "1") as bar:
            task = bar.add_task(description, total=total)
            # description: a new text for the line (e.g. the epoch's validation accuracy), None keeps it
            yield lambda n=1, description=None: bar.update(task, advance=n, description=description)

"""Faults of the machine and of files: one line saying what is wrong and what to do, nothing already written lost."""

import errno
import gzip
import os
import shutil
import subprocess
import uuid

import numpy as np
import pytest

from robust_cli.core import store
from robust_cli.core.data import _read_idx
from robust_cli.core.errors import UserError

DIGITS = ["dataset=digits", "model=fc100_20_10", "train.epochs=2", "data.n_train=200", "data.n_test=50"]


def one_line_error(proc) -> str:
    """The error line of a failed run; asserts there is exactly one and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def leftovers(root) -> list:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".publish"))]


# ----------------------------------------------------------------------------------------------- the write layer
def test_a_full_disk_during_a_write_keeps_the_previous_file_and_removes_the_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "results.csv"
    store.write_text(target, "before\n")

    def failing(f):
        f.write(b"x" * 5000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(store.DiskFull) as caught:
        store.atomic_write(target, failing)
    message = str(caught.value)
    assert "no space left" in message and str(target) in message and "4.9 KB" in message and "\n" not in message
    assert target.read_text() == "before\n"
    assert not leftovers(tmp_path)


def test_injected_disk_full_fails_every_kind_of_write_once_past_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_written_by_this_process", 0)
    monkeypatch.setenv("ROBUST_FAULT_DISK_FULL_AFTER_BYTES", "100")
    store.write_text(tmp_path / "small.txt", "x" * 50)
    for write in (lambda: store.write_json(tmp_path / "a.json", {"k": "v" * 100}), lambda: store.save_torch(tmp_path / "a.pt", {"w": 1})):
        with pytest.raises(store.DiskFull):
            write()
    assert [p.name for p in tmp_path.iterdir()] == ["small.txt"]


# ----------------------------------------------------------------------------------------------- a run on a full disk
@pytest.mark.parametrize("command", ["train", "attack"])
def test_a_run_that_fills_the_disk_says_so_in_one_line_and_keeps_what_was_written(robust, tmp_path, command):
    if command == "attack":  # the checkpoint exists; the attack's cache and CSVs then find the disk full
        robust("train", *DIGITS, check=True)
    published = list((tmp_path / "outputs" / "checkpoints").glob("*/model.pt"))
    before = {p: p.read_bytes() for p in published}
    args = [*DIGITS, "eps=[0,0.1,0.2]"] if command == "attack" else DIGITS
    proc = robust(command, *args, "retrain=true" if command == "train" else "seed=0", env={"ROBUST_FAULT_DISK_FULL_AFTER_BYTES": "20000"})
    assert proc.returncode == 1
    assert "no space left on the device writing" in one_line_error(proc)
    assert not leftovers(tmp_path / "outputs")
    assert all(p.read_bytes() == content for p, content in before.items())  # nothing already written was lost


def _tmpfs(path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"robust-test-{uuid.uuid4().hex[:6]}", str(path)], capture_output=True).returncode == 0


def test_a_real_full_tmpfs_gives_the_same_line(robust, tmp_path):
    disk = tmp_path / "small_disk"
    if not _tmpfs(disk, "160k"):
        pytest.skip("mounting a tmpfs needs root and mount(8) (CI runs as root); the injected fault above covers the same path")
    try:
        proc = robust("train", *DIGITS, f"outputs_root={disk}", f"hydra.run.dir={disk}/run")
        assert proc.returncode == 1, proc.stderr
        assert "no space left on the device" in one_line_error(proc)
        assert not leftovers(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------------------------- corrupt files
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root, n_train=60, n_test=20, corrupt=None):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if corrupt == ("magic", name):
            raw = b"\x1f\x8b" + raw[2:]
        if corrupt == ("short", name):
            raw = raw[:-100]
        data = gzip.compress(raw)
        if corrupt == ("bytes", name):  # same length, bytes flipped inside the deflate stream
            middle = len(data) // 2
            data = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 16]) + data[middle + 16 :]
        (root / f"{name}.gz").write_bytes(data)
    return root


@pytest.mark.parametrize("kind, words", [("bytes", "corrupt"), ("magic", "IDX magic number"), ("short", "not a complete IDX file")])
def test_a_corrupt_idx_file_is_one_line_naming_it(tmp_path, kind, words):
    name = "train-images-idx3-ubyte"
    root = write_mnist(tmp_path / "mnist", corrupt=(kind, name))
    size = (root / f"{name}.gz").stat().st_size
    with pytest.raises(UserError) as caught:
        _read_idx(root / f"{name}.gz")
    message = str(caught.value)
    assert words in message and f"{name}.gz" in message and "copy (or download) the file again" in message and "\n" not in message
    if kind == "bytes":  # the full length is kept: only a decode can tell
        assert size == (write_mnist(tmp_path / "clean") / f"{name}.gz").stat().st_size


def test_a_corrupt_dataset_stops_the_run_before_training(robust, tmp_path):
    root = write_mnist(tmp_path / "mnist", corrupt=("bytes", "t10k-images-idx3-ubyte"))
    proc = robust("train", "dataset=mnist", "model=fc100_20_10", f"data.root={root}", "data.download=false", "train.epochs=1")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "t10k-images-idx3-ubyte.gz" in line and "corrupt" in line
    assert not list((tmp_path / "outputs").glob("checkpoints/*/*.pt"))


# ----------------------------------------------------------------------------------------------- the seed
@pytest.mark.parametrize("seed", ["-1", str(2**32), "1.5", "true"])
def test_a_seed_outside_what_the_generators_take_is_refused_before_any_work(robust, tmp_path, seed):
    proc = robust("train", *DIGITS, f"seed={seed}")
    assert proc.returncode == 2
    assert "seed must be an integer in [0, 2^32)" in one_line_error(proc)
    assert not (tmp_path / "outputs").exists()

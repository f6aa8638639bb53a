"""Nothing lost, nothing misleading (issue 14): run directories, the registry, killed runs, one-line user errors,
shell completion, file modes, stdout vs stderr, figure titles."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from robust_cli.commands import build

TINY = ("train.epochs=1", "data.n_train=200")


def one_error_line(proc):
    """Exit code 2 and exactly one non-empty stderr line, an `error:` line, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def refused_in_process(args, tmp_path, monkeypatch, capsys) -> str:
    """Run `robust ARGS` in this process (fast) for input refused before any work: exit 2, one line, nothing written."""
    from robust_cli import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["robust", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert not (tmp_path / "outputs").exists()  # nothing written
    return lines[0]


def registry_entry(root: Path) -> Path:
    entries = list((root / "outputs" / "checkpoints").iterdir())
    assert len(entries) == 1, entries
    return entries[0]


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "robust_cli", "train", "train.epochs=1", f"seed={s}", "data.n_train=200"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for s in (8, 9)
    ]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = [next(line for line in (o + e).splitlines() if line.startswith("run directory:")) for o, e in outs]
    assert len(set(dirs)) == 2
    runs = list((tmp_path / "outputs" / "train").glob("*/*"))
    assert len(runs) == 2 and all((r / "run.json").is_file() and (r / "model.pt").is_file() for r in runs)


def test_outputs_root_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "robust_cli", "train", "outputs_root=afile"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "afile" in lines[0] and "Traceback" not in proc.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_sigterm_marks_the_run_interrupted_in_one_line(tmp_path):
    import json
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "robust_cli", "train", "train.epochs=200"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "outputs").glob("checkpoints/*/last.pt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted (SIGTERM)") and "resume=true" in err
    record = json.loads(next((tmp_path / "outputs" / "train").glob("*/*/run.json")).read_text())
    assert record["status"] == "interrupted"
    assert list((tmp_path / "outputs").glob("checkpoints/*/last.pt"))  # the checkpoint is kept


def test_sigint_is_one_line_with_the_resume_hint(tmp_path):
    # a pytest-xdist worker ignores SIGINT, and a child inherits that: give the child the default (a shell's) handler
    proc = subprocess.Popen(
        [sys.executable, "-m", "robust_cli", "train", "train.epochs=200"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "outputs").glob("checkpoints/*/last.pt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("training", "warning"))]
    assert "Traceback" not in err and lines[-1].startswith("interrupted (Ctrl-C)") and "resume=true" in lines[-1]


# ----------------------------------------------------------------------------------------------- the registry
def test_sigint_while_the_libraries_load_is_one_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "robust_cli", "train"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.3)  # torch alone takes longer than this to import
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C) outside a running job")
    assert not list(tmp_path.glob("outputs/**/run.json"))  # no run was started, so none is left half-written


def test_train_reuses_a_finished_checkpoint_and_retrain_keeps_the_old_one(robust, tmp_path):
    robust("train", *TINY, check=True)
    entry = registry_entry(tmp_path)
    first = (entry / "model.pt").read_bytes()
    again = robust("train", *TINY, "train.lr=0.05", check=True)
    assert "already trained" in again.stderr and "reusing" in again.stderr
    assert (entry / "model.pt").read_bytes() == first and not list(entry.glob("model.v*.pt"))
    runs = sorted((tmp_path / "outputs" / "train").glob("*/*"), key=lambda p: p.stat().st_mtime)
    record = json.loads((runs[-1] / "run.json").read_text())
    assert record["headline"]["reused"] is True and (runs[-1] / "model.pt").read_bytes() == first
    assert record["environment"]["threads"] >= 1 and record["environment"]["torch"] == str(torch.__version__)

    (entry / "model.v1.pt").write_bytes(b"an older version")  # numbering continues after the versions kept
    robust("train", *TINY, "retrain=true", "seed=0", check=True)
    assert (entry / "model.v2.pt").read_bytes() == first and (entry / "train_log.v2.csv").is_file()
    state = torch.load(entry / "model.pt", weights_only=True)
    assert state["complete"] and state["environment"]["threads"] >= 1 and state["environment"]["device"] == "cpu"


def test_a_sweep_job_and_a_single_run_give_the_same_weights_at_the_same_thread_count(robust, tmp_path):
    args = ("train.epochs=2", "data.n_train=300", "threads=1", "model=fc10_4")
    robust("train", *args, "outputs_root=single", check=True)
    robust("train", "--multirun", "hydra/launcher=joblib", *args, "seed=0,1", "outputs_root=swept", "~hydra/callbacks", check=True)
    single = torch.load(next((tmp_path / "single").glob("checkpoints/*s0*/model.pt")), weights_only=True)
    swept = torch.load(next((tmp_path / "swept").glob("checkpoints/*s0*/model.pt")), weights_only=True)
    assert all(torch.equal(single["state_dict"][k], swept["state_dict"][k]) for k in single["state_dict"])
    assert single["environment"]["threads"] == swept["environment"]["threads"] == 1


def test_a_sweep_with_a_failed_job_exits_non_zero_even_without_the_collect_callback(robust):
    proc = robust("train", "--multirun", *TINY, "train.lr=0.05,-1", "~hydra/callbacks")
    assert proc.returncode == 1 and "1 of 2 sweep jobs did not complete" in proc.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------- killed runs
def test_kill_9_is_reported_died_and_its_temporaries_are_cleaned_at_the_next_start(robust, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "robust_cli", "train", "train.epochs=200"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "outputs").glob("checkpoints/*/last.pt")):
        time.sleep(0.2)
    robust("collect", "outputs/train", check=True)
    assert list(pd.read_csv(tmp_path / "outputs/train/collected/runs.csv").status) == ["running"]  # alive
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    entry = registry_entry(tmp_path)
    (entry / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what a kill during a write leaves
    robust("collect", "outputs/train", check=True)
    assert list(pd.read_csv(tmp_path / "outputs/train/collected/runs.csv").status) == ["died"]
    failed = pd.read_csv(tmp_path / "outputs/train/collected/failed_runs.csv")
    assert "SIGKILL" in failed.error.item()
    info = robust("info", "train.epochs=200", check=True)
    assert "died (pid" in info.stdout and "is gone" in info.stdout and "resume=true" in info.stdout
    epoch = torch.load(entry / "last.pt", weights_only=True)["epoch"]
    resumed = robust("train", "train.epochs=200", "resume=true", env={"ROBUST_STOP_AFTER_EPOCH": str(epoch + 1)})
    assert f"resuming {entry.name} after epoch {epoch}" in resumed.stderr
    assert not list(entry.glob(".*.tmp"))


def test_heartbeat_of_a_run_on_another_host_goes_stale(tmp_path):
    from robust_cli.core import store

    (tmp_path / "heartbeat.json").write_text(json.dumps({"pid": 1, "host": "elsewhere", "interval_s": 30, "updated": time.time() - 10}))
    assert store.run_status({"status": "running"}, tmp_path) == "running"
    (tmp_path / "heartbeat.json").write_text(json.dumps({"pid": 1, "host": "elsewhere", "interval_s": 30, "updated": time.time() - 600}))
    assert store.run_status({"status": "running"}, tmp_path) == "died"
    assert store.run_status({"status": "completed"}, tmp_path) == "completed"


# ----------------------------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(
    "args, says",
    [
        (("train", "+train.epoch=3"), "did you mean train.epochs?"),
        (("train", "train.epoch=3"), "did you mean train.epochs?"),
        (("train", "++data.n_tarin=5"), "did you mean data.n_train?"),
        (("train", "+defense.foo=1"), "unknown key defense.foo"),
        (("train", "checkpoint=nowhere.pt"), "does not read checkpoint="),
        (("train", "resume=true", "retrain=true"), "contradict"),
        (("attack", "attack.eot_iter=3"), "write +attack.eot_iter"),
        (("attack", "+attack.stepz=3"), "did you mean attack.steps?"),
        (("attack", "data.shard=3/3"), "0 <= I < N"),
        (("attack", "data.shard=half"), "I/N"),
        (("attack", "data.shard=0/8", "data.n_test=200", "batch_size=32"), "make only 7 batches"),
        (("train", "data.shard=0/2"), "robust attack only"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, args, says):
    assert says in refused_in_process(args, tmp_path, monkeypatch, capsys)


def test_attack_parameters_of_the_class_are_accepted_with_plus(robust):
    assert robust("attack", "+attack.eot_iter=3", "--cfg", "job").returncode == 0


def test_truncated_idx_file_is_one_line_naming_it(robust, tmp_path):
    import gzip

    root = tmp_path / "mnist"
    root.mkdir()
    shapes = {
        "train-images-idx3-ubyte": (20, 28, 28),
        "train-labels-idx1-ubyte": (20,),
        "t10k-images-idx3-ubyte": (10, 28, 28),
        "t10k-labels-idx1-ubyte": (10,),
    }
    for name, shape in shapes.items():
        header = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
        body = bytes(int(torch.tensor(shape).prod()))
        (root / f"{name}.gz").write_bytes(gzip.compress(header + body))
    full = (root / "t10k-images-idx3-ubyte.gz").read_bytes()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(full[: len(full) // 2])
    line = one_error_line(robust("train", "dataset=mnist", "data.root=mnist", "data.download=false", *TINY[:1]))
    assert "t10k-images-idx3-ubyte.gz" in line and "truncated" in line


def test_warnings_for_nothing_to_resume_tiny_classes_and_zero_steps(robust, tmp_path):
    from conftest import latest_run

    proc = robust("train", "train.epochs=1", "data.n_train=15", "resume=true", check=True)
    warnings = json.loads((latest_run(tmp_path, "train") / "run.json").read_text())["warnings"]
    assert any("nothing to resume" in w for w in warnings) and any("fewer than 5 per class" in w for w in warnings), proc.stderr
    robust("attack", "attack.steps=0", "data.n_test=20", "audit=false", "train.epochs=1", "data.n_train=15", check=True)
    warnings = json.loads((latest_run(tmp_path, "attack") / "run.json").read_text())["warnings"]
    assert any("attack.steps=0" in w and "random start" in w for w in warnings)


def test_checkpoint_messages_say_what_is_wrong(robust, tmp_path):
    from robust_cli.core import registry
    from robust_cli.core.errors import UserError

    robust("train", *TINY, check=True)
    entry = registry_entry(tmp_path)
    other = one_error_line(robust("attack", f"checkpoint={entry / 'model.pt'}", "dataset=gaussians2d", "audit=false"))
    assert "trained on dataset=digits" in other and "add dataset=digits" in other
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    broken = robust("attack", "checkpoint=broken.pt", "audit=false")
    assert "cannot be read" in one_error_line(broken) and "Warning" not in broken.stderr
    for path, says in ((entry, "is a directory"), (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(UserError, match=says):
            registry.load_checkpoint(path)
    info = robust("info", "checkpoint=missing.pt", check=True)
    assert "refuses it" in info.stdout and "train it first" not in info.stdout


def test_unknown_command_is_a_short_usage(robust):
    proc = robust("trian")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) <= 3 and "did you mean train?" in lines[0]
    assert len(robust("--help").stdout.splitlines()) > 10  # the full list is on --help


# ----------------------------------------------------------------------------------------------- completion
@pytest.mark.parametrize("prefix", [(), ("train",)])
def test_shell_completion_install_works_before_or_after_the_command(robust, prefix):
    proc = robust(*prefix, "-sc", "install=bash")
    assert proc.returncode == 0 and "complete -o nospace -o default -F _robust_completion robust" in proc.stdout


def test_completion_in_a_real_bash(robust, tmp_path):
    cases = [
        ("robust tr", "train"),
        ("robust train defense=tu", "defense=tulip"),
        ("robust attack attack.st", "attack.steps="),
        ("robust persistence model=fc1", "model=fc100_100_10"),
    ]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "robust").write_text(f'#!/bin/sh\nexec {sys.executable} -m robust_cli "$@"\n')
    (bindir / "robust").chmod(0o755)
    bash = robust("-sc", "install=bash").stdout
    for line, _ in cases:
        words = line.split()
        bash += f'\nCOMP_LINE="{line}"; COMP_POINT={len(line)}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n_robust_completion; echo "${{COMPREPLY[*]}}"'
    out = subprocess.run(["bash", "-c", bash], capture_output=True, text=True, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}, cwd=tmp_path)
    replies = out.stdout.splitlines()
    assert len(replies) == len(cases), out.stdout + out.stderr
    for (line, expect), reply in zip(cases, replies):
        assert expect in reply.split(), (line, reply)


# ----------------------------------------------------------------------------------------------- files and output
def test_files_respect_the_umask_and_results_go_to_stdout(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "robust_cli", "train", *TINY], cwd=tmp_path, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o002)
    )
    assert proc.returncode == 0, proc.stderr
    run = next((tmp_path / "outputs" / "train").glob("*/*"))
    for name in ("run.json", "model.pt", "train_log.csv"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o664, name
    assert "run directory:" in proc.stdout and "test_accuracy" in proc.stdout  # results on stdout ...
    assert "run directory:" not in proc.stderr  # ... progress and warnings on stderr


def test_every_figure_names_model_dataset_defense_and_attack(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from omegaconf import OmegaConf

    from robust_cli.core import store

    cfg = OmegaConf.create(
        {"model": {}, "dataset": {}, "defense": {}, "attack": {}, "choices": {"model": "c_32", "dataset": "mnist", "defense": "tulip", "attack": "pgd"}}
    )
    ctx = store.RunContext(tmp_path, torch.device("cpu"), {}, build.described(cfg))
    fig, _ = plt.subplots()
    fig.suptitle("curve")
    ctx.save_figure("f.png", fig)
    assert fig.get_suptitle() == "curve\nmodel c_32, dataset mnist, defense tulip, attack pgd"
    assert (tmp_path / "f.png").stat().st_size > 0

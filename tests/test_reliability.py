"""Issue 14 items covered so far: unique run directories, outputs_root that is a file, JSON without NaN."""
import os
import subprocess
import sys


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "robust_cli", "train", "train.epochs=1", f"seed={s}", "data.n_train=200"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for s in (8, 9)]
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

    proc = subprocess.Popen([sys.executable, "-m", "robust_cli", "train", "train.epochs=200"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
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

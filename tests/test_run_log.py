"""run.log: what a run printed (warnings, errors, the results table) is kept in its run directory, without colours."""

from tests.conftest import latest_run


def test_run_log_keeps_the_warnings_and_the_results_table(robust, tmp_path):
    proc = robust("train", "dataset=digits", "model=fc100_20_10", "train.epochs=1", "data.n_train=30", check=True, env={"ROBUST_PROGRESS": "1"})
    log = (latest_run(tmp_path, "train") / "run.log").read_text()
    assert "warning: class 0 has 3 training examples" in proc.stderr
    assert "warning: class 0 has 3 training examples" in log and "test_accuracy" in log and "run directory:" in log
    assert "\x1b" not in log  # no colour codes, no progress redraws


def test_run_log_keeps_the_error_of_a_run_that_failed(robust, tmp_path):
    proc = robust("train", "dataset=digits", "model=fc100_20_10", "train.epochs=2", env={"ROBUST_FAULT_DISK_FULL_AFTER_BYTES": "20000"})
    assert proc.returncode == 1
    log = (latest_run(tmp_path, "train") / "run.log").read_text()
    assert "error: no space left on the device writing" in log

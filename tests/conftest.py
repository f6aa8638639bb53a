import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def robust(tmp_path):
    """Run the CLI as a user would, in tmp_path; returns CompletedProcess (stdout+stderr as text)."""

    def run(*args, env=None, check=False):
        full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "robust_cli", *args], cwd=tmp_path, capture_output=True, text=True, env=full_env)
        if check and proc.returncode != 0:
            raise AssertionError(f"robust {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def latest_run(root: Path, command: str) -> Path:
    runs = sorted((root / "outputs" / command).glob("*/*"), key=lambda p: p.stat().st_mtime)
    assert runs, f"no run directory under {root / 'outputs' / command}"
    return runs[-1]

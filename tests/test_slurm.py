"""A real SLURM cluster: scripts/test_slurm.sh starts munged, slurmctld and slurmd on localhost, submits a
`robust train --multirun ... hydra/launcher=submitit_slurm` sweep as one job array, checks every run.json and the
collected tables, scancels a running job and checks that it is recorded as interrupted, and stops the daemons."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def slurm_installable() -> bool:
    have = all(shutil.which(b, path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")) for b in ("slurmctld", "slurmd", "munged", "sbatch"))
    return have or (os.geteuid() == 0 and shutil.which("apt-get") is not None)


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_installable(), reason="SLURM is not installed and cannot be (needs root and apt-get for slurm-wlm, munge)")
def test_a_sweep_runs_on_a_one_node_slurm_cluster_and_scancel_is_recorded_as_interrupted():
    robust = Path(sys.executable).parent / "robust"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "test_slurm.sh")], capture_output=True, text=True, timeout=600, env={**os.environ, "ROBUST": str(robust)}
    )
    out = proc.stdout + proc.stderr
    if proc.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1])
    assert proc.returncode == 0, out[-6000:]
    assert "sweep: 4 jobs completed, collected runs.csv 4 rows" in out
    assert '"status": "interrupted", "error": "SIGTERM"' in out
    assert not list(Path("/tmp").glob("robust-slurm.*")), "test_slurm.sh left its folder behind"

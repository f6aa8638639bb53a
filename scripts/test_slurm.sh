#!/usr/bin/env bash
# A real SLURM cluster for the tests: a one-node cluster on localhost (munged + slurmctld + slurmd, a generated
# slurm.conf in a temporary folder, no cgroup plugins), a `robust train --multirun ... hydra/launcher=submitit_slurm`
# sweep submitted to it, every job's run.json and the collected table checked, then a running job scancel'ed
# (SLURM's SIGTERM, as on a time-out or pre-emption) and its run.json checked for status=interrupted.
# Everything it starts is stopped and its folder removed on exit, also on failure or Ctrl-C.
#   scripts/test_slurm.sh            (root, or sudo, to install Debian's slurm-wlm and munge when missing)
# Exit status 77: SLURM is missing and could not be installed (the test skips). Environment: ROBUST (default .venv/bin/robust), KEEP=1 keeps the temporary folder for a look afterwards.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROBUST="${ROBUST:-$REPO/.venv/bin/robust}"
PYTHON="$(dirname "$ROBUST")/python"
START=$SECONDS
say() { echo "[test_slurm $((SECONDS - START))s] $*"; }
fail() { echo "test_slurm: FAILED: $*" >&2; exit 1; }

[ -x "$ROBUST" ] || fail "no robust at $ROBUST (run scripts/setup_venv.sh, or set ROBUST=path/to/robust)"
"$PYTHON" -c "import hydra_plugins.hydra_submitit_launcher" 2>/dev/null \
    || fail "the submitit launcher is missing: pip install -e '.[cluster]'"

# ---- Debian's SLURM and munge, when missing
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    say "installing slurm-wlm and munge"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || { echo "test_slurm: SKIPPED: apt-get install slurm-wlm munge did not work (needs root or passwordless sudo, and Debian's mirrors)" >&2; exit 77; }
fi
export PATH="/usr/sbin:$PATH"

TMP="$(mktemp -d /tmp/robust-slurm.XXXXXX)"
chmod 755 "$TMP"
PIDS=()  # munged, slurmctld, slurmd, in start order
STEPDS_BEFORE=" $(pgrep -d ' ' -x slurmstepd || true) "
stop() {  # SIGTERM, then SIGKILL after 10 s: a daemon that hangs must not hang the test
    local pid
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.1
    done
    for pid in "$@"; do kill -9 "$pid" 2>/dev/null || true; done
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "${SWEEP_PID:-}" ] && stop "$SWEEP_PID"
    if [ -f "$TMP/slurm.conf" ] && [ "${#PIDS[@]}" -ge 2 ]; then  # let the controller end every job before it stops
        SLURM_CONF="$TMP/slurm.conf" scancel --quiet --user "$(id -un)" 2>/dev/null || true
        for _ in $(seq 30); do [ -z "$(SLURM_CONF="$TMP/slurm.conf" squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
    fi
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}"; done  # slurmd, slurmctld, then munged
    local stepd  # job steps whose slurmd is gone
    for stepd in $(pgrep -x slurmstepd || true); do
        [[ "$STEPDS_BEFORE" == *" $stepd "* ]] || kill -9 "$stepd" 2>/dev/null || true
    done
    if [ "$rc" != 0 ]; then
        for log in "$TMP"/log/*.log; do [ -f "$log" ] && { echo "--- $log (last lines)"; tail -n 15 "$log"; }; done >&2
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$TMP"/{log,state,spool,munge,outputs,work}

# ---- munge, on its own socket and key (the system's munged, if any, is left alone)
dd if=/dev/urandom of="$TMP/munge/munge.key" bs=1024 count=1 status=none
chmod 711 "$TMP/munge"; chmod 400 "$TMP/munge/munge.key"
munged --foreground --force --socket="$TMP/munge/munge.sock" --key-file="$TMP/munge/munge.key" \
    --log-file="$TMP/log/munged.log" --pid-file="$TMP/munge/munged.pid" --seed-file="$TMP/munge/munged.seed" \
    >>"$TMP/log/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$TMP/munge/munge.sock" ] && break; sleep 0.1; done
[ -S "$TMP/munge/munge.sock" ] || fail "munged did not start"

# ---- slurm.conf: this host as controller and only node, free ports, no cgroups, no accounting database
HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
PORTS="$("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
read -r CTLD_PORT SLURMD_PORT <<<"$PORTS"
cat >"$TMP/slurm.conf" <<EOF
ClusterName=robusttest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$(id -un)
AuthType=auth/munge
AuthInfo=socket=$TMP/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool
SlurmctldPidFile=$TMP/slurmctld.pid
SlurmdPidFile=$TMP/slurmd.pid
SlurmctldLogFile=$TMP/log/slurmctld.log
SlurmdLogFile=$TMP/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
ReturnToService=2
KillWait=20
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=robust Nodes=$HOST Default=YES MaxTime=30 State=UP
EOF
export SLURM_CONF="$TMP/slurm.conf"

slurmctld -D -i -f "$SLURM_CONF" >>"$TMP/log/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" >>"$TMP/log/slurmd.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do
    sinfo -h -o "%t" 2>/dev/null | grep -Eq '^(idle|mix|alloc)' && break
    sleep 1
done
sinfo -h -o "%t" 2>/dev/null | grep -Eq '^(idle|mix|alloc)' \
    || fail "the node did not come up: $(sinfo -h -o '%t %E' 2>&1 | head -1); see the daemons' logs below"
say "cluster up: $(sinfo -h -o '%P %D %c CPUs %t')"

# ---- the sweep: 4 training jobs as one array on the cluster, collected by the submitting process
cd "$TMP/work"
LAUNCH=(hydra/launcher=submitit_slurm hydra.launcher.partition=robust hydra.launcher.timeout_min=10
        hydra.launcher.cpus_per_task=1 hydra.launcher.gpus_per_node=0 hydra.launcher.mem_gb=2
        "hydra.launcher.setup=[\"export OMP_NUM_THREADS=1\"]" outputs_root="$TMP/outputs" dataset=digits data.n_train=300)
say "submitting robust train --multirun defense=none,fgsm_at seed=0,1"
timeout 240 "$ROBUST" train --multirun defense=none,fgsm_at seed=0,1 train.epochs=2 "${LAUNCH[@]}" \
    hydra.sweep.dir="$TMP/outputs/sweep" >"$TMP/log/sweep.log" 2>&1 \
    || { tail -n 30 "$TMP/log/sweep.log" >&2; fail "the sweep did not finish (exit $?)"; }
"$PYTHON" - "$TMP/outputs/sweep" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd
sweep = Path(sys.argv[1])
records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/run.json"))]
assert len(records) == 4, f"expected 4 run.json under {sweep}, found {len(records)}"
bad = [(r["overrides"], r["status"], r.get("error")) for r in records if r["status"] != "completed"]
assert not bad, f"jobs that did not complete: {bad}"
jobs = {(r["choices"]["defense"], r["config"]["seed"]) for r in records}
assert jobs == {(d, s) for d in ("none", "fgsm_at") for s in (0, 1)}, jobs
runs = pd.read_csv(sweep / "collected" / "runs.csv")
assert len(runs) == 4 and set(runs.status) == {"completed"}, runs[["run", "status"]]
log = pd.read_csv(sweep / "collected" / "train_log.csv")
assert set(log.defense) == {"none", "fgsm_at"} and set(log.seed) == {0, 1} and log.epoch.max() == 2, log
print(f"sweep: 4 jobs completed, collected runs.csv {len(runs)} rows, train_log.csv {len(log)} rows")
EOF
ARRAY="$(ls "$TMP/outputs/sweep/.submitit" 2>/dev/null | grep -v _ | head -1)"  # .submitit/<array id>_<task> per task
[ -n "$ARRAY" ] && [ "$(ls -d "$TMP/outputs/sweep/.submitit/${ARRAY}"_[0-3] | wc -l)" = 4 ] \
    || fail "no .submitit/<job>/<job>_0..3 folders: the jobs did not run as one SLURM array"
say "sweep checked"

# ---- scancel a running job: SIGTERM -> status=interrupted in its run.json
timeout 200 "$ROBUST" train --multirun defense=none seed=7 train.epochs=100000 "${LAUNCH[@]}" \
    hydra.sweep.dir="$TMP/outputs/cancel" >"$TMP/log/cancel.log" 2>&1 &
SWEEP_PID=$!
RUN_JSON=""
for _ in $(seq 120); do
    RUN_JSON="$(ls "$TMP"/outputs/cancel/*/run.json 2>/dev/null | head -1 || true)"
    [ -n "$RUN_JSON" ] && grep -q '"status": *"running"' "$RUN_JSON" && [ -n "$(squeue -h -t R -o %i)" ] && break
    sleep 1
done
[ -n "$RUN_JSON" ] || { tail -n 20 "$TMP/log/cancel.log" >&2; fail "the job to cancel never started"; }
sleep 3  # a few training steps
JOB="$(squeue -h -t R -o %i | head -1)"
say "scancel $JOB"
scancel "$JOB"
for _ in $(seq 60); do grep -q '"status": *"interrupted"' "$RUN_JSON" && break; sleep 1; done
grep -q '"status": *"interrupted"' "$RUN_JSON" || fail "after scancel, $RUN_JSON says $(grep -o '"status": *"[a-z_]*"' "$RUN_JSON")"
say "scancel'ed job recorded: $(grep -o '"status": *"[a-z_]*"' "$RUN_JSON"), $(grep -o '"error": *"[^"]*"' "$RUN_JSON")"
for _ in $(seq 30); do [ -z "$(squeue -h -o %i)" ] && break; sleep 1; done
[ -z "$(squeue -h -o %i)" ] || fail "the cancelled job is still in the queue 30 s after scancel: $(squeue -h -o '%i %T')"
stop "$SWEEP_PID"  # the submitting process would wait for the cancelled job's result forever (no accounting database)
SWEEP_PID=""
say "passed"

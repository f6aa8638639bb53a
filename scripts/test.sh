#!/usr/bin/env bash
# Create/use .venv, install robust with its test extra, check lint and format (ruff), run the fast test suite (pass --slow for the long one).
# Tests run in one worker process per core (pytest-xdist; ROBUST_TEST_WORKERS overrides, 0 = in this process):
# most of them are CLI subprocesses, and on 2 cores two workers cut the wall time from about 10 to 7.5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh test
# tests/test_report.py renders report.html in a real headless Chromium: take Debian's where we can (root, apt),
# best effort (without it that one test says it skipped and why)
if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell) >/dev/null 2>&1 \
    || echo "test.sh: could not install chromium-headless-shell; the headless-browser check of robust report will be skipped"
fi
# tests/test_slurm.py starts a one-node SLURM cluster (scripts/test_slurm.sh): Debian's slurm-wlm and munge, same terms
if ! command -v slurmctld >/dev/null 2>&1 && ! [ -x /usr/sbin/slurmctld ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge) >/dev/null 2>&1 \
    || echo "test.sh: could not install slurm-wlm and munge; the SLURM cluster test will be skipped"
fi
# tests/test_summary.py compiles `robust collect --format latex` in a minimal document: Debian's pdflatex with booktabs
if ! command -v pdflatex >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends texlive-latex-base texlive-latex-recommended) >/dev/null 2>&1 \
    || echo "test.sh: could not install pdflatex; the LaTeX compile check will be skipped (its structure is still checked)"
fi
# lint and format first: a finding fails the run in seconds, before the 10-minute suite (pyproject.toml [tool.ruff])
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ "${1:-}" = "--slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow -n "${ROBUST_TEST_WORKERS:-auto}" --dist worksteal "$@"
fi
# worksteal: an idle worker takes tests queued on the other, so a long test near the end does not leave a core idle
exec .venv/bin/python -m pytest -q -n "${ROBUST_TEST_WORKERS:-auto}" --dist worksteal "$@"

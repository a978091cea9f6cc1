#!/usr/bin/env bash
# One command for the test suite on a fresh machine: sets up .venv, installs, runs pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test || exit 1
# On pytest-xdist workers: one per core, at most 4 (each holds ~2 GB); TOKENPRUNE_TEST_WORKERS=0 runs in one
# process. Slow tests go first and the multi-process ones share one work unit (tests/conftest.py).
cores=$(nproc 2>/dev/null || echo 1)
workers=${TOKENPRUNE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
if [ "$#" -gt 0 ]; then
  python -m pytest -q -n "$workers" --dist loadgroup "$@"
  status=$?
else
  # The whole suite: the one-node SLURM cluster's tests run afterwards, on their own. Beside the other worker's
  # load a requeued job's DDP rendezvous found its port still taken (EADDRINUSE, 2 runs of 2); alone, never.
  python -m pytest -q -n "$workers" --dist loadgroup --ignore tests/test_slurm_real.py
  status=$?
  python -m pytest -q tests/test_slurm_real.py
  slurm=$?
  if [ "$status" -eq 0 ]; then status=$slurm; fi
fi
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"

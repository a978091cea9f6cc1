#!/usr/bin/env bash
# One command for the test suite on a fresh machine: sets up .venv, installs, runs pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test || exit 1
# on pytest-xdist workers: one per core, at most 4 (each holds ~2 GB); TOKENPRUNE_TEST_WORKERS=0 runs in one
# process. Slow tests go first and the multi-process ones share one work unit (tests/conftest.py).
cores=$(nproc 2>/dev/null || echo 1)
workers=${TOKENPRUNE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
python -m pytest -q -n "$workers" --dist loadgroup "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"

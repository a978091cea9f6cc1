#!/usr/bin/env bash
# One command for the test suite on a fresh machine: sets up .venv, installs, runs pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test || exit 1
python -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"

#!/usr/bin/env bash
# One command for the main job on a fresh machine: sets up .venv, installs, runs eval.py on the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh data
python eval.py "$@"

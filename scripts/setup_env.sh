#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and install tokenprune with the given extras.
# Usage: source scripts/setup_env.sh [extras]     e.g.  source scripts/setup_env.sh test
set -euo pipefail
EXTRAS="${1:-data}"
VENV="${TOKENPRUNE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# torch/torchvision are pinned in pyproject.toml (the pair that imports cleanly with timm on CPU machines).
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q -e ".[${EXTRAS}]"

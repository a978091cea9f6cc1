#!/usr/bin/env bash
# The VLM prefill benchmark on a CUDA machine, LLaVA-1.5-7B shapes from random weights in bf16, logs under $1:
#   bash benchmarks/gpu_vlm.sh benchmarks/gpu_out [WHEEL_DIR]
# A machine without transformers gets it from WHEEL_DIR (made here with: pip download transformers==5.23.0
# --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d DIR).
set -uo pipefail
OUT=${1:-benchmarks/gpu_out}
WHEELS=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD/src
python -c "import transformers" 2>/dev/null || {
  [ -n "$WHEELS" ] || { echo "transformers is missing and no wheel directory was given"; exit 2; }
  pip install -q --no-index --find-links "$WHEELS" transformers==5.23.0 2>&1 | tail -3; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/vlm_device.txt"
for m in visionzip cls_attn; do
  timeout 300 python benchmarks/bench_vlm.py --device cuda --real-shapes --method $m --record "$OUT/vlm_results.md"
done
python -m pytest -q -p no:cacheprovider tests/test_vlm.py 2>&1 | tail -5 | tee "$OUT/vlm_tests.log"

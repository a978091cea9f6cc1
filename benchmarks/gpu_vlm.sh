#!/usr/bin/env bash
# The VLM prefill benchmark on a CUDA machine, LLaVA-1.5-7B shapes from random weights in bf16, logs under $1:
#   bash benchmarks/gpu_vlm.sh benchmarks/gpu_out [WHEEL_DIR]
# A machine without transformers 5.23.0 (the H200 image has 5.17.0, with a compatible huggingface_hub 1.33 and
# tokenizers 0.23.2) installs the wheels of WHEEL_DIR into /tmp/site without dependencies; make them here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d DIR transformers==5.23.0 regex==2026.11.19
set -uo pipefail
OUT=${1:-benchmarks/gpu_out}
WHEELS=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-}
if [ "$(python3 -c 'import transformers; print(transformers.__version__)' 2>/dev/null)" != "5.23.0" ]; then
  [ -n "$WHEELS" ] || { echo "transformers 5.23.0 is missing and no wheel directory was given"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/vlm_device.txt"
for m in visionzip cls_attn; do
  timeout 200 python3 benchmarks/bench_vlm.py --device cuda --real-shapes --method $m --record "$OUT/vlm_results.md"
done
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_vlm.py 2>&1 | tail -5 | tee "$OUT/vlm_tests.log"

#!/usr/bin/env bash
# GPU checks and benchmarks in one go (a CUDA machine with the project importable), logs under $1:
#   bash benchmarks/gpu_suite.sh benchmarks/gpu_out [--tests-only | --bench-only]
# 1. the GPU-marked tests (Triton scan vs the reference loop, every method on GPU vs CPU, ViT path vs timm),
# 2. Triton scan parity on ViM-sized shapes, 3. scan / model / pruning throughput (same-run ratios).
set -uo pipefail
OUT=${1:-benchmarks/gpu_out}
MODE=${2:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$MODE" != "--bench-only" ]; then
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, timm, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'timm', timm.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/device.txt"
python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
python tests/scripts/triton_scan_check.py --device cuda --cases gpu 2>&1 | tee "$OUT/triton_parity.log"
fi
[ "$MODE" = "--tests-only" ] && exit 0
python benchmarks/bench_scan.py --device cuda --impl triton --shapes vim_t long vim_s --no-compile-time \
  2>&1 | tee "$OUT/bench_scan.log"
python benchmarks/bench_models.py --device cuda --batch 128 --scans triton,reference --out "$OUT/results_gpu.md"
for m in l2 papr; do
  python benchmarks/bench_pruning.py --device cuda --batch 128 --method $m --out "$OUT/results_gpu.md"
done

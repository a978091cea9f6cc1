#!/usr/bin/env bash
# GPU checks and benchmarks in one go, on a CUDA machine with the project importable; logs and tables under $1:
#   bash benchmarks/gpu_suite.sh benchmarks/gpu_h200/run1 [all|tests|bench|ssm]
# 1. kernel parity: the fused Triton scan/conv vs float64 references (tests/scripts/fused_check.py), and the
#    GPU-marked tests (every kernel vs the reference, every method on GPU vs CPU, ViT path vs timm, capture);
# 2. benchmarks, each a set of ratios measured in one run: the SSM path (scan vs a same-bytes copy, vs
#    mamba-ssm when installed, time vs L, ViM-S vs DeiT-S, bf16 vs fp32, training step, kernels per forward),
#    then the pruning grid and the VLM prefill benchmark when present.
# Set TOKENPRUNE_SUITE_FAST=1 to skip the slower GPU tests.
set -uo pipefail
OUT=${1:-benchmarks/gpu_out}
MODE=${2:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[suite $(( $(date +%s) - T0 ))s] $*"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, timm, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'timm', timm.__version__, 'triton', triton.__version__)"
  python -c "import mamba_ssm, causal_conv1d; print('mamba-ssm', mamba_ssm.__version__, 'causal-conv1d', \
causal_conv1d.__version__)" 2>&1 | tail -1
  date -u; } 2>&1 | tee "$OUT/device.txt"
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  stamp "fused-op parity"
  python tests/scripts/fused_check.py --device cuda --cases gpu 2>&1 | tee "$OUT/fused_parity.log"
  # the scan backward at the tiles the ssm benchmark sweeps (their lane sums compile differently per tile)
  python tests/scripts/fused_check.py --device cuda --tiles 32,8,1 64,8,2 32,4,1 64,4,1 32,16,1 2>&1 \
    | tee "$OUT/fused_tiles.log"
  stamp "gpu tests"
  python -m pytest -q -m gpu -p no:cacheprovider -x --timeout 300 tests 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ] || [ "$MODE" = ssm ]; then
  stamp "ssm benchmark"
  python benchmarks/bench_ssm_gpu.py --out "$OUT/ssm.md" ${SSM_ARGS:---sweep} 2>&1 | tail -n 80
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  stamp "pruning grid (every preset at 40 %, ViM-S and DeiT-S, fp32/bf16, inference and training step)"
  timeout 420 python benchmarks/bench_gpu_grid.py --device cuda --out "$OUT/grid.md" ${GRID_ARGS:-} 2>&1 | tail -n 60
  stamp "grad checkpointing memory (ViM-S, PlainMamba-L2)"
  timeout 120 python benchmarks/bench_grad_checkpointing.py vim_small_patch16_224:64 plainmamba_l2:64 2>&1 \
    | tee "$OUT/grad_ckpt.log" | tail -n 20
  stamp "vlm prefill (LLaVA-1.5-7B shapes, bf16; needs transformers 5.23.0 among the carried wheels)"
  for m in visionzip cls_attn; do
    timeout 300 python benchmarks/bench_vlm.py --device cuda --real-shapes --method $m --record "$OUT/vlm.md" 2>&1 \
      | tail -n 20
  done
fi
stamp "done"

#!/usr/bin/env bash
# Every GPU check and benchmark in one call that fits a short lease; logs and tables under $1:
#   bash benchmarks/gpu_suite.sh OUT [STAGES]        e.g.  bash benchmarks/gpu_suite.sh $OUT
# STAGES: a comma list of the stages below, or all (default), tests (parity,tests,tiles) or bench (the rest).
# Stages run in priority order (correctness first, then one table per issue, then extras), each until its
# planned end: the sum of its and the earlier stages' caps, so time an early stage leaves is the later ones',
# and never past SUITE_BUDGET_S (default 560 s, for a device call's 600 s limit) counted from the start.
# A stage cut off keeps what it printed (every log is written as it goes); stages never started are listed
# at the end with the command that runs them in a second call.
#   parity  kernel parity: the fused Triton scan/conv vs float64 references (tests/scripts/fused_check.py)
#   tests   the gpu-marked tests (kernels vs reference, methods on GPU vs CPU, ViT vs timm, CUDA-graph capture)
#   ssm     issue 16's tables (bench_ssm_gpu.py: scan vs a same-bytes copy and vs mamba-ssm, time vs L,
#           ViM-S vs DeiT-S, bf16 vs fp32, training step, kernels per forward)
#   grid    issue 17's grid (bench_gpu_grid.py: every preset at 40 %, ViM-S and DeiT-S, fp32/bf16, inference
#           and training step, speed-up next to FLOPs ratio, host ÷ GPU time per forward)
#   vlm     issue 20's prefill benchmark (LLaVA-1.5-7B shapes in bf16, VisionZip)
#   tiles   the scan backward at the tiles the sweep times (their lane sums compile differently per tile)
#   sweep   scan tile sweep (bench_ssm_gpu.py --sections sweep)
#   ckpt    gradient-checkpointing memory (ViM-S, PlainMamba-L2)
#   vlm2    the prefill benchmark with the CLS-attention reducer
# Wheels the image lacks (scripts/prepare_gpu_wheels.sh fills .whl/) are installed into /tmp/site first, and
# the kernels prebuilt for this Triton are unpacked into the Triton cache.
# SUITE_DRY_RUN=1 prints the plan (stage, cap, planned end) and runs nothing.
set -uo pipefail
OUT=${1:-benchmarks/gpu_out}
REQ=${2:-all}
BUDGET=${SUITE_BUDGET_S:-560}
ORDER=(parity tests ssm grid vlm tiles sweep ckpt vlm2)
declare -A CAP=([parity]=80 [tests]=140 [ssm]=150 [grid]=120 [vlm]=70 [tiles]=60 [sweep]=60 [ckpt]=60 [vlm2]=60)
case "$REQ" in
  all) WANT=" ${ORDER[*]} " ;;
  tests) WANT=" parity tests tiles " ;;
  bench) WANT=" ssm grid vlm sweep ckpt vlm2 " ;;
  *) WANT=" ${REQ//,/ } " ;;
esac
for s in $WANT; do
  [ -n "${CAP[$s]:-}" ] || { echo "unknown stage '$s'; expected a comma list of: ${ORDER[*]}, or all/tests/bench"; exit 2; }
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
LOG="$OUT/suite.log"
say() { echo "[suite $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

plan() {  # "stage cap planned_end" for each wanted stage, in priority order
  local total=0 s
  for s in "${ORDER[@]}"; do
    [[ "$WANT" == *" $s "* ]] || continue
    total=$(( total + CAP[$s] ))
    echo "$s ${CAP[$s]} $(( total < BUDGET ? total : BUDGET ))"
  done
}
if [ "${SUITE_DRY_RUN:-0}" = 1 ]; then
  plan | while read -r s cap end; do echo "$s cap $cap planned_end $end"; done
  echo "budget $BUDGET"
  exit 0
fi

# --- environment: the project from src/, carried wheels where the image lacks them
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import fvcore, webdataset, transformers as t; \
assert t.__version__ == '5.23.0'" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3 | tee -a "$LOG"
  export PYTHONPATH=$PWD/src:/tmp/site:$PYTHONPATH
fi
# kernels prebuilt for sm_90 on a CPU machine with this Triton (benchmarks/prewarm_triton_cache.py): a lease
# does not spend minutes compiling the parity stage's and the scan tables' kernels; a kernel whose key differs
# is compiled as usual
TV=$(python3 -c "import triton; print(triton.__version__)" 2>/dev/null)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [ -f ".whl/triton_cache-$TV.tar.xz" ]; then
  mkdir -p /tmp/tp_triton && tar xJf ".whl/triton_cache-$TV.tar.xz" -C /tmp/tp_triton \
    && export TRITON_CACHE_DIR=/tmp/tp_triton/triton_cache
fi
kernels() { ls "$TRITON_CACHE_DIR" 2>/dev/null | wc -l; }
say "Triton $TV, cache $TRITON_CACHE_DIR with $(kernels) kernels"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'timm', timm.__version__, 'triton', triton.__version__)"
  python3 -c "import mamba_ssm, causal_conv1d; print('mamba-ssm', mamba_ssm.__version__, 'causal-conv1d', \
causal_conv1d.__version__)" 2>&1 | tail -1
  python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
  python3 -c "from tokenprune.ssm import _scan_kernels as k; print('scan tiles transposed (Triton < 3.7)', \
k.TRANSPOSED.value)" 2>&1 | tail -1
  git log -1 --format='commit %h %cd' 2>/dev/null; date -u; } 2>&1 | tee "$OUT/device.txt"

DUP_PARITY_TEST=tests/test_fused_ops.py::test_compiled_fused_ops_match_float64_references_on_gpu
# The files with gpu-marked tests (tests/test_gpu_suite.py checks the list is complete), in the order they run:
# the kernels at ViM shapes and the methods on the GPU first, the costliest (subprocess checks, an inductor
# compile) last, so a stage cut off loses the least; named, not collected from tests/, so that a CPU-only
# module that cannot import on the device cannot stop the collection
GPU_TEST_FILES=(tests/test_scan_triton.py tests/test_gpu_parity.py tests/test_scan.py tests/test_capturable.py
                tests/test_compile.py tests/test_fused_ops.py)
stage_cmd() {  # the command of a stage, its output appended to one of at most 8 files under OUT
  case "$1" in
    parity) echo "python3 tests/scripts/fused_check.py --device cuda --cases gpu >>$OUT/parity.log" ;;
    # -v: each test's result is in the log as it ends (a stage cut off keeps them; -q printed failures only at
    # the end); the parity stage has run the compiled-kernel check that one test repeats
    tests) echo "python3 -m pytest -v -m gpu -p no:cacheprovider --timeout 120 -rfEs --durations 20 \
$([[ "$WANT" == *" parity "* ]] && echo "--deselect $DUP_PARITY_TEST") ${GPU_TEST_FILES[*]} >>$OUT/gpu_tests.log" ;;
    ssm) echo "python3 benchmarks/bench_ssm_gpu.py --out $OUT/ssm.md ${SSM_ARGS:-} >>$LOG" ;;
    grid) echo "python3 benchmarks/bench_gpu_grid.py --device cuda --out $OUT/grid.md ${GRID_ARGS:-} >>$OUT/grid.log" ;;
    vlm) echo "python3 benchmarks/bench_vlm.py --device cuda --real-shapes --method visionzip --record $OUT/vlm.md >>$LOG" ;;
    tiles) echo "python3 tests/scripts/fused_check.py --device cuda --tiles 32,8,1 64,8,2 32,4,1 64,4,1 32,16,1 \
>>$OUT/parity.log" ;;  # bench_ssm_gpu.SWEEP_BWD_TILES
    sweep) echo "python3 benchmarks/bench_ssm_gpu.py --out $OUT/ssm.md --sections sweep >>$LOG" ;;
    ckpt) echo "python3 benchmarks/bench_grad_checkpointing.py vim_small_patch16_224:64 plainmamba_l2:64 >>$LOG" ;;
    vlm2) echo "python3 benchmarks/bench_vlm.py --device cuda --real-shapes --method cls_attn --record $OUT/vlm.md >>$LOG" ;;
  esac
}

left_out=()
while read -r s _ end <&3; do  # the plan on fd 3: the stages' commands keep stdin
  now=$(( $(date +%s) - T0 ))
  if [ $(( end - now )) -lt 20 ]; then left_out+=("$s"); continue; fi
  cmd=$(stage_cmd "$s")
  say "stage $s (until ${end}s): ${cmd%% >>*}"
  timeout -k 5 $(( end - now )) bash -c "$cmd 2>&1"
  rc=$?
  [ $rc = 124 ] || [ $rc = 137 ] && say "stage $s cut off at its planned end (its output so far is kept)"
  say "stage $s rc=$rc (Triton cache: $(kernels) kernels)"
done 3< <(plan)
if [ ${#left_out[@]} -gt 0 ]; then
  joined=$(IFS=,; echo "${left_out[*]}")
  say "not started for lack of time: $joined; run them with: bash benchmarks/gpu_suite.sh OUT2 $joined"
fi
say "done"

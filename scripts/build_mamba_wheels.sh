#!/usr/bin/env bash
# Build mamba-ssm and causal-conv1d wheels for a GPU machine from their PyPI sources, on a machine without a GPU
# (nvcc needed), for side-by-side benchmarks (benchmarks/bench_ssm_gpu.py times mamba-ssm when importable):
#   bash scripts/build_mamba_wheels.sh OUTDIR [PYTHON] [TORCH_VERSION] [SM]
# defaults: python3.12, torch 2.11.0 (PyPI's default wheel is the CUDA 13.0 build), sm 90 (H100/H200).
# Both setup.py files hard-code nine -gencode targets with no variable to restrict them, so the extracted
# copies (never committed) keep only sm_$SM, and "-lineinfo" (which embeds the PTX text: ~3x the size) is
# replaced by fatbin compression; the .so files are stripped of host debug info. Measured 2026-12-04 on 2
# loaded cores: causal-conv1d 14 min, mamba-ssm 37 min; wheels 3.8 MB + 9.2 MB (fit the device's 64 MiB carry).
set -euo pipefail
OUT=$(realpath -m "${1:?usage: build_mamba_wheels.sh OUTDIR [PYTHON] [TORCH_VERSION] [SM]}")
PY=${2:-python3.12}
TORCH=${3:-2.11.0}
SM=${4:-90}
# torch's extension builder takes CUDA_HOME from the nvcc on PATH, which may be a wrapper script outside the
# toolkit (/usr/local/bin/nvcc here: the build then finds no cuda_runtime_api.h); point it at the toolkit
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do [ -f "$d/include/cuda_runtime_api.h" ] && { export CUDA_HOME=$d; break; }; done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}"
WORK=$(mktemp -d)
mkdir -p "$OUT"
"$PY" -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
pip install -q "torch==$TORCH" "setuptools<82" wheel ninja packaging einops numpy
pip download -q --no-deps --no-build-isolation --no-binary causal-conv1d,mamba-ssm \
  causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1 -d "$WORK/src"
for sdist in "$WORK"/src/*.tar.gz; do
  tar xzf "$sdist" -C "$WORK/src"
  dir="$WORK/src/$(basename "$sdist" .tar.gz)"
  python - "$dir/setup.py" "$SM" <<'EOF'
import re, sys
path, sm = sys.argv[1], sys.argv[2]
s = open(path).read()
pair = re.compile(r'\n(\s*)cc_flag\.append\("-gencode"\)\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)')
s = pair.sub(lambda m: m.group(0) if m.group(2) == sm else f"\n{m.group(1)}pass  # sm_{m.group(2)} not built", s)
s = s.replace('"-lineinfo"', '"--compress-mode=size"')
open(path, "w").write(s)
EOF
  TORCH_CUDA_ARCH_LIST="${SM:0:1}.${SM:1}" CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=2 \
    nice -n 19 pip wheel -q --no-build-isolation --no-deps -w "$WORK/raw" "$dir"
done
for whl in "$WORK"/raw/*.whl; do
  python -m wheel unpack -d "$WORK/unpacked" "$whl"
  find "$WORK/unpacked" -name '*.so' -exec strip --strip-debug {} \;
  python -m wheel pack -d "$OUT" "$WORK"/unpacked/*/
  rm -rf "$WORK/unpacked"
done
ls -la "$OUT"
rm -rf "$WORK"

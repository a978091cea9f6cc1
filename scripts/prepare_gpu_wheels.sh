#!/usr/bin/env bash
# Fill the git-ignored .whl/ with every wheel the GPU suite needs that the device image lacks, on this (CPU)
# machine, so that a short GPU lease starts measuring at once (the device machine reaches no registry):
#   bash scripts/prepare_gpu_wheels.sh [--no-mamba]      (DEVICE_TORCH=2.11.0: the device image's torch)
# The device image (Python 3.12, torch 2.11.0+cu130) has torch, Triton, timm, lightning, numba, tokenizers and
# huggingface-hub, but not fvcore and its helpers, webdataset, jsonargparse's signature extras, nor transformers
# 5.23.0 (it has 5.17). mamba-ssm and causal-conv1d are built from their sdists for sm_90 against torch 2.11.0
# (scripts/build_mamba_wheels.sh: 15 minutes on 2 idle cores, about 50 beside other work); --no-mamba skips
# them, and the suite then leaves out the side-by-side tables. It also prebuilds the suite's Triton kernels for
# sm_90 with the device's torch and Triton in a Python 3.12 venv (benchmarks/prewarm_triton_cache.py, a few
# minutes).
# benchmarks/gpu_suite.sh installs whatever lies in .whl/ by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
MAMBA=1
[ "${1:-}" = "--no-mamba" ] && MAMBA=0
DEST=.whl
DEVICE_TORCH=${DEVICE_TORCH:-2.11.0}
# the device's Python: a pyenv-managed 3.12 is not on PATH unless pyenv selects it
PY312=python3.12
"$PY312" -V >/dev/null 2>&1 || PY312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
[ -n "$PY312" ] || { echo "no Python 3.12 here: the device's mamba-ssm and Triton cache are built with it"; exit 1; }
mkdir -p "$DEST"
grep -qx '/.whl/' .gitignore || echo '/.whl/' >>.git/info/exclude
# One version of each: two versions of a package in .whl stop the device's install.
# portalocker and tabulate: fvcore's and iopath's imports; einops: mamba-ssm's (installed with --no-deps there)
PURE="fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 termcolor==3.3.0 portalocker==4.4.2 tabulate==0.10.0
webdataset==1.0.2 braceexpand==0.1.7 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
transformers==5.23.0 einops==0.8.2"
BINARY="regex==2026.12.2"   # compiled: the cp312 manylinux build; transformers 5.23 needs a newer one than the image's
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for spec in $PURE; do
  name=${spec%%==*}
  ls "$DEST"/"${name//-/_}"-*.whl >/dev/null 2>&1 && continue
  # pure-Python: a wheel from the registry where there is one, else built from the sdist (fvcore, iopath)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d "$DEST" "$spec" 2>/dev/null || python3 -m pip wheel -q --no-deps -w "$DEST" "$spec"
done
for spec in $BINARY; do
  name=${spec%%==*}
  ls "$DEST"/"$name"-*.whl >/dev/null 2>&1 && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d "$DEST" "$spec"
done
if [ "$MAMBA" = 1 ] && ! ls "$DEST"/mamba_ssm-*.whl >/dev/null 2>&1; then
  bash scripts/build_mamba_wheels.sh "$DEST" "$PY312" "$DEVICE_TORCH" 90
fi
# Triton finds a cached kernel by a key that hashes its own libtriton, which differs per Python version: the
# kernels are built in a Python 3.12 venv with the device's torch, whose Triton is the device's (3.6.0)
if ! ls "$DEST"/triton_cache-*.tar.xz >/dev/null 2>&1; then
  TDIR=$(mktemp -d)
  "$PY312" -m venv "$TDIR/venv"
  "$TDIR/venv/bin/python" -m pip install -q "torch==$DEVICE_TORCH" numpy timm==1.0.31
  PYTHONPATH="$PWD/src" "$TDIR/venv/bin/python" benchmarks/prewarm_triton_cache.py "$DEST"
  rm -rf "$TDIR"
fi
ls -l "$DEST"
TOTAL=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -cb "$DEST" | tail -1 | cut -f1) ))
echo "working tree + .whl: $(( TOTAL / 1048576 )) MiB of the device's 64 MiB carry limit"
[ "$TOTAL" -lt $(( 60 * 1048576 )) ] || { echo "too large to carry: drop --no-mamba's wheels or others"; exit 1; }

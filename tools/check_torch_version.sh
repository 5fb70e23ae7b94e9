#!/usr/bin/env bash
# Checks this checkout against another torch/triton pair than the pinned CPU one, on a machine without a GPU. The
# default pair is the one of the NVIDIA image the GPU checks run on (torch 2.11.0, its CUDA 13.0 build, triton
# 3.6.0), so an API missing from that torch, a C++/CUDA header change or a kernel that its triton cannot compile
# shows up before a GPU run. In a throwaway venv and worktree under $WORK (~5 GB, needs PyPI):
#   1. build the extension, with its CUDA kernels when nvcc exists (sm_90 unless TORCH_CUDA_ARCH_LIST says)
#   2. the test suite, without the Triton-interpreter cases (triton 3.6's interpreter fails with numpy >= 2.4;
#      a GPU compiles the kernels instead of interpreting them)
#   3. every Triton kernel and autotune config compiled for sm_90 (tests/triton_compile_check.py --all-configs)
# Usage: [TORCH=2.11.0 TRITON=3.6.0 TORCHVISION=0.26.0 WORK=/tmp/torch-compat] bash tools/check_torch_version.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
TORCHVISION=${TORCHVISION:-0.26.0}
WORK=${WORK:-/tmp/torch-compat}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
VENV="$WORK/venv-torch$TORCH"
TREE="$WORK/tree"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH" "triton==$TRITON"
  # the project's pins except torch and triton; timm & co. without their dependencies (they would replace torch)
  grep -v -E "^(triton|torch)==" requirements.txt >"$WORK/requirements.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$WORK/requirements.txt"
  sed "s/^torchvision==.*/torchvision==$TORCHVISION/" requirements-nodeps.txt >"$WORK/requirements-nodeps.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-compile -r "$WORK/requirements-nodeps.txt"
fi
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__)"

git worktree remove --force "$TREE" 2>/dev/null || rm -rf "$TREE"
git worktree add -q --detach "$TREE" HEAD
trap 'git worktree remove --force "$TREE" 2>/dev/null || true' EXIT
cd "$TREE"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
# a toolkit whose runtime library lies in lib/ rather than lib64/ (torch.utils.cpp_extension links from lib64/ only)
for lib in /usr/local/cuda*/lib; do [ -e "$lib/libcudart.so" ] && export LIBRARY_PATH="$lib:${LIBRARY_PATH:-}"; done

echo "== build"
"$VENV/bin/python" setup.py build_ext --inplace -q >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
echo "== tests (no Triton interpreter)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests -k "not interpreter and not triton" | tail -5
echo "== Triton kernels compiled for sm_90"
PYTHONPATH="$TREE" "$VENV/bin/python" tests/triton_compile_check.py --all-configs | tail -1

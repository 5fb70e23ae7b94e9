#!/usr/bin/env bash
# GPU checks for a machine with a CUDA GPU and a CUDA build of torch + triton + nvcc already installed:
# build the extension with its CUDA kernels, run the whole test suite there (CUDA and Triton tests included), and
# benchmark the Triton ops against the standard-PyTorch composition and a device copy of the same bytes.
#   OUT=results/gpu bash tools/gpu_check.sh      # logs + bench_triton.json under $OUT
# The video/CLI tests are left out (they need scikit-video and a decoder, which GPU images rarely carry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}

{ nvidia-smi -L || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} 2>&1 | tee "$OUT/env.txt"

echo "== build"
start=$SECONDS
if ! $PY setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "built in $((SECONDS - start)) s"

echo "== tests"
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n "${XDIST:-8}")
timeout "${TEST_TIMEOUT:-330}" $PY -m pytest -q -p no:cacheprovider "${xdist[@]}" tests \
  --ignore=tests/test_video_cli.py 2>&1 | tee "$OUT/tests.log" | grep -vE '^[.sFEx]+( +\[ *[0-9]+%\])?$' | tail -40

echo "== Triton op benchmarks"
timeout "${BENCH_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider benchmarks/bench_triton.py \
  --benchmark-json "$OUT/bench_triton.json" --benchmark-columns=mean,median,rounds 2>&1 | tail -4 | tee "$OUT/bench.log"

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
# Seen on the lent H200 image (torch 2.11+cu130, built with GCC 13.3): with its default /opt/gcc/bin/g++ wrapper every
# C++ exception thrown by the extension (any bad-input check) segfaulted; /usr/bin/g++ (GCC 13.3) works. Override
# with CXX=... / CC=...
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
start=$SECONDS
if ! $PY setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "built in $((SECONDS - start)) s with ${CXX:-the default compiler}"
if ! $PY -c "
import torch, eventful_kernels.ops as o
try:
    o.gather_rows(torch.zeros(2, 3), torch.zeros(1, 1, dtype=torch.long))
except RuntimeError as e:
    print('bad-input check raises:', str(e).splitlines()[0])
"; then
  echo "a C++ exception from the extension crashed the process: rebuild with another CXX"; exit 1
fi

echo "== tests"
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n "${XDIST:-8}")
# -v: failures are listed as they happen, so a run cut short by the timeout still names them.
timeout "${TEST_TIMEOUT:-330}" $PY -m pytest -v -p no:cacheprovider "${xdist[@]}" tests \
  --ignore=tests/test_video_cli.py 2>&1 | tee "$OUT/tests.log" \
  | grep -E "FAILED|ERROR|passed|failed" | tail -40
echo "results per file (also when cut short):"
sed -nE 's/^(tests\/[a-z_]+\.py)::.* (PASSED|FAILED|ERROR|SKIPPED).*/\2 \1/p; s/.*(PASSED|FAILED|ERROR|SKIPPED) (tests\/[a-z_]+\.py).*/\1 \2/p' \
  "$OUT/tests.log" | sort | uniq -c

echo "== Triton op benchmarks"
timeout "${BENCH_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider benchmarks/bench_triton.py \
  --benchmark-json "$OUT/bench_triton.json" --benchmark-columns=mean,median,rounds 2>&1 | tail -4 | tee "$OUT/bench.log"

#!/usr/bin/env bash
# GPU checks, in order of value, each writing its results into $OUT as soon as it finishes (a run cut short keeps
# what finished; at most 7 files):
#   1. build the extension with its CUDA kernels                         -> env.txt (+ build.log on failure)
#      and check the gates against the reference, fused and in three launches (tools/check_gates.py) -> env.txt
#   2. the end-to-end table: dense timm vs eventful, interleaved frames  -> gpu_e2e.json, gpu_e2e.md
#   3. the op table (N = 4096, K = N/16 and N/4; N = 196, K = N/4) against the standard-PyTorch composition
#                                                                        -> ops_cuda.json
#   4. the GPU tests, each file under its own time limit                 -> tests.log
#   5. one line per step with its status and duration                    -> summary.txt (appended as it goes)
# Needs a CUDA GPU with a CUDA build of torch, triton, timm and nvcc. The step limits add up to 8 min.
#   OUT=results/gpu VIDEO=path/to/bigbuckbunny.mp4 bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
PY=${PY:-python3}
VIDEO=${VIDEO:-bigbuckbunny}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
summary="$OUT/summary.txt"
: >"$summary"
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log status and duration to summary.txt
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  timeout "$limit" "$@"
  rc=$?
  echo "$name: rc=$rc ($([ $rc = 124 ] && echo "cut at ${limit} s" || echo "$((SECONDS - t0)) s"))" | tee -a "$summary"
  return $rc
}

{ nvidia-smi -L || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} 2>&1 | tee "$OUT/env.txt"

echo "== build"
# On the H200 image (torch 2.11+cu130, built with GCC 13.3) the default /opt/gcc/bin/g++ wrapper made every C++
# exception thrown by the extension segfault; /usr/bin/g++ (GCC 13.3) works. Override with CXX=... / CC=...
if [ -z "${CXX:-}" ] && [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
if ! step build "${BUILD_TIMEOUT:-150}" $PY setup.py build_ext --inplace -q >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
rm -f "$OUT/build.log"
if ! $PY -c "
import torch, eventful_kernels.ops as o
try:
    o.gather_rows(torch.zeros(2, 3), torch.zeros(1, 1, dtype=torch.long))
except RuntimeError as e:
    print('bad-input check raises:', str(e).splitlines()[0])
" >>"$OUT/env.txt" 2>&1; then
  echo "a C++ exception from the extension crashed the process: rebuild with another CXX" | tee -a "$summary"
  exit 1
fi
# the library's own report: CUDA targets, C++ CUDA kernels, whether they cover this GPU, the ops Triton serves
timeout 60 $PY -m eventful_kernels >>"$OUT/env.txt" 2>&1 || true

echo "== gates against the reference (fused and three-launch paths)"
# a fused gate that fails its check (or crashes it) must not spoil the tables: the rest then runs the three-launch
# gates
step gates "${GATES_TIMEOUT:-20}" $PY tools/check_gates.py 2>&1 | tee -a "$OUT/env.txt" | tail -4
if ! grep -q "gates \[fused\]: passed" "$OUT/env.txt"; then
  export EVENTFUL_CUDA_GATE=split
  echo "the fused gates failed their check: the rest runs with EVENTFUL_CUDA_GATE=split" | tee -a "$summary"
fi

echo "== end-to-end table"
step e2e "${E2E_TIMEOUT:-160}" $PY benchmarks/bench_gpu.py --video "$VIDEO" --out "$OUT/gpu_e2e.json" \
  ${E2E_ARGS:-} 2>&1 | grep -v "^|" | tail -20
[ -f "$OUT/gpu_e2e.json" ] && $PY benchmarks/bench_gpu.py --report "$OUT/gpu_e2e.json" >"$OUT/gpu_e2e.md" \
  && cat "$OUT/gpu_e2e.md"

echo "== op table"
# the ops with targets first (gates, attention updates, row moves), so a table cut at its limit keeps them
step ops "${OPS_TIMEOUT:-70}" $PY benchmarks/bench_ops.py --device cuda --dtype fp16 --sizes 4096:256,4096:1024,196:49 \
  --ops token_gate,token_gate_threshold,token_delta_gate,qk_update_,av_delta_update_,gather_rows,scatter_rows_,\
scatter_rows_residual_,qk_update_relpos_,gather_cols,scatter_cols_ --rounds 30 --budget 2 --out "$OUT/ops_cuda.json"

echo "== GPU tests"
: >"$OUT/tests.log"
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n "${XDIST:-8}")  # parallel Triton JIT compilation (16 cores)
# file:seconds:selection, in order of value: the ops through the dispatcher on CUDA tensors ("cuda": the C++ CUDA
# kernel where the build has one, else the Triton one registered for it); each op file collects ~300-1000 items per
# backend, so a file cut at its limit still logs (-v) what ran. The CPU backend of the same files runs anywhere, the
# Triton kernels under the interpreter and the C++ CUDA kernels under the emulator (tests/cuda_emulator.py).
for spec in "test_graphs.py:15:cuda" "test_gather_scatter.py:15:cuda" "test_token_gate.py:15:cuda" \
    "test_scatter_rows_residual.py:5:cuda" "test_qk_update.py:10:cuda" "test_av_delta_update.py:10:cuda" \
    "test_blocks.py:10:cuda"; do
  IFS=: read -r file limit select <<<"$spec"
  step "tests/$file${select:+ [$select]}" "$limit" $PY -m pytest -v -p no:cacheprovider "${xdist[@]}" --maxfail=20 \
    "tests/$file" ${select:+-k "$select and not cuda_emu"} >>"$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)" "$OUT/tests.log" | tail -3
done
cat "$summary"

"""Compile every Triton kernel of eventful_kernels.triton for an H100 (sm_90) without a GPU.

The interpreter runs kernels as numpy code and never compiles them; this script runs the real compiler pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin via the ptxas shipped with triton) so GPU-only compile errors (tl.dot
shapes, types of if/else branches, layouts) surface on a CPU-only machine. It must run WITHOUT TRITON_INTERPRET.
Usage: python tests/triton_compile_check.py [--all-configs]   (prints one line per kernel, exits 1 on failure)
"""
from __future__ import annotations

import importlib
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import eventful_kernels  # noqa: E402,F401
from eventful_kernels.triton import av_delta_update, gather_scatter, qk_update  # noqa: E402

token_gate = importlib.import_module("eventful_kernels.triton.token_gate")  # the package's `token_gate` is the op

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT_ARGS = {"scale", "threshold"}


def _signature(fn, ptrs: dict, constexprs: dict) -> dict:
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr or name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _compile(label: str, kernel, ptrs: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
             aligned=(), ptx_has=()) -> float:
    """Compile for sm_90. Like the JIT does for real tensors, every pointer is specialised as 16-byte aligned and
    the int args named in ``aligned`` as multiples of 16 (a unit stride is passed as a constexpr 1 in
    ``constexprs``); ``ptx_has``: instructions the PTX must contain (e.g. 16-byte vector loads)."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    t0 = time.time()
    sig = _signature(fn, ptrs, constexprs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if sig[p.name].startswith("*") or p.name in aligned}
    src = ASTSource(fn, sig, constexprs, attrs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm["cubin"], label
    for instr in ptx_has:
        assert instr in compiled.asm["ptx"], f"{label}: no {instr} in the PTX"
    dt = time.time() - t0
    print(f"ok  {label:70s} {dt:5.1f}s  shared={compiled.metadata.shared}", flush=True)
    return dt


def _autotune_configs(kernel, all_configs: bool):
    return kernel.configs if all_configs else kernel.configs[:1]


# Row layouts as the ops see them with contiguous tensors and D a multiple of 16: unit feature stride, every other
# stride a multiple of 16 elements. The copy must then move 16-byte vectors (v4 of 32-bit words).
_ROW_ALIGNED = ("D", "s_b", "s_h", "s_n", "d_b", "d_h", "d_n")
_VEC = ("ld.global.v4", "st.global.v4")
# Products on tensor cores for 16-bit inputs and for float32 at tf32 precision: "mma" matches both the Hopper
# warpgroup wgmma (tiles of 64 rows and more) and mma.sync (smaller tiles). Float32 at "ieee" precision runs on the
# FMA units by design.
_TENSOR_CORES = ("mma",)


def jobs(all_configs: bool):
    for fl in ("fp16", "fp32"):  # copy kernels move bytes: 2- and 4-byte elements
        for src_i, dst_i in ((True, False), (False, True), (True, True)):
            bk, bd = gather_scatter._row_blocks(256, 768)
            for vec in (False, True):
                yield (f"copy_rows {fl} src_idx={src_i} dst_idx={dst_i}" + (" unit-stride" if vec else ""),
                       gather_scatter._copy_rows_kernel, {"src_ptr": fl, "dst_ptr": fl, "idx_ptr": "i64"},
                       {"SRC_INDEXED": src_i, "DST_INDEXED": dst_i, "BLOCK_K": bk, "BLOCK_D": bd,
                        **({"s_d": 1, "d_d": 1} if vec else {})}, 4, 3, _ROW_ALIGNED if vec else (),
                       _VEC if vec else ())
            yield (f"copy_cols {fl} src_idx={src_i} dst_idx={dst_i}", gather_scatter._copy_cols_kernel,
                   {"src_ptr": fl, "dst_ptr": fl, "idx_ptr": "i32"},
                   {"SRC_INDEXED": src_i, "DST_INDEXED": dst_i, "BLOCK_M": 128, "BLOCK_K": 32}, 4, 3)
    for fl in FLOATS:
        for scaled in (False, True):
            yield (f"scatter_residual {fl} scaled={scaled} unit-stride", gather_scatter._scatter_residual_kernel,
                   {"dst_ptr": fl, "src_ptr": fl, "res_ptr": fl, "scale_ptr": fl, "y_ptr": fl, "idx_ptr": "i64"},
                   {"SCALED": scaled, "SOFT_BF16": False, "EMULATED_FMA": False, "BLOCK_N": 8, "BLOCK_K": 64,
                    "BLOCK_D": gather_scatter.feature_block(768, cap=256), "d_d": 1, "s_d": 1, "r_d": 1}, 4, 3,
                   ("D", "d_b", "d_n", "s_b", "s_n", "r_b", "r_n"), _VEC)
        for thr in (False, True):
            yield (f"gate scores {fl} threshold={thr}", token_gate._scores_kernel,
                   {"c_ptr": fl, "r_ptr": fl, "out_ptr": "fp32"},
                   {"HAS_THRESHOLD": thr, "BLOCK_N": 16, "BLOCK_D": 128}, 4, 3)
        for with_e, copy_index in ((False, False), (True, False), (True, True)):
            bd = gather_scatter.feature_block(768)
            yield (f"gate copy {fl} with_e={with_e} copy_index={copy_index} unit-stride", token_gate._gate_copy_kernel,
                   {"c_ptr": fl, "r_ptr": fl, "idx_ptr": "i64" if fl == "fp32" else "i32", "sel_ptr": fl,
                    "e_ptr": fl, "out_idx_ptr": "i64"},
                   {"WITH_E": with_e, "COPY_INDEX": copy_index, "SOFT_BF16": False, "BLOCK_K": 8, "BLOCK_D": bd,
                    "c_d": 1, "r_d": 1}, 4, 3, ("D", "c_b", "c_n", "r_b", "r_n"),
                   _VEC if fl != "bf16" or not with_e else ())
    for thr in (False, True):
        for one_block, block, warps in ((True, 4096, 16), (True, 2048, 8), (True, 256, 4), (False, 4096, 16)):
            yield (f"gate select threshold={thr} one_block={one_block} block={block}", token_gate._select_kernel,
                   {"s_ptr": "fp32", "idx_ptr": "i64", "count_ptr": "i64"},
                   {"HAS_THRESHOLD": thr, "ONE_BLOCK": one_block, "BLOCK_N": block}, warps, 3)
    head_dims = (16, 64, 128) if all_configs else (64,)  # BLOCK_D = head dim rounded up to a power of 2
    for fl in FLOATS:
        precisions = ("ieee", "tf32") if fl == "fp32" else ("ieee",)
        for prec, bd in ((p, bd) for p in precisions for bd in head_dims):
            common = {"IS_F32": fl == "fp32", "PREC": prec, "UPCAST": False, "SOFT_BF16": False, "BLOCK_D": bd}
            mma = _TENSOR_CORES if prec != "ieee" or fl != "fp32" else ()
            for cfg in _autotune_configs(qk_update._qk_update_kernel, all_configs):
                for bias in (False, True):  # rel-pos bias: rel_h/rel_w have q's dtype; absent: dummies = logits
                    yield (f"qk_update {fl} {prec} d={bd} bias={bias} {cfg.kwargs} w={cfg.num_warps}",
                           qk_update._qk_update_kernel,
                           {"l_ptr": fl, "q_ptr": fl, "k_ptr": fl, "iq_ptr": "i64", "ik_ptr": "i32",
                            "rh_ptr": fl, "rw_ptr": fl},
                           {**cfg.kwargs, **common, "HAS_BIAS": bias}, cfg.num_warps, cfg.num_stages, (), mma)
            for cfg in _autotune_configs(av_delta_update._av_delta_kernel, all_configs):
                for refresh in (True, False):
                    yield (f"av_delta {fl} {prec} d={bd} refresh_a={refresh} {cfg.kwargs} w={cfg.num_warps}",
                           av_delta_update._av_delta_kernel,
                           {"o_ptr": fl, "an_ptr": fl, "ar_ptr": fl, "vn_ptr": fl, "vr_ptr": fl, "idx_ptr": "i64"},
                           {**cfg.kwargs, **common, "REFRESH_A": refresh}, cfg.num_warps, cfg.num_stages, (), mma)


def main(argv) -> int:
    all_configs = "--all-configs" in argv
    failed = 0
    for label, kernel, *job in jobs(all_configs):
        try:
            _compile(label, kernel, *job)
        except Exception as exc:  # report every failing kernel, not just the first
            failed += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    print(f"{'FAILED' if failed else 'PASSED'}: {failed} kernel(s) failed to compile for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

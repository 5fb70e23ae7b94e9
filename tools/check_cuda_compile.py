#!/usr/bin/env python
"""Compile-check every CUDA source (csrc/cuda/*.cu and *.cpp) to an object file with ``nvcc -c``.

Works with a CPU-only torch (no CUDA extension can link there): the flags mirror what
``torch.utils.cpp_extension.BuildExtension`` passes for a CUDA build (torch include dirs, -std=c++20, torch's
half/bfloat16 defines), plus ``-I csrc/include``. Objects go to a temporary directory and are discarded.

Usage: python tools/check_cuda_compile.py [-j JOBS] [--arch 90] [files ...]
Exit status 0 if every unit compiles, 1 if any fails, 2 if nvcc is not found. Environment: NVCC (compiler path),
EVENTFUL_CUDA_ARCH (default 90, i.e. -gencode arch=compute_90,code=sm_90).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch.utils.cpp_extension.COMMON_NVCC_FLAGS (copied so the check does not depend on a private name)
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def find_nvcc() -> str | None:
    explicit = os.environ.get("NVCC")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) + sorted(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    )


def common_flags(arch: str) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    flags = ["-std=c++20", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    flags += TORCH_NVCC_FLAGS
    flags += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    incs = cpp_extension.include_paths()
    flags += [f"-I{p}" for p in incs] + [f"-I{os.path.join(ROOT, 'csrc', 'include')}"]
    # A CPU build of torch ships c10/cuda headers without the generated cuda_cmake_macros.h (a CUDA build has it).
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in incs):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def compile_one(nvcc: str, flags: list[str], src: str, outdir: str) -> tuple[str, int, str, float]:
    obj = os.path.join(outdir, os.path.basename(src) + ".o")
    cmd = [nvcc, "-c", src, "-o", obj] + flags
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return src, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="sources to check (default: every csrc/cuda/*.cu and *.cpp)")
    parser.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--arch", default=os.environ.get("EVENTFUL_CUDA_ARCH", "90"))
    args = parser.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)", file=sys.stderr)
        return 2
    units = [os.path.abspath(f) for f in args.files] or sources()
    if not units:
        print("check_cuda_compile: no CUDA sources found", file=sys.stderr)
        return 1
    flags = common_flags(args.arch)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="eventful_nvcc_") as outdir:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda s: compile_one(nvcc, flags, s, outdir), units))
    for src, rc, out, secs in results:
        rel = os.path.relpath(src, ROOT)
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {rel} ({secs:.1f}s)")
        if out.strip():
            print(out.rstrip())
        failed += rc != 0
    print(f"check_cuda_compile: {len(units) - failed}/{len(units)} units compiled (sm_{args.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The C++ CUDA kernels of csrc/cuda, run on the CPU by an emulator of the CUDA execution model (tests/cuda_emu).

No GPU is needed: each ``csrc/cuda/*.cu`` is compiled as C++ with ``tests/cuda_emu/emu.h`` force-included (the CUDA
built-ins as CPU code, every thread of a block a fiber that switches only at warp shuffles and barriers) and its
``k<<<grid, block, shmem, stream>>>(args)`` launches rewritten into ``emu::launch``. The op files
(``csrc/cuda/*_ops.cpp``: argument checks, index checks, workspace, torch ops between the kernels) compile unchanged
except that they register into ``torch.ops.eventful_emu`` for CPU tensors instead of ``torch.ops.eventful`` for CUDA
tensors; ``tests/cuda_emu/shim`` stands in for the CUDA runtime and ``c10/cuda`` headers. What runs is therefore the
kernels' own index arithmetic, vector-width choices, grid-stride loops, reductions and launch sizing, on CPU tensors.

Emulated devices (``torch.ops.eventful_emu._set_device(d)``): their SM counts set the grid sizes; device 0 has an
H200's 132 SMs, the others 1, 2 (the default), 3 and 7, so grid-stride loops take one or many turns.

Checked as a GPU would: warp shuffles and barriers (a lane that exited or diverged raises, a deadlock raises), the
alignment of every pointer a kernel casts to a wider type (``reinterpret_cast`` is rewritten into a checked cast: a
misaligned 16-byte access faults on a GPU while a CPU allows it), launch configurations. Not checked: speed, races
between threads (they run one at a time between synchronization points), and out-of-bounds addresses (a stray access
may crash the test process or go unseen, unless AddressSanitizer is on: see below).

Out-of-bounds accesses are caught by AddressSanitizer: with ``EVENTFUL_CUDA_EMU_ASAN=1`` the emulated kernels are
built instrumented (a separate build) and the process must run with libasan preloaded, as
``test_cuda_emulator.py::test_op_tests_under_address_sanitizer`` does for the op tests (``asan_env()``): every read or
write outside a tensor's allocation then stops the run with a report naming the kernel.

``load()`` builds once per build directory (ninja, incremental) and returns the ops module, or raises.
"""
from __future__ import annotations

import inspect
import os
import re
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")
BUILD = os.path.join(ROOT, "build", "cuda_emu")

# kernel<targs><<<cfg>>>(  ->  ::emu::launch(::emu::LaunchConfig{cfg}, kernel<targs>,
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:\s*<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(\s*(\)?)", re.S)
_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*eventful\s*,\s*CUDA\s*,")
_OP_NAMES = re.compile(r'm\.impl\(\s*"(\w+)"')


def rewrite_kernels(source: str) -> str:
    """A .cu source as C++ for the emulator: launches become calls of its launcher (a kernel without arguments gets
    none), reinterpret_casts its alignment-checked cast, and the members ``gridDim`` / ``blockDim`` of a launch
    configuration (``cudaLaunchConfig_t``) are renamed, as those names are the emulator's built-ins."""
    def repl(m):
        head = f"::emu::launch(::emu::LaunchConfig{{{m.group(2)}}}, {m.group(1)}"
        return head + ")" if m.group(3) else head + ", "
    out = _LAUNCH.sub(repl, source)
    if "<<<" in out:
        raise ValueError("a kernel launch the emulator's rewrite does not understand is left")
    out = re.sub(r"(\.|->)(\s*)(gridDim|blockDim)\b", r"\1\2emu_\3", out)
    return re.sub(r"\breinterpret_cast<", "::emu::reinterpret<", out)


def rewrite_registration(source: str) -> str:
    out = _IMPL.sub("TORCH_LIBRARY_IMPL(eventful_emu, CPU,", source)
    if "TORCH_LIBRARY_IMPL(eventful," in out.replace(" ", ""):
        raise ValueError("a registration the emulator's rewrite does not understand is left")
    return out


def op_names() -> list:
    """The ops the C++ CUDA backend implements (its registrations in csrc/cuda/*_ops.cpp)."""
    names = []
    for f in sorted(os.listdir(CUDA_SRC)):
        if f.endswith("_ops.cpp"):
            with open(os.path.join(CUDA_SRC, f)) as fh:
                names += _OP_NAMES.findall(fh.read())
    return names


def _schemas_source(names) -> str:
    import eventful_kernels  # noqa: F401  (torch.ops.eventful: the schemas to copy)

    lines = ["#include <torch/library.h>", "", "TORCH_LIBRARY_FRAGMENT(eventful_emu, m) {"]
    for n in names:
        schema = str(getattr(torch.ops.eventful, n).default._schema)
        lines.append(f'  m.def("{schema.split("::", 1)[1]}");')
    return "\n".join(lines + ["}", ""])


def _write(path: str, text: str) -> str:
    """Write ``text`` unless the file already holds it (so ninja rebuilds only what changed)."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return path
    with open(path, "w") as f:
        f.write(text)
    return path


def sources(build: str) -> list:
    src = os.path.join(build, "src")
    os.makedirs(src, exist_ok=True)
    out = [os.path.join(EMU, "runtime.cpp")]
    files = [os.path.join(CUDA_SRC, f) for f in sorted(os.listdir(CUDA_SRC))] + [os.path.join(EMU, "selftest.cu")]
    for path in files:
        f = os.path.basename(path)
        with open(path) as fh:
            text = fh.read()
        if f.endswith(".cu"):
            out.append(_write(os.path.join(src, f[:-3] + "_kernels.cpp"), rewrite_kernels(text)))
        elif f.endswith("_ops.cpp"):
            out.append(_write(os.path.join(src, f), rewrite_registration(text)))
    out.append(_write(os.path.join(src, "schemas.cpp"), _schemas_source(op_names())))
    return out


_loaded = None
ASAN = os.environ.get("EVENTFUL_CUDA_EMU_ASAN", "") == "1"
_ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def _compiler_file(name: str) -> str:
    import subprocess

    try:
        path = subprocess.run([os.environ.get("CXX", "g++"), f"-print-file-name={name}"], capture_output=True,
                              text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else ""


def libasan() -> str:
    """Path of the compiler's AddressSanitizer runtime ('' when the compiler has none)."""
    return _compiler_file("libasan.so")


def asan_env(log_dir: str) -> dict:
    """Environment of a process that loads the instrumented build: libasan preloaded with the C++ runtime (Python
    does not link libstdc++, and ASan must find its __cxa_throw at start-up or every C++ exception aborts), leaks not
    reported (Python keeps objects alive at exit), the first error fatal, reports written to ``log_dir``/asan.*
    (pytest's capture would swallow them)."""
    preload = " ".join(p for p in (libasan(), _compiler_file("libstdc++.so.6")) if p)
    return dict(os.environ, EVENTFUL_CUDA_EMU_ASAN="1", LD_PRELOAD=preload,
                ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:log_path={os.path.join(log_dir, 'asan')}")


def load(build: str = None, verbose: bool = False):
    """Build (if needed) and load the emulated kernels; returns ``torch.ops.eventful_emu``."""
    global _loaded
    if _loaded is None:
        from torch.utils import cpp_extension

        build = build or (BUILD + "_asan" if ASAN else BUILD)
        os.makedirs(build, exist_ok=True)
        cpp_extension.load(
            name="eventful_cuda_emu" + ("_asan" if ASAN else ""),
            sources=sources(build),
            extra_include_paths=[os.path.join(EMU, "shim"), EMU, CUDA_SRC, os.path.join(ROOT, "csrc", "include")],
            extra_cflags=["-include", os.path.join(EMU, "emu.h"), "-O1", "-fno-strict-aliasing"]
            + (_ASAN_FLAGS if ASAN else []),
            extra_ldflags=_ASAN_FLAGS if ASAN else [],
            build_directory=build,
            is_python_module=False,
            verbose=verbose,
        )
        _loaded = torch.ops.eventful_emu
    return _loaded


def ops_module(emu) -> types.SimpleNamespace:
    """The emulated ops with the signatures (and defaults) of eventful_kernels.ops: arguments are bound to the
    wrapper's signature and passed on in schema order; in-place ops that return nothing return their first argument,
    as the wrappers do."""
    from eventful_kernels import ops

    def wrap(name):
        op, sig = getattr(emu, name), inspect.signature(getattr(ops, name))
        returns_nothing = not getattr(torch.ops.eventful, name).default._schema.returns

        def call(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            out = op(*bound.args, **bound.kwargs)
            return bound.args[0] if returns_nothing else out

        return call

    return types.SimpleNamespace(**{name: wrap(name) for name in op_names()})

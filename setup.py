"""Build eventful_kernels._C: the CPU C++ ops always; CUDA kernels when a CUDA build of torch and nvcc exist.

EVENTFUL_CUDA=1 forces the CUDA build (fails without a toolkit), EVENTFUL_CUDA=0 disables it; unset = auto.
The CUDA kernels are compiled for TORCH_CUDA_ARCH_LIST when it is set, else for the visible GPUs; with neither (a
build container, a CPU-only build machine) for DEFAULT_CUDA_ARCHS: sm_80 (runs on every 8.x GPU), sm_90 and
compute_90 PTX that newer GPUs compile when the library loads.
The library is compiled against the torch installed in the build environment, so build without isolation
(`pip install --no-build-isolation .`, `python -m build --no-isolation --wheel`) after installing torch.
The public headers (csrc/include/eventful/) are copied into the package as eventful_kernels/include/.
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

try:
    from torch.utils import cpp_extension
except ImportError as exc:
    raise SystemExit(
        "eventful-kernels: building needs torch installed in the build environment (the C++ library is compiled "
        "against it). Install torch first, then build without isolation: "
        "`pip install --no-build-isolation .` or `python -m build --no-isolation --wheel`."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _want_cuda() -> bool:
    flag = os.environ.get("EVENTFUL_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    # the contract and check ops (csrc/*.cpp) and the CPU kernels, one file per op family (csrc/README.md)
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(include_dirs=[INCLUDE], extra_link_args=["-fopenmp"])
    if _want_cuda():
        # kernels (*.cu) and the op/registration files that call them (*.cpp); see tools/check_cuda_compile.py
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # no --use_fast_math: its flush-to-zero / approximate math would make gate scores differ from the
        # reference's, and top-k ties must be decided exactly as the reference decides them
        _default_cuda_archs()
        archs = _cuda_arch_names()  # recorded in the library (csrc/build_info.cpp) for info() and the CUDA backend
        kwargs["extra_compile_args"] = {"cxx": cxx + ([f"-DEVENTFUL_CUDA_ARCHS={','.join(archs)}"] if archs else []),
                                        "nvcc": ["-O3"]}
        return cpp_extension.CUDAExtension("eventful_kernels._C", sources, **kwargs)
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return cpp_extension.CppExtension("eventful_kernels._C", sources, **kwargs)


def _default_cuda_archs() -> None:
    """Without TORCH_CUDA_ARCH_LIST and without a visible GPU, torch.utils.cpp_extension has no architecture to compile
    for and fails with an IndexError; give it DEFAULT_CUDA_ARCHS instead."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or torch.cuda.device_count() > 0:
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    print(f"eventful-kernels: no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling the CUDA kernels for "
          f"{DEFAULT_CUDA_ARCHS}")


def _cuda_arch_names() -> list:
    """The targets nvcc will compile for, e.g. ``["sm_80", "sm_90", "compute_90"]`` (sm_XY: a binary for GPUs of
    capability X.Y and later minors of X; compute_XY: PTX that GPUs of X.Y and later compile at load); [] if torch's
    build code cannot tell."""
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except Exception:  # a private function of torch.utils.cpp_extension: never fail the build over a report
        return []
    return [m.group(1) for f in flags for m in [re.search(r",code=\[?(\w+)", f)] if m]


class BuildPyWithHeaders(build_py):
    """Installs the public headers with the package (eventful_kernels/include/eventful/*.h)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install finds them in csrc/include
            return
        target = os.path.join(self.build_lib, "eventful_kernels", "include")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(INCLUDE, target)


setup(
    packages=find_packages(include=["eventful_kernels", "eventful_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={
        "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True),
        "build_py": BuildPyWithHeaders,
    },
)

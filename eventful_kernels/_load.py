"""Locate and load the compiled op library (eventful_kernels/_C*.so), which registers torch.ops.eventful."""
import glob
import importlib.machinery
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_native() -> str:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_HERE, "_C" + suffix)
        if os.path.exists(path):
            torch.ops.load_library(path)
            return path
    found = glob.glob(os.path.join(_HERE, "_C*.so"))
    if found:
        torch.ops.load_library(found[0])
        return found[0]
    raise ImportError(
        "eventful_kernels: compiled library _C not found next to the package; build it with "
        "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace`)"
    )

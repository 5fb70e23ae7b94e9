"""Import timm (and torchvision, which timm and transformers import) beside a CPU-only torch.

timm imports torchvision, whose compiled ops (``torchvision::nms`` ...) fail to load when its wheel was built for
another torch flavour (the PyPI torchvision wheel is a CUDA build; we run CPU torch). torchvision's Python side then
registers fake kernels for ``torchvision::nms`` / ``qnms`` and crashes because the schemas do not exist. Defining
those two schemas first (only when missing) lets torchvision and timm import; the ops themselves are never used.
"""
from __future__ import annotations

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIB = None  # keeps the fragment (and so its schemas) alive for the life of the process


def _define_missing_torchvision_schemas() -> None:
    global _LIB
    missing = [name for name in _SCHEMAS if not _has_op(name)]
    if not missing:
        return
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _LIB.define(_SCHEMAS[name])


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def import_torchvision() -> None:
    """Import torchvision (when installed), first defining its missing native-op schemas if its ``_C`` is unusable.
    timm and transformers both import it."""
    try:
        import torchvision  # noqa: F401  (loads its _C when that works; then the schemas exist)
    except ImportError:
        return
    except RuntimeError:
        _define_missing_torchvision_schemas()
        import sys

        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]  # drop the half-imported package so the retry runs its init again
        import torchvision  # noqa: F401


def import_timm():
    """Return the ``timm`` module, making torchvision importable first if its native ops are unusable."""
    import_torchvision()
    import timm

    return timm

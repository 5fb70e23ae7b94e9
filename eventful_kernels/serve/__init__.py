"""Serving eventful models to many video streams on Ray (``pip install eventful-kernels[serve]``).

A stream's state lives in the replica that ran its last frame, so every frame of a stream goes to that replica:
:class:`StreamServer` routes by stream id (rendezvous hashing over the live replicas, an assignment table after
moves) to Ray actors (:mod:`.replica`), each owning one converted model and its streams (:class:`ReplicaCore`),
which batch frames of streams with the same budget and frame shape. See docs/serving.md.

:mod:`.slots` and :mod:`.core` need no Ray; :class:`StreamServer` imports it on first use.
"""
from .core import ReplicaCore, StreamCheckpoint
from .errors import CapacityError, NoReplica, StreamError, StreamEvicted, StreamNotOpen

__all__ = ["CapacityError", "NoReplica", "ReplicaCore", "StreamCheckpoint", "StreamError", "StreamEvicted",
           "StreamNotOpen", "StreamServer", "FrameResult"]


def __getattr__(name):
    if name in ("StreamServer", "FrameResult"):
        from . import router

        return getattr(router, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Errors of the serving layer; each names the stream (and the limit) so a client can act on it."""
from __future__ import annotations


class StreamError(ValueError):
    """Base: a request that cannot be served for this stream (the replica's state is unchanged)."""

    def __init__(self, message: str, stream=None):
        super().__init__(message)
        self.stream = stream

    def __reduce__(self):  # keep the stream id when the error crosses a process boundary
        return (type(self), (self.args[0], self.stream))


class CapacityError(StreamError):
    """The replica already holds ``max_streams`` streams."""


class StreamNotOpen(StreamError):
    """A frame, budget change or close for a stream that is not open (never opened, closed, or evicted)."""


class StreamEvicted(StreamNotOpen):
    """The stream was evicted after being idle longer than the replica's ``idle_timeout_s``; open it again."""


class NoReplica(StreamError):
    """Every replica of the server is dead or drained."""

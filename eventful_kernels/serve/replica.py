"""The replica: a Ray actor (asyncio) around a :class:`~eventful_kernels.serve.core.ReplicaCore`.

Frame requests are queued per batch key; a queue is due when it holds ``max_batch`` frames or its first frame has
waited ``max_wait_ms``. Batches run one at a time on one worker thread (the model is not re-entrant) while the event
loop keeps accepting requests: a due queue keeps collecting frames until the thread is free, then up to
``max_batch`` of them run as one batch. Lifecycle calls
run on the same thread, so they are ordered with the batches. Idle streams are evicted by a periodic task.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from ..models import EventfulModel, convert
from .core import ReplicaCore
from .errors import CapacityError


class Replica:
    """``make_model()`` returns a timm ViT (converted here with ``convert_kwargs``; served as it is when ``dense``)
    or an EventfulModel."""

    def __init__(self, name: str, make_model: Callable, convert_kwargs: Optional[dict] = None, *,
                 max_streams: int = 16, max_batch: int = 8, max_wait_ms: float = 5.0,
                 idle_timeout_s: Optional[float] = None, checkpoint_every: Optional[int] = None,
                 refresh_every: Optional[int] = None, dense: bool = False):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"argument 'max_batch' must be an int >= 1, got {max_batch!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"argument 'max_wait_ms' must be >= 0, got {max_wait_ms!r}")
        model = make_model()
        if dense:
            model = model.dense.eval() if isinstance(model, EventfulModel) else model.eval()
        elif not isinstance(model, EventfulModel):
            model = convert(model, **(convert_kwargs or {}))
        self.name = name
        self.core = ReplicaCore(model, max_streams=max_streams, idle_timeout_s=idle_timeout_s,
                                checkpoint_every=checkpoint_every, refresh_every=refresh_every)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._pool = ThreadPoolExecutor(1)
        self._open: dict = {}  # batch key -> frames waiting [(stream, frame, future)]
        self._ready: deque = deque()  # batches due to run, in order
        self._busy = False
        self._answered: set = set()  # streams of the batch that ran last
        self._evictor: Optional[asyncio.Task] = None
        self._draining = False

    async def _call(self, fn, *args):
        if self._evictor is None and self.core.idle_timeout_s is not None:
            self._evictor = asyncio.get_running_loop().create_task(self._evict_loop())
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _evict_loop(self) -> None:
        period = max(0.05, self.core.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            await asyncio.get_running_loop().run_in_executor(self._pool, self.core.evict_idle)

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def open(self, stream, budget=None, checkpoint=None) -> dict:
        if self._draining:
            raise CapacityError(f"stream {stream!r}: replica {self.name} is draining", stream)
        return await self._call(self.core.open, stream, budget, checkpoint)

    async def close(self, stream) -> None:
        await self._call(self.core.close, stream)

    async def set_budget(self, stream, budget) -> None:
        await self._call(self.core.set_budget, stream, budget)

    async def checkpoint(self, stream):
        return await self._call(self.core.checkpoint, stream)

    async def drain(self) -> list:
        """Stop taking streams; return every stream's checkpoint (exact, current) and free them all."""
        self._draining = True

        def take_all():
            ids = list(self.core.streams)
            ckpts = [self.core.checkpoint(k) for k in ids]
            for k in ids:
                self.core._forget(k, "drained")
            return ckpts

        return await self._call(take_all)

    async def stats(self) -> dict:
        return {"name": self.name, **await self._call(self.core.stats)}

    # ---- frames -------------------------------------------------------------------------------------------------
    async def frame(self, stream, frame) -> dict:
        """One frame ``[3, H, W]`` of ``stream`` -> result dict (see :meth:`ReplicaCore.run`) + ``replica``."""
        loop = asyncio.get_running_loop()
        key = self.core.batch_key(stream, frame)
        fut = loop.create_future()
        queue = self._open.get(key)
        if queue is None:
            queue = self._open[key] = _Queue(key)
        queue.items.append((stream, frame, fut))
        if len(queue.items) == 1:
            loop.call_later(self.max_wait, self._due, queue)
        if len(queue.items) >= self.max_batch:
            self._due(queue)
        if queue.held and not self._missing(queue):
            self._pump()
        result = await fut
        if isinstance(result, BaseException):
            raise result
        result["replica"] = self.name
        return result

    def _due(self, queue: "_Queue") -> None:
        if not queue.due and queue.items:
            queue.due = True
            self._ready.append(queue)
            self._pump()

    def _missing(self, queue: "_Queue") -> bool:
        """Whether streams of the batch that just ran have not sent their next frame to ``queue`` yet."""
        return len(queue.items) < self.max_batch and bool(self._answered - {s for s, _, _ in queue.items})

    def _pump(self) -> None:
        """Run the oldest due queue (at most ``max_batch`` of it) unless a batch is running; a due queue keeps
        collecting frames until then. A queue that lacks streams of the batch just answered waits once more, up to
        ``max_wait_ms``, for their next frames: streams that send in step then stay in one batch (and resident)
        instead of settling into alternating part-batches."""
        while not self._busy and self._ready:
            queue = self._ready[0]
            if not queue.held and self._missing(queue):
                queue.held = True
                asyncio.get_running_loop().call_later(self.max_wait, self._pump)
                return
            batch, queue.items = queue.items[: self.max_batch], queue.items[self.max_batch :]
            if not queue.items:
                self._ready.popleft()
                if self._open.get(queue.key) is queue:
                    del self._open[queue.key]
            if batch:
                self._busy = True
                asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch) -> None:
        try:
            results = await self._call(self.core.run, [(s, f) for s, f, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
            results = [exc] * len(batch)
        finally:
            self._busy = False
        self._answered = {s for s, _, _ in batch}
        for (_, _, fut), r in zip(batch, results):
            if not fut.done():
                fut.set_result(r)
        self._pump()


class _Queue:
    """Frames of one batch key waiting for a batch; ``due`` once full or once its first frame waited max_wait."""

    def __init__(self, key):
        self.key = key
        self.items: list = []
        self.due = False
        self.held = False  # has waited once for the streams of the last batch

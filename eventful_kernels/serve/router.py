"""StreamServer: replicas as Ray actors, frames routed by stream id, streams moved when a replica dies or drains.

Routing is sticky: a new stream goes to the less loaded of the two live replicas ranked first for its id by
rendezvous hashing (two choices: balanced load; when a replica leaves, only its own streams move), and the
assignment is kept in a table; every request of a stream goes
through the actor handle of its replica. One request per stream is in flight at a time (a per-stream lock), which
keeps a stream's frames in order; different streams run concurrently and are batched by their replica.

Faults: a call that fails because the replica is gone (:class:`ray.exceptions.RayActorError`, e.g. after
``ray.kill``) marks it dead; each of its streams is opened on its next-ranked live replica at its next request,
from the stream's last checkpoint (``checkpoint_every``: the replica sends one every that many frames; the result
says ``recovery="resumed"`` and ``resumed_from`` = the frames the checkpoint had seen) or, without one, as a flush
(``recovery="reflushed"``). :meth:`StreamServer.drain` moves a replica's streams with their exact current state
(``recovery="migrated"``: they continue as if nothing happened). No stream is lost silently: a stream that cannot be
placed again raises (:class:`~eventful_kernels.serve.errors.NoReplica`, ``CapacityError``).

The server runs its own event loop on a background thread; the blocking methods (``open``, ``frame``, ...) can be
called from any thread, and their ``*_async`` twins awaited from any event loop.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional

try:
    import ray
    from ray.exceptions import RayActorError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("eventful_kernels.serve.StreamServer needs Ray: pip install 'eventful-kernels[serve]' "
                      "(ray==2.60.0)") from exc

import eventful_kernels

from .core import StreamCheckpoint
from .errors import NoReplica, StreamEvicted, StreamNotOpen
from .replica import Replica


@dataclass
class FrameResult:
    """One frame's answer. ``frame``: its index in the stream (0 = first frame after open). ``phase``: what the
    model did (``"flush"``, ``"steady"``, ``"refresh"``). ``batch``: streams in the model call. ``recovery``: set on
    the first frame after the stream moved (``"resumed"`` from a checkpoint, ``"reflushed"``, ``"migrated"``), with
    ``resumed_from`` = frames the restored state had seen."""

    stream: Hashable
    frame: int
    output: object
    replica: str
    phase: str
    batch: int
    recovery: Optional[str] = None
    resumed_from: Optional[int] = None


@dataclass
class _Route:
    replica: Optional[int]
    budget: object
    lock: asyncio.Lock
    frames: int = 0
    checkpoint: Optional[StreamCheckpoint] = None
    recovery: Optional[str] = None  # set when the stream was moved, reported with its next frame
    resumed_from: Optional[int] = None


def _score(stream, name: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{stream!r}|{name}".encode()).digest()[:8], "big")


def _package_env(options: dict) -> dict:
    """Actor options whose runtime_env puts this eventful_kernels (its checkout or install) first on the path, then
    the PYTHONPATH of the options, of the job's runtime_env and of this process (an actor's env_vars replace the
    job's)."""
    options = dict(options)
    env = dict(options.get("runtime_env") or {})
    env_vars = dict(env.get("env_vars") or {})
    root = os.path.dirname(os.path.dirname(os.path.abspath(eventful_kernels.__file__)))
    job = (ray.get_runtime_context().runtime_env.get("env_vars") or {}) if ray.is_initialized() else {}
    paths = [root]
    for where in (env_vars, job, os.environ):
        paths += [p for p in where.get("PYTHONPATH", "").split(os.pathsep) if p]
    env_vars["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["env_vars"] = env_vars
    options["runtime_env"] = env
    return options


class StreamServer:
    """``replicas`` Ray actors, each owning a model from ``make_model()`` (a timm ViT converted with
    ``convert_kwargs``, or an EventfulModel; pickled to the actors, so a module-level function or a
    ``functools.partial`` of one) and up to ``max_streams`` streams; frames of one batch key are batched up to
    ``max_batch``, waiting at most ``max_wait_ms``. ``idle_timeout_s``, ``checkpoint_every``, ``refresh_every``: see
    :class:`~eventful_kernels.serve.core.ReplicaCore`. ``dense``: serve the dense model instead (stateless, every
    frame full cost: the baseline). ``actor_options``: Ray actor options (default ``num_cpus=1``;
    ``num_gpus=1`` on a GPU cluster). Ray is initialised with defaults if it is not yet."""

    def __init__(self, make_model: Callable, *, replicas: int = 2, convert_kwargs: Optional[dict] = None,
                 max_streams: int = 16, max_batch: int = 8, max_wait_ms: float = 5.0,
                 idle_timeout_s: Optional[float] = None, checkpoint_every: Optional[int] = None,
                 refresh_every: Optional[int] = None, dense: bool = False, actor_options: Optional[dict] = None):
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"argument 'replicas' must be an int >= 1, got {replicas!r}")
        options = _package_env({"num_cpus": 1, **(actor_options or {})})
        actor = ray.remote(Replica).options(max_restarts=0, max_task_retries=0, max_concurrency=1000, **options)
        self.names: List[str] = [f"replica-{i}" for i in range(replicas)]
        self.handles = [actor.remote(name, make_model, convert_kwargs, max_streams=max_streams, max_batch=max_batch,
                                     max_wait_ms=max_wait_ms, idle_timeout_s=idle_timeout_s,
                                     checkpoint_every=checkpoint_every, refresh_every=refresh_every, dense=dense)
                        for name in self.names]
        self.alive = [True] * replicas
        self.draining = [False] * replicas
        self._routes: Dict[Hashable, _Route] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stream-server", daemon=True)
        self._thread.start()
        self._submit(self._ready()).result()

    async def _ready(self) -> None:
        await asyncio.gather(*[h.stats.remote() for h in self.handles])  # constructors done (or raised)

    def _submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _blocking(self, coro):
        return self._submit(coro).result()

    async def _await_from(self, coro):
        return await asyncio.wrap_future(self._submit(coro))

    # ---- placement ----------------------------------------------------------------------------------------------
    def ranking(self, stream) -> List[int]:
        """Live, non-draining replicas in the order ``stream`` prefers them."""
        live = [i for i in range(len(self.names)) if self.alive[i] and not self.draining[i]]
        return sorted(live, key=lambda i: _score(stream, self.names[i]), reverse=True)

    def replica_of(self, stream) -> Optional[str]:
        """Name of the replica holding ``stream`` now (None while it waits to be moved)."""
        route = self._route(stream)
        return None if route.replica is None else self.names[route.replica]

    def _route(self, stream) -> _Route:
        route = self._routes.get(stream)
        if route is None:
            raise StreamNotOpen(f"stream {stream!r} is not open", stream)
        return route

    def _dead(self, index: int) -> None:
        self.alive[index] = False
        for route in self._routes.values():
            if route.replica == index:
                route.replica = None

    def _load(self, index: int) -> int:
        return sum(1 for r in self._routes.values() if r.replica == index)

    async def _place(self, stream, route: _Route, checkpoint: Optional[StreamCheckpoint]) -> dict:
        """Open ``stream`` on the less loaded of its two first-ranked live replicas (from ``checkpoint`` when
        given)."""
        while True:
            ranking = self.ranking(stream)
            if not ranking:
                raise NoReplica(f"stream {stream!r}: no live replica left", stream)
            index = min(ranking[:2], key=self._load)
            try:
                info = await self.handles[index].open.remote(stream, route.budget, checkpoint)
            except RayActorError:
                self._dead(index)
                continue
            route.replica = index
            return info

    async def _move(self, stream, route: _Route) -> None:
        ckpt = route.checkpoint
        info = await self._place(stream, route, ckpt)
        if info["start"] == "resumed":
            route.recovery = route.recovery or "resumed"
            route.resumed_from = ckpt.frame
        else:
            route.recovery, route.resumed_from = "reflushed", None

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    async def _open(self, stream, budget) -> str:
        old = self._routes.get(stream)
        if old is not None:
            await self._close(stream)
        route = _Route(None, budget, asyncio.Lock())
        self._routes[stream] = route
        try:
            async with route.lock:
                await self._place(stream, route, None)
        except BaseException:
            self._routes.pop(stream, None)
            raise
        return self.names[route.replica]

    async def _close(self, stream) -> None:
        route = self._route(stream)
        async with route.lock:
            self._routes.pop(stream, None)
            if route.replica is not None:
                try:
                    await self.handles[route.replica].close.remote(stream)
                except RayActorError:
                    self._dead(route.replica)
                except StreamNotOpen:
                    pass  # evicted meanwhile: gone either way

    async def _set_budget(self, stream, budget) -> None:
        route = self._route(stream)
        async with route.lock:
            if route.replica is not None:
                try:
                    await self.handles[route.replica].set_budget.remote(stream, budget)
                except RayActorError:
                    self._dead(route.replica)
            route.budget = budget

    async def _frame(self, stream, frame) -> FrameResult:
        route = self._route(stream)
        async with route.lock:
            while True:
                if route.replica is None:
                    await self._move(stream, route)
                index = route.replica
                try:
                    r = await self.handles[index].frame.remote(stream, frame)
                    break
                except RayActorError:
                    self._dead(index)
                except StreamNotOpen as exc:
                    if isinstance(exc, StreamEvicted):
                        self._routes.pop(stream, None)
                    raise
            if r["checkpoint"] is not None:
                route.checkpoint = r["checkpoint"]
            result = FrameResult(stream, route.frames, r["output"], r["replica"], r["phase"], r["batch"],
                                 route.recovery, route.resumed_from)
            route.frames += 1
            route.recovery = route.resumed_from = None
            return result

    async def _drain(self, index: int) -> List[Hashable]:
        self.draining[index] = True
        mine = [(k, r) for k, r in self._routes.items() if r.replica == index]
        for _, r in mine:
            await r.lock.acquire()
        try:
            try:
                ckpts = await self.handles[index].drain.remote()
            except RayActorError:  # died first: its streams move at their next frame as after any death
                self._dead(index)
                return [k for k, _ in mine]
            by_stream = {c.stream: c for c in ckpts}
            for k, r in mine:
                ckpt = by_stream.get(k)
                if ckpt is None:  # evicted meanwhile
                    self._routes.pop(k, None)
                    continue
                r.checkpoint, r.recovery = ckpt, "migrated"
                await self._move(k, r)
                r.resumed_from = ckpt.frame if ckpt.state is not None else None
        finally:
            for _, r in mine:
                r.lock.release()
        return [k for k, _ in mine]

    async def _stats(self) -> list:
        out = []
        for i, h in enumerate(self.handles):
            if not self.alive[i]:
                out.append({"name": self.names[i], "alive": False})
                continue
            try:
                out.append({"alive": True, "draining": self.draining[i], **await h.stats.remote()})
            except RayActorError:
                self._dead(i)
                out.append({"name": self.names[i], "alive": False})
        return out

    # ---- public API: blocking and awaitable ---------------------------------------------------------------------
    def open(self, stream, budget=None) -> str:
        """Open (or restart) ``stream`` with ``budget`` (default all tokens); its next frame is a flush. Returns
        the replica's name. ``CapacityError`` when that replica is full."""
        return self._blocking(self._open(stream, budget))

    def frame(self, stream, frame) -> FrameResult:
        """Run one frame ``[3, H, W]`` (float, normalised) of an open stream."""
        return self._blocking(self._frame(stream, frame))

    async def frame_async(self, stream, frame) -> FrameResult:
        return await self._await_from(self._frame(stream, frame))

    async def open_async(self, stream, budget=None) -> str:
        return await self._await_from(self._open(stream, budget))

    async def close_async(self, stream) -> None:
        await self._await_from(self._close(stream))

    def set_budget(self, stream, budget) -> None:
        """``stream``'s budget from its next frame on."""
        self._blocking(self._set_budget(stream, budget))

    def close(self, stream) -> None:
        """Close ``stream`` and free its state."""
        self._blocking(self._close(stream))

    def drain(self, replica: int) -> List[Hashable]:
        """Move every stream of replica ``replica`` (an index) to the others with its exact state; the replica
        takes no new streams. Returns the streams moved."""
        return self._blocking(self._drain(replica))

    def stats(self) -> list:
        """Per replica: name, alive, open streams, batch sizes formed (size -> count), state copies."""
        return self._blocking(self._stats())

    def streams(self) -> List[Hashable]:
        return list(self._routes)

    def shutdown(self) -> None:
        """Kill every replica and stop the server's loop."""
        for i, h in enumerate(self.handles):
            if self.alive[i]:
                ray.kill(h)
                self.alive[i] = False
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

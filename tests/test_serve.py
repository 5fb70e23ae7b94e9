"""Serving: replica core (lifecycle, batching of independent streams, eviction, capacity, checkpoints) without Ray,
then a StreamServer on a local Ray (sticky routing, batching, drain, replica killed mid-run)."""
import asyncio
import functools
import os
import random

import pytest
import torch

from eventful_kernels.models import convert
from eventful_kernels.serve import (CapacityError, ReplicaCore, StreamError, StreamEvicted, StreamNotOpen)
from eventful_kernels.serve import slots
from tiny_timm import tiny_sam, tiny_vit, video

pytestmark = pytest.mark.usefixtures("one_thread")
MAKERS = {"vit": (tiny_vit, 32), "sam": (tiny_sam, 64)}
ATOL = 1e-5


def model(make=tiny_vit, budget=0.5, **kw):
    return convert(make(0), budget, strategy="eventful", **kw)


def reference(make, frames, budgets, **kw):
    """One stream alone in its own model: ``frames`` [T, 3, H, W], ``budgets[t]`` the budget of frame t."""
    m, out = model(make, budgets[0], **kw), []
    for t, f in enumerate(frames):
        m.set_budget(budgets[t])
        out.append(m(f[None])[0])
    return out


def ok(result):
    assert not isinstance(result, Exception), result
    return result


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# ---- replica core ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "sam"])
def test_batches_equal_single_process(family):
    make, size = MAKERS[family]
    streams, frames = 5, 6
    v = video(frames, size, batch=streams, seed=3)
    budgets = {s: [0.5 if s % 2 else 5] * frames for s in range(streams)}
    budgets[1][3:] = [0.25] * 3  # a budget change mid-stream
    refs = {s: reference(make, v[:, s], budgets[s]) for s in range(streams)}
    core = ReplicaCore(model(make), max_streams=8)
    for s in range(streams):
        assert core.open(s, budgets[s][0])["start"] == "flush"
    rnd = random.Random(0)
    phases = {}
    for t in range(frames):
        if t == 3:
            core.set_budget(1, 0.25)
        order = list(range(streams))
        rnd.shuffle(order)
        cut = rnd.randint(1, streams)
        for part in (order[:cut], order[cut:]):
            for s, r in zip(part, core.run([(s, v[t, s]) for s in part]) if part else []):
                r = ok(r)
                assert r["frame"] == t
                phases.setdefault(t, set()).add(r["phase"])
                torch.testing.assert_close(r["output"], refs[s][t], atol=ATOL, rtol=0)
    assert phases[0] == {"flush"} and phases[frames - 1] == {"steady"}
    sizes = core.stats()["batch_sizes"]
    assert max(sizes) > 1 and core.stats()["copies"] > 0


def test_resident_batch_is_not_copied():
    v = video(4, 32, batch=3, seed=1)
    core = ReplicaCore(model(), max_streams=4)
    for s in range(3):
        core.open(s, 0.5)
    for t in range(4):
        [ok(r) for r in core.run([(s, v[t, s]) for s in range(3)])]
    assert core.stats()["copies"] == 0 and core.stats()["resident"] == [0, 1, 2]
    ok(core.run([(2, video(1, 32, seed=9)[0, 0])])[0])  # another composition: states copied out and in
    assert core.stats()["copies"] == 2


def test_lifecycle_open_frame_close_reopen():
    v = video(3, 32, batch=2, seed=2)
    core = ReplicaCore(model(), max_streams=4)
    core.open("a", 0.5)
    core.open("b", 0.5)
    assert [ok(r)["phase"] for r in core.run([("a", v[0, 0]), ("b", v[0, 1])])] == ["flush", "flush"]
    assert ok(core.run([("a", v[1, 0])])[0])["phase"] == "steady"
    core.close("a")
    assert core.stats()["streams"] == 1
    with pytest.raises(StreamNotOpen, match="'a'.*closed"):
        core.batch_key("a", v[2, 0])
    assert isinstance(core.run([("a", v[2, 0])])[0], StreamNotOpen)
    with pytest.raises(StreamNotOpen):
        core.close("a")
    core.open("a", 0.5)  # a new stream: flushes on the given frame
    r = ok(core.run([("a", v[2, 0])])[0])
    assert r["phase"] == "flush" and r["frame"] == 0
    torch.testing.assert_close(r["output"], reference(tiny_vit, v[2:, 0], [0.5])[0], atol=ATOL, rtol=0)
    # "b" went on untouched by a's close (it was resident with a)
    torch.testing.assert_close(ok(core.run([("b", v[1, 1])])[0])["output"],
                               reference(tiny_vit, v[:2, 1], [0.5, 0.5])[1], atol=ATOL, rtol=0)
    core.open("b", 0.5)  # open of an open stream restarts it
    assert ok(core.run([("b", v[2, 1])])[0])["phase"] == "flush"


def test_idle_streams_are_evicted():
    clock = Clock()
    v = video(2, 32, batch=2, seed=4)
    core = ReplicaCore(model(), max_streams=4, idle_timeout_s=10.0, clock=clock)
    core.open("idle", 0.5)
    core.open("busy", 0.5)
    [ok(r) for r in core.run([("idle", v[0, 0]), ("busy", v[0, 1])])]
    clock.t = 6.0
    ok(core.run([("busy", v[1, 1])])[0])
    clock.t = 12.0
    assert core.evict_idle() == ["idle"]
    assert core.stats()["streams"] == 1
    with pytest.raises(StreamEvicted, match="'idle'.*evicted after more than 10.0 s idle"):
        core.batch_key("idle", v[1, 0])
    clock.t = 17.0
    assert core.evict_idle() == ["busy"]
    core.open("idle", 0.5)
    assert ok(core.run([("idle", v[1, 0])])[0])["phase"] == "flush"


def test_capacity_error_leaves_streams_untouched():
    v = video(3, 32, batch=2, seed=5)
    core = ReplicaCore(model(), max_streams=2)
    core.open(0, 0.5)
    core.open(1, 0.5)
    [ok(r) for r in core.run([(0, v[0, 0]), (1, v[0, 1])])]
    with pytest.raises(CapacityError, match="stream 2: the replica holds max_streams=2 streams"):
        core.open(2, 0.5)
    assert sorted(core.streams) == [0, 1]
    out = [ok(r)["output"] for r in core.run([(0, v[1, 0]), (1, v[1, 1])])]
    for s in range(2):
        torch.testing.assert_close(out[s], reference(tiny_vit, v[:2, s], [0.5] * 2)[1], atol=ATOL, rtol=0)
    core.close(0)
    assert core.open(2, 0.5)["start"] == "flush"


def test_bad_frame_fails_only_its_stream():
    v = video(3, 32, batch=2, seed=6)
    core = ReplicaCore(model(), max_streams=2)
    core.open(0, 0.5)
    core.open(1, 0.5)
    [ok(r) for r in core.run([(0, v[0, 0]), (1, v[0, 1])])]
    bad, good = core.run([(0, v[1, 0, :2]), (1, v[1, 1])])
    assert isinstance(bad, StreamError) and "argument 'frame'" in str(bad)
    torch.testing.assert_close(ok(good)["output"], reference(tiny_vit, v[:2, 1], [0.5] * 2)[1], atol=ATOL, rtol=0)
    # stream 0 continues as if the bad frame never came
    torch.testing.assert_close(ok(core.run([(0, v[2, 0])])[0])["output"],
                               reference(tiny_vit, v[[0, 2], 0], [0.5] * 2)[1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="budget"):
        core.set_budget(0, -1)


def test_checkpoint_continues_bit_identically_elsewhere():
    v = video(5, 64, batch=2, seed=7)
    a, b = ReplicaCore(model(tiny_sam), max_streams=2), ReplicaCore(model(tiny_sam), max_streams=2)
    for s in range(2):
        a.open(s, 0.5)
    for t in range(3):
        [ok(r) for r in a.run([(s, v[t, s]) for s in range(2)])]
    ckpt = a.checkpoint(0)  # resident in a's model
    assert ckpt.frame == 3 and ckpt.state.nbytes() > 0
    assert b.open(0, checkpoint=ckpt) == {"stream": 0, "start": "resumed", "frame": 3}
    for t in range(3, 5):
        here = ok(a.run([(0, v[t, 0]), (1, v[t, 1])])[0])
        there = ok(b.run([(0, v[t, 0])])[0])
        assert there["frame"] == here["frame"] == t
        torch.testing.assert_close(there["output"], here["output"], atol=ATOL, rtol=0)
    other = ReplicaCore(model(tiny_vit), max_streams=2)
    with pytest.raises(StreamError, match="another architecture"):
        other.open(0, checkpoint=ckpt)
    assert other.stats()["streams"] == 0


def test_refresh_every_counts_per_stream():
    v = video(6, 32, batch=2, seed=8)
    core = ReplicaCore(model(), max_streams=2, refresh_every=2)
    core.open(0, 0.5)
    core.open(1, 0.5)
    refs = [reference(tiny_vit, v[:, s], [0.5] * 6, refresh_every=2) for s in range(2)]
    ok(core.run([(0, v[0, 0])])[0])  # stream 1 starts a frame later, so its refreshes fall on other frames
    phases = {0: [], 1: []}
    for t in range(1, 6):
        items = [(0, v[t, 0])] + ([(1, v[t - 1, 1])] if t >= 1 else [])
        for (s, _), r in zip(items, core.run(items)):
            r = ok(r)
            phases[s].append(r["phase"])
            torch.testing.assert_close(r["output"], refs[s][r["frame"]], atol=ATOL, rtol=0)
    assert phases[0] == ["steady", "steady", "refresh", "steady", "steady"]
    assert phases[1] == ["flush", "steady", "steady", "refresh", "steady"]


def test_dense_model_is_served_without_state():
    v = video(2, 32, batch=3, seed=10)
    dense = tiny_vit(0)
    core = ReplicaCore(tiny_vit(0), max_streams=3)
    for s in range(3):
        core.open(s)
    for t in range(2):
        for s, r in zip(range(3), core.run([(s, v[t, s]) for s in range(3)])):
            assert (ok(r)["phase"], r["batch"], r["frame"]) == ("dense", 3, t)
            torch.testing.assert_close(r["output"], dense(v[t, s][None])[0], atol=ATOL, rtol=0)
    assert core.checkpoint(0).state is None


def test_put_rejects_streams_of_another_attention_mode():
    v = video(1, 32, seed=1)[0, 0]
    eventful = ReplicaCore(model(), max_streams=1)
    dense = ReplicaCore(convert(tiny_vit(0), 0.5, strategy="dense"), max_streams=1)
    for core in (eventful, dense):
        core.open(0)
        ok(core.run([(0, v)])[0])
    states = [eventful.checkpoint(0).state, dense.checkpoint(0).state]
    with pytest.raises(ValueError, match="attention mode"):
        slots.put(eventful.model, states)
    torch.testing.assert_close(ok(eventful.run([(0, v)])[0])["output"],  # untouched: a steady frame of stream 0
                               reference(tiny_vit, torch.stack([v, v]), [0.5, 0.5])[1], atol=ATOL, rtol=0)


# ---- the replica's batching queue (the actor class, run here in plain asyncio) --------------------------------------
def test_replica_batches_streams_sending_in_step_and_evicts_idle_ones():
    from eventful_kernels.serve.replica import Replica

    v = video(4, 32, batch=5, seed=15)

    async def main():
        rep = Replica("r", functools.partial(tiny_vit, 0), {"strategy": "eventful"}, max_streams=5, max_batch=4,
                      max_wait_ms=30, idle_timeout_s=0.3)
        for s in range(5):
            await rep.open(s, 0.5)

        async def stream(s):
            return [await rep.frame(s, v[t, s]) for t in range(4)]

        answers = await asyncio.gather(*[stream(s) for s in range(5)])
        await asyncio.sleep(0.6)  # > idle_timeout_s + the eviction period
        with pytest.raises(StreamEvicted):
            await rep.frame(0, v[0, 0])
        return answers, await rep.stats()

    answers, stats = asyncio.run(main())
    for s, got in enumerate(answers):
        refs = reference(tiny_vit, v[:, s], [0.5] * 4)
        for t, r in enumerate(got):
            assert r["replica"] == "r" and r["frame"] == t and r["batch"] <= 4
            torch.testing.assert_close(r["output"], refs[t], atol=ATOL, rtol=0)
    sizes = stats["batch_sizes"]
    assert sum(k * n for k, n in sizes.items()) == 20 and max(sizes) == 4
    assert stats["streams"] == 0


# ---- StreamServer on Ray -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on the loopback address only
    ray = pytest.importorskip("ray")
    from eventful_kernels.serve import StreamServer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.path.join(root, "tests")]),
                                       "OMP_NUM_THREADS": "1"}})
    srv = StreamServer(functools.partial(tiny_vit, 0), replicas=3, convert_kwargs={"strategy": "eventful"},
                       max_streams=5, max_batch=4, max_wait_ms=20, checkpoint_every=3, idle_timeout_s=6.0,
                       actor_options={"num_cpus": 0.5})
    yield srv
    srv.shutdown()
    ray.shutdown()


def open_on(srv, replica, n, prefix):
    """Open ``n`` streams (budget 0.5) that the server places on replica index ``replica``; returns their ids."""
    kept, extra = [], []
    for i in range(60):
        stream = f"{prefix}{i}"
        name = srv.open(stream, 0.5)
        (kept if name == srv.names[replica] else extra).append(stream)
        if len(kept) == n:
            break
    for stream in extra:
        srv.close(stream)
    assert len(kept) == n
    return kept


def drive(srv, frames_of, on_frame=None):
    """Run every stream's frames concurrently (one request in flight per stream); ``on_frame(stream, t)`` before
    each frame. Returns stream -> [FrameResult]."""
    async def one(stream, frames):
        out = []
        for t, f in enumerate(frames):
            if on_frame is not None:
                on_frame(stream, t)
            out.append(await srv.frame_async(stream, f))
        return out

    async def main():
        results = await asyncio.gather(*[one(s, f) for s, f in frames_of.items()])
        return dict(zip(frames_of, results))

    return asyncio.run(main())


def test_server_routes_sticky_and_batches_across_streams(server):
    v = video(5, 32, batch=6, seed=11)
    streams = {f"cam{s}": v[:, s] for s in range(6)}
    placed = {s: server.open(s, 0.5) for s in streams}
    assert len(set(placed.values())) > 1  # spread over replicas
    results = drive(server, streams)
    batches = []
    for s, frames in streams.items():
        refs = reference(tiny_vit, frames, [0.5] * 5)
        for t, r in enumerate(results[s]):
            assert (r.stream, r.frame, r.replica, r.recovery) == (s, t, placed[s], None)
            torch.testing.assert_close(r.output, refs[t], atol=ATOL, rtol=0)
            batches.append(r.batch)
        assert server.replica_of(s) == placed[s]
    assert max(batches) > 1
    for s in streams:
        server.close(s)
    with pytest.raises(StreamNotOpen):
        server.frame("cam0", v[0, 0])


def test_server_capacity_and_eviction(server):
    opened, refused = [], None
    for i in range(3 * 5 + 1):  # 3 live replicas of max_streams=5
        try:
            server.open(f"cap{i}", 0.5)
            opened.append(f"cap{i}")
        except CapacityError as exc:
            refused = (f"cap{i}", str(exc))
            break
    assert refused is not None and "max_streams=5" in refused[1] and refused[0] not in server.streams()
    assert len(opened) <= 15
    for s in opened:
        server.close(s)
    v = video(2, 32, seed=12)
    server.open("sleepy", 0.5)
    server.frame("sleepy", v[0, 0])
    import time
    time.sleep(8.0)  # > idle_timeout_s + the eviction period
    with pytest.raises(StreamEvicted, match="evicted"):
        server.frame("sleepy", v[1, 0])
    assert "sleepy" not in server.streams()


def test_server_drain_moves_streams_exactly(server):
    moving, staying = open_on(server, 0, 2, "drain"), open_on(server, 1, 1, "stay")
    v = video(6, 32, batch=3, seed=13)
    streams = dict(zip(moving + staying, [v[:, 0], v[:, 1], v[:, 2]]))
    first = drive(server, {s: f[:3] for s, f in streams.items()})
    assert server.drain(0) == moving
    later = drive(server, {s: f[3:] for s, f in streams.items()})
    for s, frames in streams.items():
        refs = reference(tiny_vit, frames, [0.5] * 6)
        results = first[s] + later[s]
        for t, r in enumerate(results):
            torch.testing.assert_close(r.output, refs[t], atol=ATOL, rtol=0)
        expect = ("migrated", 3) if s in moving else (None, None)
        assert (results[3].recovery, results[3].resumed_from) == expect
        assert results[3].replica != "replica-0"
    assert server.open("new-after-drain") != "replica-0"
    for s in [*streams, "new-after-drain"]:
        server.close(s)


def test_server_replica_killed_mid_run_resumes_or_reflushes(server):
    import ray

    victim = 1  # replica-0 is drained; replica-1 dies, replica-2 takes its streams
    long_run, short_run = open_on(server, victim, 2, "long"), open_on(server, victim, 1, "short")
    other = open_on(server, 2, 1, "safe")
    v = video(8, 32, batch=4, seed=14)
    streams = dict(zip(long_run + short_run + other, [v[:, 0], v[:, 1], v[:2, 2], v[:, 3]]))
    drive(server, {s: streams[s][:1] for s in short_run})  # one frame: no checkpoint yet (every 3)
    killed = []

    def kill_at(stream, t):
        if stream == long_run[0] and t == 5 and not killed:
            ray.kill(server.handles[victim])  # the other streams' frames are in flight
            killed.append(t)

    results = drive(server, {s: f for s, f in streams.items() if s not in short_run}, kill_at)
    results.update(drive(server, {s: streams[s][1:] for s in short_run}))
    assert killed and not server.alive[victim]
    for s, frames in streams.items():
        got = results[s] if s not in short_run else [None] + results[s]
        moved = [r for r in got if r is not None and r.recovery is not None]
        if s in other:
            assert not moved
            refs = reference(tiny_vit, frames, [0.5] * len(frames))
            for t, r in enumerate(got):
                torch.testing.assert_close(r.output, refs[t], atol=ATOL, rtol=0)
            continue
        assert len(moved) == 1, [(r.frame, r.recovery) for r in got if r is not None]
        m = moved[0]
        assert m.replica == "replica-2" and server.replica_of(s) == "replica-2"
        if s in short_run:
            assert (m.recovery, m.resumed_from) == ("reflushed", None)
            seen = frames[m.frame:]
        else:
            assert m.recovery == "resumed" and m.resumed_from % 3 == 0 and 0 < m.resumed_from <= m.frame
            seen = torch.cat([frames[:m.resumed_from], frames[m.frame:]])
        refs = reference(tiny_vit, seen, [0.5] * len(seen))
        for r, ref in zip(got[m.frame:], refs[len(seen) - (len(frames) - m.frame):]):
            torch.testing.assert_close(r.output, ref, atol=ATOL, rtol=0)

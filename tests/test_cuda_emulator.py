"""The CUDA emulator (tests/cuda_emulator.py) that runs the C++ CUDA kernels of csrc/cuda on the CPU.

Its semantics (shuffles, barriers, shared memory, atomics), the misuse it refuses (exited or diverged lanes,
deadlocks, misaligned vector accesses, bad launch configurations), the source rewrite, and what the kernels do on
every emulated device (grid sizes from one SM to an H200's 132). The ops themselves are tested against the reference
on the ``cuda_emu`` backend of the op tests (tests/op_support.py).
"""
import os
import subprocess
import sys
import types

import pytest
import torch

import cuda_emulator
from eventful_kernels import reference as R
from op_support import assert_same

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the C++ CUDA kernels for real")


@pytest.fixture(scope="module")
def emu():
    e = cuda_emulator.load()
    yield e
    e._set_device(2)


def test_warp_shuffles_and_block_barriers(emu):
    assert emu._selftest("xor_sum").tolist() == [496] * 64
    want = [100 + (lane + 3 if lane % 8 + 3 < 8 else lane) for lane in range(32)]
    assert emu._selftest("down_width8").tolist() == want
    assert emu._selftest("block_sum").tolist() == [sum(range(256)) * b for b in (1, 2, 3)]
    assert emu._selftest("atomic").tolist() == [1000, 999]


@pytest.mark.parametrize("case, message", [
    ("exited_lane", "__shfl_xor_sync: a lane named in the mask exited while others wait for it"),
    ("split_sync", "lanes of one warp wait at different synchronization points"),
    ("deadlock", "deadlock in block (0,0,0)"),
    ("misaligned", "misaligned address: a 16-byte access at an address = 4 (mod 16)"),
    ("too_many_threads", "CUDA error: invalid configuration argument"),
    ("empty_grid", "CUDA error: invalid configuration argument"),
])
def test_misuse_raises(emu, case, message):
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        emu._selftest(case)


def test_thread_block_clusters(emu):
    """Blocks of a cluster see each other's global writes after cluster.sync() and keep their own shared memory;
    a block that exits without the barrier, a cluster larger than the portable 8 blocks or than the device can host
    at once, a grid that is not a whole number of clusters, and clusters on a device before sm_90 are refused."""
    got = emu._selftest("cluster_6_3").tolist()
    assert got == [6 + 1000 * r + 300000 for r in range(3)] + [15 + 1000 * r + 300000 for r in range(3)]
    assert emu._selftest("cluster_4_1").tolist() == [b + 1 + 100000 for b in range(4)]
    with pytest.raises(RuntimeError, match="another block of the cluster failed or exited without it"):
        emu._selftest("cluster_4_2_exit1")
    emu._set_device(0)  # 132 SMs
    assert emu._selftest("cluster_16_8").tolist()[-1] == sum(range(9, 17)) + 7000 + 800000
    for name in ("cluster_32_16", "cluster_6_4"):
        with pytest.raises(RuntimeError, match="invalid cluster size"):
            emu._selftest(name)
    emu._set_device(1)  # before sm_90
    with pytest.raises(RuntimeError, match="operation not supported"):
        emu._selftest("cluster_2_2")
    emu._set_device(2)  # 2 SMs host at most 2 * 2048 threads at once: 64 blocks of 64, 8 by the portable limit
    assert emu._selftest("cluster_8_8").tolist()[0] == 36 + 800000


def test_rewrite_of_launches_and_casts():
    src = ("k<T, 4><<<grid, dim3(32, 8), 0, stream>>>(a, b);\n"
           "noop<<<1, 32>>>();\n"
           "auto* p = reinterpret_cast<const vec_t*>(q);\n")
    out = cuda_emulator.rewrite_kernels(src)
    assert "::emu::launch(::emu::LaunchConfig{grid, dim3(32, 8), 0, stream}, k<T, 4>, a, b);" in out
    assert "::emu::launch(::emu::LaunchConfig{1, 32}, noop);" in out
    assert "::emu::reinterpret<const vec_t*>(q)" in out and "<<<" not in out
    with pytest.raises(ValueError, match="kernel launch"):
        cuda_emulator.rewrite_kernels("k<<<(1), 2>>> (x);\nbroken<<<1 2>>\n")
    assert "TORCH_LIBRARY_IMPL(eventful_emu, CPU, m)" in cuda_emulator.rewrite_registration(
        "TORCH_LIBRARY_IMPL(eventful, CUDA, m) {}")


def test_every_cuda_op_is_emulated():
    names = cuda_emulator.op_names()
    assert {"gather_rows", "scatter_rows_", "scatter_rows_residual_", "gather_cols", "scatter_cols_", "token_gate",
            "token_gate_threshold", "token_delta_gate"} <= set(names)
    assert set(vars(cuda_emulator.ops_module(cuda_emulator.load()))) == set(names)


def _ops_case(dtype, g):
    """One call of every C++ CUDA op on shapes that need many blocks (several grid-stride turns on small devices)."""
    x = torch.randn(2, 3, 300, 72, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(300, generator=g)[:130] for _ in range(2)])
    src_rows = torch.randn(2, 3, 130, 72, generator=g).to(dtype)
    c = torch.randn(3, 400, 40, generator=g).to(dtype)
    ref = torch.randn(3, 400, 40, generator=g).to(dtype)
    return x, idx, src_rows, c, ref


def _run_ops(ops, case):
    x, idx, src_rows, c, ref = (t.clone() for t in case)
    xt = x.transpose(-1, -2).contiguous()
    out = [ops.gather_rows(x, idx), ops.gather_cols(xt, idx)]
    out.append(ops.scatter_rows_(x.clone(), idx, src_rows))
    out.append(ops.scatter_cols_(xt.clone(), idx, src_rows.transpose(-1, -2)))
    dst, res = x[:, 0].clone(), x[:, 1].clone()
    out += [ops.scatter_rows_residual_(dst, idx, src_rows[:, 0], res, x[0, 2, 0]), dst]
    index, c_sel = ops.token_gate(c, ref, 97)
    return out + [index, c_sel, ref]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", range(5))
def test_every_grid_size_matches_the_reference(emu, device, dtype):
    emu._set_device(device)
    case = _ops_case(dtype, torch.Generator().manual_seed(device))
    got = _run_ops(cuda_emulator.ops_module(emu), case)
    want = _run_ops(R, case)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_one_kernel_launch_per_unchecked_op(emu, monkeypatch):
    """Unchecked ops launch one kernel, a checked index adds the one validation kernel. The gates are one launch
    (a thread block cluster per batch row) for rows of up to 4096 tokens on sm_90 where the cost model expects it to
    pay (always, on the 2-SM device); three (scores, selection, rows) past 4096 tokens, before sm_90, where the
    device cannot host the cluster, where a few clusters would stream much through few of many SMs (one SAM-sized
    row on 132 SMs), or with EVENTFUL_CUDA_GATE=split; EVENTFUL_CUDA_GATE=fused takes one launch wherever it can."""
    ops = cuda_emulator.ops_module(emu)
    emu._set_device(2)
    x = torch.randn(2, 50, 16)
    idx = torch.tensor([[3, 1, -1], [0, 49, 7]])

    def launches(fn):
        before = emu._launches()
        fn()
        return emu._launches() - before

    assert launches(lambda: ops.gather_rows(x, idx, check_index=False)) == 1
    assert launches(lambda: ops.gather_rows(x, idx)) == 2
    assert launches(lambda: ops.scatter_rows_(x, idx, torch.randn(2, 3, 16), check_index=False)) == 1
    assert launches(lambda: ops.gather_cols(x, idx[:, :2] % 16, check_index=False)) == 1
    assert launches(lambda: ops.scatter_cols_(x, idx[:, :2] % 16, torch.randn(2, 50, 2), check_index=False)) == 1
    src, res = torch.randn(2, 3, 16), torch.randn(2, 50, 16)
    assert launches(lambda: ops.scatter_rows_residual_(x, idx, src, res, check_index=False)) == 1
    assert launches(lambda: ops.scatter_rows_residual_(x, idx, src, res, torch.randn(16))) == 2
    gates = {
        "top-k": lambda t: ops.token_gate(t, torch.zeros_like(t), 5),
        "top-k, k = N": lambda t: ops.token_gate(t, torch.zeros_like(t), t.size(1)),
        "threshold": lambda t: ops.token_gate_threshold(t, torch.zeros_like(t), 0.5, 40),
        "delta": lambda t: ops.token_delta_gate(t, torch.zeros_like(t), 5),
    }
    wide = torch.randn(1, 4097, 2)
    for name, gate in gates.items():
        assert launches(lambda: gate(x)) == 1, name
        split = 1 if name == "top-k, k = N" else 3  # k = N: every token, no scores
        assert launches(lambda: gate(wide)) == split, name
        full = torch.randn(1, 4096, 64)  # clusters of 8 blocks of 1024 threads: too many for 2 SMs at once
        assert launches(lambda: gate(full)) == 1 + split, name  # refused, then the three launches
        emu._set_device(0)
        assert launches(lambda: gate(full)) == split, name  # 2 MB through 8 of 132 SMs: three launches pay
        monkeypatch.setenv("EVENTFUL_CUDA_GATE", "fused")
        assert launches(lambda: gate(full)) == 1, name
        monkeypatch.delenv("EVENTFUL_CUDA_GATE")
        assert launches(lambda: gate(torch.randn(9, 4096, 64))) == 1, name  # 9 clusters of 8 cover half the SMs
        emu._set_device(1)  # before sm_90: no clusters
        assert launches(lambda: gate(x)) == split, name
        emu._set_device(2)
        monkeypatch.setenv("EVENTFUL_CUDA_GATE", "split")
        assert launches(lambda: gate(x)) == split, name
        monkeypatch.delenv("EVENTFUL_CUDA_GATE")
    given = torch.tensor([[4, 1, -1], [0, 2, 3]])
    assert launches(lambda: ops.token_delta_gate(x, torch.zeros_like(x), -1, given)) == 2  # index check, delta
    # unchecked ids may repeat: the delta rows read every old ref row before one scatter refreshes them
    assert launches(lambda: ops.token_delta_gate(x, torch.zeros_like(x), -1, given, check_index=False)) == 2


@pytest.mark.parametrize("gate_path", ["fused", "split"])
@pytest.mark.parametrize("n", [2, 33, 197, 1025, 4096, 4097])
@pytest.mark.parametrize("scores", ["distinct", "ties", "nan"])
def test_gate_selection_across_token_counts(emu, n, scores, gate_path, monkeypatch):
    """The per-row radix selection picks exactly the reference's tokens for any N (one or several rounds of the
    block): k largest scores, equal scores to the lower id, NaN above +inf, ids ascending; the threshold gate the
    same among the tokens above the threshold (never NaN), then -1. In the fused gate (one cluster per row, on the
    132-SM device so that every N up to 4096 runs fused) and in the three-launch path."""
    monkeypatch.setenv("EVENTFUL_CUDA_GATE", gate_path)
    if gate_path == "fused" and n > 4096:
        pytest.skip("past 4096 tokens the fused gate hands over to the three launches (the split case)")
    emu._set_device(0 if gate_path == "fused" else 2)
    g = torch.Generator().manual_seed(n)
    ops = cuda_emulator.ops_module(emu)
    for k in sorted({1, 2, n // 3, n - 1} - {0}):
        c = torch.randn(3, n, 8, generator=g)
        ref = torch.zeros(3, n, 8)
        if scores == "ties":  # two thirds of the tokens score exactly 0, the rest few distinct values
            c = (c * 2).round() / 2
            ref = c.clone()
            ref[:, ::3] = 0
        elif scores == "nan":
            c[0, n // 2] = float("nan")
            c[1, n - 1] = float("inf")
            c[2] = 1.0  # one row where every score is equal
        got_ref, want_ref = ref.clone(), ref.clone()
        index, c_sel = ops.token_gate(c, got_ref, k)
        want_index, want_sel = R.token_gate(c, want_ref, k)
        assert torch.equal(index, want_index), (n, k)
        assert_same(c_sel, want_sel)
        assert_same(got_ref, want_ref)
        for threshold in (-1e300, 0.0, 0.5, 1e300):  # +-1e300: +-inf in float32
            got_ref, want_ref = ref.clone(), ref.clone()
            got = ops.token_gate_threshold(c, got_ref, threshold, k)
            want = R.token_gate_threshold(c, want_ref, threshold, k)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (n, k, threshold)
            assert_same(got[2], want[2])
            assert_same(got_ref, want_ref)


def test_fused_gate_with_blocks_that_own_no_token(emu, monkeypatch):
    """Wide rows of few tokens: 8 blocks per cluster for 9 tokens, so three blocks own none of the key pass and must
    still meet the others at the cluster barrier and move their share of the rows."""
    monkeypatch.setenv("EVENTFUL_CUDA_GATE", "fused")
    emu._set_device(0)
    ops = cuda_emulator.ops_module(emu)
    g = torch.Generator().manual_seed(9)
    c, ref = torch.randn(2, 9, 16384, generator=g), torch.randn(2, 9, 16384, generator=g)
    before = emu._launches()
    got_ref, want_ref = ref.clone(), ref.clone()
    got = ops.token_delta_gate(c, got_ref, 4)
    want = R.token_delta_gate(c, want_ref, 4)
    assert emu._launches() - before == 1
    for a, b in zip(got, want):
        assert_same(a, b)
    assert_same(got_ref, want_ref)
    emu._set_device(2)


def test_bad_gate_path_is_named_and_leaves_the_state(emu, monkeypatch):
    ops = cuda_emulator.ops_module(emu)
    c, ref = torch.randn(2, 30, 8), torch.randn(2, 30, 8)
    before = ref.clone()
    monkeypatch.setenv("EVENTFUL_CUDA_GATE", "fast")
    with pytest.raises(ValueError, match="EVENTFUL_CUDA_GATE must be auto, fused or split, got 'fast'"):
        ops.token_gate(c, ref, 4)
    assert torch.equal(ref, before)
    monkeypatch.setenv("EVENTFUL_CUDA_GATE", "auto")
    assert ops.token_gate(c, ref, 4)[0].shape == (2, 4)


def test_gpu_gate_check_passes_and_catches_a_broken_path(emu):
    """tools/check_gates.py (run on a GPU before the end-to-end table) passes on the emulated kernels, both paths,
    and names the path that breaks."""
    sys.path.insert(0, os.path.join(cuda_emulator.ROOT, "tools"))
    import check_gates

    emu._set_device(2)
    ops = cuda_emulator.ops_module(emu)
    small = {"shapes": [(2, 197, 64, 49), (1, 300, 8, 100)], "dtypes": [torch.float32, torch.bfloat16]}
    lines = []
    assert check_gates.run_paths(ops, "cpu", log=lines.append, **small) == 0
    assert lines == ["gates [fused]: passed", "gates [split]: passed"]

    class Broken:  # the delta gate's e_sel off by one on one path
        def __init__(self, path):
            self.path = path

        def __getattr__(self, name):
            return getattr(ops, name)

        def token_delta_gate(self, c, ref, k):
            index, c_sel, e_sel = ops.token_delta_gate(c, ref, k)
            split = os.environ.get(check_gates.ENV) == "split"
            return index, c_sel, e_sel + 1 if split == (self.path == "split") else e_sel

    for path, status in (("fused", 1), ("split", 2)):
        lines = []
        assert check_gates.run_paths(Broken(path), "cpu", log=lines.append, **small) == status
        assert f"FAIL [{path}] token_delta_gate B=2 N=197 D=64 k=49 torch.float32: outputs [2] differ from the " \
            "reference" in lines
        assert os.environ.get(check_gates.ENV) is None


@pytest.mark.slow
def test_op_tests_under_address_sanitizer(tmp_path):
    """The op tests of the C++ CUDA kernels (backend cuda_emu) and this file's kernel cases again, with the kernels
    built under AddressSanitizer: no access outside any tensor's allocation (an illegal address on a GPU)."""
    if cuda_emulator.ASAN:
        pytest.skip("already running under AddressSanitizer")
    if not cuda_emulator.libasan():
        pytest.skip("the compiler has no AddressSanitizer runtime")
    root = cuda_emulator.ROOT
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           *(os.path.join(root, "tests", f) for f in ("test_gather_scatter.py", "test_scatter_rows_residual.py",
                                                      "test_token_gate.py", "test_cuda_emulator.py")),
           "-k", "cuda_emu or grid_size or selection"]
    proc = subprocess.run(cmd, cwd=root, env=cuda_emulator.asan_env(str(tmp_path)), capture_output=True, text=True,
                          timeout=2400)
    reports = "".join(p.read_text() for p in sorted(tmp_path.glob("asan*")))
    errors = [line for line in reports.splitlines() if "AddressSanitizer" in line and "swapcontext" not in line]
    assert not errors, reports[-6000:]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("gate_path", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_aligned_rows_move_as_16_byte_vectors(emu, dtype, gate_path, monkeypatch):
    """Row copies and the gates' score passes and row moves load and store 16 bytes at a time when rows allow it
    (unit feature stride, row bytes and strides multiples of 16, aligned base), and fall back to the widest unit
    that fits."""
    if gate_path == "split":
        monkeypatch.setenv("EVENTFUL_CUDA_GATE", "split")
    ops = cuda_emulator.ops_module(emu)
    emu._set_device(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, 64, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(40, generator=g)[:9] for _ in range(2)])
    emu._launch_log()
    ops.gather_rows(x, idx, check_index=False)
    ops.scatter_rows_(x, idx, torch.randn(2, 3, 9, 64, generator=g).to(dtype), check_index=False)
    ops.gather_cols(x, idx, check_index=False)  # columns: element-wise by design
    c, ref = x[:, 0], torch.zeros(2, 40, 64, dtype=dtype)
    ops.token_gate(c, ref, 7)  # split: scores, selection, row copy into c_sel and ref
    ops.token_delta_gate(c, ref, 7)  # split: scores, selection, delta rows
    gates = [16, 16] if gate_path == "fused" else [16, 0, 16, 16, 0, 16]
    assert emu._launch_log() == [16, 16, 0] + gates
    esize = x.element_size()
    odd = torch.randn(2, 1, 40, 66, generator=g).to(dtype)[..., 1:65]  # base one element in, rows of 66 elements
    ops.gather_rows(odd, idx, check_index=False)
    want = 4 if esize == 4 else 2  # 66-element rows of 2-byte elements: 4-byte units would need an even offset
    assert emu._launch_log() == [want]
    narrow = torch.randn(2, 40, 3, generator=g).to(dtype)  # 3-element rows: element by element
    ops.gather_rows(narrow, idx, check_index=False)
    ops.token_gate(narrow, torch.zeros_like(narrow), 5)
    ops.token_delta_gate(narrow, torch.zeros_like(narrow), 5)
    gates = [esize, esize] if gate_path == "fused" else [0, 0, esize, 0, 0, esize]
    assert emu._launch_log() == [esize] + gates


@pytest.mark.parametrize("policy", ["top-k", "threshold"])
def test_eventful_vit_frames_on_the_emulated_cuda_kernels(emu, monkeypatch, policy):
    """A converted ViT whose ops run on the C++ CUDA kernels (gates, scatters, the fused residual add; any op without
    one on the CPU kernels), on the emulated H200, gives the frames of the CPU kernels bit for bit, two streams."""
    from eventful_kernels import ops
    from eventful_kernels.models import convert
    from eventful_kernels.nn import BACKENDS, Threshold
    from tiny_timm import tiny_vit, video

    emu._set_device(0)
    emulated = types.SimpleNamespace(**{name: getattr(ops, name) for name in ops.__all__})
    vars(emulated).update(vars(cuda_emulator.ops_module(emu)))
    dense = tiny_vit()
    budget = Threshold(0.5) if policy == "threshold" else 6
    cpu, cuda = convert(dense, budget, cuda_graphs=False), convert(dense, budget, cuda_graphs=False)
    before = emu._launches()
    with torch.no_grad():
        for x in video(6, 32, batch=2):
            want = cpu(x)
            monkeypatch.setitem(BACKENDS, "ops", emulated)
            got = cuda(x)
            monkeypatch.setitem(BACKENDS, "ops", ops)
            assert torch.equal(got, want)
    steady = 5 * 2  # frames after the flush x blocks
    assert emu._launches() - before >= steady * (3 + 2)  # at least the gates and the fused residual adds

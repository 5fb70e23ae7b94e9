"""eventful-video: the noisy-run flag, budget parsing, interleaved timing, CLI errors and the token overlay."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from eventful_kernels import cli
from eventful_kernels.models import convert
from eventful_kernels.nn import Threshold
from eventful_kernels.video import budgets, overlay, runner, timing
from eventful_kernels.video.decode import read_frames, sample_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
TINY_ARGS = ["--model", "vit_small_patch16_224", "--model-kwargs", json.dumps(TINY_VIT), "--threads", "1", "--quiet",
             "--system-malloc", "--no-plots"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()  # the CLI sets torch's thread count for the whole process
    yield
    torch.set_num_threads(before)


# ---- the noisy flag -------------------------------------------------------------------------------------------
def test_percentile_and_spread():
    assert timing.percentile([1, 2, 3, 4, 5], 50) == 3
    assert timing.percentile([1, 2, 3, 4, 5], 90) == pytest.approx(4.6)  # numpy.percentile's linear rule
    assert timing.percentile([1, 2, 3, 4, 5], 10) == pytest.approx(1.4)
    assert timing.percentile([7.0], 90) == 7.0
    assert timing.spread([100.0] * 9) == 0.0
    assert timing.spread([5.0]) == 0.0
    assert timing.spread([90, 95, 100, 105, 110]) == pytest.approx((108 - 92) / 100)


def test_noise_check_quiet_run():
    check = timing.noise_check({"dense timm": [100, 102, 99, 101, 100, 103]}, {"r=N": 0.97, "r=N/4": 0.8})
    assert check["noisy"] is False and check["reasons"] == []
    assert check["dense_spread"]["dense timm"] < 0.05
    assert check["max_efficiency"] == 1.1 and check["max_spread"] == 0.3 and "p90 - p10" in check["spread"]


def test_noise_check_efficiency_above_ideal():
    # the loaded-machine run: r=N measured 7.40x against an ideal of 0.96x
    check = timing.noise_check({"dense timm": [250, 251, 249, 252]}, {"r=N": 7.70, "r=N/4": 1.05, "h=0.5": None})
    assert check["noisy"] is True and len(check["reasons"]) == 1
    assert "r=N efficiency 7.70 > 1.1" in check["reasons"][0]
    assert timing.noise_check({}, {"r=N/2": 1.1})["noisy"] is False  # the limit itself passes
    assert timing.noise_check({}, {"r=N/2": 1.1001})["noisy"] is True


def test_noise_check_dense_spread():
    steady = [100, 100, 100, 100, 100, 100, 100, 100, 100, 160]  # p90 = 106, p10 = 100: spread 6 %
    assert timing.noise_check({"dense timm": steady}, {})["noisy"] is False
    wide = [100, 140, 100, 140, 100, 140, 100, 140]  # p90 = 140, p10 = 100, median 120: 33 %
    check = timing.noise_check({"dense timm": [120] * 8, "dense timm, packed linears": wide}, {"r=N/4": 0.9})
    assert check["noisy"] is True
    assert check["dense_spread"]["dense timm, packed linears"] == pytest.approx(40 / 120)
    assert check["reasons"] == ["dense timm, packed linears frame times spread 33% > 30% ((p90 - p10) / median)"]
    both = timing.noise_check({"dense timm": wide}, {"r=N": 2.0})
    assert len(both["reasons"]) == 2


def test_rates_and_like_for_like():
    dense = {"ms_median": 200.0, "gflops_mean": 35.0}
    packed = {"ms_median": 150.0, "gflops_mean": 35.0}
    run = {"ms_median": 50.0, "gflops_mean": 8.75}
    r = timing.rates(run, dense, packed)
    assert r["speedup"] == 4.0 and r["ideal_speedup"] == 4.0 and r["efficiency"] == 1.0
    assert r["speedup_vs_dense_packed"] == 3.0 and r["efficiency_vs_dense_packed"] == 0.75
    assert timing.like_for_like(r) == 0.75  # the packed baseline: the eventful blocks' own kernels
    r = timing.rates(run, dense)
    assert "efficiency_vs_dense_packed" not in r and timing.like_for_like(r) == 1.0


# ---- budgets ---------------------------------------------------------------------------------------------------
def test_parse_budgets():
    assert budgets.parse_budget("N") == 1.0 and budgets.parse_budget("N/4") == 0.25
    assert budgets.parse_budget("49") == 49 and budgets.parse_budget(" 0.5 ") == 0.5
    t = budgets.parse_budget("t0.5")
    assert isinstance(t, Threshold) and t.h == 0.5 and t.capacity is None
    t = budgets.parse_budget("T1.5:49")
    assert (t.h, t.capacity) == (1.5, 49)
    assert budgets.budget_text(t) == "t1.5:49" and budgets.budget_label("T1.5:49", t) == "h=1.5, cap 49"
    assert budgets.budget_label("N/4", 0.25) == "r=N/4"
    assert budgets.tokens_for(t, 197) == 49 and budgets.tokens_for(budgets.parse_budget("t2"), 197) == 197
    assert budgets.tokens_for(0.25, 197) == 49
    assert [text for text, _ in budgets.parse_budget_list("N, N/4,,t0.5")] == ["N", "N/4", "t0.5"]
    f = budgets.fresh(t)
    assert f is not t and (f.h, f.capacity) == (t.h, t.capacity)


@pytest.mark.parametrize("text,match", [
    ("0", "selects no tokens"), ("0.0", "selects no tokens"), ("N/0", "expected"), ("1.5", r"\(0, 1\]"),
    ("-3", ">= 1"), ("lots", "expected"), ("nan", "expected"), ("t", "t<threshold>"), ("tx", "t<threshold>"),
    ("t-1", ">= 0"), ("t0.5:0", "capacity"), ("t0.5:x", "t<threshold>"), ("", "empty"),
])
def test_parse_budget_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        budgets.parse_budget(text)


def test_parse_budget_list_rejects():
    with pytest.raises(ValueError, match="twice"):
        budgets.parse_budget_list("N/4,N/4")
    with pytest.raises(ValueError, match="no budgets"):
        budgets.parse_budget_list(" , ")


# ---- interleaved timing ----------------------------------------------------------------------------------------
def _tiny_model():
    return runner.create_model("vit_small_patch16_224", 0, None, **TINY_VIT)


def test_compare_interleaves_and_matches_sequential(monkeypatch):
    torch.set_num_threads(1)
    model = _tiny_model()
    size, mean, std = runner.input_spec(model)
    frames = read_frames(sample_video("bigbuckbunny"), size, 4)
    calls = []
    timed = runner._timed

    def spy(fn, x):
        calls.append(fn)
        return timed(fn, x)

    monkeypatch.setattr(runner, "_timed", spy)
    plan = [("r=N/4", 0.25), ("h=0.5", budgets.parse_budget("t0.5"))]
    sched = {0: 1.0, 2: 3}
    inter = runner.compare(model, frames, mean, std, plan, sched, packed_baseline=True, warmup=1)
    assert inter.mode == "interleaved" and inter.n_tokens == 17
    # every frame goes through all five models once; the order rotates by one from frame to frame
    assert len(calls) == 4 * 5
    per_frame = [calls[5 * t: 5 * t + 5] for t in range(4)]
    for t in range(1, 4):
        assert per_frame[t] == per_frame[t - 1][1:] + per_frame[t - 1][:1]
    assert len({id(c) for c in per_frame[0]}) == 5  # five distinct models: one eventful model per budget
    evs = [c for c in per_frame[0] if hasattr(c, "eventful_blocks")]
    assert len(evs) == 3 and all(ev.dense is model for ev in evs)
    assert all(ev.eventful_blocks()[0].block is model.blocks[0] for ev in evs)  # weights shared
    calls.clear()
    seq = runner.compare(model, frames, mean, std, plan, sched, packed_baseline=True, warmup=1, sequential=True)
    assert seq.mode == "sequential" and len(calls) == 4 * 5
    # each eventful model kept its own state: the interleaved runs equal the one-after-the-other runs
    for a, b in zip(inter.runs + [inter.schedule], seq.runs + [seq.schedule]):
        assert a.label == b.label and a.gflops == b.gflops and a.tokens == b.tokens and a.budget == b.budget
        assert a.rel_error == pytest.approx(b.rel_error, abs=1e-6)
    assert inter.schedule.budget == ["1.0", "1.0", "3", "3"] and inter.schedule.tokens == [17, 17, 3, 3]
    assert inter.dense.gflops == seq.dense.gflops == inter.dense_packed.gflops
    assert inter.runs[0].attention[-1] == ("eventful", "eventful")


def test_compare_gate_placements_interleaved_and_sequential():
    torch.set_num_threads(1)
    model = _tiny_model()
    size, mean, std = runner.input_spec(model)
    torch.manual_seed(3)
    frames = (torch.rand(5, 3, size, size) * 255).to(torch.uint8)  # every token moves: the placements disagree
    plan = [("after", 0.25), ("before", 0.25, "before_norm"), ("all before", 1.0, "before_norm")]
    inter = runner.compare(model, frames, mean, std, plan, {0: 0.5}, gate_placement="after_norm")
    seq = runner.compare(model, frames, mean, std, plan, {0: 0.5}, gate_placement="after_norm", sequential=True)
    for cmp in (inter, seq):
        after, before, full = cmp.runs
        assert [r.gate_placement for r in cmp.runs] == ["after_norm", "before_norm", "before_norm"]
        assert cmp.schedule.gate_placement == "after_norm" and cmp.dense.gate_placement is None
        assert max(full.rel_error) < 1e-5  # r = N: the dense output, either placement
        assert after.gflops == before.gflops  # same token counts: the operation counts agree ...
        assert max(abs(a - b) for a, b in zip(after.rel_error, before.rel_error)) > 1e-3  # ... the tokens do not
        assert after.to_json()["gate_placement"] == "after_norm" and "gate_placement" not in cmp.dense.to_json()
    for a, b in zip(inter.runs + [inter.schedule], seq.runs + [seq.schedule]):
        assert a.rel_error == pytest.approx(b.rel_error, abs=1e-6)
    with pytest.raises(ValueError, match="gate_placement"):
        runner.compare(model, frames[:2], mean, std, [("x", 0.5, "inside")])


def test_token_count():
    assert runner.token_count(_tiny_model()) == 17  # 4x4 patches + class token
    from tiny_timm import tiny_sam

    assert runner.token_count(tiny_sam()) == 64  # 8x8 grid, no prefix tokens


def test_attention_summary():
    assert runner.attention_summary([("eventful",) * 2] * 3) == "eventful"
    assert runner.attention_summary([("eventful", "eventful"), ("dense", "dense")]) == "dense"  # flush left out
    assert runner.attention_summary([(), ("eventful", "dense"), ("eventful", "eventful")]) == \
        "mixed (eventful 75%, dense 25%)"
    assert runner.attention_summary([(), ()]) == "-"


# ---- CLI errors ------------------------------------------------------------------------------------------------
ERRORS = [
    (["--video", "/no/such/video.mp4"], "--video: no video file at /no/such/video.mp4"),
    (["--model", "resnet18"], "--model resnet18 (ResNet) is not supported"),
    (["--model", "no_such_model_xyz"], "is not a timm model"),
    (["--model-kwargs", "{img_size: 32"], "--model-kwargs is not valid JSON"),
    (["--model-kwargs", "[32]"], "--model-kwargs must be a JSON object"),
    (["--model", "vit_small_patch16_224", "--model-kwargs", '{"no_such_arg": 1}'], "cannot be built"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--frames", "0"], "--frames must be >= 2"),
    (["--frames", "1"], "--frames must be >= 2"),
    (["--budgets", "0"], "--budgets: budget '0' selects no tokens"),
    (["--budgets", "N,0.0"], "selects no tokens"),
    (["--budgets", "N/0"], "--budgets: budget 'N/0'"),
    (["--budgets", "2.5"], "a fraction must lie in (0, 1]"),
    (["--budgets", "-4"], "a token count must be >= 1"),
    (["--budgets", "N,N"], "given twice"),
    (["--budgets", "t0.5:0"], "capacity"),
    (["--budgets", "fast"], "--budgets: budget 'fast'"),
    (["--schedule", "5:0.5"], "--schedule: the budget at frame 0"),
    (["--schedule", "0:N,x:0.5"], "the frame must be an integer"),
    (["--overlay-budget", "0"], "--overlay-budget"),
    (["--overlay-block", "-1"], "--overlay-block must be >= 0"),
    (["--dtype", "float64"], "argument --dtype: invalid choice"),
    (["--threads", "two"], "argument --threads: invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["--gate-placement", "inside"], "argument --gate-placement: invalid choice: 'inside'"),
]
if not torch.cuda.is_available():
    ERRORS.append((["--device", "cuda"], "--device cuda: CUDA is not available"))


@pytest.mark.parametrize("argv,message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    rc = cli.main(argv + ["--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("eventful-video: error: ")
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "result.json").exists()


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--gate-placement", "--dtype", "--overlay", "--sequential", "--schedule", "t0.5"):
        assert option in text


def test_cli_error_overlay_block_out_of_range(capsys, tmp_path):
    rc = cli.main(TINY_ARGS + ["--overlay-block", "2", "--frames", "2", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err == "eventful-video: error: --overlay-block 2: vit_small_patch16_224 has blocks 0..1\n"


@pytest.mark.parametrize("extra,message", [
    (["--budgets", "N,N/32"], "--budgets: budget 'N/32' selects no tokens of the 17 of vit_small_patch16_224"),
    (["--budgets", "N", "--schedule", "0:N,2:0.05"], "--schedule: budget '2:0.05' selects no tokens of the 17"),
    (["--budgets", "N", "--overlay", "--overlay-budget", "0.02"], "--overlay-budget: budget '0.02' selects no"),
])
def test_cli_error_budget_selects_no_tokens_of_the_model(extra, message, capsys, tmp_path):
    rc = cli.main(TINY_ARGS + extra + ["--frames", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err  # floor(f * 17) = 0
    assert not (tmp_path / "o").exists()


def test_cli_gate_placement(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(TINY_ARGS + ["--frames", "3", "--budgets", "N,N/4", "--schedule", "0:N,1:N/4",
                               "--gate-placement", "before_norm", "--out", str(out)])
    assert rc == 0
    res = json.load(open(out / "result.json"))
    assert res["gate_placement"] == "before_norm"
    assert [b["gate_placement"] for b in res["budgets"]] == ["before_norm"] * 2
    assert res["schedule"]["gate_placement"] == "before_norm"
    by = {b["budget"]: b for b in res["budgets"]}
    assert by["N"]["rel_error_max"] < 1e-5 and by["N/4"]["tokens_per_frame"] == [17, 4, 4]
    assert "gates before the LayerNorms (before_norm)" in capsys.readouterr().out


def test_bench_video_reports_gate_placements(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_video", os.path.join(ROOT, "benchmarks", "bench_video.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = ["--models", "vit_small_patch16_224", "--model-kwargs", json.dumps(TINY_VIT), "--frames", "4",
            "--threads", "1", "--system-malloc", "--out", str(out)]
    assert bench.main(argv + ["--gate-placement", "after_norm,before_norm"]) == 0
    res = json.load(open(out))
    assert res["gate_placements"] == ["after_norm", "before_norm"] and res["mode"] == "interleaved"
    m = res["models"][0]
    assert m["gate_placement"] == "after_norm" and m["eventful"]["gate_placement"] == "after_norm"
    after, before = m["placements"]["after_norm"], m["placements"]["before_norm"]
    assert before["run"]["gate_placement"] == "before_norm" and len(before["run"]["ms_per_frame"]) == 4
    assert after["ms_ratio_to_first_paired_median"] == 1.0 and before["ms_ratio_to_first_paired_median"] > 0
    assert after["ms_median"] == m["eventful"]["ms_median"] and before["gflops_mean"] == after["gflops_mean"]
    assert set(m["noise_check"]["dense_spread"]) >= {"dense"} and isinstance(m["noisy"], bool)
    assert "gates before_norm:" in capsys.readouterr().out
    assert bench.main(argv + ["--gate-placement", "before_norm"]) == 0
    m = json.load(open(out))["models"][0]
    assert m["gate_placement"] == "before_norm" and "placements" not in m
    with pytest.raises(SystemExit):
        bench.main(argv + ["--gate-placement", "after_norm,inside"])


def test_cli_error_undecodable_video(capsys, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is no video" * 64)
    rc = cli.main(TINY_ARGS + ["--video", str(bad), "--frames", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"eventful-video: error: --video {bad}: cannot decode it")


def test_cli_error_in_a_process_exits_2():
    out = subprocess.run([sys.executable, "-m", "eventful_kernels.cli", "--frames", "0"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "eventful-video: error: --frames must be >= 2 (frame 0 is the flush, timings start at frame " \
        "1), got 0\n"


# ---- overlay ---------------------------------------------------------------------------------------------------
def test_selection_recorder_maps_ids_to_the_patch_grid():
    model = _tiny_model()
    ev = convert(model, 0.25)
    rec = overlay.SelectionRecorder(ev, (4, 4))
    try:
        c = torch.zeros(1, 17, 32)  # class token + 4x4 patches
        rec._hook(0, None, (c,), (torch.tensor([[0, 1, 6, -1]]), None))  # class token, patches 0 and 5, empty
        rec._hook(1, None, (c,), (torch.tensor([[16, -1, -1, -1]]), None))
        maps = rec.maps()
    finally:
        rec.remove()
    assert maps.shape == (2, 4, 4) and maps.dtype == torch.bool
    assert maps[0].nonzero().tolist() == [[0, 0], [1, 1]]
    assert maps[1].nonzero().tolist() == [[3, 3]]
    assert overlay.heat(maps[None]).tolist()[0][0] == [1, 0, 0, 0]
    assert overlay.heat(maps[None], block=1)[0].sum() == 1


def test_overlay_record_sam_grid():
    from tiny_timm import tiny_sam

    model = tiny_sam()
    ev = convert(model, 5)
    frames = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    grid = runner.patch_grid(model)
    assert grid == (8, 8)
    maps, gflops = overlay.record(ev, frames, (0.5,) * 3, (0.25,) * 3, 5, grid)
    assert maps.shape == (3, 3, 8, 8)
    assert maps[0].all()  # the flush re-processes everything
    assert maps[1:].sum((-1, -2)).eq(5).all()  # no prefix tokens: each block's 5 ids land on 5 patches
    assert gflops[0] > gflops[1] > 0


def test_render_panel_highlights_selected_patches():
    frame = torch.zeros(3, 8, 8, dtype=torch.uint8)
    frame[2] = 255  # pure blue: the tint must still read as colour
    counts = torch.tensor([[0, 3], [1, 0]], dtype=torch.uint8)
    img = overlay.render_panel(frame, counts, vmax=3, cell=10).astype(int)
    assert img.shape == (20, 20, 3)
    chroma = img.max(-1) - img.min(-1)
    assert (chroma[:10, :10] == 0).all() and (chroma[10:, 10:] == 0).all()  # not re-processed: grey
    assert (chroma[:10, 10:] > 60).all() and (chroma[10:, :10] > 60).all()  # re-processed: tinted
    assert (img[:10, 10:, 1] > img[10:, :10, 1]).all()  # all blocks (yellow) vs one block (red)


def _cells(img: np.ndarray, cell: int, grid):
    """Mean chroma of each cell's interior."""
    chroma = img.astype(int).max(-1) - img.astype(int).min(-1)
    m = cell // 4
    return np.array([[chroma[r * cell + m:(r + 1) * cell - m, c * cell + m:(c + 1) * cell - m].mean()
                      for c in range(grid[1])] for r in range(grid[0])])


@pytest.mark.parametrize("block", [None, 1])
def test_cli_overlay_writes_video_and_gif(tmp_path, capsys, block):
    import av
    from PIL import Image

    out = tmp_path / "out"
    extra = ["--overlay"] if block is None else ["--overlay-block", str(block)]
    rc = cli.main(TINY_ARGS + ["--frames", "4", "--budgets", "N/4", "--overlay-budget", "N/4", "--out", str(out)]
                  + extra)
    assert rc == 0
    res = json.load(open(out / "result.json"))
    ov = res["overlay"]
    assert ov["block"] == block and ov["blocks"] == 2 and ov["grid"] == [4, 4] and ov["frames"] == 4
    heat = np.load(out / "overlay_heat.npy")
    assert heat.shape == (4, 4, 4)
    assert (heat[0] == (2 if block is None else 1)).all()  # flush: every block re-processed every patch
    assert heat.max() <= (2 if block is None else 1)
    assert ov["patches_updated_per_frame"] == [int((h > 0).sum()) for h in heat]
    assert all(0 < n <= 4 for n in ov["patches_updated_per_frame"][1:])  # N/4 = 4 tokens (class token too)
    assert ov["gflops_per_frame"][1] < ov["dense_gflops_per_frame"][1]
    width, height = ov["size"]
    assert width % 2 == 0 and height % 2 == 0 and height > width
    cell = width // 4
    gif = Image.open(out / "overlay.gif")
    assert gif.n_frames == 4 and gif.size == (width, height)
    with av.open(str(out / "overlay.mp4")) as container:
        video = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(video) == 4 and video[0].shape == (height, width, 3)
    for t in range(4):
        gif.seek(t)
        for img in (np.asarray(gif.convert("RGB")), video[t]):
            chroma = _cells(img[:width], cell, (4, 4))
            assert (chroma[heat[t] > 0] > 40).all(), (t, chroma, heat[t])
            assert (chroma[heat[t] == 0] < 12).all(), (t, chroma, heat[t])
    assert "overlay.mp4" in capsys.readouterr().out

"""Video decoding and the eventful-video CLI end to end on a tiny model and a few frames of the sample video."""
import json
import os
import platform
import subprocess
import sys
import tomllib

import pytest
import torch

from eventful_kernels import cli
from eventful_kernels.video.decode import fit_frame, normalize, read_frames, sample_video
from eventful_kernels.nn import Threshold
from eventful_kernels.video.runner import parse_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()  # the CLI sets torch's thread count for the whole process
    yield
    torch.set_num_threads(before)


def test_sample_videos_decode():
    frames = read_frames(sample_video("bigbuckbunny"), 48, max_frames=3)
    assert frames.shape == (3, 3, 48, 48) and frames.dtype == torch.uint8
    assert frames.float().std() > 10  # real picture content, not a blank frame
    assert not torch.equal(frames[0], frames[2])
    bikes = read_frames(sample_video("bikes"), 40, max_frames=2)
    assert bikes.shape == (2, 3, 40, 40)
    with pytest.raises(ValueError, match="name"):
        sample_video("nope")


def test_fit_frame_resizes_short_side_and_center_crops():
    img = torch.zeros(3, 20, 60, dtype=torch.uint8)
    img[:, :, 20:40] = 200  # the middle third: what a center crop of the 10x30 resize keeps
    out = fit_frame(img, 10)
    assert out.shape == (3, 10, 10)
    assert out[:, :, 2:8].min() == 200
    x = normalize(out, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x[0, 5, 5], torch.tensor((200 / 255 - 0.5) / 0.25))


def test_parse_schedule():
    assert parse_schedule("0:1.0,10:N/4,5:49") == {0: 1.0, 5: 49, 10: 0.25}
    with pytest.raises(ValueError, match="frame 0"):
        parse_schedule("3:0.5")
    with pytest.raises(ValueError, match="FRAME:BUDGET"):
        parse_schedule("0")
    sched = parse_schedule("0:N,4:t0.5:7")
    assert sched[0] == 1.0 and isinstance(sched[4], Threshold)
    assert (sched[4].h, sched[4].capacity) == (0.5, 7)
    with pytest.raises(ValueError, match="twice"):
        parse_schedule("0:N,0:0.5")
    with pytest.raises(ValueError, match="selects no tokens"):
        parse_schedule("0:N,3:0")


def test_console_script_declared():
    meta = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert meta["project"]["scripts"]["eventful-video"] == "eventful_kernels.cli:main"


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main([
        "--model", "vit_small_patch16_224", "--model-kwargs", json.dumps(TINY_VIT), "--frames", "5",
        "--budgets", "N,N/4,3,t0.5", "--schedule", "0:1.0,2:0.25", "--threads", "1", "--out", str(out), "--quiet",
        "--system-malloc",  # in-process run: leave the test session's allocator alone
    ])
    assert rc == 0
    res = json.load(open(out / "result.json"))
    assert res["tokens"] == 17 and res["frames"] == 5 and res["input_size"] == 32 and res["threads"] == 1
    assert res["malloc_keep_freed"] is False
    assert res["mode"] == "interleaved" and "interleaved" in res["mode_description"] and res["dtype"] == "float32"
    assert res["gate_placement"] == "after_norm"  # the default, as published
    assert len(res["dense"]["ms_per_frame"]) == 5
    by = {b["budget"]: b for b in res["budgets"]}
    assert set(by) == {"N", "N/4", "3", "t0.5"}
    assert [by[k]["tokens"] for k in ("N", "N/4", "3")] == [17, 4, 3]
    assert by["N/4"]["label"] == "r=N/4" and by["t0.5"]["label"] == "h=0.5"
    assert by["N/4"]["tokens_per_frame"] == [17, 4, 4, 4, 4] and by["N/4"]["tokens_mean"] == 4
    dense_gf = res["dense"]["gflops_mean"]
    assert dense_gf > 0
    # r = N: same output as dense (fp32 tolerance); reduced budgets: fewer GFLOPs, ideal speedup > 1
    assert by["N"]["rel_error_max"] < 1e-4 and by["N"]["top1_agreement"] == 1.0
    for k in ("N/4", "3"):
        b = by[k]
        assert b["gflops_mean"] < dense_gf and b["ideal_speedup"] > 1.0
        assert b["gflops_per_frame"][0] > b["gflops_per_frame"][1]  # flush is dense
        assert b["ideal_speedup"] == pytest.approx(dense_gf / b["gflops_mean"])
        assert b["speedup"] > 0 and b["efficiency"] == pytest.approx(b["speedup"] / b["ideal_speedup"])
        assert all(ms > 0 for ms in b["ms_per_frame"]) and len(b["ms_per_frame"]) == 5
    assert by["3"]["gflops_mean"] < by["N/4"]["gflops_mean"]
    # threshold budget: the tokens over 0.5 (capacity N), trimmed on CPU, so the count shows in tokens and GFLOPs
    th = by["t0.5"]
    assert th["policy"].startswith("Threshold(h=0.5") and th["tokens"] == 17
    assert th["tokens_per_frame"][0] == 17 and all(0 <= k <= 17 for k in th["tokens_per_frame"])
    assert th["gflops_per_frame"][1] <= th["gflops_per_frame"][0]
    # every run reports its global blocks' attention (the test session pins EVENTFUL_ATTENTION=eventful)
    for b in res["budgets"] + [res["schedule"]]:
        assert b["attention"] == "eventful" and b["attention_modes"] == ["eventful", "eventful"]
    assert res["attention_modes"]["r=N/4"] == "eventful" and res["strategy"] == "eventful"
    # noise verdict: a bool, its reasons, and how it was decided
    assert isinstance(res["noisy"], bool) and res["noisy"] == bool(res["noisy_reasons"])
    nc = res["noise_check"]
    assert nc["max_efficiency"] == 1.1 and nc["max_spread"] == 0.3 and "p90 - p10" in nc["spread"]
    assert "dense timm" in nc["dense_spread"]
    from eventful_kernels.nn.linear import packing_enabled

    if packing_enabled():  # like-for-like baseline: the dense model on the same prepacked linears
        dp = res["dense_packed"]
        assert len(dp["ms_per_frame"]) == 5 and dp["gflops_mean"] == pytest.approx(dense_gf)
        for b in by.values():
            assert b["speedup_vs_dense_packed"] == pytest.approx(dp["ms_median"] / b["ms_median"])
            assert b["efficiency_vs_dense_packed"] == pytest.approx(
                b["speedup_vs_dense_packed"] / (dp["gflops_mean"] / b["gflops_mean"]))
        assert "dense timm, packed linears" in nc["dense_spread"]
    sched = res["schedule"]
    gf = sched["gflops_per_frame"]
    assert gf[1] == pytest.approx(by["N"]["gflops_per_frame"][1])
    assert gf[3] == pytest.approx(by["N/4"]["gflops_per_frame"][3])
    assert sched["budget_per_frame"] == ["1.0", "1.0", "0.25", "0.25", "0.25"]
    assert sched["changes"] == {"0": "1.0", "2": "0.25"}
    assert sched["ideal_speedup"] == pytest.approx(dense_gf / sched["gflops_mean"])
    for name in ("per_frame.png", "speedup.png", "schedule.png"):
        data = open(out / name, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    text = capsys.readouterr().out
    assert "dense timm" in text and "r=N/4" in text and "h=0.5" in text and "result.json" in text
    assert ("packed linears" in text) == packing_enabled()
    assert "timing interleaved" in text and "cpu float32, 1 threads" in text
    rows = [line for line in text.splitlines() if line.startswith("schedule 0:1.0,2:0.25")]
    assert len(rows) == 1 and "eventful" in rows[0]  # the schedule is a row of the table
    assert ("NOISY RUN" in text) == res["noisy"] and ("timing check passed" in text) != res["noisy"]


def test_cli_dtype_bfloat16(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--model", "vit_small_patch16_224", "--model-kwargs", json.dumps(TINY_VIT), "--frames", "3",
                   "--budgets", "N,N/4", "--dtype", "bfloat16", "--threads", "1", "--out", str(out), "--quiet",
                   "--system-malloc", "--no-plots"])
    assert rc == 0
    res = json.load(open(out / "result.json"))
    assert res["dtype"] == "bfloat16"
    by = {b["budget"]: b for b in res["budgets"]}
    assert by["N"]["rel_error_max"] < 0.05  # bf16 rounding, same model
    assert 0 < by["N/4"]["gflops_mean"] < res["dense"]["gflops_mean"]
    assert "cpu bfloat16" in capsys.readouterr().out


def test_cli_sequential_mode(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["--model", "vit_small_patch16_224", "--model-kwargs", json.dumps(TINY_VIT), "--frames", "3",
                   "--budgets", "N/4,t0.5", "--sequential", "--threads", "1", "--out", str(out), "--quiet",
                   "--system-malloc", "--no-plots"])
    assert rc == 0
    res = json.load(open(out / "result.json"))
    assert res["mode"] == "sequential" and res["mode_description"].startswith("sequential")
    assert "timing sequential" in capsys.readouterr().out
    assert [b["budget"] for b in res["budgets"]] == ["N/4", "t0.5"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt")
def test_keep_freed_memory_in_a_fresh_process():
    code = "from eventful_kernels.video.malloc import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_cli_int8(tmp_path, capsys):
    """--int8: both models run the dynamic-int8 copy; at r = N the eventful model equals it (the same rows reach
    every quantized product), no packed baseline (it would be the same int8 model)."""
    out = tmp_path / "out"
    rc = cli.main(["--model", "vit_small_patch16_224", "--model-kwargs", json.dumps(TINY_VIT), "--frames", "3",
                   "--budgets", "N,N/4", "--int8", "--threads", "1", "--out", str(out), "--quiet",
                   "--system-malloc", "--no-plots"])
    assert rc == 0
    res = json.load(open(out / "result.json"))
    assert res["int8"] is True and res["dtype"] == "float32" and "dense_packed" not in res
    by = {b["budget"]: b for b in res["budgets"]}
    assert by["N"]["rel_error_max"] < 1e-5
    assert 0 < by["N/4"]["gflops_mean"] < res["dense"]["gflops_mean"]
    assert "cpu float32 (dynamic int8 linears)" in capsys.readouterr().out
    assert cli.main(["--int8", "--dtype", "bfloat16", "--frames", "3", "--quiet"]) == 2
    assert "--int8 quantizes a float32 model on the CPU, not --device cpu --dtype bfloat16" in capsys.readouterr().err

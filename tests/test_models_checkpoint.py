"""load_checkpoint: timm-format weights (torch.save state dict, wrapped dicts, safetensors) into shared weights."""
import pytest
import torch
from safetensors.torch import save_file
from tiny_timm import tiny_sam, tiny_vit, video

from eventful_kernels.models import convert, load_checkpoint

TOL = dict(atol=1e-4, rtol=1e-4)  # fp32, same reasoning as tests/test_models.py


pytestmark = pytest.mark.usefixtures("one_thread")


def _save(state, path, fmt):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "wrapped":
        torch.save({"state_dict": state, "epoch": 3}, str(path))
    elif fmt == "ddp":
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, str(path))
    else:
        torch.save(state, str(path))


@pytest.mark.parametrize("fmt", ["pth", "wrapped", "ddp", "safetensors"])
@pytest.mark.parametrize("build,size", [(tiny_vit, 32), (tiny_sam, 64)])
def test_round_trip(tmp_path, build, size, fmt):
    source = build(seed=1)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    _save(source.state_dict(), path, fmt)

    target = build(seed=2)
    ev = convert(target, 1.0)
    frames = video(3, size)
    with torch.no_grad():
        ev(frames[0])  # state from the old weights: loading must reset it
        ev.load_checkpoint(str(path))
        for name, p in target.state_dict().items():
            assert torch.equal(p, source.state_dict()[name]), name
        for x in frames:
            torch.testing.assert_close(ev(x), source(x), **TOL)


def test_original_sam_checkpoint_layout(tmp_path):
    """Segment-Anything's own files prefix the encoder with image_encoder. and name the MLP lin1/lin2."""
    source = tiny_sam(seed=1)
    sam_style = {}
    for k, v in source.state_dict().items():
        sam_style["image_encoder." + k.replace("mlp.fc", "mlp.lin")] = v
    sam_style["prompt_encoder.pe_layer.gaussian"] = torch.zeros(2, 8)  # non-encoder keys are dropped
    torch.save(sam_style, tmp_path / "sam.pth")
    target = tiny_sam(seed=2)
    load_checkpoint(target, str(tmp_path / "sam.pth"))
    for name, p in target.state_dict().items():
        assert torch.equal(p, source.state_dict()[name]), name


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_bad_checkpoints_raise_and_leave_weights_unchanged(tmp_path):
    source = tiny_vit(seed=1).state_dict()
    target = tiny_vit(seed=2)
    snap = _snapshot(target)

    missing = dict(source)
    del missing["blocks.0.mlp.fc1.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="missing keys.*blocks.0.mlp.fc1.weight"):
        load_checkpoint(target, str(tmp_path / "missing.pth"))
    assert _unchanged(target, snap)

    extra = dict(source, **{"blocks.9.bogus": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="unexpected keys.*blocks.9.bogus"):
        load_checkpoint(target, str(tmp_path / "extra.pth"))
    assert _unchanged(target, snap)

    wrong = dict(source, **{"blocks.1.attn.proj.weight": torch.zeros(32, 16)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(RuntimeError, match=r"blocks.1.attn.proj.weight: checkpoint shape \(32, 16\)"):
        load_checkpoint(target, str(tmp_path / "wrong.safetensors"))
    assert _unchanged(target, snap)

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_checkpoint(target, str(tmp_path / "list.pth"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(target, str(tmp_path / "absent.pth"))
    assert _unchanged(target, snap)


def test_non_strict_loads_the_matching_subset(tmp_path):
    source = tiny_vit(seed=1).state_dict()
    partial = {k: v for k, v in source.items() if not k.startswith("head.")}
    torch.save(partial, tmp_path / "backbone.pth")
    target = tiny_vit(seed=2)
    head_before = target.head.weight.clone()
    load_checkpoint(target, str(tmp_path / "backbone.pth"), strict=False)
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])
    assert torch.equal(target.head.weight, head_before)

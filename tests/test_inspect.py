"""Attention maps, rollout and the per-stage profile."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import cvt
from cvt.cli import main
from cvt.flops import count_macs, count_params
from cvt.inspect import attention_maps, draw_attention, key_footprint, profile_stages
from helpers import TINY as TINY_LAYOUT

TINY = dict(TINY_LAYOUT, num_classes=10, img_size=64)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return cvt.create_model("cvt_13_224", **{**TINY, **overrides}).eval()


def conv_out(size, kernel=3, stride=2, padding=1, ceil_mode=False):
    return (math.ceil if ceil_mode else math.floor)((size + 2 * padding - kernel) / stride) + 1


@pytest.mark.parametrize("proj_method", ["dw_bn", "avg", "linear"])
def test_maps_have_the_grid_shapes_and_sum_to_one(proj_method):
    model = tiny_model(proj_method=proj_method)
    maps = attention_maps(model, torch.randn(2, 3, 72, 56))
    h, w = model.feature_sizes(72, 56)[-1]
    # The official `avg` projection pools with ceil_mode=True.
    ceil_mode = proj_method == "avg"
    kh, kw = (h, w) if proj_method == "linear" else (conv_out(h, ceil_mode=ceil_mode), conv_out(w, ceil_mode=ceil_mode))
    assert maps.token_grid == (h, w) and maps.key_grid == (kh, kw)
    assert maps.last_block.shape == (2, 3, 1 + kh * kw)
    assert maps.head_maps().shape == (2, 3, kh, kw) and maps.mean_map().shape == (2, kh, kw)
    assert maps.rollout.shape == (2, 1 + h * w) and maps.rollout_map().shape == (2, h, w)
    # Softmax rows over the class token and the image keys; the rollout's row is a product of such rows.
    torch.testing.assert_close(maps.last_block.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(maps.rollout.sum(-1), torch.ones(2))
    assert (maps.last_block >= 0).all() and (maps.rollout >= 0).all()
    torch.testing.assert_close(maps.mean_map(), maps.head_maps().mean(1))


def test_last_block_is_the_attention_the_model_applies():
    model = tiny_model()
    model.set_fused_attn(False)  # the reference path passes its weights through attn_drop, where a hook sees them
    applied = []
    handle = model.stage2.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: applied.append(o))
    maps = attention_maps(model, torch.randn(2, 3, 64, 64))
    handle.remove()
    torch.testing.assert_close(maps.last_block, applied[0][:, :, 0])


def test_key_footprint_gives_each_token_to_one_key():
    attn = tiny_model().stage2.blocks[0].attn  # 3x3 depth-wise conv, stride 2, padding 1
    footprint = key_footprint(attn, 5, 4)
    assert footprint.shape == (3, 2, 20)
    # Nearest-neighbour upsampling of the 3x2 key map: key (i, j) owns tokens (2i..2i+1, 2j..2j+1).
    owner = torch.arange(6).reshape(3, 2).repeat_interleave(2, 0).repeat_interleave(2, 1)[:5].flatten()
    for key in range(6):
        expected = (owner == key).float()
        torch.testing.assert_close(footprint.flatten(0, 1)[key], expected / expected.sum())


def test_key_footprint_keeps_a_ceil_mode_key_over_the_edge():
    attn = tiny_model(proj_method="avg").stage2.blocks[0].attn  # 3x3 average pool, stride 2, ceil_mode=True
    footprint = key_footprint(attn, 4, 4)
    assert footprint.shape == (3, 3, 16)  # ceil mode: a third key whose window holds only the last token
    torch.testing.assert_close(footprint.sum(-1), torch.ones(3, 3))
    torch.testing.assert_close(footprint[2, 2], torch.eye(16)[15])


def test_rollout_of_one_block_mixes_attention_with_the_residual():
    model = tiny_model(depths=(1, 1, 1))
    maps = attention_maps(model, torch.randn(1, 3, 64, 64))
    head_mean = maps.last_block.mean(1)
    # One block: rollout = (A + I) / 2 with A's keys spread over their windows of the token map.
    torch.testing.assert_close(maps.rollout[:, 0], (head_mean[:, 0] + 1) / 2)
    footprint = key_footprint(model.stage2.blocks[0].attn, *maps.token_grid).flatten(0, 1)
    torch.testing.assert_close(maps.rollout[:, 1:], head_mean[:, 1:] @ footprint / 2)


def test_model_without_class_token_is_refused():
    model = tiny_model(cls_token=False)
    with pytest.raises(ValueError, match="class token"):
        attention_maps(model, torch.randn(1, 3, 64, 64))


def test_draw_attention_writes_the_figure(tmp_path):
    model = tiny_model()
    maps = attention_maps(model, torch.randn(1, 3, 64, 48))
    out = tmp_path / "maps.png"
    draw_attention(np.zeros((64, 48, 3), dtype=np.uint8), maps, out, title="tiny")
    assert Image.open(out).format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["maps.png"]


def test_cli_attention(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "weights")
    image = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "attention.png"
    main(["attention", str(image), "--model", "cvt_13_224", "--checkpoint", str(tmp_path / "weights"),
          "--output", str(out), "--img-size", "80", "48"])
    printed = capsys.readouterr().out
    assert "input 80x48" in printed and "3 heads" in printed
    assert Image.open(out).size[0] > 0


def test_profile_adds_up_and_counts_tokens():
    model = tiny_model()
    stages = profile_stages(model, (72, 56))
    assert [s.name for s in stages] == ["stage0", "stage1", "stage2", "head"]
    assert sum(s.params for s in stages) == count_params(model)
    assert sum(s.macs for s in stages) == count_macs(model, (72, 56))
    for s, (h, w), depth, heads in zip(stages, model.feature_sizes(72, 56), TINY["depths"], TINY["num_heads"]):
        cls = int(s.name == "stage2")
        assert s.token_grid == (h, w) and s.blocks == depth and s.heads == heads
        assert s.queries == h * w + cls and s.keys == conv_out(h) * conv_out(w) + cls
        assert s.attention_bytes == depth * heads * s.queries * s.keys * 4
        assert s.activation_bytes > s.attention_bytes
    with torch.device("meta"):
        on_meta = profile_stages(cvt.create_model("cvt_13_224", **TINY), (72, 56))
    for meta_stage, stage in zip(on_meta, stages):
        # Equal but for the batch mean and inverse std a BatchNorm saves on meta (empty on the CPU in eval mode).
        part = model.head if stage.name == "head" else getattr(model, stage.name)
        batchnorm_stats = sum(2 * 4 * m.num_features for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert 0 <= meta_stage.activation_bytes - stage.activation_bytes <= batchnorm_stats
        assert meta_stage.macs == stage.macs and meta_stage.attention_bytes == stage.attention_bytes


def test_profile_shows_what_the_kv_stride_saves():
    with torch.device("meta"):
        strided = profile_stages(cvt.create_model("cvt_13_224", **TINY))
        full = profile_stages(cvt.create_model("cvt_13_224", **TINY, stride_kv=1))
    for s, f in zip(strided[:3], full[:3]):
        assert f.keys == f.queries > s.keys
        assert f.attention_bytes > s.attention_bytes and f.macs > s.macs and f.params == s.params


def test_cli_profile(capsys):
    main(["profile", "--model", "cvt_13_224", "--img-size", "160"])
    printed = capsys.readouterr().out
    with torch.device("meta"):
        model = cvt.create_model("cvt_13_224")
    total = next(line for line in printed.splitlines() if line.startswith("| total"))
    assert f"{count_params(model):,}" in total and f"{count_macs(model, 160) / 1e9:.3f}" in total
    assert "| stage2 | 10x10" in printed

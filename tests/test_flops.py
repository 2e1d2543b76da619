"""MACs by the paper's convention, against the paper's figures (within 2%) and by hand on a tiny model."""
import pytest
import torch

import cvt
from cvt.cli import main
from cvt.flops import count_macs, macs_by_module


def meta_model(name, **overrides):
    with torch.device("meta"):
        return cvt.create_model(name, **overrides)


@pytest.mark.parametrize("name,img_size,overrides,paper_gmacs", [
    ("cvt_13_224", 224, {}, 4.53),
    ("cvt_13_384", 384, {}, 16.3),
    ("cvt_21_224", 224, {}, 7.1),
    ("cvt_21_384", 384, {}, 24.9),
    ("cvt_w24_384", 384, {}, 193.2),
    ("cvt_13_224", 224, {"stride_kv": 1}, 6.55),
])
def test_paper_figures_within_two_percent(name, img_size, overrides, paper_gmacs):
    gmacs = count_macs(meta_model(name, **overrides), img_size) / 1e9
    assert abs(gmacs - paper_gmacs) / paper_gmacs < 0.02, gmacs


def test_counts_by_hand_on_a_tiny_model():
    model = cvt.create_model("cvt_13_224", embed_dims=(8, 8, 8), depths=(1, 1, 1), num_heads=(1, 1, 1),
                             patch_sizes=(4, 2, 2), patch_strides=(4, 2, 2), patch_paddings=(0, 0, 0),
                             num_classes=2)
    counts = macs_by_module(model, 32)
    assert counts["stage0.patch_embed.proj"] == 8 * 8 * 8 * (3 * 4 * 4)
    # stage 0: 64 queries, 16 keys after the stride-2 k/v convs, width 8: two products.
    assert counts["stage0.blocks.0.attn.matmul"] == 2 * 64 * 16 * 8
    assert counts["stage0.blocks.0.attn.conv_proj_k.conv"] == 16 * 8 * 9
    assert counts["stage0.blocks.0.attn.proj_q"] == 64 * 8 * 8
    # stage 2 has the class token: 2x2 map -> 5 queries, 1x1 keys + class token -> 2 keys.
    assert counts["stage2.blocks.0.attn.matmul"] == 2 * 5 * 2 * 8
    assert counts["head"] == 8 * 2
    assert count_macs(model, 32) == sum(counts.values())


def test_counting_leaves_the_model_unchanged():
    model = cvt.create_model("cvt_13_224", embed_dims=(16, 32, 48), depths=(1, 1, 2), num_heads=(1, 2, 3)).train()
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    before = model(x)
    model.train()
    count_macs(model, (40, 24))
    assert model.training
    assert "attend" not in vars(model.stage0.blocks[0].attn)
    model.eval()
    torch.testing.assert_close(model(x), before)


def test_cli_models_and_flops(capsys):
    main(["models", "cvt_13*"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows[2:]] == ["cvt_13_224.ms_in1k", "cvt_13_384.ms_in1k", "cvt_13_384.ms_in22k_ft_in1k"]
    assert rows[2][1:6] == ["microsoft/cvt-13", "19,997,480", f"{count_macs(meta_model('cvt_13_224'), 224) / 1e9:.2f}",
                            "224", "81.6"]
    assert rows[4][1] == "microsoft/cvt-13-384-22k" and rows[4][5] == "83.3"
    main(["flops", "cvt_13_224", "--set", "stride_kv=1"])
    expected = count_macs(meta_model("cvt_13_224", stride_kv=1), 224) / 1e9
    assert f"{expected:.3f} GMACs" in capsys.readouterr().out


def test_cli_unknown_model_exits_with_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["flops", "cvt_13"])
    assert exit_info.value.code == 2
    assert "did you mean" in capsys.readouterr().err

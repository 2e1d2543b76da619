"""The model: shapes at any resolution, SDPA == reference, gradients, options, zoo and errors."""
import pytest
import timm
import torch

import cvt
from cvt.model import CvT, resize_pos_embed
from helpers import TINY, randomize_batchnorm


def tiny(**kwargs) -> CvT:
    torch.manual_seed(0)
    return cvt.create_model("cvt_13_224", num_classes=kwargs.pop("num_classes", 7), **TINY, **kwargs)


@pytest.mark.parametrize("size", [(64, 64), (72, 56), (33, 47), (17, 100)])
def test_any_resolution_and_batch_of_one(size):
    model = tiny().eval()
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        out = model(x)
        single = model(x[1:2])
    assert out.shape == (3, 7)
    assert single.shape == (1, 7)
    torch.testing.assert_close(single[0], out[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("proj_method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("size", [(64, 64), (50, 38)])
def test_sdpa_equals_reference(proj_method, size):
    model = tiny(proj_method=proj_method).eval()
    randomize_batchnorm(model)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attn(False)
        reference = model(x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_reference_gradients():
    model = tiny(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 48, 40)
    model(x).square().sum().backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_fused_attn(False)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, fused[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("options", [
    {},
    {"proj_method": "avg"},
    {"proj_method": "linear"},
    {"pos_embed": True},
    {"token_embed": "patch", "pos_embed": (True, False, False)},
    {"cls_token": False},
    {"stride_kv": 1},
])
def test_gradients_reach_every_parameter(options):
    model = tiny(**options).train()
    # The classifier alone reads only the class token, which the last block's q projection of the other tokens
    # cannot reach: the loss also reads every token, as a dense-prediction head would.
    tokens = model.forward_features(torch.randn(2, 3, 64, 48))
    (model.forward_head(tokens).logsumexp(dim=1).sum() + tokens.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_position_embedding_is_resized_bicubic():
    model = tiny(pos_embed=True, img_size=64).eval()
    stage = model.stage0
    assert stage.pos_embed.shape == (1, 16 * 16, 16)
    assert resize_pos_embed(stage.pos_embed, stage.pos_embed_grid, 16, 16) is stage.pos_embed
    resized = resize_pos_embed(stage.pos_embed, stage.pos_embed_grid, 20, 12)
    assert resized.shape == (1, 20 * 12, 16)
    grid = stage.pos_embed.transpose(1, 2).unflatten(2, (16, 16))
    expected = torch.nn.functional.interpolate(grid, size=(20, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized, expected.flatten(2).transpose(1, 2))
    assert model(torch.randn(1, 3, 80, 48)).shape == (1, 7)


def test_position_embedding_adds_exactly_its_parameters():
    plain = tiny(img_size=64)
    with_pos = tiny(img_size=64, pos_embed=True)
    grids = plain.feature_sizes(64, 64)
    expected = sum(h * w * c for (h, w), c in zip(grids, (16, 32, 48)))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(with_pos) - count(plain) == expected


def test_patch_token_embedding_keeps_stage_resolution():
    conv, patch = tiny(), tiny(token_embed="patch")
    assert conv.feature_sizes(224, 224) == patch.feature_sizes(224, 224) == [(56, 56), (28, 28), (14, 14)]
    assert patch.stage0.patch_embed.proj.kernel_size == (4, 4)
    assert patch.stage1.patch_embed.proj.padding == (0, 0)


def test_linear_projection_has_no_convolutions_or_batchnorm():
    model = tiny(proj_method="linear")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == ["stage0.patch_embed.proj", "stage1.patch_embed.proj", "stage2.patch_embed.proj"]
    q, k, v = model.stage0.blocks[0].attn.qkv(torch.randn(1, 16 * 16, 16), 16, 16)
    assert q.shape[2] == k.shape[2] == 256  # keys at full resolution


def test_forward_features_head_and_intermediates():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, return_prefix_tokens=True)
        maps, cls_token = [m for m, _ in intermediates], intermediates[-1][1]
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
        pooled = model.forward_head(tokens, pre_logits=True)
    assert [m.shape for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 48, 4, 4)]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16]
    assert cls_token.shape == (2, 1, 48)
    assert tokens.shape == (2, 1 + 16, 48)
    assert [c for _, c in intermediates[:2]] == [None, None]  # a class token in the last stage only
    torch.testing.assert_close(final, tokens)
    torch.testing.assert_close(pooled, model.norm(cls_token[:, 0]))
    torch.testing.assert_close(logits, model(x))


def test_features_only():
    features = cvt.create_model("cvt_13_224", features_only=True, out_indices=(1, 2), **TINY).eval()
    outs = features(torch.randn(1, 3, 96, 64))
    assert [o.shape for o in outs] == [(1, 32, 12, 8), (1, 48, 6, 4)]
    assert features.feature_info.channels() == [32, 48] and features.feature_info.reduction() == [8, 16]


def test_avg_pool_without_class_token():
    model = tiny(cls_token=False).eval()
    assert model.global_pool == "avg"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.mean(dim=1))


def test_reset_classifier():
    model = tiny().eval()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 48)


def test_zoo_parameter_counts_are_exact():
    expected = {"cvt_13_224": 19_997_480, "cvt_13_384": 19_997_480, "cvt_21_224": 31_622_696,
                "cvt_21_384": 31_622_696, "cvt_w24_384": 277_196_392}
    assert cvt.list_models() == sorted(expected)
    for name, count in expected.items():
        with torch.device("meta"):
            model = cvt.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_zoo_eval_transforms_metadata():
    assert cvt.create_model("cvt_13_224", **TINY).pretrained_cfg["crop_pct"] == 0.875
    cfg = cvt.create_model("cvt_21_384", **TINY).pretrained_cfg
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_mode"] == "squash" and cfg["interpolation"] == "bicubic"


def test_timm_registry():
    assert "cvt_13_224" in timm.list_models("cvt_*")
    model = timm.create_model("cvt_13_224", num_classes=5, **TINY)
    assert isinstance(model, CvT) and model.num_classes == 5


def test_official_initialisation():
    model = tiny()
    assert torch.all(model.stage2.blocks[0].attn.proj_q.bias == 0)
    assert torch.all(model.stage0.blocks[0].norm1.weight == 1)
    assert 0.015 < model.stage2.blocks[0].mlp.fc1.weight.std() < 0.025
    # timm's trunc_normal_ (as the official code calls it) truncates at +-2 absolute: a plain normal at std 0.02.
    assert 0.01 < model.stage2.cls_token.std() < 0.03


def test_quick_gelu_is_the_default_activation():
    assert isinstance(tiny().stage0.blocks[0].mlp.act, cvt.model.QuickGELU)
    assert isinstance(tiny(act_layer="gelu").stage0.blocks[0].mlp.act, torch.nn.GELU)
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(cvt.model.QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_attention_scale_is_whole_width():
    model = tiny()
    assert model.stage2.blocks[0].attn.scale == 48 ** -0.5


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        tiny()(torch.randn(1, 1, 64, 64))


def test_too_small_image_is_a_clear_error():
    model = tiny().eval()
    assert model.min_input_size == 3
    model(torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match="smaller than this model can take"):
        model(torch.randn(1, 3, 2, 64))
    assert tiny(token_embed="patch").min_input_size == 16


def test_unbatched_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unsqueeze"):
        tiny()(torch.randn(3, 64, 64))


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean cvt_13_224"):
        cvt.create_model("cvt13_224")


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="one value per stage"):
        tiny(stride_kv=(2, 2))
    with pytest.raises(ValueError, match="proj_method takes one of"):
        tiny(proj_method="conv")
    with pytest.raises(ValueError, match="act_layer takes one of"):
        tiny(act_layer="relu")
    with pytest.raises(ValueError, match="not divisible"):
        cvt.create_model("cvt_13_224", embed_dims=(16, 32, 50), depths=(1, 1, 1), num_heads=(1, 2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("options", [{}, {"proj_method": "avg"}, {"proj_method": "linear"}, {"pos_embed": True},
                                     {"cls_token": False}])
def test_the_model_scripts_and_traces(options):
    """timm's model tests script (`torch.jit.script`) and trace (`torch.fx`) every model: the reference has no
    speed predicates that either would trip on."""
    model = tiny(**options).eval()
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected, atol=1e-5, rtol=0)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected 3 input channels"):
        traced(torch.randn(1, 1, 64, 64))  # the input check is kept in the graph

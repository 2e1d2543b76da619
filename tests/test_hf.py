"""Conversion both ways with transformers' CvtForImageClassification, and the preprocessing that goes with it."""
import inspect
import json

import pytest
import timm.data
import torch
from PIL import Image
from transformers import CvtConfig, CvtForImageClassification

import cvt
from cvt.hf import from_hf, save_hf, to_hf
from cvt.model import IMAGENET_MEAN, IMAGENET_STD, CvT, _per_stage, model_from_checkpoint
from cvt.weights import _HF_CONFIG_NAMES, _rename, load_checkpoint
from helpers import randomize_batchnorm

# transformers' CvtStage indexes drop-path rates by stage number, so it needs depths[i] > i.
HF_TINY = dict(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[1, 2, 3], num_labels=5)
TINY = dict(embed_dims=(16, 32, 48), depths=(1, 2, 3), num_heads=(1, 2, 3))


@pytest.fixture(scope="module")
def hf_model() -> CvtForImageClassification:
    torch.manual_seed(0)
    model = CvtForImageClassification(CvtConfig(**HF_TINY))
    randomize_batchnorm(model)
    return model.eval()


def test_hf_model_converted_to_ours_gives_its_logits(hf_model):
    ours = from_hf(hf_model, hf_numerics=True).eval()
    x = torch.randn(2, 3, 64, 56)
    with torch.no_grad():
        expected = hf_model(x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
        ours.set_fused_attn(False)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)


def test_every_layernorm_eps_matches_hf(hf_model):
    """HF_NUMERICS only switches the activation: each HF LayerNorm already has the eps of ours."""
    ours = from_hf(hf_model, hf_numerics=True)
    hf_modules = dict(hf_model.named_modules())
    norms = [(name, m) for name, m in ours.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == sum(isinstance(m, torch.nn.LayerNorm) for m in hf_modules.values())
    for name, norm in norms:
        (hf_weight,) = _rename({f"{name}.weight": None}, to_hf=True)
        assert hf_modules[hf_weight.removesuffix(".weight")].eps == norm.eps, name


def test_official_numerics_stay_the_default(hf_model):
    ours = from_hf(hf_model).eval()
    assert ours.config["act_layer"] == "quick_gelu"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - hf_model(x).logits).abs().max() > 1e-4  # QuickGELU is not GELU


def test_ours_converted_back_loads_strictly(hf_model):
    back = to_hf(from_hf(hf_model, hf_numerics=True))
    assert back.config.num_channels == hf_model.config.num_channels
    for name in set(_HF_CONFIG_NAMES) - {"num_channels"}:
        assert list(getattr(back.config, name)) == list(getattr(hf_model.config, name)), name
    fresh = CvtForImageClassification(hf_model.config).eval()
    fresh.load_state_dict(back.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, hf_model(x).logits, atol=0, rtol=0)


def test_zoo_model_through_hf_directory_offline(tmp_path):
    torch.manual_seed(1)
    ours = cvt.create_model("cvt_13_224", num_classes=3, act_layer="gelu", **TINY).eval()
    randomize_batchnorm(ours)
    ours.pretrained_cfg["label_names"] = ["cat", "dog", "bird"]
    save_hf(ours, tmp_path / "hf")
    hf_model = CvtForImageClassification.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf_model.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x).logits, ours(x), atol=1e-5, rtol=0)
        # back through the directory: with create_model (our loader, no transformers needed) and from_hf
        again = cvt.create_model("cvt_13_224", pretrained=tmp_path / "hf", act_layer="gelu").eval()
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)
        assert again.pretrained_cfg["label_names"] == ["cat", "dog", "bird"]
        torch.testing.assert_close(from_hf(tmp_path / "hf", hf_numerics=True).eval()(x), ours(x), atol=0, rtol=0)


def test_imagenet_labels_for_a_1000_class_model(tmp_path):
    config = to_hf(cvt.create_model("cvt_13_224", **TINY)).config
    assert config.num_labels == 1000
    assert config.id2label[0].startswith("tench")


def test_hf_config_defaults_are_cvt_defaults():
    """transformers writes only non-default config fields; reading one relies on both defaults being CvT-13's."""
    hf_defaults = CvtConfig()
    ours = inspect.signature(CvT).parameters
    assert hf_defaults.num_channels == ours["in_chans"].default
    for hf_name, our_name in _HF_CONFIG_NAMES.items():
        if our_name != "in_chans":
            assert list(getattr(hf_defaults, hf_name)) == list(_per_stage(ours[our_name].default, our_name)), hf_name


def test_hf_directory_with_only_non_default_fields(tmp_path):
    """A config.json that leaves out CvT-13's values (as transformers may) still gives CvT-13."""
    torch.manual_seed(2)
    ours = cvt.create_model("cvt_21_224", num_classes=4, embed_dims=(16, 32, 48), num_heads=(1, 2, 3)).eval()
    save_hf(ours, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "cvt", "embed_dim": [16, 32, 48], '
                                                  '"num_heads": [1, 2, 3], "depth": [1, 4, 16]}')
    checkpoint = load_checkpoint(tmp_path / "hf")
    assert checkpoint.model_args["depths"] == [1, 4, 16] and "stride_kv" not in checkpoint.model_args
    assert checkpoint.num_classes == 4
    assert model_from_checkpoint(checkpoint).config["stride_kv"] == 2
    again = cvt.create_model("cvt_21_224", pretrained=tmp_path / "hf").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)


@pytest.mark.parametrize("option, message", [
    (dict(proj_method="avg"), "only 'dw_bn' works"),
    (dict(pos_embed=True), "position embeddings"),
    (dict(depths=(1, 1, 2)), r"depths\[i\] > i"),
    (dict(head_norm_eps=1e-6), "LayerNorm eps"),
])
def test_what_hf_cannot_represent_is_a_clear_error(option, message):
    model = cvt.create_model("cvt_13_224", **dict(TINY, **option))
    with pytest.raises(ValueError, match=f"cannot represent this model: .*{message}"):
        to_hf(model)


def test_from_hf_refuses_a_directory_of_ours(tmp_path):
    cvt.create_model("cvt_13_224", **TINY).save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="not a Hugging Face CvT directory"):
        from_hf(tmp_path / "ours")


def test_a_transformers_directory_brings_a_whole_data_config(hf_model, tmp_path):
    """transformers' save_pretrained writes no image size: the model runs at CvT's native 224 with the paper's
    eval transform, which timm's resolver reads (it was an empty pretrained_cfg)."""
    hf_model.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf")
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert timm.data.resolve_model_data_config(model) == {
        "input_size": (3, 224, 224), "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "crop_pct": 0.875, "crop_mode": "center"}


@pytest.mark.parametrize("size, crop", [(224, (0.875, "center")), (384, (1.0, "squash"))])
def test_a_hub_image_processor_gives_the_preprocessing(hf_model, tmp_path, size, crop):
    """What the Hub's microsoft/cvt-13 and cvt-13-384 hold beside the weights: ConvNeXt's processor config, which
    squashes from 384 on."""
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({
        "crop_pct": 0.875, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "ConvNextFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 2, "size": size}))
    for model in (from_hf(tmp_path / "hf"), cvt.create_model("cvt_13_224", pretrained=tmp_path / "hf")):
        cfg = timm.data.resolve_model_data_config(model)
        assert cfg["input_size"] == (3, size, size) and (cfg["crop_pct"], cfg["crop_mode"]) == crop
        assert cfg["interpolation"] == "bilinear" and cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.25,) * 3


def test_save_hf_writes_the_preprocessing_transformers_reads(tmp_path):
    from transformers import AutoImageProcessor

    ours = cvt.create_model("cvt_13_224", num_classes=2, **dict(TINY, img_size=48))
    ours.pretrained_cfg.update(crop_pct=0.9, crop_mode="center")
    save_hf(ours, tmp_path / "hf")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    pixels = processor(Image.new("RGB", (64, 40)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 48, 48) and processor.crop_pct == 0.9
    back = from_hf(tmp_path / "hf")
    assert back.pretrained_cfg["input_size"] == (3, 48, 48) and back.pretrained_cfg["crop_pct"] == 0.9

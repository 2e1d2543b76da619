"""timm's model contract, checked the way timm's own model tests check it: cfgs and tags, factory arguments,
forward_intermediates and pruning, features_only, gradient checkpointing, parameter groups, the classifier."""
import copy

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn

import cvt
from cvt.flops import count_params
from cvt.model import PRETRAINED, ZOO
from helpers import TINY


def tiny(**kwargs) -> cvt.CvT:
    torch.manual_seed(0)
    return timm.create_model("cvt_13_224", num_classes=kwargs.pop("num_classes", 5), **dict(TINY, **kwargs))


def test_every_released_checkpoint_is_a_tag_with_its_repo_license_top1_and_eval_transform():
    tags = timm.list_pretrained("cvt*")
    assert tags == cvt.list_pretrained() == list(PRETRAINED) and len(tags) == 7
    assert {t.split(".")[0] for t in tags} == set(ZOO)
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.hf_hub_id.startswith("microsoft/cvt-") and cfg.license == "mit"
        assert any(note.startswith("paper top-1 ") for note in cfg.notes)
        assert cfg.crop_mode == ("center" if cfg.input_size[-1] == 224 else "squash")
    assert timm.models.get_pretrained_cfg("cvt_13_384.ms_in22k_ft_in1k").hf_hub_id == "microsoft/cvt-13-384-22k"
    assert PRETRAINED["cvt_w24_384.ms_in22k_ft_in1k"]["num_classes"] == 1000  # fine-tuned on ImageNet-1k


@pytest.mark.parametrize("name", ["cvt_13_224", "cvt_13_384.ms_in22k_ft_in1k"])
def test_default_cfg_and_pretrained_cfg(name):
    model = cvt.create_model(name, **TINY)
    assert model.default_cfg == model.pretrained_cfg
    assert model.pretrained_cfg["architecture"] == name.split(".")[0]
    assert model.pretrained_cfg["tag"] == (name.split(".")[1] if "." in name else "ms_in1k")
    assert timm.data.resolve_model_data_config(model)["input_size"] == model.pretrained_cfg["input_size"]


def test_construction_on_the_meta_device_and_in_a_dtype():
    model = cvt.CvT(device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert count_params(model) == 19_997_480  # CvT-13, as the official implementation counts it
    on_meta = timm.create_model("cvt_w24_384", device="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    half = tiny(dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_forward_intermediates_as_timm_checks_it():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for info, feature in zip(model.feature_info, intermediates):
            assert feature.shape[1] == info["num_chs"]
            assert (64 // feature.shape[2], 48 // feature.shape[3]) == (info["reduction"],) * 2
        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert [f.shape[1] for f in only] == [16, 48]
        torch.testing.assert_close(only[1], intermediates[2])
        assert len(model.forward_intermediates(x, indices=1, intermediates_only=True)) == 1  # the last n
        early = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early[0], intermediates[1])
        nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert nlc[2].shape == (2, 4 * 3, 48)
        normed = model.forward_intermediates(x, norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(normed[2], model.norm(nlc[2]))
    with pytest.raises(ValueError, match="NCHW or NLC"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_what_the_indices_need():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
        assert not hasattr(pruned, "stage2") and isinstance(pruned.head, nn.Identity)
        got = pruned.forward_intermediates(x, intermediates_only=True)
    assert len(got) == 2
    for a, b in zip(got, expected[:2]):
        torch.testing.assert_close(a, b)


def test_features_only_through_timms_feature_machinery():
    features = timm.create_model("cvt_13_224", features_only=True, feature_cls="getter", out_indices=(1, 2), **TINY)
    assert features.feature_info.channels() == [32, 48]
    assert features.feature_info.reduction() == [8, 16]
    assert [d["module"] for d in features.feature_info.get_dicts()] == ["stage1", "stage2"]
    maps = features(torch.randn(2, 3, 64, 64))
    assert [m.shape for m in maps] == [(2, 32, 8, 8), (2, 48, 4, 4)]
    default = timm.create_model("cvt_13_224", features_only=True, **TINY)
    assert default.feature_info.channels() == [16, 32, 48]


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    model = tiny(drop_path_rate=0.0).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in checkpointed.stages)
    x = torch.randn(2, 3, 48, 48)
    losses = [m(x).logsumexp(dim=1).sum() for m in (model, checkpointed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=lambda m, n=name: f"{n}: {m}")
    # the blocks' activations are recomputed in the backward pass: fewer tensors are kept
    saved = []
    for m in (model, checkpointed):
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + 1) or t, lambda t: t):
            m(x).sum()
        saved.append(count[0])
    assert saved[1] < saved[0] / 2


def test_group_matcher_orders_the_layers_for_timms_layer_wise_lr_decay():
    model = tiny()
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5)
    scale_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[p] = group["lr_scale"]
    names = dict(model.named_parameters())
    stem = scale_of[names["stage0.patch_embed.proj.weight"]]
    first_block = scale_of[names["stage0.blocks.0.attn.proj_q.weight"]]
    stage1_embed = scale_of[names["stage1.patch_embed.proj.weight"]]
    stage1_block = scale_of[names["stage1.blocks.0.attn.proj_q.weight"]]
    last_block = scale_of[names["stage2.blocks.1.mlp.fc2.weight"]]
    head = scale_of[names["head.weight"]]
    assert stem < first_block < stage1_block < last_block < head == 1.0
    assert stage1_embed == stage1_block  # a stage's token embedding goes with its first block
    assert scale_of[names["stage2.cls_token"]] == scale_of[names["stage2.blocks.0.norm1.weight"]]
    coarse = model.group_matcher(coarse=True)
    assert coarse["stem"] and coarse["blocks"]


def test_classifier_get_and_reset():
    model = tiny().eval()
    assert model.get_classifier() is model.head and model.head.out_features == 5
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 48)
    model.reset_classifier(3, global_pool="avg")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and model.global_pool == "avg"


def test_timms_fx_feature_extractor_traces_the_model():
    from timm.models import create_feature_extractor

    model = tiny().eval()
    extractor = create_feature_extractor(model, return_nodes={"stage1.blocks.0": "stage1", "norm": "tokens"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["tokens"], model.forward_features(x))
    assert out["stage1"].shape == (1, 8 * 8, 32)

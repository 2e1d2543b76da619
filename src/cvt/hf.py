"""Hugging Face transformers: our models as `CvtForImageClassification` and back, with the same weights.

The Hugging Face port runs the released weights with exact GELU where the official model uses QuickGELU. Its
LayerNorms all use PyTorch's default eps 1e-5, the official value: its config's `layer_norm_eps` (1e-12) is
never read. `from_hf(..., hf_numerics=True)` (i.e. `act_layer="gelu"`) reproduces its outputs; the official
numerics stay the default everywhere.
"""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from .files import atomic_directory
from .model import CvT, _per_stage, model_from_checkpoint
from .weights import (
    _HF_CONFIG_NAMES, PIL_RESAMPLE, Checkpoint, _cvt_kwargs_from_hf_config, _label_cfg, official_names, _rename,
    label_names, load_checkpoint,
)

__all__ = ["HF_NUMERICS", "hf_config", "to_hf", "from_hf", "save_hf", "image_processor"]

# What makes our model compute exactly what transformers' CvT computes (see the module docstring).
HF_NUMERICS = {"act_layer": "gelu"}


def hf_config(model: CvT):
    """A transformers `CvtConfig` for this model; an error names what transformers' CvT cannot represent."""
    from transformers import CvtConfig

    cfg = model.config
    stage = {ours: list(_per_stage(cfg[ours], ours)) for ours in _HF_CONFIG_NAMES.values() if ours != "in_chans"}
    stage["patch_sizes"], stage["patch_strides"], stage["patch_paddings"] = map(list, zip(*model.embed_geometry))
    problems = []
    if any(_per_stage(cfg["pos_embed"], "pos_embed")):
        problems.append("position embeddings (pos_embed)")
    if set(stage["proj_method"]) != {"dw_bn"}:
        problems.append(f"projection {stage['proj_method']}: its 'avg' builds no pooling and fails at run time, "
                        "only 'dw_bn' works")
    if any(stage["cls_token"][:-1]):
        problems.append("a class token before the last stage")
    if model.global_pool != ("token" if stage["cls_token"][-1] else "avg"):
        problems.append(f"global_pool {model.global_pool!r} (it pools the class token when there is one, else "
                        "the mean)")
    if any(d <= i for i, d in enumerate(stage["depths"])):
        problems.append(f"depths {stage['depths']}: it indexes each stage's drop-path rates by the stage number, "
                        "so it needs depths[i] > i")
    default_eps = nn.LayerNorm(1).eps  # transformers builds every CvT LayerNorm with PyTorch's default eps
    if cfg["norm_eps"] != default_eps or cfg["head_norm_eps"] not in (None, default_eps):
        problems.append(f"LayerNorm eps {cfg['norm_eps']} / {cfg['head_norm_eps']} (it always uses {default_eps})")
    if problems:
        raise ValueError("transformers' CvtForImageClassification cannot represent this model: " + "; ".join(problems))
    names = label_names(model)
    labels = {"id2label": dict(enumerate(names))} if names else {}
    hf_args = {hf: stage[ours] for hf, ours in _HF_CONFIG_NAMES.items() if ours != "in_chans"}
    return CvtConfig(num_channels=model.in_chans, num_labels=model.num_classes, **hf_args, **labels)


def to_hf(model: CvT):
    """transformers' `CvtForImageClassification` (eval mode) holding this model's weights.

    It computes with exact GELU whatever `model.config["act_layer"]` is: identical outputs need a model built with
    `act_layer="gelu"` (HF_NUMERICS).
    """
    from transformers import CvtForImageClassification

    hf_model = CvtForImageClassification(hf_config(model))
    hf_model.load_state_dict(_rename(model.state_dict(), to_hf=True), strict=True)
    return hf_model.eval()


def save_hf(model: CvT, directory: str | os.PathLike) -> None:
    """A directory `transformers.CvtForImageClassification.from_pretrained` loads, written atomically, with the
    model's preprocessing (`image_processor`) beside it, as the Hub's microsoft/cvt-* repos have it."""
    hf_model = to_hf(model)
    processor = image_processor(model)
    with atomic_directory(directory) as tmp:
        hf_model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)


def image_processor(model: CvT):
    """transformers' `ConvNextImageProcessor` (what the Hub's CvT repos use) for the model's preprocessing
    (`timm.data.resolve_model_data_config`), which `cvt.weights` reads back: the input size, crop_pct, resampling,
    mean and std. None for a non-square input size, which it cannot hold. It squashes from 384 px on and below that
    resizes the short side to size / crop_pct and centre-crops; a model that squashes below 384 gets crop_pct 1,
    which gives the same image for a square picture."""
    from timm.data import resolve_model_data_config
    from transformers import ConvNextImageProcessor

    cfg = resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    if h != w:
        return None
    resample = {name: code for code, name in PIL_RESAMPLE.items()}.get(cfg["interpolation"], 3)
    return ConvNextImageProcessor(size={"shortest_edge": h}, crop_pct=cfg["crop_pct"], resample=resample,
                                  image_mean=list(cfg["mean"]), image_std=list(cfg["std"]))


def from_hf(source: Any, hf_numerics: bool = False, **overrides: Any) -> CvT:
    """Our model from a Hugging Face CvT: a `CvtForImageClassification` or a directory it saved.

    Official numerics (QuickGELU) by default; `hf_numerics=True` reproduces the Hugging Face outputs.
    """
    if isinstance(source, (str, os.PathLike)):
        checkpoint = load_checkpoint(source)
        if checkpoint.kind != "hf":
            raise ValueError(f"{source} is not a Hugging Face CvT directory: load it with cvt.create_model(name, "
                             f"pretrained=...) or cvt.model.model_from_checkpoint")
    else:
        config = source.config.to_dict()
        checkpoint = Checkpoint(official_names(source.state_dict()), type(source).__name__, "hf",
                                _cvt_kwargs_from_hf_config(config), pretrained_cfg=_label_cfg(config))
    if hf_numerics:
        overrides = dict(HF_NUMERICS, **overrides)
    return model_from_checkpoint(checkpoint, **overrides)

"""Checkpoint files: read every released CvT weight format into the official names, and write our own.

`load_checkpoint(path)` reads, into the official parameter names:

- an official checkpoint (`.pth`, `.pt`, `.bin`): a bare state dict or one wrapped in `state_dict` / `model`, with
  or without the `module.` prefix of (Distributed)DataParallel; pickles load with `weights_only=True`;
- a `.safetensors` file (official or Hugging Face names);
- a Hugging Face CvT directory (`config.json` with `model_type: cvt` + `model.safetensors` or `pytorch_model.bin`);
- a directory written by `save_pretrained` (`config.json` in our format + `model.safetensors`);
- a checkpoint written by `cvt train` (`.pth`: weights, architecture, zoo name and class names together).

This module reads and writes files only; building a model from them is `cvt.model`'s (`create_model`,
`model_from_checkpoint`), and converting to and from transformers' models is `cvt.hf`'s.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import atomic_directory, atomic_path

__all__ = ["Checkpoint", "load_checkpoint", "save_pretrained", "save_safetensors", "label_names"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "cvt-pytorch"
TRAINING_FORMAT = "cvt-train"  # the `format` of a checkpoint written by `cvt train`
HF_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
# What timm's local-dir loader builds a folder with no zoo name as (its model_args decide the architecture).
DEFAULT_ARCHITECTURE = "cvt_13_224"
# timm's PretrainedCfg fields that say where weights come from.
WEIGHT_SOURCE_FIELDS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
MAX_KEYS_SHOWN = 10


@dataclass
class Checkpoint:
    """Weights in the official names, and what the file says about the model they belong to.

    `model_args` are the CvT arguments the checkpoint dictates (from a config; empty for a bare state dict),
    `model_name` the zoo name it was saved under (our own formats only).
    """

    state_dict: dict[str, torch.Tensor]
    source: str
    # "official" (a bare state-dict file), "hf" (a Hugging Face directory) or "cvt" (a save_pretrained directory or
    # a `cvt train` checkpoint)
    kind: str
    model_args: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Outputs of the checkpoint's classifier head; 0 when it has none."""
        head = self.state_dict.get("head.weight")
        return 0 if head is None else head.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# Reading

def load_checkpoint(source: str | os.PathLike | Checkpoint) -> Checkpoint:
    """Read any supported checkpoint (see the module docstring); a `Checkpoint` is returned as it is."""
    if isinstance(source, Checkpoint):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: pass the path to an official .pth, a .safetensors file, "
                                f"a Hugging Face CvT directory or a directory written by save_pretrained")
    return _read_directory(path) if path.is_dir() else _read_file(path)


def _read_file(path: Path) -> Checkpoint:
    if path.suffix == ".safetensors":
        try:
            return Checkpoint(official_names(load_file(path)), str(path), "official")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"{path} holds pickled Python objects besides tensors, which loading with weights_only=True "
                         f"refuses to run ({reason}); re-save just the weights, torch.save(model.state_dict(), "
                         f"path), or use a .safetensors file") from None
    except RuntimeError as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
    if isinstance(obj, dict) and obj.get("format") == TRAINING_FORMAT:
        # Written by `cvt train`: the architecture, zoo name and class names come with the weights.
        return Checkpoint(obj["model"], str(path), "cvt", obj["model_args"], obj["model_name"], obj["pretrained_cfg"])
    # Training scripts wrap the weights with optimizer state, epoch, ...: the official one under "state_dict",
    # timm's under "model".
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"a dict with keys {list(obj)[:MAX_KEYS_SHOWN]}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path} holds {found}, not a state dict (parameter name -> tensor), bare or under "
                         f"'state_dict' or 'model'")
    return Checkpoint(official_names(obj), str(path), "official")


def official_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `module.` prefix of (Distributed)DataParallel and map Hugging Face names to the official ones."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    if any(k.startswith("cvt.encoder.") for k in state_dict):
        state_dict = _rename(state_dict, to_hf=False)
    return state_dict


def _read_directory(path: Path) -> Checkpoint:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: expected a Hugging Face CvT directory or one written by "
                                f"save_pretrained (or pass the weights file itself)")
    config = json.loads(config_path.read_text())
    if config.get("format") == FORMAT_TAG:
        model_args = {k: v for k, v in config["model_args"].items() if k != "num_classes"}
        return Checkpoint(_read_file(path / WEIGHTS_NAME).state_dict, str(path), "cvt", model_args, config.get("model"),
                          config.get("pretrained_cfg") or {})
    if config.get("model_type") == "cvt":
        weights = next((path / n for n in HF_WEIGHTS_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"Hugging Face directory {path} has none of {', '.join(HF_WEIGHTS_NAMES)}")
        return Checkpoint(_read_file(weights).state_dict, str(path), "hf",
                          _cvt_kwargs_from_hf_config(config), pretrained_cfg=_label_cfg(config))
    raise ValueError(f"{config_path} describes neither a CvT model written by save_pretrained nor a Hugging Face CvT "
                     f"(model_type {config.get('model_type')!r}): a checkpoint of another architecture")


# ---------------------------------------------------------------------------------------------------------------
# Writing

def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as one .safetensors file, atomically."""
    with atomic_path(path) as tmp:
        # transformers' from_pretrained wants the "format" metadata.
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """`config.json` and `model.safetensors`, written atomically, which both readers take:
    `cvt.create_model(name, pretrained=directory)` (it reads "format", "model", "model_args" and "pretrained_cfg")
    and `timm.create_model("local-dir:" + directory, pretrained=True)` (timm's Hub layout: "architecture",
    "num_classes", "model_args" and a "pretrained_cfg" of timm's fields)."""
    name = getattr(model, "model_name", None)
    config = {
        "format": FORMAT_TAG,
        "model": name,
        # timm builds `architecture` with `model_args`, which describe the whole model: one without a zoo name
        # (read from a Hugging Face directory, say) is built as well through any CvT entry point.
        "architecture": name or DEFAULT_ARCHITECTURE,
        "num_classes": model.num_classes,
        "model_args": model.config,
        "pretrained_cfg": _timm_pretrained_cfg(model),
    }
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_safetensors(model.state_dict(), tmp / WEIGHTS_NAME)


def _timm_pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """The model's pretrained_cfg as timm's local-dir loader takes it: timm's `PretrainedCfg` fields only (it
    refuses others; the zoo's paper notes come back from the zoo name), and none locating other weights (the
    saved ones are these)."""
    from timm.models import PretrainedCfg

    timm_fields = {f.name for f in fields(PretrainedCfg)} - set(WEIGHT_SOURCE_FIELDS)
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k in timm_fields}
    cfg.pop("architecture", None)  # at the top level
    return dict(cfg, num_classes=model.num_classes, input_size=(model.in_chans, *model.img_size))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face transformers

# (ours, Hugging Face) module names inside a block: stage{i}.blocks.{j}. <-> cvt.encoder.stages.{i}.layers.{j}.
_HF_BLOCK_MODULES = [
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    *[(f"attn.conv_proj_{x}.{ours}", f"attention.attention.convolution_projection_{hf_x}.convolution_projection.{hf}")
      for x, hf_x in (("q", "query"), ("k", "key"), ("v", "value"))
      for ours, hf in (("conv", "convolution"), ("bn", "normalization"))],
    *[(f"attn.proj_{x}", f"attention.attention.projection_{hf_x}")
      for x, hf_x in (("q", "query"), ("k", "key"), ("v", "value"))],
    ("attn.proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
]
# Full-name templates: {i} stage, {j} block, {p} parameter or buffer.
_HF_NAMES = [
    ("stage{i}.patch_embed.proj.{p}", "cvt.encoder.stages.{i}.embedding.convolution_embeddings.projection.{p}"),
    ("stage{i}.patch_embed.norm.{p}", "cvt.encoder.stages.{i}.embedding.convolution_embeddings.normalization.{p}"),
    ("stage{i}.cls_token", "cvt.encoder.stages.{i}.cls_token"),
    *[(f"stage{{i}}.blocks.{{j}}.{ours}.{{p}}", f"cvt.encoder.stages.{{i}}.layers.{{j}}.{hf}.{{p}}")
      for ours, hf in _HF_BLOCK_MODULES],
    ("norm.{p}", "layernorm.{p}"),
    ("head.{p}", "classifier.{p}"),
]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(pattern.replace(r"\{p\}", r"(?P<p>\w+)"))


_HF_NAME_REGEXES = [(_template_regex(ours), _template_regex(hf), ours, hf) for ours, hf in _HF_NAMES]


def _rename(state_dict: dict[str, torch.Tensor], to_hf: bool) -> dict[str, torch.Tensor]:
    """Official <-> Hugging Face parameter names. A name of neither scheme is kept, so loading reports it."""
    out = {}
    for key, value in state_dict.items():
        new_key = key
        for ours_re, hf_re, ours, hf in _HF_NAME_REGEXES:
            match = (ours_re if to_hf else hf_re).fullmatch(key)
            if match:
                new_key = (hf if to_hf else ours).format(**match.groupdict())
                break
        out[new_key] = value
    return out


# Hugging Face CvtConfig field -> CvT argument.
_HF_CONFIG_NAMES = {
    "num_channels": "in_chans", "patch_sizes": "patch_sizes", "patch_stride": "patch_strides",
    "patch_padding": "patch_paddings", "embed_dim": "embed_dims", "num_heads": "num_heads", "depth": "depths",
    "mlp_ratio": "mlp_ratio", "attention_drop_rate": "attn_drop_rate", "drop_rate": "drop_rate",
    "drop_path_rate": "drop_path_rate", "qkv_bias": "qkv_bias", "cls_token": "cls_token",
    "qkv_projection_method": "proj_method", "kernel_qkv": "kernel_qkv", "padding_kv": "padding_kv",
    "stride_kv": "stride_kv", "padding_q": "padding_q", "stride_q": "stride_q",
}


def _cvt_kwargs_from_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    # transformers writes only the fields that differ from CvtConfig's defaults. Those are CvT-13's, as are
    # CvT's own defaults, so an absent field is left to CvT's default (tests/test_hf.py checks that they agree).
    return {ours: config[hf] for hf, ours in _HF_CONFIG_NAMES.items() if hf in config}


def _label_cfg(config: dict[str, Any]) -> dict[str, Any]:
    """`label_names` from a Hugging Face id2label, unless it holds only transformers' LABEL_i placeholders."""
    id2label = config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return {}
    return {"label_names": names}


def label_names(model: nn.Module) -> list[str] | None:
    """The model's class names: its own (saved with it), ImageNet-1k's (bundled with timm) for a 1000-class model
    without any, else None."""
    names = model.pretrained_cfg.get("label_names")
    if names:
        return list(names)
    if model.num_classes == 1000:
        from timm.data import ImageNetInfo

        return ImageNetInfo().label_descriptions()
    return None

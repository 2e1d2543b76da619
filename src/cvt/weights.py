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

__all__ = ["Checkpoint", "UnreadableCheckpointError", "load_checkpoint", "save_pretrained", "save_safetensors",
           "label_names"]

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
# How a file torch.save wrote begins: a zip archive (PyTorch >= 1.6), or before that a pickle (protocol 2 and up).
TORCH_ZIP_SIGNATURE, TORCH_PICKLE_SIGNATURE = b"PK\x03\x04", b"\x80"
# What a `cvt train` checkpoint holds for the readers of weights (engine.TrainingState writes it).
TRAINING_WEIGHT_KEYS = ("model", "model_args", "model_name", "pretrained_cfg")


class UnreadableCheckpointError(ValueError):
    """A weights file or model config that cannot be read, or describes no CvT its weights fit; the message names
    the file and what to do."""


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
            raise UnreadableCheckpointError(
                f"{path} is not a readable safetensors file ({e}): if it was cut short or damaged on the way, copy "
                f"or download it again") from None
    obj = read_torch_file(path)
    if isinstance(obj, dict) and obj.get("format") == TRAINING_FORMAT:
        # Written by `cvt train`: the architecture, zoo name and class names come with the weights.
        missing = [k for k in TRAINING_WEIGHT_KEYS if k not in obj]
        if missing:
            raise UnreadableCheckpointError(f"{path} is a `cvt train` checkpoint without {missing}: it was altered "
                                            f"or damaged; use another checkpoint of the run")
        return _described_checkpoint(_state_dict(path, obj["model"]), path, "cvt", path, obj["model_args"],
                                     obj["model_name"], obj["pretrained_cfg"])
    # Training scripts wrap the weights with optimizer state, epoch, ...: the official one under "state_dict",
    # timm's under "model".
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return Checkpoint(official_names(_state_dict(path, obj)), str(path), "official")


def _state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """`obj`, read from `path`, as the state dict it must be."""
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        found = f"a dict with keys {list(obj)[:MAX_KEYS_SHOWN]}" if isinstance(obj, dict) else type(obj).__name__
        raise UnreadableCheckpointError(f"{path} holds {found}, not a state dict (parameter name -> tensor), bare "
                                        f"or under 'state_dict' or 'model'")
    return obj


def read_torch_file(path: Path, mmap: bool = False) -> Any:
    """`torch.load` onto the CPU with weights_only, so that no code in the file runs (and with mmap, where asked and
    the file's format has it). A file it cannot read is an UnreadableCheckpointError that says which of three it
    is: no PyTorch file, one holding Python objects besides tensors, or one cut short or damaged."""
    with open(path, "rb") as f:
        signature = f.read(len(TORCH_ZIP_SIGNATURE))
    # A file shorter than the signature may be one cut short: a prefix of it counts.
    if not (TORCH_ZIP_SIGNATURE.startswith(signature) or signature.startswith(TORCH_PICKLE_SIGNATURE)):
        raise UnreadableCheckpointError(
            f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive, or a pickle before PyTorch 1.6): "
            f"pass an official .pth, a .safetensors file, a Hugging Face CvT directory or one save_pretrained wrote")
    damaged = UnreadableCheckpointError(
        f"{path} is truncated or corrupt{'' if signature else ' (it is empty)'}: it was not completely written, "
        f"copied or downloaded. Copy or download it again, or use another checkpoint (a `cvt train` run keeps "
        f"best.pth and epoch_NNNN.pth beside last.pth, which --resume PATH takes)")
    try:
        with warnings.catch_warnings():
            # A damaged pickle may claim any protocol: torch warns before it fails, and the failure says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and signature == TORCH_ZIP_SIGNATURE)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not refused:
            raise damaged from None
        raise UnreadableCheckpointError(
            f"{path} holds pickled Python objects besides tensors ({refused[1]}), which loading with "
            f"weights_only=True refuses to run; re-save just the weights, torch.save(model.state_dict(), path), or "
            f"use a .safetensors file") from None
    except Exception:  # a damaged file fails anywhere in torch.load: EOFError, RuntimeError, IndexError, OSError...
        raise damaged from None


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
    config = _read_config(config_path)
    if config.get("format") == FORMAT_TAG:
        return _described_checkpoint(_read_file(path / WEIGHTS_NAME).state_dict, path, "cvt", config_path,
                                     config.get("model_args"), config.get("model"), config.get("pretrained_cfg") or {})
    if config.get("model_type") == "cvt":
        weights = next((path / n for n in HF_WEIGHTS_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"Hugging Face directory {path} has none of {', '.join(HF_WEIGHTS_NAMES)}")
        try:
            labels = _label_cfg(config)
        except ValueError as e:
            raise _config_error(config_path, e) from None
        return _described_checkpoint(_read_file(weights).state_dict, path, "hf", config_path,
                                     _cvt_kwargs_from_hf_config(config),
                                     pretrained_cfg={**_hf_preprocessing(path, config.get("num_channels", 3)),
                                                     **labels})
    raise UnreadableCheckpointError(
        f"{config_path} describes neither a CvT model written by save_pretrained nor a Hugging Face CvT (model_type "
        f"{config.get('model_type')!r}): a checkpoint of another architecture")


def _read_config(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; anything else is an UnreadableCheckpointError naming it."""
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested past the parser's depth
        raise UnreadableCheckpointError(f"{path} is not valid JSON ({type(e).__name__}: {e}): it was cut short or "
                                        f"damaged; copy it again, or write the model again") from None
    if not isinstance(config, dict):
        raise _config_error(path, f"it holds a JSON {type(config).__name__}, not an object of settings")
    return config


def _described_checkpoint(state_dict: dict[str, torch.Tensor], source: Path, kind: str, described_in: Path,
                          model_args: Any, model_name: Any = None, pretrained_cfg: Any = None) -> Checkpoint:
    """The weights and what `described_in` (a config.json, or a training checkpoint itself) says of their model,
    once CvT's argument checks pass and the weights' widths and depths are the config's: a config that describes
    no CvT, or another one than its weights', is refused before anything is built, naming the file."""
    from .model import ZOO, check_args  # cvt.model imports this module

    pretrained_cfg = {} if pretrained_cfg is None else pretrained_cfg
    try:
        if not isinstance(model_args, dict):
            raise ValueError(f"model_args is {type(model_args).__name__}, not a mapping of CvT arguments")
        if not (model_name is None or isinstance(model_name, str) and model_name in ZOO):
            raise ValueError(f"model {model_name!r} is none of the zoo's ({', '.join(ZOO)})")
        labels = pretrained_cfg.get("label_names", []) if isinstance(pretrained_cfg, dict) else None
        if not (isinstance(labels, list) and all(isinstance(n, str) for n in labels)):
            raise ValueError("pretrained_cfg is not a mapping, or its label_names are not a list of names")
        check_args(model_args, state_dict)
    except ValueError as e:
        raise _config_error(described_in, e) from None
    # The head's size is the weights' (a model of another class count re-initialises it: model.load_state_dict).
    model_args = {k: v for k, v in model_args.items() if k != "num_classes"}
    return Checkpoint(state_dict, str(source), kind, model_args, model_name, pretrained_cfg)


def _config_error(path: Path, problem: Any) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(f"{path} describes no CvT this library builds: {problem}. Correct it, or write "
                                     f"the model again (save_pretrained, `cvt convert`)")


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
    # The input size it was trained or evaluated at (cvt.model keeps it in pretrained_cfg), else its native one.
    input_size = tuple(cfg.get("input_size") or (model.in_chans, *model.img_size))
    return dict(cfg, num_classes=model.num_classes, input_size=input_size)


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
    if not (isinstance(id2label, dict) and all(str(k).isdigit() and isinstance(v, str) for k, v in id2label.items())):
        raise ValueError("id2label is not a mapping of class numbers to names (e.g. {\"0\": \"cat\"})")
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return {}
    return {"label_names": names}


# What transformers writes beside a CvT (the Hub's microsoft/cvt-* repos): ConvNeXt's image processor, which at a
# `size` below 384 resizes the short side to size / crop_pct and centre-crops, and from 384 on squashes.
PREPROCESSOR_NAME = "preprocessor_config.json"
HF_SQUASH_FROM = 384
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _hf_preprocessing(directory: Path, in_chans: int) -> dict[str, Any]:
    """The preprocessing (timm's `input_size`, `crop_pct`, `crop_mode`, `interpolation`, `mean`, `std`) of a
    Hugging Face directory's ConvNeXt image processor; empty without one, or for another kind of processor."""
    path = directory / PREPROCESSOR_NAME
    if not path.is_file():
        return {}
    processor = _read_config(path)
    size = processor.get("size")
    edge = size.get("shortest_edge") if isinstance(size, dict) else size
    if not isinstance(edge, int) or isinstance(edge, bool) or edge < 1:
        return {}
    squash = edge >= HF_SQUASH_FROM
    cfg = {"input_size": (in_chans, edge, edge), "crop_mode": "squash" if squash else "center",
           "crop_pct": 1.0 if squash else float(processor.get("crop_pct", 224 / 256))}
    if processor.get("resample") in PIL_RESAMPLE:
        cfg["interpolation"] = PIL_RESAMPLE[processor["resample"]]
    if processor.get("do_normalize", True) and processor.get("image_mean") and processor.get("image_std"):
        cfg["mean"], cfg["std"] = tuple(processor["image_mean"]), tuple(processor["image_std"])
    return cfg


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

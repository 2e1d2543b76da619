"""Checkpoints: read every released CvT weight format, write our own, convert to and from Hugging Face.

`load_checkpoint(path)` reads, into the official parameter names:

- an official checkpoint (`.pth`, `.pt`, `.bin`): a bare state dict or one wrapped in `state_dict` / `model`, with
  or without the `module.` prefix of (Distributed)DataParallel; pickles load with `weights_only=True`;
- a `.safetensors` file (official or Hugging Face names);
- a Hugging Face CvT directory (`config.json` with `model_type: cvt` + `model.safetensors` or `pytorch_model.bin`);
- a directory written by `save_pretrained` (`config.json` in our format + `model.safetensors`);
- a checkpoint written by `cvt train` (`.pth`: weights, architecture, zoo name and class names together).

The Hugging Face port (`transformers`' `CvtForImageClassification`) runs the released weights with exact GELU
where the official model uses QuickGELU. Its LayerNorms all use PyTorch's default eps 1e-5, the official value:
its config's `layer_norm_eps` (1e-12) is never read. `from_hf(..., hf_numerics=True)` (i.e. `act_layer="gelu"`)
reproduces its outputs; the official numerics stay the default everywhere.
"""
from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import atomic_directory, atomic_path
from .model import NUM_STAGES, ZOO, CvT, _per_stage, create_model

__all__ = [
    "Checkpoint", "load_checkpoint", "load_state_dict", "load_weights", "model_from_checkpoint", "describe_state_dict",
    "cvt_kwargs_from_official_spec", "save_pretrained", "save_safetensors", "hf_config", "to_hf", "from_hf", "save_hf",
    "HF_NUMERICS",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "cvt-pytorch"
TRAINING_FORMAT = "cvt-train"  # the `format` of a checkpoint written by `cvt train`
HF_WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
# What makes our model compute exactly what transformers' CvT computes (see the module docstring).
HF_NUMERICS = {"act_layer": "gelu"}
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

    def load_into(self, model: CvT) -> None:
        load_state_dict(model, self.state_dict, self.source)


# ---------------------------------------------------------------------------------------------------------------
# Reading

def load_checkpoint(source: str | os.PathLike | Checkpoint, expect_model: str | None = None) -> Checkpoint:
    """Read any supported checkpoint (see the module docstring). With `expect_model`, a checkpoint that names or
    describes another zoo model is an error that gives the right call."""
    if isinstance(source, Checkpoint):
        checkpoint = source
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}: pass the path to an official .pth, a .safetensors file, "
                                    f"a Hugging Face CvT directory or a directory written by save_pretrained")
        checkpoint = _read_directory(path) if path.is_dir() else _read_file(path)
    if expect_model:
        _check_model_name(checkpoint, expect_model)
    return checkpoint


def _read_file(path: Path) -> Checkpoint:
    if path.suffix == ".safetensors":
        try:
            return Checkpoint(_official_names(load_file(path)), str(path), "official")
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
    return Checkpoint(_official_names(obj), str(path), "official")


def _official_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _check_model_name(checkpoint: Checkpoint, expect_model: str) -> None:
    if checkpoint.kind == "hf":
        # A Hugging Face config has no image size: any zoo model of the same architecture fits.
        candidates = _zoo_matches(checkpoint.model_args)
    else:
        candidates = [checkpoint.model_name] if checkpoint.model_name else []
    if candidates and expect_model not in candidates:
        calls = " or ".join(f"cvt.create_model({n!r}, pretrained={checkpoint.source!r})" for n in candidates)
        raise ValueError(f"{checkpoint.source} holds {' / '.join(candidates)} weights, not {expect_model}: "
                         f"call {calls}")


def _zoo_matches(arch: dict[str, Any]) -> list[str]:
    """Zoo models with these widths, depths and (where given) heads."""
    keys = [k for k in ("embed_dims", "depths", "num_heads") if k in arch]
    return [name for name, (zoo_arch, _) in ZOO.items()
            if keys and all(list(zoo_arch[k]) == list(arch[k]) for k in keys)]


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """What architecture a state dict looks like, read off its shapes."""
    if "stage0.patch_embed.proj.weight" not in state_dict:
        return (f"it is not a CvT checkpoint: it has no stage0.patch_embed.proj.weight "
                f"(its first keys: {', '.join(list(state_dict)[:5])})")
    arch = {
        "embed_dims": [state_dict[f"stage{i}.patch_embed.proj.weight"].shape[0]
                       for i in range(NUM_STAGES) if f"stage{i}.patch_embed.proj.weight" in state_dict],
        "depths": [len({k.split(".")[2] for k in state_dict if k.startswith(f"stage{i}.blocks.")})
                   for i in range(NUM_STAGES)],
    }
    shapes = f"embed_dims {arch['embed_dims']}, depths {arch['depths']}"
    matches = _zoo_matches(arch)
    if matches:
        return f"the checkpoint looks like {' / '.join(matches)} ({shapes})"
    return f"the checkpoint has {shapes}, which is no zoo model"


# ---------------------------------------------------------------------------------------------------------------
# Loading into a model

def load_state_dict(model: CvT, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Load official-named weights. A head of another size is left freshly initialised, with a warning; any other
    difference is an error listing the missing, unexpected and wrongly-shaped keys."""
    head_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    keep_head = head_classes == model.num_classes
    if not keep_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        if model.num_classes:
            has = f"a {head_classes}-class head" if head_classes else "no classifier head"
            warnings.warn(f"{source} has {has}, the model {model.num_classes} classes: its head is freshly "
                          f"initialised and needs training", stacklevel=2)
    expected = model.state_dict()
    # BatchNorm's batch counter only matters for momentum-free training; older checkpoints lack it.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")
               and (keep_head or not k.startswith("head."))]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} in the model"
                   for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"{source} does not fit this model (embed_dims {model.config['embed_dims']}, "
                 f"depths {model.config['depths']}):"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("wrongly-shaped keys", wrong_shape)):
            if keys:
                more = f", ... and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else ""
                lines.append(f"  {len(keys)} {label}: {', '.join(keys[:MAX_KEYS_SHOWN])}{more}")
        lines.append(f"  {describe_state_dict(state_dict)}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=False)


def load_weights(model: CvT, path: str | os.PathLike) -> CvT:
    """Load any supported checkpoint into a model built directly with `cvt.CvT(...)`; returns the model."""
    load_checkpoint(path).load_into(model)
    return model


def model_from_checkpoint(source: str | os.PathLike | Checkpoint, model_name: str | None = None,
                          num_classes: int | None = None, **overrides: Any) -> CvT:
    """A model built as the checkpoint describes, with its weights: through `create_model` when the zoo name is
    known (given, or saved in the checkpoint), else straight from the checkpoint's config."""
    checkpoint = load_checkpoint(source, expect_model=model_name)
    name = model_name or checkpoint.model_name
    if name:
        return create_model(name, num_classes=num_classes, pretrained=checkpoint, **overrides)
    if not checkpoint.model_args:
        raise ValueError(f"{checkpoint.source} is a bare state dict that does not say which model it is: name it, "
                         f"e.g. cvt.create_model('cvt_13_224', pretrained={checkpoint.source!r}) or "
                         f"`cvt convert --model NAME`; {describe_state_dict(checkpoint.state_dict)}")
    model = CvT(num_classes=checkpoint.num_classes if num_classes is None else num_classes,
                **dict(checkpoint.model_args, **overrides))
    checkpoint.load_into(model)
    model.pretrained_cfg = dict(checkpoint.pretrained_cfg)
    return model


_OFFICIAL_SPEC_NAMES = {
    "PATCH_SIZE": "patch_sizes", "PATCH_STRIDE": "patch_strides", "PATCH_PADDING": "patch_paddings",
    "DIM_EMBED": "embed_dims", "NUM_HEADS": "num_heads", "DEPTH": "depths", "MLP_RATIO": "mlp_ratio",
    "ATTN_DROP_RATE": "attn_drop_rate", "DROP_RATE": "drop_rate", "DROP_PATH_RATE": "drop_path_rate",
    "QKV_BIAS": "qkv_bias", "CLS_TOKEN": "cls_token", "POS_EMBED": "pos_embed", "QKV_PROJ_METHOD": "proj_method",
    "KERNEL_QKV": "kernel_qkv", "PADDING_KV": "padding_kv", "STRIDE_KV": "stride_kv", "PADDING_Q": "padding_q",
    "STRIDE_Q": "stride_q",
}


def cvt_kwargs_from_official_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """CvT arguments from the official config's MODEL.SPEC (`DIM_EMBED`, `NUM_HEADS`, `DEPTH`, `STRIDE_KV`, ...)."""
    if spec.get("NUM_STAGES", NUM_STAGES) != NUM_STAGES:
        raise ValueError(f"NUM_STAGES is {spec['NUM_STAGES']}: CvT has {NUM_STAGES} stages")
    # INIT picks the initialiser for training from scratch; it does not change the architecture.
    unknown = sorted(set(spec) - set(_OFFICIAL_SPEC_NAMES) - {"NUM_STAGES", "INIT"})
    if unknown:
        raise ValueError(f"unknown official spec keys {unknown}; known: {sorted(_OFFICIAL_SPEC_NAMES)}")
    return {ours: spec[official] for official, ours in _OFFICIAL_SPEC_NAMES.items() if official in spec}


# ---------------------------------------------------------------------------------------------------------------
# Writing

def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict as one .safetensors file, atomically."""
    with atomic_path(path) as tmp:
        # transformers' from_pretrained wants the "format" metadata.
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})


def save_pretrained(model: CvT, directory: str | os.PathLike) -> None:
    """`config.json` (zoo name, CvT arguments, pretrained_cfg) and `model.safetensors`, written atomically;
    `cvt.create_model(name, pretrained=directory)` reads them back."""
    config = {
        "format": FORMAT_TAG,
        "model": getattr(model, "model_name", None),
        "model_args": model.config,
        "pretrained_cfg": dict(model.pretrained_cfg, num_classes=model.num_classes),
    }
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_safetensors(model.state_dict(), tmp / WEIGHTS_NAME)


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
    # CvT's own defaults, so an absent field takes CvT's default (tests/test_hf.py checks that they agree).
    defaults = inspect.signature(CvT).parameters
    return {ours: config.get(hf, defaults[ours].default) for hf, ours in _HF_CONFIG_NAMES.items()}


def _label_cfg(config: dict[str, Any]) -> dict[str, Any]:
    """`label_names` from a Hugging Face id2label, unless it holds only transformers' LABEL_i placeholders."""
    id2label = config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return {}
    return {"label_names": names}


def label_names(model: CvT) -> list[str] | None:
    """The model's class names: its own (saved with it), ImageNet-1k's (bundled with timm) for a 1000-class model
    without any, else None."""
    names = model.pretrained_cfg.get("label_names")
    if names:
        return list(names)
    if model.num_classes == 1000:
        from timm.data import ImageNetInfo

        return ImageNetInfo().label_descriptions()
    return None


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
    """A directory `transformers.CvtForImageClassification.from_pretrained` loads, written atomically."""
    hf_model = to_hf(model)
    with atomic_directory(directory) as tmp:
        hf_model.save_pretrained(tmp)


def from_hf(source: Any, hf_numerics: bool = False, **overrides: Any) -> CvT:
    """Our model from a Hugging Face CvT: a `CvtForImageClassification` or a directory it saved.

    Official numerics (QuickGELU) by default; `hf_numerics=True` reproduces the Hugging Face outputs.
    """
    if isinstance(source, (str, os.PathLike)):
        checkpoint = load_checkpoint(source)
        if checkpoint.kind != "hf":
            raise ValueError(f"{source} is not a Hugging Face CvT directory: load it with cvt.create_model(name, "
                             f"pretrained=...) or cvt.weights.model_from_checkpoint")
    else:
        config = source.config.to_dict()
        checkpoint = Checkpoint(_official_names(source.state_dict()), type(source).__name__, "hf",
                                _cvt_kwargs_from_hf_config(config), pretrained_cfg=_label_cfg(config))
    if hf_numerics:
        overrides = dict(HF_NUMERICS, **overrides)
    return model_from_checkpoint(checkpoint, **overrides)

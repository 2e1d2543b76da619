"""CvT: Convolutional vision Transformer (Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021).

The reference: the paper's blocks, one configurable model and the registered variants of the official release.
It computes the same way on every device, dtype and compile state; the speed-ups are `cvt.accel`, a layer that
rewrites or swaps modules of a built model.

Parameter names follow the official implementation (`stage0.patch_embed.proj.weight`,
`stage2.blocks.0.attn.conv_proj_k.bn.running_var`, `stage2.cls_token`, `norm.weight`, `head.weight`), so an
official checkpoint loads without renaming. Numerics follow it too: QuickGELU, LayerNorm eps 1e-5 and the
attention scale `dim ** -0.5` over the whole stage width (not per head).

Options beyond the released models, for the paper's ablations: a learned absolute position embedding per stage
(`pos_embed`), a non-overlapping patch token embedding (`token_embed="patch"`), the `avg` and position-wise
`linear` projections and any k/v stride.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import math
import numbers
import os
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch.utils.checkpoint import checkpoint

from .weights import Checkpoint, load_checkpoint, official_names, save_pretrained

__all__ = ["CvT", "create_model", "list_models", "list_pretrained", "model_from_checkpoint", "load_model",
           "load_state_dict", "load_weights", "describe_state_dict", "cvt_kwargs_from_official_spec", "ZOO",
           "PRETRAINED", "QuickGELU"]

NUM_STAGES = 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_KEYS_SHOWN = 10


class QuickGELU(nn.Module):
    """`x * sigmoid(1.702 x)`: the activation the released weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACT_LAYERS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}
PROJ_METHODS = ("dw_bn", "avg", "linear")
TOKEN_EMBEDS = ("conv", "patch")


class ConvEmbed(nn.Module):
    """Token embedding: a strided Conv2d over the 2-D token map, then LayerNorm over channels."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, padding: int, norm_eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Projection(nn.Sequential):
    """The convolutional projection (Sec. 3.2): a (B, C, H, W) token map in, its projected tokens (B, H'W', C) out.

    `dw_bn`, the paper's: a depth-wise conv then BatchNorm; `avg`: average pooling; `linear`: nothing, the
    position-wise projection of ViT (the tokens as they are).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x.flatten(2).transpose(1, 2)


def build_projection(method: str, dim: int, kernel_size: int, stride: int, padding: int) -> Projection:
    if method == "dw_bn":
        return Projection(OrderedDict([
            ("conv", nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, groups=dim, bias=False)),
            ("bn", nn.BatchNorm2d(dim)),
        ]))
    if method == "avg":
        return Projection(OrderedDict([
            ("avg", nn.AvgPool2d(kernel_size, stride=stride, padding=padding, ceil_mode=True)),
        ]))
    return Projection()  # "linear" (check_args refuses any other method)


class Attention(nn.Module):
    """Multi-head attention with convolutional projections of q, k and v (Fig. 3).

    The class token (last stage only) skips the convolutions and joins q, k and v right after them.
    `fused_attn` picks `scaled_dot_product_attention`; the plain computation is the reference.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        method: str = "dw_bn",
        kernel_size: int = 3,
        stride_q: int = 1,
        padding_q: int = 1,
        stride_kv: int = 2,
        padding_kv: int = 1,
        with_cls_token: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.scale = dim ** -0.5
        self.with_cls_token = with_cls_token
        self.fused_attn = True
        # The official `avg` method pools k and v only; q stays position-wise.
        self.conv_proj_q = build_projection("linear" if method == "avg" else method, dim, kernel_size, stride_q,
                                            padding_q)
        self.conv_proj_k = build_projection(method, dim, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = build_projection(method, dim, kernel_size, stride_kv, padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, C) -> (B, heads, tokens, head_dim)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def qkv(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, heads, tokens, head_dim), the class token first where there is one."""
        cls_token: Optional[torch.Tensor] = None
        if self.with_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        x_map = x.transpose(1, 2).unflatten(2, (h, w))
        q, k, v = self.conv_proj_q(x_map), self.conv_proj_k(x_map), self.conv_proj_v(x_map)
        if cls_token is not None:
            q, k, v = torch.cat((cls_token, q), 1), torch.cat((cls_token, k), 1), torch.cat((cls_token, v), 1)
        return self.heads(self.proj_q(q)), self.heads(self.proj_k(k)), self.heads(self.proj_v(v))

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale): the attention weights (B, heads, queries, keys)."""
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale) v with attention dropout, (B, heads, queries, head_dim)."""
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                                  scale=self.scale)
        return self.attn_drop(self.attention_probs(q, k)) @ v

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        q, k, v = self.qkv(x, h, w)
        x = self.attend(q, k, v).transpose(1, 2).flatten(2)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: `x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, drop_path: float,
                 act_layer: type[nn.Module], norm_eps: float, **attn_kwargs: Any):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, attn_drop=attn_kwargs.pop("attn_drop"), proj_drop=drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Token embedding, optional class token and position embedding, then the blocks.

    Returns the stage's output map (B, C, H, W) and its class token (B, 1, C) or None.
    """

    def __init__(self, in_chans: int, embed_dim: int, depth: int, num_heads: int, embed_kernel: int,
                 embed_stride: int, embed_padding: int, with_cls_token: bool, pos_embed_grid: tuple[int, int] | None,
                 drop_rate: float, drop_path_rate: float, norm_eps: float, **block_kwargs: Any):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, embed_dim, embed_kernel, embed_stride, embed_padding, norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if with_cls_token else None
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, pos_embed_grid[0] * pos_embed_grid[1], embed_dim)) if pos_embed_grid else None
        )
        self.pos_embed_grid = pos_embed_grid
        self.pos_drop = nn.Dropout(drop_rate)
        self.grad_checkpointing = False
        # Rises linearly over the stage's blocks (plain floats, so the model can be built on the meta device).
        drop_paths = [drop_path_rate * j / max(depth - 1, 1) for j in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, drop=drop_rate, drop_path=dp, norm_eps=norm_eps,
                  with_cls_token=with_cls_token, **block_kwargs)
            for dp in drop_paths
        ])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            x = x + resize_pos_embed(self.pos_embed, self.pos_embed_grid, h, w)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, h, w, use_reentrant=False)
            else:
                x = block(x, h, w)
        cls_token: Optional[torch.Tensor] = None
        if self.cls_token is not None:
            cls_token, x = x[:, :1], x[:, 1:]
        return x.transpose(1, 2).unflatten(2, (h, w)), cls_token


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """A position embedding made for a `grid` token map, for an h x w one: bicubic interpolation."""
    if h == grid[0] and w == grid[1]:
        return pos_embed
    x = pos_embed.transpose(1, 2).unflatten(2, grid)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def check_input(x: torch.Tensor, in_chans: int, min_size: int, native: tuple[int, int]) -> None:
    """Raise a clear error for an input the model cannot take."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {list(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0)")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (shape {list(x.shape)}); "
                         "convert the images (e.g. PIL .convert('RGB')) or build the model with "
                         f"in_chans={x.shape[1]}")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is smaller than this model can take "
                         f"(at least {min_size}x{min_size}); resize the image, ideally to the native "
                         f"{native[0]}x{native[1]}")


# Calls that torch.fx records as they are: they compare sizes, which a symbolic trace cannot.
torch.fx.wrap("resize_pos_embed")
torch.fx.wrap("check_input")


def _per_stage(value: Any, name: str) -> tuple:
    """A per-stage option: one value for every stage, or a sequence of one per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != NUM_STAGES:
            raise ValueError(f"{name} needs one value per stage ({NUM_STAGES}), got {len(value)}: {list(value)}")
        return tuple(value)
    return (value,) * NUM_STAGES


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def embed_geometry(patch_sizes: Any, patch_strides: Any, patch_paddings: Any,
                   token_embed: str) -> tuple[tuple[int, int, int], ...]:
    """(kernel, stride, padding) of each stage's token embedding; a "patch" embedding's kernel is its stride."""
    strides = _per_stage(patch_strides, "patch_strides")
    if token_embed == "patch":
        return tuple((s, s, 0) for s in strides)
    return tuple(zip(_per_stage(patch_sizes, "patch_sizes"), strides, _per_stage(patch_paddings, "patch_paddings")))


def min_input_size(geometry: Sequence[tuple[int, int, int]]) -> int:
    """The smallest input side that leaves every stage a token: each embedding's conv inverted, last stage first."""
    size = 1
    for kernel, stride, padding in reversed(geometry):
        size = max(1, (size - 1) * stride + kernel - 2 * padding)
    return size


def takes_device_and_dtype(init):
    """timm's factory arguments for a model's `__init__`: its parameters and buffers are made on `device` (the meta
    device included) and in `dtype`."""

    @functools.wraps(init)
    def wrapped(self, *args: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                **kwargs: Any) -> None:
        with torch.device(device) if device is not None else nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype)

    return wrapped


# Far beyond any CvT (the released ones are at most 1024 wide, with 20 blocks in a stage, at 384 x 384): only a
# corrupt or hostile config reaches them, and it is refused before anything is allocated.
MAX_WIDTH, MAX_DEPTH, MAX_IMG_SIZE, MAX_KERNEL = 8192, 256, 4096, 32
MAX_IN_CHANS, MAX_CLASSES, MAX_MLP_RATIO = 1024, 1_000_000, 16

Rule = tuple[Callable[[Any], bool], str]  # a test of one value, and what passes it


def _whole(low: int, high: int) -> Rule:
    return (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= high,
            f"whole numbers from {low} to {high}")


def _real(low: float, high: float) -> Rule:
    return (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and low <= v <= high,
            f"numbers from {low} to {high}")


def _one_of(*choices: str | None) -> Rule:
    return (lambda v: (v is None or isinstance(v, str)) and v in choices), f"one of {', '.join(map(repr, choices))}"


def _or_none(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v)), f"None or {rule[1]}"


_FLAG: Rule = (lambda v: isinstance(v, bool)), "true or false"
# Every CvT argument's rule, for each of its values: per stage for those of PER_STAGE_ARGS, per side for img_size.
ARG_RULES: dict[str, Rule] = {
    "in_chans": _whole(1, MAX_IN_CHANS), "num_classes": _whole(0, MAX_CLASSES),
    "global_pool": _one_of(None, "token", "avg"), "embed_dims": _whole(1, MAX_WIDTH),
    "depths": _whole(1, MAX_DEPTH), "num_heads": _whole(1, MAX_WIDTH), "patch_sizes": _whole(1, MAX_KERNEL),
    "patch_strides": _whole(1, MAX_KERNEL), "patch_paddings": _whole(0, MAX_KERNEL),
    "token_embed": _one_of(*TOKEN_EMBEDS), "mlp_ratio": _real(0, MAX_MLP_RATIO), "qkv_bias": _FLAG,
    "drop_rate": _real(0, 1), "attn_drop_rate": _real(0, 1), "drop_path_rate": _real(0, 1), "cls_token": _FLAG,
    "proj_method": _one_of(*PROJ_METHODS), "kernel_qkv": _whole(1, MAX_KERNEL), "stride_q": _whole(1, MAX_KERNEL),
    "padding_q": _whole(0, MAX_KERNEL), "stride_kv": _whole(1, MAX_KERNEL), "padding_kv": _whole(0, MAX_KERNEL),
    "pos_embed": _FLAG, "img_size": _whole(1, MAX_IMG_SIZE), "act_layer": _one_of(*ACT_LAYERS),
    "norm_eps": _real(0, 1), "head_norm_eps": _or_none(_real(0, 1)),
}
PER_STAGE_ARGS = ("embed_dims", "depths", "num_heads", "patch_sizes", "patch_strides", "patch_paddings", "mlp_ratio",
                  "qkv_bias", "drop_rate", "attn_drop_rate", "drop_path_rate", "cls_token", "proj_method",
                  "kernel_qkv", "stride_q", "padding_q", "stride_kv", "padding_kv", "pos_embed")


def check_args(args: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse CvT arguments that build no model, or one far too big to be meant, before anything is allocated; with
    the `weights` they come with, also widths and depths other than the weights'. `CvT.__init__` calls it, and so
    does every reader of a model's config (`cvt.weights`); an argument left out takes CvT's default."""
    defaults = {k: p.default for k, p in inspect.signature(CvT).parameters.items()}
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        raise ValueError(f"unknown CvT arguments {unknown}; it takes {', '.join(defaults)}")
    args = {**defaults, **args}
    for name, (test, takes) in ARG_RULES.items():
        value = args[name]
        if name in PER_STAGE_ARGS:
            values, each = _per_stage(value, name), " (one, or one per stage)"
        elif name == "img_size":
            pair = isinstance(value, (list, tuple)) and len(value) == 2
            values, each = (value if pair else (value,)), " (one, or height and width)"
        else:
            values, each = (value,), ""
        if not all(test(v) for v in values):
            raise ValueError(f"{name} takes {takes}{each}, got {value!r}")
    dims, depths, heads, cls_token = (_per_stage(args[n], n) for n in ("embed_dims", "depths", "num_heads",
                                                                         "cls_token"))
    if any(dim % h for dim, h in zip(dims, heads)):
        raise ValueError(f"embed_dims {list(dims)} are not divisible by num_heads {list(heads)}: every head of a "
                         "stage takes an equal share of its width")
    if args["global_pool"] == "token" and not cls_token[-1]:
        raise ValueError("global_pool 'token' needs a class token in the last stage (cls_token[-1]); or use 'avg'")
    smallest = min_input_size(embed_geometry(args["patch_sizes"], args["patch_strides"], args["patch_paddings"],
                                             args["token_embed"]))
    img_size = args["img_size"]
    if min(img_size if isinstance(img_size, (list, tuple)) else (img_size,)) < smallest:
        raise ValueError(f"img_size {img_size!r} leaves the last stage no tokens: these token embeddings take inputs "
                         f"of at least {smallest}x{smallest}")
    if weights is not None:
        theirs = stage_shapes(weights)
        ours = {i: (dims[i], depths[i]) for i in theirs}
        if ours != theirs:
            raise ValueError(f"embed_dims {[w for w, _ in ours.values()]} and depths {[d for _, d in ours.values()]} "
                             f"are not those of its weights, {[w for w, _ in theirs.values()]} and "
                             f"{[d for _, d in theirs.values()]}")


class CvT(nn.Module):
    """The Convolutional vision Transformer.

    Every option marked per-stage takes one value for all three stages or a sequence of three.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs; 0 leaves the head out.
        global_pool: "token" (class token) or "avg" (mean of the last map); by default "token" when the last
            stage has a class token.
        embed_dims, depths, num_heads: per-stage width, number of blocks and attention heads.
        patch_sizes, patch_strides, patch_paddings: per-stage token-embedding conv.
        token_embed: "conv" (the paper's overlapping convolutional embedding) or "patch" (non-overlapping:
            kernel = stride, no padding, so each stage keeps its output resolution).
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate: per-stage; drop path rises linearly from
            0 to the stage's rate over its blocks.
        cls_token: per-stage class token (the released models: last stage only).
        proj_method: per-stage "dw_bn" (depth-wise conv + BatchNorm, the paper's), "avg" (k/v average-pooled)
            or "linear" (position-wise: no projection, keys at full resolution).
        kernel_qkv, stride_q, padding_q, stride_kv, padding_kv: per-stage projection geometry.
        pos_embed: per-stage learned absolute position embedding, sized for `img_size` and resized by bicubic
            interpolation for other inputs.
        img_size: the input size the position embeddings are made for (and the native resolution).
        act_layer: "quick_gelu" (official) or "gelu" (exact, as the Hugging Face port runs).
        norm_eps: LayerNorm eps everywhere but the final norm; head_norm_eps: the final norm's (default norm_eps).
        device, dtype: where and in which dtype the parameters are made (timm's factory arguments).
    """

    @takes_device_and_dtype
    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str | None = None,
        embed_dims: Sequence[int] = (64, 192, 384),
        depths: Sequence[int] = (1, 2, 10),
        num_heads: Sequence[int] = (1, 3, 6),
        patch_sizes: Sequence[int] = (7, 3, 3),
        patch_strides: Sequence[int] = (4, 2, 2),
        patch_paddings: Sequence[int] = (2, 1, 1),
        token_embed: str = "conv",
        mlp_ratio: float | Sequence[float] = 4.0,
        qkv_bias: bool | Sequence[bool] = True,
        drop_rate: float | Sequence[float] = 0.0,
        attn_drop_rate: float | Sequence[float] = 0.0,
        drop_path_rate: float | Sequence[float] = (0.0, 0.0, 0.1),
        cls_token: bool | Sequence[bool] = (False, False, True),
        proj_method: str | Sequence[str] = "dw_bn",
        kernel_qkv: int | Sequence[int] = 3,
        stride_q: int | Sequence[int] = 1,
        padding_q: int | Sequence[int] = 1,
        stride_kv: int | Sequence[int] = 2,
        padding_kv: int | Sequence[int] = 1,
        pos_embed: bool | Sequence[bool] = False,
        img_size: int | Sequence[int] = 224,
        act_layer: str = "quick_gelu",
        norm_eps: float = 1e-5,
        head_norm_eps: float | None = None,
    ):
        super().__init__()
        # Plain data describing the architecture: what save_pretrained writes and create_model reads back.
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in locals().items()
                       if k not in ("self", "__class__")}
        check_args(self.config)
        embed_dims, depths, num_heads = (_per_stage(v, n) for v, n in
                                         ((embed_dims, "embed_dims"), (depths, "depths"), (num_heads, "num_heads")))
        self.embed_geometry = embed_geometry(patch_sizes, patch_strides, patch_paddings, token_embed)
        self.img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        cls_token = _per_stage(cls_token, "cls_token")
        pos_embed = _per_stage(pos_embed, "pos_embed")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_prefix_tokens = int(cls_token[-1])
        self.global_pool = global_pool or ("token" if cls_token[-1] else "avg")

        grids = self.feature_sizes(*self.img_size)
        per_stage = {name: _per_stage(value, name) for name, value in (
            ("mlp_ratio", mlp_ratio), ("qkv_bias", qkv_bias), ("drop_rate", drop_rate),
            ("attn_drop_rate", attn_drop_rate), ("drop_path_rate", drop_path_rate), ("proj_method", proj_method),
            ("kernel_qkv", kernel_qkv), ("stride_q", stride_q), ("padding_q", padding_q),
            ("stride_kv", stride_kv), ("padding_kv", padding_kv))}
        act = ACT_LAYERS[act_layer]
        chans = in_chans
        for i in range(NUM_STAGES):
            kernel, stride, padding = self.embed_geometry[i]
            stage = Stage(
                chans, embed_dims[i], depths[i], num_heads[i], kernel, stride, padding,
                with_cls_token=cls_token[i], pos_embed_grid=grids[i] if pos_embed[i] else None,
                drop_rate=per_stage["drop_rate"][i], drop_path_rate=per_stage["drop_path_rate"][i],
                norm_eps=norm_eps, mlp_ratio=per_stage["mlp_ratio"][i], act_layer=act,
                qkv_bias=per_stage["qkv_bias"][i], attn_drop=per_stage["attn_drop_rate"][i],
                method=per_stage["proj_method"][i], kernel_size=per_stage["kernel_qkv"][i],
                stride_q=per_stage["stride_q"][i], padding_q=per_stage["padding_q"][i],
                stride_kv=per_stage["stride_kv"][i], padding_kv=per_stage["padding_kv"][i],
            )
            setattr(self, f"stage{i}", stage)
            chans = embed_dims[i]
        self.norm = nn.LayerNorm(embed_dims[-1], eps=norm_eps if head_norm_eps is None else head_norm_eps)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=embed_dims[i], reduction=math.prod(s for _, s, _ in self.embed_geometry[: i + 1]),
                 module=f"stage{i}")
            for i in range(NUM_STAGES)
        ]
        self.min_input_size = min_input_size(self.embed_geometry)
        self.pretrained_cfg = {}
        self.init_weights()

    __jit_unused_properties__ = ["stages"]

    @property
    def stages(self) -> list[Stage]:
        """stage0, stage1, stage2 (those that `prune_intermediate_layers` kept)."""
        return [getattr(self, f"stage{i}") for i in range(NUM_STAGES) if hasattr(self, f"stage{i}")]

    def init_weights(self) -> None:
        """The official initialisation: trunc-normal(0.02) linears, class tokens and position embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            for p in (stage.cls_token, stage.pos_embed):
                if p is not None:
                    trunc_normal_(p, std=0.02)

    def feature_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """The (H, W) of each stage's token map for an h x w input."""
        sizes = []
        for kernel, stride, padding in self.embed_geometry:
            h, w = _conv_out(h, kernel, stride, padding), _conv_out(w, kernel, stride, padding)
            sizes.append((h, w))
        return sizes

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stage{i}.{name}" for i in range(NUM_STAGES) for name in ("cls_token", "pos_embed")}

    def set_fused_attn(self, enable: bool = True) -> None:
        """Choose scaled_dot_product_attention (True) or the plain reference computation (False)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused_attn = enable

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing: each block's activations are recomputed in the backward pass instead of kept,
        for less training memory at the cost of a second forward pass of the blocks; same outputs and gradients."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups from the input to the output (layer-wise lr decay, `timm.optim`): the stem is
        stage 0's token embedding; each later token embedding, class token and position embedding goes with its
        stage's first block; every block is a group of its own (`coarse`: one group per stage)."""
        return dict(
            stem=r"^stage0\.(?:patch_embed|pos_embed|cls_token)",
            blocks=[(r"^stage(\d+)", None)] if coarse else [
                (r"^stage(\d+)\.blocks\.(\d+)", None),
                (r"^stage(\d+)\.(?:patch_embed|pos_embed|cls_token)", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A freshly initialised head for `num_classes` outputs (0: no head)."""
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        if global_pool is not None:
            self.global_pool = self.config["global_pool"] = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """The stage maps named by `indices` (timm's protocol: None all three, an int the last n, a sequence those;
        strides 4, 8 and 16 for the released models), and unless `intermediates_only` the final features too
        (`forward_features`' normalised tokens).

        Args:
            return_prefix_tokens: each intermediate as (map, class token (B, 1, C) or None), the class token
                before the final norm.
            norm: the final norm applied to the last stage's map.
            stop_early: run no stage past the last one asked for (then only the intermediates are returned).
            output_fmt: "NCHW" maps or "NLC" token sequences.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt {output_fmt!r}: choose NCHW or NLC")
        check_input(x, self.in_chans, self.min_input_size, self.img_size)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        cls_token = None
        for i, stage in enumerate(stages):
            x, cls_token = stage(x)
            if i not in take_indices:
                continue
            out = x.flatten(2).transpose(1, 2)
            if norm and i == NUM_STAGES - 1:
                out = self.norm(out)
            if output_fmt == "NCHW":
                out = out.transpose(1, 2).unflatten(2, x.shape[2:])
            intermediates.append((out, cls_token) if return_prefix_tokens else out)
        if intermediates_only or stop_early:
            return intermediates
        tokens = x.flatten(2).transpose(1, 2)
        if cls_token is not None:
            tokens = torch.cat((cls_token, tokens), dim=1)
        return self.norm(tokens), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages past the last of `indices` (and the final norm and head, as asked) for a model that
        only gives intermediates; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        for i in range(max_index + 1, NUM_STAGES):
            if hasattr(self, f"stage{i}"):
                delattr(self, f"stage{i}")
        if prune_norm or max_index < NUM_STAGES - 1:
            self.norm = nn.Identity()
        if prune_head or max_index < NUM_STAGES - 1:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens of the last stage (B, prefix + H*W, C), the class token first where there is one."""
        check_input(x, self.in_chans, self.min_input_size, self.img_size)
        x, _ = self.stage0(x)
        x, _ = self.stage1(x)
        x, cls_token = self.stage2(x)
        x = x.flatten(2).transpose(1, 2)
        if cls_token is not None:
            x = torch.cat((cls_token, x), dim=1)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def save_pretrained(self, directory: str) -> None:
        """Write `config.json` and `model.safetensors`; `create_model(name, pretrained=directory)` reads them back."""
        save_pretrained(self, directory)


# ---------------------------------------------------------------------------------------------------------------
# The zoo: the official release's models and weights. Variants only set numbers.

_CVT_13 = dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6), drop_path_rate=(0.0, 0.0, 0.1))
_CVT_21 = dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6), drop_path_rate=(0.0, 0.0, 0.1))
_CVT_W24 = dict(embed_dims=(192, 768, 1024), depths=(2, 2, 20), num_heads=(3, 12, 16), drop_path_rate=(0.0, 0.0, 0.3))
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "cvt_13_224": dict(_CVT_13, img_size=224), "cvt_13_384": dict(_CVT_13, img_size=384),
    "cvt_21_224": dict(_CVT_21, img_size=224), "cvt_21_384": dict(_CVT_21, img_size=384),
    "cvt_w24_384": dict(_CVT_W24, img_size=384),
}
IN1K, IN22K_FT_IN1K = "ImageNet-1k", "ImageNet-22k, fine-tuned on ImageNet-1k at 384"


def eval_data_cfg(img_size: int | Sequence[int], in_chans: int = 3) -> dict[str, Any]:
    """The paper's eval preprocessing at a resolution, in timm's pretrained_cfg fields (`input_size`, `crop_pct`,
    `crop_mode`, `interpolation`, `mean`, `std`): at 224 resize the short side to 256 and centre-crop; at 384 (and
    any other size) squash, no crop. What a model whose weights say nothing about their preprocessing runs with."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    crop_pct, crop_mode = (0.875, "center") if (h, w) == (224, 224) else (1.0, "squash")
    return dict(input_size=(in_chans, h, w), crop_pct=crop_pct, crop_mode=crop_mode, interpolation="bicubic",
                mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _pretrained_cfg(hf_hub_id: str, img_size: int, paper_top1: float, pretraining: str) -> dict[str, Any]:
    return dict(
        hf_hub_id=hf_hub_id, **eval_data_cfg(img_size), num_classes=1000,
        first_conv="stage0.patch_embed.proj", classifier="head", license="mit", paper_ids="arXiv:2103.15808",
        paper_name="CvT: Introducing Convolutions to Vision Transformers",
        origin_url="https://github.com/microsoft/CvT",
        notes=(f"paper top-1 {paper_top1}", f"pre-training: {pretraining}"), paper_top1=paper_top1,
        pretraining=pretraining,
    )


# Every released checkpoint, as `architecture.tag` in timm's naming: the converted official weights that Microsoft
# publishes on the Hugging Face Hub (transformers' format). An architecture's first tag is its default.
PRETRAINED: dict[str, dict[str, Any]] = {
    "cvt_13_224.ms_in1k": _pretrained_cfg("microsoft/cvt-13", 224, 81.6, IN1K),
    "cvt_13_384.ms_in1k": _pretrained_cfg("microsoft/cvt-13-384", 384, 83.0, IN1K),
    "cvt_13_384.ms_in22k_ft_in1k": _pretrained_cfg("microsoft/cvt-13-384-22k", 384, 83.3, IN22K_FT_IN1K),
    "cvt_21_224.ms_in1k": _pretrained_cfg("microsoft/cvt-21", 224, 82.5, IN1K),
    "cvt_21_384.ms_in1k": _pretrained_cfg("microsoft/cvt-21-384", 384, 83.3, IN1K),
    "cvt_21_384.ms_in22k_ft_in1k": _pretrained_cfg("microsoft/cvt-21-384-22k", 384, 84.9, IN22K_FT_IN1K),
    "cvt_w24_384.ms_in22k_ft_in1k": _pretrained_cfg("microsoft/cvt-w24-384-22k", 384, 87.7, IN22K_FT_IN1K),
}
# name -> (architecture, its default checkpoint's cfg: eval transform and provenance)
ZOO: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    name: (arch, next(cfg for tag, cfg in PRETRAINED.items() if tag.split(".")[0] == name))
    for name, arch in ARCHITECTURES.items()
}
# timm's PretrainedCfg takes its own fields only; the paper's top-1 and the pre-training are in its notes.
default_cfgs = generate_default_cfgs({
    tag: {k: v for k, v in cfg.items() if k not in ("paper_top1", "pretraining")} for tag, cfg in PRETRAINED.items()
})


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered CvT variants, optionally filtered by a shell-style pattern."""
    return sorted(n for n in ZOO if fnmatch.fnmatch(n, pattern))


def list_pretrained(pattern: str = "*") -> list[str]:
    """The released checkpoints as `name.tag` (what `pretrained=True` downloads), filtered by a pattern."""
    return [tag for tag in PRETRAINED if fnmatch.fnmatch(tag, pattern)]


def unknown_model_error(name: str) -> ValueError:
    close = difflib.get_close_matches(name, [*ZOO, *PRETRAINED], n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model {name!r}{hint} (available: {', '.join(list_models())}; with weights: "
                      f"{', '.join(list_pretrained())})")


def released_cfg(name: str) -> dict[str, Any]:
    """The cfg of a released checkpoint, `name.tag`, or of a model's default one; an unknown name is an error."""
    variant = name.split(".")[0]
    if variant not in ZOO or (name != variant and name not in PRETRAINED):
        raise unknown_model_error(name)
    return PRETRAINED.get(name, ZOO[variant][1])


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CvT) -> dict[str, torch.Tensor]:
    """A hub checkpoint (transformers' names) or an official one in the model's names, for timm's loader."""
    state_dict = official_names(state_dict)
    for key, value in model.state_dict().items():  # BatchNorm's batch counters, which converted files may lack
        if key.endswith("num_batches_tracked"):
            state_dict.setdefault(key, torch.zeros_like(value))
    return state_dict


def _build(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """A zoo model through timm's builder: the released weights downloaded from the Hugging Face Hub with
    `pretrained` (its cache, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT are honoured; `model.safetensors`
    before `pytorch_model.bin`, read with weights_only), the stem adapted to `in_chans`, a head of another
    `num_classes` freshly initialised, `features_only` through timm's feature machinery."""
    variant = name.split(".")[0]
    try:
        model = build_model_with_cfg(CvT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                     feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2)),
                                     **dict(ARCHITECTURES[variant], **kwargs))
    except OSError as e:  # huggingface_hub's errors for a missing download or an offline cache miss
        tag = kwargs.get("pretrained_cfg")  # what timm.create_model passes for `name.tag`
        repo = released_cfg(f"{variant}.{tag}" if tag else variant)["hf_hub_id"]
        raise FileNotFoundError(
            f"the weights of {name} could not be had from the Hugging Face Hub repo {repo} (model.safetensors or "
            f"pytorch_model.bin): {type(e).__name__}: {str(e).splitlines()[0].rstrip('.')}. With a connection, "
            f"run it again (or `hf download {repo}`) and it is cached; without one, pass a local file or folder "
            f"instead: cvt.create_model({variant!r}, pretrained=PATH)") from None
    net = model.model if isinstance(model, FeatureGetterNet) else model
    net.model_name = variant
    # timm keeps the zoo cfg's input size; a model built at another size (or channel count) is run at its own.
    if tuple(net.pretrained_cfg.get("input_size", ())) != (net.in_chans, *net.img_size):
        net.pretrained_cfg = net.default_cfg = dict(net.pretrained_cfg, input_size=(net.in_chans, *net.img_size))
    return model


def create_model(
    name: str,
    num_classes: int | None = None,
    pretrained: bool | str | os.PathLike | Checkpoint | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2),
    **overrides: Any,
) -> nn.Module:
    """Build a registered CvT variant.

    Args:
        name: a name from `list_models()`, or a released checkpoint's `name.tag` (`list_pretrained()`).
        num_classes: classifier outputs. Default: the checkpoint's when `pretrained` is given, else 1000. A value
            that differs from the checkpoint's re-initialises the head (and says so).
        pretrained: True downloads the released weights from the Hugging Face Hub (the tag's, else the
            architecture's default; `_build`). A path reads local weights: an official `.pth`, a `.safetensors`
            file, a Hugging Face CvT directory, a directory written by `save_pretrained` or a `cvt train`
            checkpoint (or a `cvt.weights.Checkpoint` already read), whose config decides the architecture.
        features_only: the stage maps named by `out_indices`, through timm's `FeatureGetterNet` (`feature_info`
            is timm's `FeatureInfo`).
        overrides: any `CvT` argument (e.g. `drop_path_rate=0.2`, `act_layer="gelu"`, `in_chans=1`,
            `device="meta"`).
    """
    meta = released_cfg(name)
    variant = name.split(".")[0]
    if pretrained is None or isinstance(pretrained, bool):
        classes = {} if num_classes is None else {"num_classes": num_classes}
        features = dict(features_only=True, out_indices=out_indices) if features_only else {}
        return _build(variant, bool(pretrained), pretrained_cfg=name.partition(".")[2] or None,
                      **classes, **features, **overrides)
    arch = ZOO[variant][0]
    checkpoint = load_checkpoint(pretrained)
    _check_model_name(checkpoint, variant)
    wanted_classes = checkpoint.num_classes if num_classes is None else num_classes
    model = CvT(num_classes=wanted_classes, **{**arch, **checkpoint.model_args, **overrides})
    load_state_dict(model, checkpoint.state_dict, checkpoint.source)
    model.pretrained_cfg = model.default_cfg = dict(_loaded_cfg(meta, model, checkpoint, overrides),
                                                    architecture=variant)
    model.model_name = variant
    if features_only:
        return FeatureGetterNet(model, out_indices=list(out_indices))
    return model


def _entry_point(name: str, pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> nn.Module:
    """What timm.create_model calls: pretrained True or False goes through timm's builder with the cfg timm
    resolved (`pretrained_cfg`); a local path (also as timm's `pretrained_cfg_overlay=dict(file=PATH)`) through
    `create_model`."""
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    if isinstance(pretrained, bool) and not (pretrained and "file" in overlay):
        return _build(name, pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("cache_dir", None)
    return create_model(name, pretrained=overlay["file"] if pretrained is True else pretrained, **kwargs)


@register_model
def cvt_13_224(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    return _entry_point("cvt_13_224", pretrained, **kwargs)


@register_model
def cvt_13_384(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    return _entry_point("cvt_13_384", pretrained, **kwargs)


@register_model
def cvt_21_224(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    return _entry_point("cvt_21_224", pretrained, **kwargs)


@register_model
def cvt_21_384(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    return _entry_point("cvt_21_384", pretrained, **kwargs)


@register_model
def cvt_w24_384(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    return _entry_point("cvt_w24_384", pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Loading weights into a model: official names, checked against the architecture

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
    checkpoint = load_checkpoint(path)
    load_state_dict(model, checkpoint.state_dict, checkpoint.source)
    return model


def model_from_checkpoint(source: str | os.PathLike | Checkpoint, model_name: str | None = None,
                          num_classes: int | None = None, **overrides: Any) -> CvT:
    """A model built as the checkpoint describes, with its weights: through `create_model` when the zoo name is
    known (given, or saved in the checkpoint), else straight from the checkpoint's config."""
    checkpoint = load_checkpoint(source)
    if model_name:
        _check_model_name(checkpoint, model_name.split(".")[0])
    name = model_name or checkpoint.model_name
    if name:
        return create_model(name, num_classes=num_classes, pretrained=checkpoint, **overrides)
    if not checkpoint.model_args:
        raise ValueError(f"{checkpoint.source} is a bare state dict that does not say which model it is: name it, "
                         f"e.g. cvt.create_model('cvt_13_224', pretrained={checkpoint.source!r}) or "
                         f"`cvt convert --model NAME`; {describe_state_dict(checkpoint.state_dict)}")
    model = CvT(num_classes=checkpoint.num_classes if num_classes is None else num_classes,
                **dict(checkpoint.model_args, **overrides))
    load_state_dict(model, checkpoint.state_dict, checkpoint.source)
    base = dict(eval_data_cfg(model.img_size, model.in_chans), num_classes=model.num_classes)
    model.pretrained_cfg = model.default_cfg = _loaded_cfg(base, model, checkpoint, overrides)
    return model


def _loaded_cfg(base: dict[str, Any], model: CvT, checkpoint: Checkpoint, overrides: dict[str, Any]) -> dict[str, Any]:
    """The pretrained_cfg of a model built from a checkpoint: `base` (its zoo cfg, or the paper's preprocessing at
    its size), the model's own input size, and over them what the checkpoint says (label names, and the
    preprocessing it was trained or evaluated with: input size, crop, ...). An `img_size` or `in_chans` the caller
    overrides builds another model, which runs at its own size."""
    saved = dict(checkpoint.pretrained_cfg)
    if "img_size" in overrides or "in_chans" in overrides:
        saved.pop("input_size", None)
    cfg = {**base, "input_size": (model.in_chans, *model.img_size), **saved}
    cfg["input_size"] = tuple(cfg["input_size"])  # a list after a trip through JSON
    return cfg


def load_model(checkpoint: str | os.PathLike | Checkpoint | None = None, model_name: str | None = None, *,
               random_weights: bool = False, num_classes: int | None = None, **overrides: Any) -> CvT:
    """The model that a command's weights arguments name, its preprocessing in `pretrained_cfg` (which
    `timm.data.resolve_model_data_config` reads): every command that takes weights loads them through this.

    `checkpoint`: any file or folder `create_model(..., pretrained=PATH)` reads, built as `model_from_checkpoint`
    builds it (`model_name` needed only for a bare state dict). Without one, the released weights of `model_name`
    (`name` or `name.tag`) downloaded from the Hugging Face Hub, or with `random_weights` none at all.
    `num_classes` and `overrides` as `create_model` takes them."""
    if checkpoint is not None:
        return model_from_checkpoint(checkpoint, model_name, num_classes=num_classes, **overrides)
    if model_name is None and random_weights:
        raise ValueError("no weights and no model: give local weights (--checkpoint PATH) or the model to build "
                         "with random weights (--model NAME, see cvt.list_models())")
    if model_name is None:
        raise ValueError("no weights to classify with: name the released ones to download (--model NAME or "
                         "NAME.TAG, see cvt.list_pretrained()) or give local ones (--checkpoint PATH)")
    return create_model(model_name, num_classes=num_classes, pretrained=not random_weights, **overrides)


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


def _check_model_name(checkpoint: Checkpoint, expect_model: str) -> None:
    if checkpoint.kind == "hf":
        # A Hugging Face config has no image size: any zoo model of the same architecture fits. It leaves out
        # what equals the defaults, which are CvT's.
        defaults = {k: p.default for k, p in inspect.signature(CvT).parameters.items()}
        candidates = _zoo_matches({**defaults, **checkpoint.model_args})
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


def stage_shapes(state_dict: dict[str, torch.Tensor]) -> dict[int, tuple[int, int]]:
    """Stage -> (width, depth) for each stage whose token embedding a state dict holds, read off its shapes."""
    return {i: (state_dict[f"stage{i}.patch_embed.proj.weight"].shape[0],
                len({k.split(".")[2] for k in state_dict if k.startswith(f"stage{i}.blocks.")}))
            for i in range(NUM_STAGES) if f"stage{i}.patch_embed.proj.weight" in state_dict}


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """What architecture a state dict looks like, read off its shapes."""
    if "stage0.patch_embed.proj.weight" not in state_dict:
        return (f"it is not a CvT checkpoint: it has no stage0.patch_embed.proj.weight "
                f"(its first keys: {', '.join(list(state_dict)[:5])})")
    stages = stage_shapes(state_dict).values()
    arch = {"embed_dims": [width for width, _ in stages], "depths": [depth for _, depth in stages]}
    shapes = f"embed_dims {arch['embed_dims']}, depths {arch['depths']}"
    matches = _zoo_matches(arch)
    if matches:
        return f"the checkpoint looks like {' / '.join(matches)} ({shapes})"
    return f"the checkpoint has {shapes}, which is no zoo model"

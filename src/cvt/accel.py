"""Acceleration: the speed-ups, as explicit rewrites of a built `CvT`, beside the reference model.

The model in `cvt.model` computes the paper's way on every device. Everything here takes a built model and
returns one that computes the same function faster, by swapping or rewriting modules; nothing here changes the
process (no allocator, no global flag, no op registered at import).

    fast = cvt.optimize_for_inference(model)          # every inference speed-up that helps on its device
    fast = cvt.optimize_for_inference(model, compile=False, logits_only=False)   # each one can be turned off

    cvt.accel.accelerate_training(model)              # in place: the training speed-ups (the engine's train.accel)

The speed-ups, each its own function (BENCHMARKS.md says what each buys, on which machine):

- `fold_batchnorm`: every depth-wise conv + BatchNorm projection becomes one conv (inference);
- `class_token_only`: the last block computes the class token alone (`ClassTokenBlock`), for a classifier
  that reads only the class token (inference);
- `use_onednn_linears`: the float32 CPU products of the linear layers by oneDNN instead of MKL (`OneDNNLinear`);
- `use_tap_sums`: the depth-wise projections as sums of shifted slices (`TapSumConv2d`), which inductor fuses
  with the norms around them into one pass on a GPU;
- `use_float32_depthwise_convs`: the depth-wise projections in float32 under CPU bfloat16 training
  (`Float32DepthwiseConv2d`), whose bfloat16 backward pass is a slow path;
- `compile_model`: `torch.compile(fullgraph=True)`, with CUDA graphs on a GPU.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import Attention, Block, CvT, Projection

__all__ = ["optimize_for_inference", "accelerate_training", "fold_batchnorm", "class_token_only", "use_onednn_linears",
           "use_tap_sums", "use_float32_depthwise_convs", "compile_model", "reference_module", "ClassTokenAttention",
           "ClassTokenBlock", "OneDNNLinear", "TapSumConv2d", "Float32DepthwiseConv2d"]


def reference_module(model: nn.Module) -> nn.Module:
    """The module a compiled model (`torch.compile`'s wrapper) runs, or the model itself: what tools inspect."""
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------------------------
# Rewrites for inference

def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each projection's BatchNorm (eval statistics) into its depth-wise conv, in place; returns the model.

    The folded conv keeps the name `conv` and gains a bias. Projections without BatchNorm are left as they are.
    """
    for module in model.modules():
        if isinstance(module, Attention):
            for name in ("conv_proj_q", "conv_proj_k", "conv_proj_v"):
                proj = getattr(module, name)
                if hasattr(proj, "conv") and hasattr(proj, "bn"):
                    setattr(module, name, Projection(OrderedDict([("conv", fuse_conv_bn_eval(proj.conv, proj.bn))])))
    return model


class ClassTokenAttention(Attention):
    """`Attention` with the class token's query alone: keys and values still come from every token."""

    def qkv(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls_token, tokens = x[:, :1], x[:, 1:]
        x_map = tokens.transpose(1, 2).unflatten(2, (h, w))
        k = torch.cat((cls_token, self.conv_proj_k(x_map)), dim=1)
        v = torch.cat((cls_token, self.conv_proj_v(x_map)), dim=1)
        return self.heads(self.proj_q(cls_token)), self.heads(self.proj_k(k)), self.heads(self.proj_v(v))


class ClassTokenBlock(nn.Module):
    """The last block of a classifier that reads the class token alone, for inference: only the class token is
    computed (one row instead of 1 + H*W through the query, the attention output, its projection and the MLP);
    the other tokens leave the block as they entered it. Same parameters, same names as the `Block`."""

    def __init__(self, block: Block):
        super().__init__()
        if not block.attn.with_cls_token:
            raise ValueError("ClassTokenBlock needs a block with a class token (the last stage's)")
        self.norm1 = block.norm1
        self.attn = copy.copy(block.attn)
        self.attn.__class__ = ClassTokenAttention
        self.norm2, self.mlp = block.norm2, block.mlp

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        cls_token = x[:, :1] + self.attn(self.norm1(x), h, w)
        cls_token = cls_token + self.mlp(self.norm2(cls_token))
        return torch.cat((cls_token, x[:, 1:]), dim=1)


def class_token_only(model: CvT) -> CvT:
    """Make the last block a `ClassTokenBlock`, in place; returns the model.

    The logits and the class token are the model's; the last stage's map (`forward_intermediates`, the patch
    tokens of `forward_features`) is then the one entering that block.
    """
    if model.global_pool != "token":
        raise ValueError("class_token_only needs a classifier that reads the class token (global_pool='token'); "
                         "this model averages every token, so all of them are needed")
    blocks = model.stages[-1].blocks
    if len(blocks):
        blocks[-1] = ClassTokenBlock(blocks[-1])
    return model


# ---------------------------------------------------------------------------------------------------------------
# Module swaps: same parameters, same names, the same function computed another way

class OneDNNLinear(nn.Linear):
    """`nn.Linear` that multiplies (B, tokens, C) sequences on the CPU as a 1x1 convolution, i.e. with oneDNN.

    PyTorch sends a float32 CPU matmul to MKL; a 1x1 convolution over a (B, C, tokens, 1) channels-last view of
    the sequence is the same product done by oneDNN, forward and backward, with no copies. The dilation changes
    nothing for a 1x1 kernel: PyTorch gives an undilated 1x1 convolution on one thread with fewer than 16 images
    to its own im2col + MKL path instead of oneDNN, and a dilated one to oneDNN, except a single image of at most
    `SINGLE_IMAGE_VALUES` values, which would take its slow dilated-convolution loop; that one is `F.linear`'s.
    Other devices and shapes take `F.linear`.
    """

    SINGLE_IMAGE_VALUES = 20480  # ATen's ConvParams::use_mkldnn threshold for a single image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 3 or (x.shape[0] == 1 and x.numel() <= self.SINGLE_IMAGE_VALUES):
            return F.linear(x, self.weight, self.bias)
        y = F.conv2d(x.unsqueeze(2).permute(0, 3, 1, 2), self.weight[:, :, None, None], self.bias, dilation=2)
        return y.permute(0, 2, 3, 1).flatten(1, 2)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Make every `nn.Linear` in `model` a `OneDNNLinear`, in place; returns it. The parameters are the same
    objects, so an optimizer built before still holds them."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model


class TapSumConv2d(nn.Conv2d):
    """A depth-wise `nn.Conv2d` computed as the sum over its kernel taps of strided slices of the padded input.

    Compiled, inductor fuses the taps with the BatchNorm, the LayerNorm before and the layout change after into
    one pass over the tokens, where a conv kernel is a pass of its own with copies to and from its layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        h_out = (x.shape[2] + 2 * ph - kh) // sh + 1
        w_out = (x.shape[3] + 2 * pw - kw) // sw + 1
        x = F.pad(x, (pw, pw, ph, ph))
        weight = self.weight.squeeze(1)  # (C, kh, kw)
        out = self.bias[:, None, None] if self.bias is not None else 0
        for i in range(kh):
            for j in range(kw):
                tap = x[:, :, i:i + sh * (h_out - 1) + 1:sh, j:j + sw * (w_out - 1) + 1:sw]
                out = out + tap * weight[:, i, j, None, None]
        return out


def use_tap_sums(model: nn.Module) -> nn.Module:
    """Make every depth-wise conv of the projections a `TapSumConv2d`, in place; returns it."""
    return _swap_depthwise_convs(model, TapSumConv2d)


class Float32DepthwiseConv2d(nn.Conv2d):
    """A depth-wise `nn.Conv2d` computed in float32 whatever the input's dtype and autocast say.

    PyTorch's CPU backward pass of a strided depth-wise conv in bfloat16 or float16 is a slow path, many times
    float32's (benchmarks/gemm.py); the forward pass is as fast in either. The output is float32, which the
    BatchNorm after it takes as it is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.conv2d(x.float(), self.weight.float(), bias, self.stride, self.padding, self.dilation,
                            self.groups)


def _swap_depthwise_convs(model: nn.Module, cls: type[nn.Conv2d]) -> nn.Module:
    for module in model.modules():
        if isinstance(module, Projection) and hasattr(module, "conv"):
            conv = module.conv
            if not (conv.groups == conv.in_channels == conv.out_channels and conv.dilation == (1, 1)
                    and conv.padding_mode == "zeros"):
                raise ValueError(f"{cls.__name__} computes depth-wise convolutions without dilation, got {conv}")
            conv.__class__ = cls
    return model


def use_float32_depthwise_convs(model: nn.Module) -> nn.Module:
    """Make every depth-wise conv of the projections a `Float32DepthwiseConv2d`, in place; returns it."""
    return _swap_depthwise_convs(model, Float32DepthwiseConv2d)


def compile_model(model: nn.Module, cuda_graphs: bool = False) -> nn.Module:
    """`torch.compile(model, fullgraph=True, dynamic=False)` with inductor's layout optimisation off.

    The optimisation turns the (B, C, tokens, 1) views that `OneDNNLinear` hands to oneDNN channels-first and
    copies them back after every product. `dynamic=False`: a new batch size or resolution gets kernels of its
    own, not slower shape-generic ones. `cuda_graphs=True` replays each call as one CUDA graph, which removes the
    launch overhead that dominates small batches; the output then lives in memory the next call overwrites, so
    copy what you keep (`out.clone()`).
    """
    options = {"layout_optimization": False, "triton.cudagraphs": cuda_graphs}
    return torch.compile(model, fullgraph=True, dynamic=False, options=options)


# ---------------------------------------------------------------------------------------------------------------
# The two entry points

def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def optimize_for_inference(model: CvT, *, fold_bn: bool = True, logits_only: bool | None = None,
                           onednn_linears: bool | None = None, tap_sums: bool | None = None, compile: bool = True,
                           cuda_graphs: bool | None = None) -> nn.Module:
    """The fastest inference module for `model` on its device and dtype: an eval-mode copy, without gradients,
    whose outputs equal the model's to float rounding (1e-4 in float32). The input model is not modified.

    Every speed-up is on by default where it helps (BENCHMARKS.md); each can be turned off:

    - `fold_bn`: BatchNorm folded into the depth-wise convs (`fold_batchnorm`);
    - `logits_only`: the last block computes the class token alone (`class_token_only`); default: on for a
      classifier that reads the class token. The logits are the model's; the last stage's map is then the one
      entering that block;
    - `onednn_linears`: CPU products by oneDNN (`use_onednn_linears`); default: on the CPU;
    - `tap_sums`: depth-wise convs as fused tap sums (`use_tap_sums`); default: on a GPU when compiled;
    - `compile`: `torch.compile` (`compile_model`); the first call of each input shape compiles;
    - `cuda_graphs`: default: on a GPU when compiled.

    Tools (`cvt.count_macs`, `cvt.inspect`, `cvt.export`) accept the result: they look through the compiled
    wrapper (`reference_module`) and count or draw what the rewritten model computes.
    """
    if not isinstance(model, CvT):
        raise TypeError(f"optimize_for_inference expects a cvt.CvT, got {type(model).__name__}; for features_only "
                        "models pass the wrapped model (features.model)")
    on_gpu = _model_device(model).type == "cuda"
    logits_only = model.global_pool == "token" if logits_only is None else logits_only
    onednn_linears = _model_device(model).type == "cpu" if onednn_linears is None else onednn_linears
    tap_sums = on_gpu and compile if tap_sums is None else tap_sums
    cuda_graphs = on_gpu and compile if cuda_graphs is None else cuda_graphs
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    if fold_bn:
        fold_batchnorm(fast)
    if logits_only:
        class_token_only(fast)
    if onednn_linears:
        use_onednn_linears(fast)
    if tap_sums:
        use_tap_sums(fast)
    return compile_model(fast, cuda_graphs=cuda_graphs) if compile else fast


def accelerate_training(model: nn.Module, device: torch.device | None = None, compiled: bool = False) -> nn.Module:
    """The training speed-ups that help on `device` (default: the model's), in place; returns the model.

    Module swaps only, so parameters, names and checkpoints stay the model's, and the optimizer may be built
    before or after. On the CPU: `use_onednn_linears` and `use_float32_depthwise_convs` (which matters under
    bfloat16 or float16 autocast). On a GPU, for a model that will be compiled (`compiled`; compiling is the
    caller's, the engine's `model.compile`): `use_tap_sums`.
    """
    device = device or _model_device(model)
    if device.type == "cpu":
        use_float32_depthwise_convs(use_onednn_linears(model))
    elif device.type == "cuda" and compiled:
        use_tap_sums(model)
    return model

"""Fast inference: `optimize_for_inference(model)` rewrites a loaded CvT into an equivalent, faster module.

Fusing is a step after loading: weights load into the plain `CvT` (official names), then

    fast = cvt.optimize_for_inference(model)

returns a copy whose outputs equal the original's (eval mode) to float rounding. What it changes:

- every depth-wise conv + BatchNorm projection becomes one conv with the BatchNorm folded into it;
- k and v, which read the same map with the same stride, come from one depth-wise conv with channel
  multiplier 2 and one batched matrix product, instead of two convs, two norms and two linears;
- the convolution weights are made channels-last, so every conv writes the (B, H, W, C) layout the token
  sequence already has and the LayerNorm after the embedding reads it without a copy.

The result is for inference only (BatchNorm statistics are baked in). Two more steps, for training too:
`use_onednn_linears` (float32 CPU products by oneDNN instead of MKL) and `compile_model` (`torch.compile` with
`fullgraph=True`). Our fastest CPU inference is `compile_model(use_onednn_linears(optimize_for_inference(m)))`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import Attention, CvT

__all__ = ["optimize_for_inference", "use_onednn_linears", "compile_model", "FusedKVAttention", "OneDNNLinear"]


class OneDNNLinear(nn.Linear):
    """`nn.Linear` that multiplies token sequences on the CPU as a 1x1 convolution, i.e. with oneDNN.

    PyTorch sends a float32 CPU matmul to MKL, whose sgemm runs at about half oneDNN's speed on the AMD CPUs
    measured in BENCHMARKS.md; a 1x1 convolution over a (B, C, tokens, 1) channels-last view of the
    (B, tokens, C) sequence is the same product done by oneDNN, forward and backward, with no copies.
    Other devices, and inputs that are not (B, tokens, C), use `F.linear`. Parameters and names are nn.Linear's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 3:
            return F.linear(x, self.weight, self.bias)
        y = F.conv2d(x.unsqueeze(2).permute(0, 3, 1, 2), self.weight[:, :, None, None], self.bias)
        return y.permute(0, 2, 3, 1).flatten(1, 2)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Make every `nn.Linear` in `model` a `OneDNNLinear`, in place (same parameters, same names); returns it.

    Works for training and inference, eager and `torch.compile`; apply it before building the optimizer or not,
    the parameters are the same objects.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model


def _folded_conv(proj: nn.Sequential) -> nn.Conv2d:
    return fuse_conv_bn_eval(proj.conv, proj.bn)


class FusedKVAttention(Attention):
    """Attention with BatchNorm folded into the q conv and k, v computed together.

    The fused k/v conv has groups = width and 2 x width outputs: output channels 2i and 2i + 1 are k's and v's
    channel i. Its map is read as (2, B, tokens, width) and projected by one batched matrix product with the
    stacked k and v weights.
    """

    def __init__(self, attn: Attention):
        nn.Module.__init__(self)  # not Attention.__init__: the layers are taken from `attn`, not built afresh
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.with_cls_token = attn.with_cls_token
        self.fused_attn = attn.fused_attn
        self.attn_drop_rate = attn.attn_drop_rate
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.proj_q = attn.proj_q
        self.conv_proj_q = _folded_conv(attn.conv_proj_q)
        conv_k, conv_v = _folded_conv(attn.conv_proj_k), _folded_conv(attn.conv_proj_v)
        dim = conv_k.in_channels
        self.conv_proj_kv = nn.Conv2d(dim, 2 * dim, conv_k.kernel_size, stride=conv_k.stride,
                                      padding=conv_k.padding, groups=dim, bias=True)
        with torch.no_grad():
            self.conv_proj_kv.weight.copy_(torch.stack((conv_k.weight, conv_v.weight), dim=1).flatten(0, 1))
            self.conv_proj_kv.bias.copy_(torch.stack((conv_k.bias, conv_v.bias), dim=1).flatten())
        # baddbmm computes bias + tokens @ weight: store the transposed weights (2, in, out) and biases (2, 1, out).
        self.kv_weight = nn.Parameter(torch.stack((attn.proj_k.weight, attn.proj_v.weight)).transpose(1, 2)
                                      .contiguous().detach())
        biases = [torch.zeros(dim) if lin.bias is None else lin.bias for lin in (attn.proj_k, attn.proj_v)]
        self.kv_bias = nn.Parameter(torch.stack(biases).unsqueeze(1).detach())

    def qkv(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        if self.with_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        x_map = x.transpose(1, 2).unflatten(2, (h, w))
        q = self.conv_proj_q(x_map).flatten(2).transpose(1, 2)
        kv = self.conv_proj_kv(x_map).flatten(2).unflatten(1, (-1, 2)).permute(2, 0, 3, 1)  # (2, B, tokens, C)
        if self.with_cls_token:
            q = torch.cat((cls_token, q), dim=1)
            kv = torch.cat((cls_token.expand(2, -1, -1, -1), kv), dim=2)
        tokens = kv.shape[2]
        kv = torch.baddbmm(self.kv_bias, kv.reshape(2, b * tokens, -1), self.kv_weight)
        k, v = kv.view(2, b, tokens, self.num_heads, -1).transpose(2, 3).unbind(0)
        q = self.proj_q(q).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        return q, k, v


def optimize_for_inference(model: CvT) -> CvT:
    """An eval-mode copy of `model` with BatchNorms folded, k and v fused and channels-last convolutions.

    Attention layers with the `avg` or `linear` projections have no BatchNorm and no k/v conv to fuse and
    are kept as they are. The input model is not modified.
    """
    if not isinstance(model, CvT):
        raise TypeError(f"optimize_for_inference expects a cvt.CvT, got {type(model).__name__}; for features_only "
                        "models pass the wrapped model (features.model)")
    fast = copy.deepcopy(model).eval()
    for stage in fast.stages:
        for block in stage.blocks:
            attn = block.attn
            if isinstance(attn.conv_proj_k, nn.Sequential) and hasattr(attn.conv_proj_k, "bn"):
                block.attn = FusedKVAttention(attn)
    for module in fast.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    return fast.requires_grad_(False)


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile(model, fullgraph=True, dynamic=False)` with inductor's layout optimisation off.

    The optimisation turns the (B, C, tokens, 1) views that `OneDNNLinear` hands to oneDNN channels-first and
    copies them back after every product; without it the token sequences stay as they are (BENCHMARKS.md).
    `dynamic=False`: a new batch size or resolution gets kernels of its own, not slower shape-generic ones.
    """
    return torch.compile(model, fullgraph=True, dynamic=False, options={"layout_optimization": False})

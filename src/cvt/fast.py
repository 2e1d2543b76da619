"""Fast inference: `optimize_for_inference(model)` rewrites a loaded CvT into an equivalent, faster module.

Fusing is a step after loading: weights load into the plain `CvT` (official names), then

    fast = cvt.optimize_for_inference(model)

returns a copy whose outputs equal the original's (eval mode) to float rounding. What it changes:

- every depth-wise conv + BatchNorm projection becomes one conv with the BatchNorm folded into it;
- k and v, which read the same map with the same stride, come from one depth-wise conv with channel
  multiplier 2 instead of two convs and two norms;
- the convolution weights are made channels-last, so every conv writes the (B, H, W, C) layout the token
  sequence already has and the LayerNorm after the embedding reads it without a copy.

The result is for inference only (BatchNorm statistics are baked in). Two more steps, for training too:
`use_onednn_linears` (float32 CPU products by oneDNN instead of MKL) and `compile_model` (`torch.compile` with
`fullgraph=True`). Our fastest CPU classifier is
`compile_model(use_onednn_linears(optimize_for_inference(m, logits_only=True)))`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import Attention, CvT

__all__ = ["optimize_for_inference", "use_onednn_linears", "compile_model", "ClassTokenBlock", "FusedKVAttention",
           "OneDNNLinear"]


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
    """Attention with BatchNorm folded into the q conv, and k and v from one depth-wise conv.

    The fused k/v conv has groups = width and 2 x width outputs: output channels 2i and 2i + 1 are k's and v's
    channel i. k and v then go through their own linears: one batched product of the stacked k and v weights
    (`baddbmm`) ran 3-8% slower on the CPU, where batched products go to MKL and linears can go to oneDNN
    (`use_onednn_linears`).
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
        self.proj_q, self.proj_k, self.proj_v = attn.proj_q, attn.proj_k, attn.proj_v
        self.conv_proj_q = _folded_conv(attn.conv_proj_q)
        conv_k, conv_v = _folded_conv(attn.conv_proj_k), _folded_conv(attn.conv_proj_v)
        dim = conv_k.in_channels
        self.conv_proj_kv = nn.Conv2d(dim, 2 * dim, conv_k.kernel_size, stride=conv_k.stride,
                                      padding=conv_k.padding, groups=dim, bias=True)
        with torch.no_grad():
            self.conv_proj_kv.weight.copy_(torch.stack((conv_k.weight, conv_v.weight), dim=1).flatten(0, 1))
            self.conv_proj_kv.bias.copy_(torch.stack((conv_k.bias, conv_v.bias), dim=1).flatten())

    def qkv(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.with_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        x_map = x.transpose(1, 2).unflatten(2, (h, w))
        q = self.conv_proj_q(x_map).flatten(2).transpose(1, 2)
        kv = self.conv_proj_kv(x_map).flatten(2).transpose(1, 2)  # (B, tokens, 2C), k and v channels interleaved
        k, v = kv[..., 0::2], kv[..., 1::2]
        if self.with_cls_token:
            q, k, v = (torch.cat((cls_token, t), dim=1) for t in (q, k, v))
        q, k, v = (proj(t).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for proj, t in ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v)))
        return q, k, v


class ClassTokenBlock(nn.Module):
    """The last block of a classifier that reads the class token alone: only the class token is computed.

    Keys and values still come from every token, but the attention output, its projection and the MLP are the
    class token's only (one row instead of 1 + H*W); the other tokens leave the block as they entered it.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.norm1(x), h, w)
        attended = F.scaled_dot_product_attention(q[:, :, :1], k, v, scale=self.attn.scale)
        cls_token = x[:, :1] + self.attn.proj(attended.transpose(1, 2).flatten(2))
        cls_token = cls_token + self.mlp(self.norm2(cls_token))
        return torch.cat((cls_token, x[:, 1:]), dim=1)


def optimize_for_inference(model: CvT, logits_only: bool = False) -> CvT:
    """An eval-mode copy of `model` with BatchNorms folded, k and v fused and channels-last convolutions.

    Attention layers with the `avg` or `linear` projections have no BatchNorm and no k/v conv to fuse and
    are kept as they are. The input model is not modified.

    `logits_only=True` (a classifier reading the class token) also computes only the class token in the last
    block (`ClassTokenBlock`): the logits and the class token are the original's, while the last stage's map
    (`forward_intermediates`, the patch tokens of `forward_features`) is then the one entering that block.
    """
    if not isinstance(model, CvT):
        raise TypeError(f"optimize_for_inference expects a cvt.CvT, got {type(model).__name__}; for features_only "
                        "models pass the wrapped model (features.model)")
    if logits_only and model.global_pool != "token":
        raise ValueError("logits_only needs a classifier that reads the class token (global_pool='token'); "
                         "this model averages every token, so all of them are needed")
    fast = copy.deepcopy(model).eval()
    for stage in fast.stages:
        for block in stage.blocks:
            attn = block.attn
            if isinstance(attn.conv_proj_k, nn.Sequential) and hasattr(attn.conv_proj_k, "bn"):
                block.attn = FusedKVAttention(attn)
    if logits_only:
        last_stage = fast.stages[-1]
        last_stage.blocks[-1] = ClassTokenBlock(last_stage.blocks[-1])
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

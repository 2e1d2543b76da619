"""Multiply-accumulate counts by the paper's convention.

The paper's GFLOPs are multiply-accumulates counted per module as the official code does: convolutions,
linears and the two attention matrix products (q k^T and attn v). Norms, softmax, activations and pooling are
not counted. Counted by running the model once on a zero image with forward hooks, so every option of the model
(projection method, strides, class tokens, position embeddings, any input size) is counted as it runs.

An accelerated model (`cvt.optimize_for_inference`) is counted as it computes: its compiled wrapper is looked
through, and with `logits_only` the last block's query, MLP and projections count the class token alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .accel import reference_module
from .model import Attention

__all__ = ["count_macs", "count_params", "macs_by_module"]


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return output.numel() * per_output


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _attention_macs(module: Attention, q: torch.Tensor, k: torch.Tensor) -> int:
    # q k^T and attn v: each is queries x keys x width multiply-accumulates.
    batch, heads, queries, head_dim = q.shape
    return 2 * batch * queries * k.shape[2] * heads * head_dim


def macs_by_module(model: nn.Module, img_size: int | tuple[int, int], in_chans: int | None = None) -> dict[str, int]:
    """MACs for one image, per named module (convs, linears, attention products)."""
    model = reference_module(model)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    in_chans = in_chans or getattr(model, "in_chans", 3)
    counts: dict[str, int] = {}
    handles = []

    def add(name: str, value: int) -> None:
        counts[name] = counts.get(name, 0) + value

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: add(n, _conv_macs(m, o))))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, i, o, n=name: add(n, _linear_macs(m, o))))
        elif isinstance(module, Attention):
            original = module.attend

            def counting_attend(q, k, v, m=module, n=name, original=original):
                add(f"{n}.matmul", _attention_macs(m, q, k))
                return original(q, k, v)

            module.attend = counting_attend
            handles.append(module)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, in_chans, h, w, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in handles:
            if isinstance(handle, Attention):
                del handle.attend
            else:
                handle.remove()
    return counts


def count_macs(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int | None = None) -> int:
    """Multiply-accumulates for one image of `img_size` (an int or (H, W)) by the paper's convention."""
    return sum(macs_by_module(model, img_size, in_chans).values())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

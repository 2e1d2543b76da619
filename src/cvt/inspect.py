"""Looking inside a CvT: class-token attention maps, attention rollout and a per-stage cost profile.

Attention weights are taken from the model as it runs: a forward pre-hook on every `Attention` recomputes its
q and k with `Attention.qkv` and the weights with `Attention.attention_probs`, the reference computation, so
nothing of the model is re-implemented here.

Rollout across CvT's strided keys. Rollout (Abnar & Zuidema, 2020) multiplies the blocks' head-averaged attention
matrices, each mixed with the identity for the residual connection and renormalised, and needs square token x
token matrices. CvT's keys are not the tokens: k and v come from a strided depth-wise convolution (or pooling) of
the token map, so each block's matrix is queries x (fewer) keys. Each key is mapped back onto the tokens it stands
for, by the k/v projection's stride: every token goes to the nearest key whose window covers it, so a key at
stride 2 owns a 2x2 block of tokens and shares its weight evenly among them (nearest-neighbour upsampling of the
key map). Rows keep summing to one, and a uniform attention stays uniform over the tokens; spreading each key over
its whole, overlapping window instead would give the tokens that two windows share double weight, a checkerboard
that rollout's products amplify block after block. The class token is its own key. Rollout runs over the blocks of
the last stage, the only one with a class token; stages are joined by a convolutional token embedding, not by
attention, so there is no attention to roll out across them.

An accelerated model (`cvt.optimize_for_inference`) gives the same maps: its compiled wrapper is looked through,
and a last block that computes the class token alone (`logits_only`) still gives the class token's row, which
is all that the maps and the rollout's last step read.
"""
from __future__ import annotations

import os
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .accel import reference_module
from .files import save_figure
from .flops import macs_by_module
from .model import IMAGENET_MEAN, IMAGENET_STD, Attention, CvT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["AttentionMaps", "StageProfile", "attention_maps", "draw_attention", "key_footprint", "load_image",
           "profile_stages", "watch_attention"]


@contextmanager
def watch_attention(model: nn.Module,
                    on_attention: Callable[[str, Attention, torch.Tensor, torch.Tensor, int, int], None]
                    ) -> Iterator[None]:
    """Call `on_attention(name, module, q, k, h, w)` for every attention layer as the model runs.

    q and k are (B, heads, tokens, head_dim), class token first where there is one; (h, w) is the token map's size.
    They are recomputed without gradient, so what the model itself saves for backward is unchanged.
    """
    def hook(name: str, module: Attention, args: tuple) -> None:
        x, h, w = args
        with torch.no_grad():
            q, k, _ = module.qkv(x, h, w)
        on_attention(name, module, q, k, h, w)

    handles = [module.register_forward_pre_hook(lambda m, args, n=name: hook(n, m, args))
               for name, module in model.named_modules() if isinstance(module, Attention)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _axis_owners(tokens: int, keys: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """(keys, tokens) along one axis: each token given to the nearest key whose window covers it, the first on a
    tie; rows normalised. A key that wins no token (a ceil-mode window hanging over the edge) keeps its window."""
    starts = torch.arange(keys)[:, None] * stride - padding
    position = torch.arange(tokens)
    covered = (position >= starts) & (position < starts + kernel)
    distance = (position - (starts + (kernel - 1) / 2)).abs().masked_fill(~covered, float("inf"))
    nearest = F.one_hot(distance.argmin(dim=0), keys).T.bool()
    owned = torch.where(nearest.any(dim=1, keepdim=True), nearest, covered).float()
    return owned / owned.sum(dim=1, keepdim=True)


def key_footprint(module: Attention, h: int, w: int) -> torch.Tensor:
    """(kh, kw, h*w): the tokens of the h x w map each image key of `module` stands for, as weights summing to one.

    The keys form a kh x kw map; each token belongs to the nearest key whose window covers it (see the module
    docstring). A layer without a k projection (position-wise `linear`) has one key per token.
    """
    if not len(module.conv_proj_k):
        return torch.eye(h * w).reshape(h, w, h * w)
    window = module.conv_proj_k[0]
    kernel, stride, padding = (_pair(v) for v in (window.kernel_size, window.stride, window.padding))
    ceil_mode = getattr(window, "ceil_mode", False)
    kh, kw = F.avg_pool2d(torch.zeros(1, 1, h, w), kernel, stride, padding, ceil_mode=ceil_mode).shape[-2:]
    rows = _axis_owners(h, kh, kernel[0], stride[0], padding[0])
    cols = _axis_owners(w, kw, kernel[1], stride[1], padding[1])
    return torch.einsum("at,bu->abtu", rows, cols).reshape(kh, kw, h * w)


def _with_class_token(footprint: torch.Tensor) -> torch.Tensor:
    """(1 + keys, 1 + tokens): the footprint as a matrix, the class token (its own key) first."""
    keys = footprint.flatten(0, 1)
    full = torch.zeros(keys.shape[0] + 1, keys.shape[1] + 1)
    full[0, 0] = 1.0
    full[1:, 1:] = keys
    return full


@dataclass
class AttentionMaps:
    """Where the class token looks, for a batch of images.

    last_block: (B, heads, 1 + kh*kw) the class token's attention weights in the last block, over itself and the
        image keys (each row sums to one). The keys form a kh x kw map (`key_grid`), coarser than the tokens.
    rollout: (B, 1 + h*w) the class token's row of the attention rollout over the last stage's blocks, over itself
        and the h x w image tokens (`token_grid`); sums to one.
    """

    last_block: torch.Tensor
    key_grid: tuple[int, int]
    rollout: torch.Tensor
    token_grid: tuple[int, int]

    def head_maps(self) -> torch.Tensor:
        """(B, heads, kh, kw) each head's class-token attention over the image keys."""
        return self.last_block[:, :, 1:].unflatten(-1, self.key_grid)

    def mean_map(self) -> torch.Tensor:
        """(B, kh, kw) the class-token attention averaged over heads."""
        return self.head_maps().mean(dim=1)

    def rollout_map(self) -> torch.Tensor:
        """(B, h, w) the rollout's class-token row over the image tokens."""
        return self.rollout[:, 1:].unflatten(-1, self.token_grid)


@torch.no_grad()
def attention_maps(model: CvT, images: torch.Tensor) -> AttentionMaps:
    """Class-token attention of the last block and attention rollout over the last stage, for any input size."""
    model = reference_module(model)
    if model.stages[-1].cls_token is None:
        raise ValueError("attention maps follow the class token, and this model has none in its last stage; "
                         "build it with cls_token=(False, False, True) as the released models are")
    records: list[tuple[Attention, torch.Tensor, int, int]] = []
    last_stage = f"stage{len(model.stages) - 1}."

    def record(name: str, module: Attention, q: torch.Tensor, k: torch.Tensor, h: int, w: int) -> None:
        if name.startswith(last_stage):
            records.append((module, module.attention_probs(q, k), h, w))

    was_training = model.training
    model.eval()
    try:
        with watch_attention(model, record):
            model(images)
    finally:
        model.train(was_training)

    rollout = None
    for module, probs, h, w in records:
        footprint = key_footprint(module, h, w)
        if footprint.shape[:2].numel() + 1 != probs.shape[-1]:
            raise ValueError(f"{probs.shape[-1] - 1} keys for a {h}x{w} token map, but the k projection's window "
                             f"gives {footprint.shape[:2].numel()}: key_footprint does not know this projection")
        # Head-averaged, keys mapped back to tokens: (B, queries, tokens), rows summing to one. A block that
        # computes the class token alone has the one query: the first row of the identity is its residual.
        over_tokens = probs.mean(dim=1) @ _with_class_token(footprint).to(probs)
        queries, tokens = over_tokens.shape[-2:]
        with_residual = over_tokens + torch.eye(tokens)[:queries].to(probs)
        with_residual = with_residual / with_residual.sum(dim=-1, keepdim=True)
        rollout = with_residual if rollout is None else with_residual @ rollout
    return AttentionMaps(probs[:, :, 0], tuple(footprint.shape[:2]), rollout[:, 0], (h, w))


def load_image(path: str | os.PathLike, model: CvT, size: tuple[int, int] | None = None):
    """An image file resized (no crop, so all of it is seen) to `size` (default: the model's native), as the
    picture to draw on and the normalised (1, 3, H, W) batch the model takes."""
    from torchvision.transforms import v2 as T

    from .data import read_image

    h, w = size or model.img_size
    picture = T.Resize((h, w), interpolation=T.InterpolationMode.BICUBIC)(read_image(path))
    to_input = T.Compose([T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                          T.Normalize(model.pretrained_cfg.get("mean", IMAGENET_MEAN),
                                      model.pretrained_cfg.get("std", IMAGENET_STD))])
    return picture, to_input(picture).unsqueeze(0)


def draw_attention(picture, maps: AttentionMaps, path: str | os.PathLike, title: str = "",
                   prediction: tuple[str, float] | None = None) -> Figure:
    """Draw the maps of the first image in `maps` over `picture` (the model's input, as a PIL image or an
    H x W x 3 array): the head-averaged and per-head class-token attention of the last block, and the rollout,
    each with a colour bar of its weights. `prediction`, the model's top-1 (label, probability), is written under
    `title`. Returns the matplotlib Figure written to `path`."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch in the caller's process
    from matplotlib.ticker import MaxNLocator

    panels = [("input", None), ("mean of heads", maps.mean_map()[0]), ("rollout", maps.rollout_map()[0])]
    panels += [(f"head {i}", m) for i, m in enumerate(maps.head_maps()[0])]
    # 5, 4 or 3 columns, whichever leaves the fewest cells empty (the most columns of those).
    cols = min((5, 4, 3), key=lambda c: -len(panels) % c)
    rows = -(-len(panels) // cols)
    height, width = (picture.height, picture.width) if hasattr(picture, "height") else picture.shape[:2]
    lines = [title] if title else []
    if prediction is not None:
        lines.append(f"predicted: {prediction[0]} ({prediction[1]:.1%})")
    lines.append("class-token attention weights: the last block's heads and their mean; rollout over the last stage")
    # A grid of cells placed by hand (in inches), each a panel of the picture's shape (longer side 2.4 in; up to
    # 2:1, past which a panel is too narrow for its title) with its title above and its colour bar beside it: a
    # non-square input fills its panel instead of floating in a square one, nothing overlaps, cells past the last
    # panel are not drawn, and no layout engine has to work this out at every save.
    aspect = min(max(width / height, 0.5), 2.0)
    panel_w, panel_h = 2.4 * min(aspect, 1.0), 2.4 / max(aspect, 1.0)
    cell_w, cell_h = panel_w + 0.9, panel_h + 0.35
    fig_w = cols * cell_w
    heading = "\n".join(textwrap.fill(line, width=int(14 * fig_w)) for line in lines)
    heading_h = 0.2 * (heading.count("\n") + 1) + 0.2
    fig_h = rows * cell_h + heading_h
    fig = Figure(figsize=(fig_w, fig_h))
    fig.suptitle(heading, fontsize=10, y=1 - 0.1 / fig_h, va="top")

    def box(left: float, bottom: float, box_w: float, box_h: float) -> tuple[float, ...]:
        return left / fig_w, bottom / fig_h, box_w / fig_w, box_h / fig_h

    for k, (label, attention) in enumerate(panels):
        row, col = divmod(k, cols)
        left, bottom = col * cell_w + 0.1, fig_h - heading_h - (row + 1) * cell_h + 0.05
        ax = fig.add_axes(box(left, bottom, panel_w, panel_h))
        ax.imshow(picture)
        if attention is not None:
            weights = attention.float().cpu().numpy()
            # A colour range of at least 0.1% of the weights: a map that is uniform but for float rounding (as
            # over a single key) is drawn flat, not as magnified noise.
            centre = (weights.max() + weights.min()) / 2
            half_range = max((weights.max() - weights.min()) / 2, 5e-4 * weights.max())
            # Each map stretched over the whole image: the extent maps the coarse grid onto the pixels' edges.
            overlay = ax.imshow(weights, cmap="inferno", alpha=0.6, interpolation="bilinear",
                                vmin=centre - half_range, vmax=centre + half_range,
                                extent=(-0.5, width - 0.5, height - 0.5, -0.5))
            bar = fig.colorbar(overlay, cax=fig.add_axes(box(left + panel_w + 0.08, bottom, 0.12, panel_h)))
            bar.locator = MaxNLocator(nbins=4)  # few ticks: the bar is as tall as a small panel
            bar.formatter.set_useOffset(False)  # the weights themselves, not an offset printed above the bar
            bar.ax.tick_params(labelsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    save_figure(fig, path, dpi=100)
    return fig


@dataclass
class StageProfile:
    """One stage's share of the cost for one image. `queries` and `keys` are per attention block (class token
    included); `activation_bytes` is what a backward pass would need kept, measured with the reference attention
    computation, of which `attention_bytes` are the attention matrices (heads x queries x keys per block)."""

    name: str
    token_grid: tuple[int, int] | None
    blocks: int
    heads: int
    queries: int
    keys: int
    params: int
    macs: int
    activation_bytes: int
    attention_bytes: int


def _part(name: str) -> str:
    """The stage a parameter or module belongs to, or "head" for the final norm and classifier."""
    first = name.split(".")[0]
    return first if first.startswith("stage") else "head"


def profile_stages(model: CvT, img_size: int | tuple[int, int] | None = None) -> list[StageProfile]:
    """Per-stage params, MACs (the paper's convention), tokens and activation memory for one image.

    Runs the model once (an accelerated one as it computes); on a model built on the meta device
    (`with torch.device("meta")`) that costs nothing, at any size, and gives the figures of a CPU run but for a
    few bytes per BatchNorm. Queries and keys are the first block's of each stage. Activations are the
    tensors autograd saves during the forward pass, parameters excluded, in eval mode, with the reference
    attention (which keeps each attention matrix), so the figure does not depend on which fused kernel a
    device picks.
    """
    model = reference_module(model)
    h, w = (img_size, img_size) if isinstance(img_size, int) else (img_size or model.img_size)
    macs, params = {}, {}
    for name, value in macs_by_module(model, (h, w)).items():
        macs[_part(name)] = macs.get(_part(name), 0) + value
    for name, p in model.named_parameters():
        params[_part(name)] = params.get(_part(name), 0) + p.numel()

    part_names = [f"stage{i}" for i in range(len(model.stages))] + ["head"]
    activations = dict.fromkeys(part_names, 0)
    attention = dict.fromkeys(part_names, 0)
    shapes: dict[str, tuple] = {}
    current = ["stage0"]
    seen = {p.untyped_storage() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage not in seen:  # a tensor saved twice (or a view of one) is kept once
            seen.add(storage)
            activations[current[0]] += storage.nbytes()
        return t

    def record(name: str, module: Attention, q: torch.Tensor, k: torch.Tensor, hh: int, ww: int) -> None:
        part = _part(name)
        shapes.setdefault(part, ((hh, ww), q.shape[1], q.shape[2], k.shape[2]))
        attention[part] += q.shape[1] * q.shape[2] * k.shape[2] * q.element_size()

    def entering(part: str, module: nn.Module, args: tuple) -> None:
        current[0] = part

    parts = [(getattr(model, part), part) for part in part_names[:-1]] + [(model.norm, "head"), (model.head, "head")]
    handles = [module.register_forward_pre_hook(partial(entering, part)) for module, part in parts]
    attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
    fused = [m.fused_attn for m in attention_layers]
    # An inference model's parameters need no gradient, so it would save nothing: profiled as if trained.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    was_training = model.training
    model.eval()
    model.set_fused_attn(False)
    for p in frozen:
        p.requires_grad_(True)
    try:
        param = next(model.parameters())
        x = torch.zeros(1, model.in_chans, h, w, dtype=param.dtype, device=param.device)
        with (torch.enable_grad(), watch_attention(model, record),
              torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in zip(attention_layers, fused):
            m.fused_attn = flag
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)

    profiles = []
    for part in part_names:
        grid, heads, queries, keys = shapes.get(part, (None, 0, 0, 0))
        blocks = len(getattr(model, part).blocks) if part != "head" else 0
        profiles.append(StageProfile(part, grid, blocks, heads, queries, keys, params.get(part, 0),
                                     macs.get(part, 0), activations[part], attention[part]))
    return profiles

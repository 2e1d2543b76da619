"""Fast paths: `optimize_for_inference`, `use_onednn_linears`, `use_onednn_attention`, `compile_model` and
`reuse_cpu_buffers`.

Fusing is a step after loading: weights load into the plain `CvT` (official names), then

    fast = cvt.optimize_for_inference(model, logits_only=True)

returns an eval-mode copy whose outputs equal the original's to float rounding: every depth-wise conv +
BatchNorm projection becomes one conv with the BatchNorm folded into it, and with `logits_only` the last block
computes the class token alone. (A k/v conv with channel multiplier 2 and channels-last convs were measured
too; they were slower in every setting, on the CPU and on the GPU, and were removed: BENCHMARKS.md.)

Three more steps, for training too: `use_onednn_linears` (float32 CPU products by oneDNN instead of MKL),
`use_onednn_attention` (CPU attention by a C++ kernel built on first use, whose block products are oneDNN's
float32 ones; bfloat16 and float16 too where the CPU has no AMX) and `compile_model`
(`torch.compile(fullgraph=True)`; compiled for a GPU, and for CPU inference on small maps, the depth-wise convs
become fused tap sums, see `cvt.model.depthwise_convs_as_taps`). Our fastest classifiers:

- CPU: `compile_model(use_onednn_attention(use_onednn_linears(optimize_for_inference(m, logits_only=True))))`,
  called inside `reuse_cpu_buffers()` (large buffers kept between calls instead of fresh pages from glibc);
- GPU: `compile_model(optimize_for_inference(m, logits_only=True).to(torch.bfloat16), cuda_graphs=True)`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import Attention, CvT

__all__ = ["optimize_for_inference", "use_onednn_linears", "use_onednn_attention", "move_to", "compile_model",
           "reuse_cpu_buffers", "release_cpu_buffers", "ClassTokenBlock", "OneDNNLinear", "OneDNNAttention"]


# ATen's ConvParams::use_mkldnn never gives a single image of at most this many values to oneDNN in a 1x1
# convolution; dilated, it then takes PyTorch's slow dilated-convolution loop.
_ONEDNN_MIN_SINGLE_IMAGE = 20480
# Up to this many rows (images x tokens) oneDNN's matmul outruns its 1x1 convolution, which reorders the weight at
# every call; from about 800 rows the convolution is as fast or faster (benchmarks/gemm.py, BENCHMARKS.md).
_MATMUL_MAX_ROWS = 512
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def onednn_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a (B, tokens, C) sequence as a 1x1 convolution over its (B, C, tokens, 1)
    channels-last view: no copies, and oneDNN's, forward and backward (see `OneDNNLinear` for the dilation)."""
    y = F.conv2d(x.unsqueeze(2).permute(0, 3, 1, 2), weight[:, :, None, None], bias, dilation=2)
    return y.permute(0, 2, 3, 1).flatten(1, 2)


@torch.library.custom_op("cvt::onednn_matmul", mutates_args=())
def onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by oneDNN's matmul primitive, without gradient. An op of its own so that
    inductor calls it as it is: its lowering of `mkldnn._linear_pointwise` takes frozen weights only."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], None)


@onednn_matmul.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class OneDNNLinear(nn.Linear):
    """`nn.Linear` that multiplies token sequences on the CPU as a 1x1 convolution, i.e. with oneDNN.

    PyTorch sends a float32 CPU matmul to MKL, whose sgemm runs at about half oneDNN's speed on the AMD CPUs
    measured in BENCHMARKS.md; a 1x1 convolution over a (B, C, tokens, 1) channels-last view of the
    (B, tokens, C) sequence is the same product done by oneDNN, forward and backward, with no copies.
    Other devices, and inputs that are not (B, tokens, C), use `F.linear`. Parameters and names are nn.Linear's.

    The dilation changes nothing for a 1x1 kernel; it is there because PyTorch sends an undilated 1x1 convolution
    on a single thread with fewer than 16 images to its own MKL path instead of oneDNN (about half the speed,
    BENCHMARKS.md), and a dilated one to oneDNN, except a single image of at most 20480 values, which would go to
    a slow dilated-convolution loop: that one, a small product, is `F.linear`'s.

    Without gradient, float32 products of at most 512 rows (one or two images in the last stage) go to oneDNN's
    matmul (`onednn_matmul`), which does not reorder the weight at every call as the convolution does; under
    autocast the convolution stays, so that the product is in autocast's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 3:
            return F.linear(x, self.weight, self.bias)
        if self._small_inference_product(x):
            return onednn_matmul(x, self.weight, self.bias)
        if x.shape[0] == 1 and x.numel() <= _ONEDNN_MIN_SINGLE_IMAGE:
            return F.linear(x, self.weight, self.bias)
        return onednn_conv1x1(x, self.weight, self.bias)

    def _small_inference_product(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        autocast = torch.is_autocast_enabled("cpu")
        return (_HAS_ONEDNN and not needs_grad and not autocast and x.dtype == self.weight.dtype == torch.float32
                and x.shape[0] * x.shape[1] <= _MATMUL_MAX_ROWS)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Make every `nn.Linear` in `model` a `OneDNNLinear`, in place (same parameters, same names); returns it.

    Works for training and inference, eager and `torch.compile`; apply it before building the optimizer or not,
    the parameters are the same objects.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    return model


# Compiler flags per PyTorch CPU capability: the kernel's softmax uses ATen's vector types at that width.
_VECTOR_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}


def _kernel_vector_width() -> str:
    """The vector width to build the kernel for, "AVX512", "AVX2" or "DEFAULT" (plain C++): the one PyTorch
    dispatches its own CPU kernels to here, which `ATEN_CPU_CAPABILITY=avx2` (or `default`) lowers for both."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512" if capability.startswith("AVX512") else capability if capability in _VECTOR_FLAGS else "DEFAULT"


@functools.cache
def _load_onednn_attention() -> frozenset[torch.dtype]:
    """Build csrc/onednn_attention.cpp for this CPU and register `torch.ops.cvt.onednn_attention`; returns the
    dtypes the kernel serves (`OneDNNAttention.kernel_dtypes`).

    torch.utils.cpp_extension keeps the build in ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR) and
    rebuilds only when the source changes. Raises RuntimeError or OSError where it cannot be built (no C++
    compiler, no ninja). `-fopenmp`: ATen's parallel_for runs on one thread in code compiled without it.
    """
    from torch.utils.cpp_extension import load

    width = _kernel_vector_width()
    source = Path(__file__).with_name("csrc") / "onednn_attention.cpp"
    load(name=f"cvt_onednn_attention_{width.lower()}", sources=[str(source)], extra_ldflags=["-fopenmp"],
         extra_cflags=["-O3", "-fopenmp", f"-DCPU_CAPABILITY={width}", *_VECTOR_FLAGS.get(width, [])],
         is_python_module=False)

    def heads_last(like: torch.Tensor) -> torch.Tensor:  # the kernel's output layout: (B, tokens, H, D) storage
        return like.new_empty(like.shape[0], like.shape[2], like.shape[1], like.shape[3]).transpose(1, 2)

    @torch.library.register_fake("cvt::onednn_attention")
    def _(q, k, v, scale):
        return heads_last(q), q.new_empty(q.shape[:3])

    @torch.library.register_fake("cvt::onednn_attention_backward")
    def _(grad_out, q, k, v, out, logsumexp, scale):
        return heads_last(q), heads_last(k), heads_last(k)

    def setup_context(ctx, inputs, output):
        q, k, v, ctx.scale = inputs
        ctx.save_for_backward(q, k, v, *output)

    def backward(ctx, grad_out, grad_logsumexp):
        return (*torch.ops.cvt.onednn_attention_backward(grad_out, *ctx.saved_tensors, ctx.scale), None)

    torch.library.register_autograd("cvt::onednn_attention", backward, setup_context=setup_context)
    # Without native bfloat16 / float16 block products (AMX), PyTorch's flash attention multiplies those blocks
    # at a fraction of float32 brgemm's speed, so the kernel serves them too, in float32 (BENCHMARKS.md).
    reduced = {dtype for dtype in (torch.bfloat16, torch.float16) if not torch.ops.cvt.native_block_products(dtype)}
    return frozenset({torch.float32, *reduced})


class OneDNNAttention(Attention):
    """`Attention` whose CPU attention runs `torch.ops.cvt.onednn_attention` (csrc/onednn_attention.cpp).

    The kernels are PyTorch's CPU flash attention, forward and backward (blocks of queries against blocks of keys,
    no score matrix written out), with oneDNN brgemm block products instead of MKL's sgemm: on the AMD CPU of
    BENCHMARKS.md about twice as fast. bfloat16 and float16 attention runs in it too, on float32 copies of q, k
    and v, where the CPU has no native products for them (`kernel_dtypes`); on other devices or dtypes, and with
    attention dropout in training, `Attention.attend` runs instead. Parameters and names are Attention's.
    """

    kernel_dtypes: frozenset[torch.dtype] = frozenset()  # set by use_onednn_attention: a property of the CPU

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout = self.training and self.attn_drop_rate > 0
        if q.device.type != "cpu" or q.dtype not in self.kernel_dtypes or dropout:
            return super().attend(q, k, v)
        return torch.ops.cvt.onednn_attention(q.float(), k.float(), v.float(), self.scale)[0].to(q.dtype)


def use_onednn_attention(model: nn.Module) -> nn.Module:
    """Make every `Attention` in `model` a `OneDNNAttention`, in place (same parameters); returns it.

    Builds the kernel on first use (once per machine). Where it cannot be built, warns and leaves the model as it
    is.
    """
    try:
        OneDNNAttention.kernel_dtypes = _load_onednn_attention()
    except (RuntimeError, OSError, ImportError) as error:
        warnings.warn(f"cvt: the oneDNN attention kernel could not be built ({error}); the model keeps its "
                      "attention. The kernel needs a C++ compiler and ninja.", stacklevel=2)
        return model
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = OneDNNAttention
    return model


def move_to(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`, in place; on the CPU with float32 products and attention by oneDNN rather than MKL
    (`use_onednn_linears`, `use_onednn_attention`: same parameters, same function; BENCHMARKS.md). Returns it."""
    model.to(device)
    if device.type == "cpu":
        use_onednn_attention(use_onednn_linears(model))
    return model


@functools.cache
def _buffer_cache():
    """Build csrc/buffer_cache.cpp and install it as PyTorch's CPU allocator (it passes every allocation made
    outside a `reuse_cpu_buffers` scope through to the allocator it replaces); None, with a warning, where it cannot
    be built or installed."""
    from torch.utils.cpp_extension import load

    source = Path(__file__).with_name("csrc") / "buffer_cache.cpp"
    try:
        cache = load(name="cvt_buffer_cache", sources=[str(source)], extra_cflags=["-O2"])
    except (RuntimeError, OSError, ImportError) as error:
        warnings.warn(f"cvt: the CPU buffer cache could not be built ({error}); reuse_cpu_buffers() does nothing. "
                      "It needs a C++ compiler and ninja.", stacklevel=4)
        return None
    if not cache.install():
        warnings.warn("cvt: another CPU allocator is installed; reuse_cpu_buffers() does nothing.", stacklevel=4)
        return None
    return cache


@contextlib.contextmanager
def reuse_cpu_buffers(enabled: bool = True):
    """Inside this scope, CPU tensors of 1 MiB or more are taken from a cache of freed ones of the same size and go
    back to it when freed, in place of glibc's fresh memory. `enabled=False` makes it a no-op (as for autocast).

        with cvt.fast.reuse_cpu_buffers():
            logits = fast(images)

    glibc returns large freed blocks to the system, so each call of a model pays a page fault and a page clear
    for every 4 KiB of its large activations again: with glibc's defaults CvT-13's fastest CPU mode ran at 33.2
    img/s without the cache and 42.2 with it, its speed with every freed block kept (BENCHMARKS.md). Between
    calls the cache holds what the last call used, about the call's peak memory (blocks no allocation took
    during a scope are freed when it ends); `release_cpu_buffers()` frees them. The scope is per thread and
    nests; tensors made inside it may live on after it. Only CPU memory is concerned. The cache
    (csrc/buffer_cache.cpp) is built on first use, once per machine; where it cannot be, the scope does nothing.

    It is for inference. A buffer serves only tensors of its own size, so in a training step the activations
    freed during the backward pass cannot hold the gradients, which glibc would place there: the peak memory of
    a CvT-13 training step of 16 images on the CPU rose by 160-260 MiB in it (BENCHMARKS.md).
    """
    cache = _buffer_cache() if enabled else None
    if cache is None:
        yield
        return
    cache.enter()
    try:
        yield
    finally:
        cache.leave()


def release_cpu_buffers() -> None:
    """Free the idle buffers that `reuse_cpu_buffers` keeps between calls."""
    if _buffer_cache.cache_info().currsize and _buffer_cache() is not None:
        _buffer_cache().release()


def _fold_batchnorm(proj: nn.Sequential) -> nn.Sequential:
    """conv + BatchNorm (eval) as one conv with a bias, under the same name `conv`."""
    return nn.Sequential(OrderedDict([("conv", fuse_conv_bn_eval(proj.conv, proj.bn))]))


class ClassTokenBlock(nn.Module):
    """The last block of a classifier that reads the class token alone: only the class token is computed.

    Keys and values still come from every token, but the query, the attention output, its projection and the MLP
    are the class token's only (one row instead of 1 + H*W); the other tokens leave the block as they entered it.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.norm1(x), h, w, class_query_only=True)
        attended = self.attn.attend(q, k, v)
        cls_token = x[:, :1] + self.attn.proj(attended.transpose(1, 2).flatten(2))
        cls_token = cls_token + self.mlp(self.norm2(cls_token))
        return torch.cat((cls_token, x[:, 1:]), dim=1)


def optimize_for_inference(model: CvT, logits_only: bool = False) -> CvT:
    """An eval-mode copy of `model` with every BatchNorm folded into its depth-wise conv.

    Projections without BatchNorm (`avg`, `linear`) are kept as they are. The input model is not modified.

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
    for module in fast.modules():
        if isinstance(module, Attention):
            for name in ("conv_proj_q", "conv_proj_k", "conv_proj_v"):
                proj = getattr(module, name)
                if isinstance(proj, nn.Sequential) and hasattr(proj, "bn"):
                    setattr(module, name, _fold_batchnorm(proj))
    if logits_only:
        last_stage = fast.stages[-1]
        last_stage.blocks[-1] = ClassTokenBlock(last_stage.blocks[-1])
    return fast.requires_grad_(False)


def compile_model(model: nn.Module, cuda_graphs: bool = False) -> nn.Module:
    """`torch.compile(model, fullgraph=True, dynamic=False)` with inductor's layout optimisation off.

    The optimisation turns the (B, C, tokens, 1) views that `OneDNNLinear` hands to oneDNN channels-first and
    copies them back after every product; without it the token sequences stay as they are (BENCHMARKS.md).
    `dynamic=False`: a new batch size or resolution gets kernels of its own, not slower shape-generic ones.
    `cuda_graphs=True` replays each call as one CUDA graph (inductor's `triton.cudagraphs`), which removes the
    launch overhead that dominates small batches; the output then lives in memory the next call overwrites, so
    copy what you keep (`out.clone()`).
    """
    options = {"layout_optimization": False, "triton.cudagraphs": cuda_graphs}
    return torch.compile(model, fullgraph=True, dynamic=False, options=options)

"""Every fast path computes the same function as the plain model: eval and train, several resolutions, gradients."""
import copy
import os
import resource
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import cvt
import cvt.fast
from cvt.fast import (
    ClassTokenBlock, OneDNNAttention, OneDNNLinear, compile_model, optimize_for_inference, release_cpu_buffers,
    reuse_cpu_buffers, use_onednn_attention, use_onednn_linears,
)
from cvt.model import depthwise_conv_taps
from helpers import TINY, official_model, randomize_batchnorm


def ops_run(profiler: torch.profiler.profile) -> set[str]:
    """The names of the operators a profiled block ran."""
    return {event.key for event in profiler.key_averages()}


def tiny_model(seed: int = 0, **overrides) -> cvt.CvT:
    """A tiny CvT with every parameter and BatchNorm statistic random, so a wrong fold shows."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(cvt.CvT(num_classes=10, **dict(TINY, **overrides)))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (64, 64)])
@pytest.mark.parametrize("proj_method", ["dw_bn", "avg"])
def test_optimize_for_inference_matches_plain_model(size, proj_method):
    model = tiny_model(proj_method=proj_method).eval()
    fast = optimize_for_inference(model)
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        expected_maps, expected_cls = model.forward_intermediates(x)
        maps, cls_token = fast.forward_intermediates(x)
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=0)
    for got, want in zip(maps, expected_maps):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(cls_token, expected_cls, atol=1e-4, rtol=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())


def test_optimize_for_inference_leaves_the_original_alone_and_loads_official_weights():
    model, io = official_model("tiny_dw_bn")
    keys_before = set(model.state_dict())
    fast = use_onednn_linears(optimize_for_inference(model))
    assert set(model.state_dict()) == keys_before  # fusing is a step after loading, on a copy
    with torch.no_grad():
        for name in ("x_64x64", "x_72x56"):
            torch.testing.assert_close(fast(io[f"input.{name}"]), io[f"logits.{name}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (56, 40)])
def test_logits_only_computes_the_class_token_alone_in_the_last_block(size):
    model = tiny_model().eval()
    fast = optimize_for_inference(model, logits_only=True)
    assert isinstance(fast.stage2.blocks[-1], ClassTokenBlock)
    x = torch.randn(3, 3, *size)
    last_attention, query_rows = fast.stage2.blocks[-1].attn, []
    last_attention.conv_proj_q.register_forward_hook(lambda *_: query_rows.append("the map's queries"))
    last_attention.proj_q.register_forward_hook(lambda module, args, out: query_rows.append(args[0].shape[1]))
    with torch.no_grad():
        _, expected_cls = model.forward_intermediates(x)
        _, cls_token = fast.forward_intermediates(x)
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(cls_token, expected_cls, atol=1e-4, rtol=0)
    assert query_rows == [1, 1]  # the class token's query alone, in each of the two calls
    with pytest.raises(ValueError, match="reads the class token"):
        optimize_for_inference(tiny_model(cls_token=False), logits_only=True)
    with pytest.raises(ValueError, match="class_query_only needs a class token"):
        model.stage0.blocks[0].attn.qkv(torch.zeros(1, 16, 16), 4, 4, class_query_only=True)


def test_optimize_for_inference_without_qkv_bias_and_rejects_other_modules():
    model = tiny_model(qkv_bias=False).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(optimize_for_inference(model)(x), model(x), atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="expects a cvt.CvT"):
        optimize_for_inference(nn.Linear(2, 2))


@pytest.mark.parametrize("size", [(32, 32), (56, 48)])
def test_onednn_linears_match_in_training_with_gradients(size):
    model = tiny_model(drop_path_rate=0.0).train()
    fast = use_onednn_linears(copy.deepcopy(model))
    assert any(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 3, *size)
    y = torch.randint(0, 10, (4,))
    losses = []
    for m in (model, fast):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # training-mode BatchNorm updated the same running statistics
    for a, b in zip(model.buffers(), fast.buffers()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,backend", [
    ((2, 7, 24), "aten::mkldnn_convolution"), ((1, 900, 24), "aten::mkldnn_convolution"), ((1, 7, 24), "aten::addmm"),
])
def test_onednn_linear_runs_onednn_on_one_thread_and_small_batches(threads, shape, backend):
    """oneDNN on one thread and below 16 images; a small single image by `F.linear`; never PyTorch's slow paths."""
    layer = use_onednn_linears(nn.Sequential(nn.Linear(24, 40)))
    x = torch.randn(*shape, requires_grad=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.profiler.profile() as profiler:
            y = layer(x)
            y.sum().backward()
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(y, nn.functional.linear(x, layer[0].weight, layer[0].bias), atol=1e-5, rtol=1e-5)
    names = ops_run(profiler)
    assert backend in names and not any("slow_conv" in name for name in names), names


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,backend", [((2, 7, 24), "mkldnn::_linear_pointwise"),
                                           ((1, 900, 24), "aten::mkldnn_convolution")])
def test_onednn_linear_without_gradient_takes_onednns_matmul_for_few_rows(shape, backend, bias):
    """Inference products of at most 512 rows go to oneDNN's matmul, larger ones stay oneDNN convolutions: under
    `no_grad`, and for a model whose parameters need no gradient (`optimize_for_inference`)."""
    layer = use_onednn_linears(nn.Sequential(nn.Linear(24, 40, bias=bias)))
    x = torch.randn(*shape)
    expected = nn.functional.linear(x, layer[0].weight, layer[0].bias)
    with torch.no_grad(), torch.profiler.profile() as profiler:
        y = layer(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert backend in ops_run(profiler)
    layer.requires_grad_(False)
    with torch.profiler.profile() as profiler:
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert backend in ops_run(profiler)
    with torch.autocast("cpu", torch.bfloat16):  # autocast's products stay autocast's
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("batch,heads,queries,keys,head_dim,magnitude", [
    (2, 1, 130, 600, 64, 1.0),   # three query blocks, the last partial; two key blocks, the last partial
    (1, 3, 65, 17, 24, 1.0),     # keys and head dim that are not multiples of the vector width
    (3, 2, 1, 50, 64, 1.0),      # the class token alone (ClassTokenBlock)
    (2, 2, 70, 1030, 32, 30.0),  # large scores: the running maximum moves from key block to key block
])
def test_onednn_attention_kernel_is_as_accurate_as_pytorchs(batch, heads, queries, keys, head_dim, magnitude):
    """Output and gradients against float64: no further off than PyTorch's float32 kernel (plus rounding)."""
    use_onednn_attention(nn.Module())  # builds the kernel (once per machine)
    torch.manual_seed(0)
    # (B, heads, tokens, head_dim) views of (B, tokens, heads * head_dim) sequences, as Attention makes them
    q, k, v = (torch.randn(batch, n, heads * head_dim).unflatten(-1, (heads, head_dim)).transpose(1, 2)
               for n in (queries, keys, keys))
    q = q * magnitude
    v = v.transpose(2, 3).contiguous().transpose(2, 3)  # rows that are not contiguous are copied first
    scale = head_dim ** -0.5
    inputs = {kind: [t.detach().clone().to(dtype).requires_grad_() for t in (q, k, v)]
              for kind, dtype in (("ours", torch.float32), ("pytorch", torch.float32), ("truth", torch.float64))}
    outputs = {"ours": torch.ops.cvt.onednn_attention(*inputs["ours"], scale)[0],
               **{kind: nn.functional.scaled_dot_product_attention(*inputs[kind], scale=scale)
                  for kind in ("pytorch", "truth")}}
    assert outputs["ours"].transpose(1, 2).is_contiguous()  # merging the heads afterwards is a view
    grad = torch.randn_like(outputs["ours"]).transpose(1, 2).contiguous().transpose(1, 2)  # as the merge returns it
    for kind, out in outputs.items():
        out.backward(grad.to(out.dtype))
    results = {kind: [outputs[kind].detach(), *(t.grad for t in inputs[kind])] for kind in outputs}
    for i, name in enumerate(("output", "dq", "dk", "dv")):
        truth = results["truth"][i]
        error = (results["ours"][i].double() - truth).abs().max().item()
        pytorch_error = (results["pytorch"][i].double() - truth).abs().max().item()
        assert error <= 2 * pytorch_error + 1e-6, f"{name}: {error:.2e} off, PyTorch's kernel {pytorch_error:.2e}"
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.cvt.onednn_attention(q.double(), k.double(), v.double(), scale)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_onednn_attention_builds_for_cpus_without_avx512(capability):
    """The AVX2 and plain C++ builds (chosen like PyTorch's own kernels, lowered by ATEN_CPU_CAPABILITY) pass the
    accuracy test above too; in a subprocess, as one process loads one build."""
    script = (f"import sys, pytest, cvt.fast; assert cvt.fast._kernel_vector_width() == {capability.upper()!r}; "
              f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {__file__!r}, '-k', 'kernel_is_as_accurate']))")
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, ATEN_CPU_CAPABILITY=capability),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # 5 would be: no test collected


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_onednn_attention_in_the_model_eval_compiled_and_in_training(size):
    model = tiny_model(drop_path_rate=0.0).eval()
    fast = use_onednn_attention(copy.deepcopy(model))
    assert all(type(m) is OneDNNAttention for m in fast.modules() if isinstance(m, cvt.model.Attention))
    assert list(fast.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=0)
        logits_only = use_onednn_attention(optimize_for_inference(model, logits_only=True))
        torch.testing.assert_close(logits_only(x), expected, atol=1e-5, rtol=0)
    # training: the kernel's backward pass
    model.train(), fast.train()
    y = torch.randint(0, 10, (2,))
    for m in (model, fast):
        nn.functional.cross_entropy(m(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_onednn_attention_serves_bfloat16_in_float32_where_the_cpu_has_no_native_products(monkeypatch):
    """Without AMX, bfloat16 attention runs in the kernel on float32 copies: its logits and gradients are no further
    from float64 than with PyTorch's bfloat16 kernel; with native bfloat16 products it is left to PyTorch's kernel."""
    model = tiny_model(drop_path_rate=0.0)
    fast = use_onednn_attention(copy.deepcopy(model))
    monkeypatch.setattr(OneDNNAttention, "kernel_dtypes", frozenset({torch.float32, torch.bfloat16}))
    x, y = torch.randn(2, 3, 40, 40), torch.randint(0, 10, (2,))

    def logits_and_gradient(m: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        m = copy.deepcopy(m).to(dtype).train()
        nn.functional.cross_entropy(m(x.to(dtype)), y).backward()
        with torch.no_grad():
            logits = m.eval()(x.to(dtype)).double()
        return logits, torch.cat([p.grad.double().flatten() for p in m.parameters()])

    truth = logits_and_gradient(model, torch.float64)
    errors = {}
    for name, m in (("pytorch", model), ("ours", fast)):
        with torch.profiler.profile() as profiler:
            got = logits_and_gradient(m, torch.bfloat16)
        assert ("cvt::onednn_attention" in ops_run(profiler)) == (name == "ours")
        errors[name] = [((a - b).norm() / b.norm()).item() for a, b in zip(got, truth)]
    for what, ours, pytorch in zip(("logits", "gradient"), errors["ours"], errors["pytorch"]):
        assert ours <= 1.5 * pytorch, f"{what}: {ours:.2e} off float64, PyTorch's bfloat16 kernel {pytorch:.2e}"
    monkeypatch.setattr(OneDNNAttention, "kernel_dtypes", frozenset({torch.float32}))
    with torch.no_grad(), torch.profiler.profile() as profiler:
        fast.bfloat16().eval()(x.bfloat16())
    assert "cvt::onednn_attention" not in ops_run(profiler)


def test_onednn_attention_that_cannot_be_built_warns_and_leaves_the_model(monkeypatch):
    def no_compiler():
        raise RuntimeError("Error building extension")

    monkeypatch.setattr(cvt.fast, "_load_onednn_attention", no_compiler)
    model = tiny_model()
    with pytest.warns(UserWarning, match="could not be built .*Error building extension"):
        assert use_onednn_attention(model) is model
    assert not any(isinstance(m, OneDNNAttention) for m in model.modules())


def held_cpu_buffer_bytes() -> int:
    """What the buffer cache of `reuse_cpu_buffers` owns, idle or in use."""
    return cvt.fast._buffer_cache().held_bytes()


def test_reuse_cpu_buffers_hands_a_freed_buffer_to_the_next_allocation_of_its_size():
    numel = 2**19  # 2 MiB of float32
    release_cpu_buffers()
    held_before = held_cpu_buffer_bytes()
    with reuse_cpu_buffers():
        first = torch.empty(numel)
        address = first.data_ptr()
        del first
        again, other_size, small = torch.empty(numel), torch.empty(numel + 1), torch.empty(1000)
        assert again.data_ptr() == address and other_size.data_ptr() != address
    assert held_cpu_buffer_bytes() - held_before == 4 * (2 * numel + 1)  # the 4 KB tensor is glibc's
    del again
    outside = torch.empty(numel)  # outside a scope: the allocator the cache stands in front of
    assert outside.data_ptr() != address and held_cpu_buffer_bytes() - held_before == 4 * (2 * numel + 1)


def test_reuse_cpu_buffers_keeps_what_the_last_scope_used():
    release_cpu_buffers()
    held_before = held_cpu_buffer_bytes()
    with reuse_cpu_buffers():
        address = torch.empty(2**20).data_ptr()  # 4 MiB, freed at once
        with reuse_cpu_buffers():
            pass  # a nested scope frees nothing when it ends
        assert torch.empty(2**20).data_ptr() == address
    assert held_cpu_buffer_bytes() - held_before == 4 * 2**20
    with reuse_cpu_buffers():
        torch.empty(2**21)  # another size: the 4 MiB buffer, unused in this scope, is freed at its end
    assert held_cpu_buffer_bytes() - held_before == 8 * 2**20
    release_cpu_buffers()
    assert held_cpu_buffer_bytes() == held_before


def test_reuse_cpu_buffers_saves_the_page_faults_of_large_tensors():
    def faults_of_a_fresh_64mib_tensor() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(2**24).fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    outside = faults_of_a_fresh_64mib_tensor()  # glibc maps a block this large afresh and unmaps it when freed
    with reuse_cpu_buffers():
        first, again = faults_of_a_fresh_64mib_tensor(), faults_of_a_fresh_64mib_tensor()
    assert outside >= 2**24 * 4 // 4096 and first >= 2**24 * 4 // 4096  # one fault per 4 KiB page
    assert again < 100


def test_model_outputs_under_reuse_cpu_buffers_are_exact_and_outlive_the_next_call():
    model = use_onednn_attention(use_onednn_linears(optimize_for_inference(tiny_model())))
    first, second = torch.randn(2, 64, 3, 64, 64)  # stage-0 maps of 1 MiB: buffers the cache keeps
    with torch.no_grad():
        expected = [model.forward_intermediates(x)[0][0] for x in (first, second)]
        release_cpu_buffers()
        got = []
        for x in (first, second):
            with reuse_cpu_buffers():
                got.append(model.forward_intermediates(x)[0][0])
    assert got[0].nbytes >= 2**20 and held_cpu_buffer_bytes() > 0
    for output, reference in zip(got, expected):
        torch.testing.assert_close(output, reference, atol=1e-6, rtol=0)


def test_reuse_cpu_buffers_that_cannot_be_built_warns_and_does_nothing(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cvt.fast._buffer_cache.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built .*Error building extension"):
            with reuse_cpu_buffers():
                ones = torch.ones(2**20)
        assert ones.sum() == 2**20
    finally:
        cvt.fast._buffer_cache.cache_clear()  # the next use builds (finds) the real one


def test_sdpa_path_matches_the_reference_attention_with_gradients():
    model = tiny_model(drop_path_rate=0.0).train()
    reference = copy.deepcopy(model)
    reference.set_fused_attn(False)
    x = torch.randn(2, 3, 48, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    model(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size,projections", [((32, 32), "as chosen"), ((48, 40), "as chosen"), ((48, 40), "taps")])
def test_torch_compile_fullgraph_training_matches_eager_and_inference_runs(size, projections, monkeypatch):
    """As chosen on the CPU: conv kernels in training, tap sums in inference (the tiny model's maps are small);
    "taps" trains with the tap sums too (the GPU's form)."""
    torch._dynamo.reset()
    if projections == "taps":
        monkeypatch.setattr(cvt.model, "depthwise_convs_as_taps", lambda x: torch.compiler.is_compiling())
    model = tiny_model(drop_path_rate=0.0)
    x = torch.randn(2, 3, *size)
    y = torch.randint(0, 10, (2,))

    eager = copy.deepcopy(model).train()
    train_model = use_onednn_attention(use_onednn_linears(copy.deepcopy(model))).train()
    compiled_train = compile_model(train_model)
    losses = [nn.functional.cross_entropy(m(x), y) for m in (eager, compiled_train)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for (name, p), q in zip(eager.named_parameters(), train_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")

    model.eval()
    # cuda_graphs=True is for CUDA; on the CPU inductor runs the same graph without them.
    compiled_fast = compile_model(
        use_onednn_attention(use_onednn_linears(optimize_for_inference(model, logits_only=True))), cuda_graphs=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled_fast(x), model(x), atol=1e-4, rtol=0)


def test_depthwise_projections_are_tap_sums_when_compiled_for_small_cpu_maps_in_inference():
    small = torch.zeros(1, 8, 14, 14)
    large = torch.zeros(1, 8, 1, cvt.model.TAPS_MAX_CPU_VALUES // 8 + 1)

    @torch.compile(fullgraph=True, dynamic=False)
    def chosen(x):
        return torch.tensor(cvt.model.depthwise_convs_as_taps(x))

    with torch.no_grad():
        assert chosen(small) and not chosen(large)
        assert not cvt.model.depthwise_convs_as_taps(small)  # eager: one conv call beats nine tap operations
    assert not chosen(small)  # training keeps the conv kernels on the CPU


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 1, 1, (7, 9)), (3, 2, 1, (8, 8)), (3, 2, 1, (7, 5)),
                                                        (3, 1, 0, (5, 6)), (5, 2, 2, (9, 11))])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv_taps_is_the_depthwise_conv(kernel, stride, padding, size, bias):
    """The form the depth-wise projections take when compiled for a GPU, forward and backward."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, kernel, stride=stride, padding=padding, groups=6, bias=bias)
    x = torch.randn(2, 6, *size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = depthwise_conv_taps(conv, x), conv(x_ref)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="depth-wise"):
        depthwise_conv_taps(nn.Conv2d(6, 12, 3, groups=6), x)


class DepthwiseConvs(TorchDispatchMode):
    """Records every depth-wise convolution, forward and backward, that reaches ATen: its name and input dtype, and
    for the forward ones whether the input is dense (a tensor the kernel need not copy first)."""

    def __init__(self):
        super().__init__()
        self.dtypes, self.dense_inputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        groups_at = {torch.ops.aten.convolution.default: 8, torch.ops.aten.convolution_backward.default: 9}.get(func)
        if groups_at is not None and args[groups_at] > 1:
            self.dtypes.append((func.overloadpacket.__name__, args[1].dtype))
            if func is torch.ops.aten.convolution.default:
                x = args[0]
                self.dense_inputs.append(x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        return func(*args, **(kwargs or {}))


def test_depthwise_projections_get_dense_maps_past_the_class_token():
    model = tiny_model().eval()
    with DepthwiseConvs() as recorded, torch.no_grad():
        model(torch.randn(2, 3, 48, 48))
    assert len(recorded.dense_inputs) == 3 * sum(TINY["depths"]) and all(recorded.dense_inputs)


@pytest.mark.parametrize("setting", ["autocast", "bfloat16 model"])
def test_depthwise_projections_run_in_float32_in_cpu_bfloat16(setting):
    """PyTorch's bfloat16 backward pass of a strided depth-wise conv is a slow path on the CPU (BENCHMARKS.md), so
    the projections run those convs in float32 where a backward pass may follow; the model still matches float32 to
    bfloat16's rounding. Without gradients they stay in bfloat16."""
    model = tiny_model(drop_path_rate=0.0).train()
    x, y = torch.randn(2, 3, 40, 40), torch.randint(0, 10, (2,))
    expected = nn.functional.cross_entropy(copy.deepcopy(model)(x), y)
    if setting == "bfloat16 model":
        model, x = model.bfloat16(), x.bfloat16()
    with DepthwiseConvs() as recorded, torch.autocast("cpu", torch.bfloat16, enabled=setting == "autocast"):
        loss = nn.functional.cross_entropy(model(x), y)
    with recorded:
        loss.backward()
    assert {name for name, _ in recorded.dtypes} == {"convolution", "convolution_backward"}
    assert {dtype for _, dtype in recorded.dtypes} == {torch.float32}
    torch.testing.assert_close(loss.float(), expected, atol=0, rtol=2e-2)
    with DepthwiseConvs() as recorded, torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        model(x)
    assert {dtype for _, dtype in recorded.dtypes} == {torch.bfloat16}

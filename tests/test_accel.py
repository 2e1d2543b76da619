"""Every speed-up of cvt.accel computes the reference model's function: eval and train, several resolutions,
gradients; and every tool works on an accelerated model as on a plain one."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import cvt
from cvt.accel import (
    ClassTokenAttention, ClassTokenBlock, Float32DepthwiseConv2d, OneDNNLinear, TapSumConv2d, accelerate_training,
    class_token_only, compile_model, fold_batchnorm, optimize_for_inference, reference_module, use_onednn_linears,
    use_tap_sums,
)
from cvt.flops import macs_by_module
from cvt.inspect import attention_maps, profile_stages
from helpers import TINY, official_model, randomize_batchnorm


def tiny_model(seed: int = 0, **overrides) -> cvt.CvT:
    """A tiny CvT with every parameter and BatchNorm statistic random, so a wrong fold shows."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(cvt.CvT(num_classes=10, **dict(TINY, **overrides)))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
                module.bias.normal_(0, 0.2)
    return model


def ops_run(profiler: torch.profiler.profile) -> set[str]:
    """The names of the operators a profiled block ran."""
    return {event.key for event in profiler.key_averages()}


# Each speed-up alone, then all of them (compile aside: tested below).
ALONE = {"fold_bn": dict(fold_bn=True), "logits_only": dict(logits_only=True),
         "onednn_linears": dict(onednn_linears=True), "tap_sums": dict(tap_sums=True)}
NONE = dict(fold_bn=False, logits_only=False, onednn_linears=False, tap_sums=False, compile=False)


@pytest.mark.parametrize("speedup", [*ALONE, "all"])
@pytest.mark.parametrize("proj_method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("size", [(32, 32), (56, 40)])
def test_each_inference_speedup_and_all_of_them_compute_the_model(speedup, proj_method, size):
    model = tiny_model(proj_method=proj_method).eval()
    options = dict(NONE, **ALONE[speedup]) if speedup != "all" else dict(compile=False)
    fast = optimize_for_inference(model, **options)
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=0)
        expected_cls = model.forward_intermediates(x, return_prefix_tokens=True)[1][-1][1]
        cls_token = fast.forward_intermediates(x, return_prefix_tokens=True)[1][-1][1]
    torch.testing.assert_close(cls_token, expected_cls, atol=1e-4, rtol=0)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())


def test_optimize_for_inference_defaults_apply_every_cpu_speedup_and_leave_the_original_alone():
    model, io = official_model("tiny_dw_bn")
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model, compile=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert isinstance(fast.stage2.blocks[-1], ClassTokenBlock)
    assert any(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert not any(isinstance(m, TapSumConv2d) for m in fast.modules())  # a GPU's, when compiled
    assert all(torch.equal(v, keys_before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (OneDNNLinear, ClassTokenBlock)) for m in model.modules())
    with torch.no_grad():
        for name in ("x_64x64", "x_72x56"):
            torch.testing.assert_close(fast(io[f"input.{name}"]), io[f"logits.{name}"], atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="expects a cvt.CvT"):
        optimize_for_inference(nn.Linear(2, 2))


def test_fold_batchnorm_leaves_one_conv_with_a_bias_under_the_same_name():
    model = tiny_model().eval()
    folded = fold_batchnorm(copy.deepcopy(model))
    proj = folded.stage1.blocks[0].attn.conv_proj_k
    assert list(dict(proj.named_children())) == ["conv"] and proj.conv.bias is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=0)


def test_logits_only_computes_the_class_token_alone_in_the_last_block():
    model = tiny_model().eval()
    fast = optimize_for_inference(model, **dict(NONE, logits_only=True))
    last = fast.stage2.blocks[-1]
    assert isinstance(last, ClassTokenBlock) and isinstance(last.attn, ClassTokenAttention)
    assert list(last.state_dict()) == list(model.stage2.blocks[-1].state_dict())
    query_rows = []
    last.attn.conv_proj_q.register_forward_hook(lambda *_: query_rows.append("the map's queries"))
    last.attn.proj_q.register_forward_hook(lambda module, args, out: query_rows.append(args[0].shape[1]))
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=0)
        fast(x[:1])
    assert query_rows == [1, 1]  # the class token's query alone, in each call
    with pytest.raises(ValueError, match="reads the class token"):
        class_token_only(tiny_model(cls_token=False))
    with pytest.raises(ValueError, match="needs a block with a class token"):
        ClassTokenBlock(model.stage0.blocks[0])
    # a classifier that averages the tokens needs them all: by default it keeps its last block
    averaging = tiny_model(cls_token=False)
    assert not any(isinstance(m, ClassTokenBlock) for m in optimize_for_inference(averaging, compile=False).modules())


@pytest.mark.parametrize("size", [(32, 32), (56, 48)])
def test_accelerated_training_matches_the_model_with_gradients(size):
    model = tiny_model(drop_path_rate=0.0).train()
    fast = accelerate_training(copy.deepcopy(model), torch.device("cpu"))
    assert any(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert list(fast.state_dict()) == list(model.state_dict())
    x, y = torch.randn(4, 3, *size), torch.randint(0, 10, (4,))
    losses = []
    for m in (model, fast):
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(model.buffers(), fast.buffers()):  # training-mode BatchNorm: the same running statistics
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_accelerate_training_keeps_the_parameter_objects_and_picks_tap_sums_for_a_compiled_gpu_model():
    model = tiny_model()
    params = list(model.parameters())
    assert list(accelerate_training(model, torch.device("cpu")).parameters()) == params
    gpu_model = accelerate_training(tiny_model(), torch.device("cuda"), compiled=True)  # swaps only, no copy
    assert any(isinstance(m, TapSumConv2d) for m in gpu_model.modules())
    assert not any(isinstance(m, (TapSumConv2d, OneDNNLinear))
                   for m in accelerate_training(tiny_model(), torch.device("cuda")).modules())


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


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 1, 1, (7, 9)), (3, 2, 1, (8, 8)), (3, 2, 1, (7, 5)),
                                                        (3, 1, 0, (5, 6)), (5, 2, 2, (9, 11))])
@pytest.mark.parametrize("bias", [True, False])
def test_tap_sums_are_the_depthwise_conv_forward_and_backward(kernel, stride, padding, size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, kernel, stride=stride, padding=padding, groups=6, bias=bias)
    taps = copy.deepcopy(conv)
    taps.__class__ = TapSumConv2d
    x = torch.randn(2, 6, *size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = taps(x), conv(x_ref)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(taps.weight.grad, conv.weight.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="depth-wise"):
        use_tap_sums(cvt.model.Projection(OrderedDict(conv=nn.Conv2d(6, 12, 3, groups=6))))


class DepthwiseConvs(TorchDispatchMode):
    """Records the input dtype of every depth-wise convolution, forward and backward, that reaches ATen."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        groups_at = {torch.ops.aten.convolution.default: 8, torch.ops.aten.convolution_backward.default: 9}.get(func)
        if groups_at is not None and args[groups_at] > 1:
            self.dtypes.append((func.overloadpacket.__name__, args[1].dtype))
        return func(*args, **(kwargs or {}))


def test_accelerated_cpu_training_runs_the_depthwise_convs_in_float32_under_bfloat16_autocast():
    model = tiny_model(drop_path_rate=0.0).train()
    x, y = torch.randn(2, 3, 40, 40), torch.randint(0, 10, (2,))
    expected = nn.functional.cross_entropy(copy.deepcopy(model)(x), y)
    accelerate_training(model, torch.device("cpu"))
    assert any(isinstance(m, Float32DepthwiseConv2d) for m in model.modules())
    with DepthwiseConvs() as recorded, torch.autocast("cpu", torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    with recorded:
        loss.backward()
    assert {name for name, _ in recorded.dtypes} == {"convolution", "convolution_backward"}
    assert {dtype for _, dtype in recorded.dtypes} == {torch.float32}
    torch.testing.assert_close(loss.float(), expected, atol=0, rtol=2e-2)


def test_compiled_training_and_inference_match_eager():
    """Training as the engine compiles it (with the GPU's tap sums too, so that their compiled form is checked
    here), and inference as `optimize_for_inference` gives it by default."""
    torch._dynamo.reset()
    model = tiny_model(drop_path_rate=0.0)
    x, y = torch.randn(2, 3, 48, 40), torch.randint(0, 10, (2,))
    eager = copy.deepcopy(model).train()
    train_model = use_tap_sums(accelerate_training(copy.deepcopy(model), torch.device("cpu"))).train()
    losses = [nn.functional.cross_entropy(m(x), y) for m in (eager, compile_model(train_model))]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
    for (name, p), q in zip(eager.named_parameters(), train_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    model.eval()
    fast = optimize_for_inference(model)
    assert reference_module(fast) is not fast  # compiled
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Tools on accelerated models

def test_count_macs_counts_what_an_accelerated_model_computes():
    model = tiny_model().eval()
    plain = macs_by_module(model, 64)
    assert cvt.count_macs(optimize_for_inference(model, logits_only=False), 64) == sum(plain.values())
    fast = macs_by_module(optimize_for_inference(model), 64)  # compiled: counted through the wrapper
    last = "stage2.blocks.1."
    assert {k: v for k, v in fast.items() if not k.startswith(last)} == \
           {k: v for k, v in plain.items() if not k.startswith(last)}
    queries = 1 + (64 // 16) ** 2  # the class token and the 4x4 map of stage 2
    for name in ("attn.proj_q", "attn.matmul", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert fast[last + name] * queries == plain[last + name], name
    assert last + "attn.conv_proj_q.conv" not in fast
    assert "attend" not in vars(reference_module(optimize_for_inference(model)).stage0.blocks[0].attn)


@pytest.mark.parametrize("compiled", [False, True])
def test_attention_maps_of_an_accelerated_model_are_the_models(compiled):
    model = tiny_model().eval()
    x = torch.randn(2, 3, 56, 48)
    expected = attention_maps(model, x)
    got = attention_maps(optimize_for_inference(model, compile=compiled), x)
    assert got.key_grid == expected.key_grid and got.token_grid == expected.token_grid
    torch.testing.assert_close(got.last_block, expected.last_block, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rollout, expected.rollout, atol=1e-5, rtol=0)


def test_profile_of_an_accelerated_model_counts_what_it_computes():
    model = tiny_model().eval()
    plain = profile_stages(model, 64)
    fast = profile_stages(optimize_for_inference(model), 64)
    assert [(s.name, s.token_grid, s.blocks) for s in fast] == [(s.name, s.token_grid, s.blocks) for s in plain]
    assert [s.macs for s in fast[:2]] == [s.macs for s in plain[:2]]
    assert 0 < fast[2].macs < plain[2].macs  # the last block computes the class token alone
    assert 0 < fast[2].activation_bytes < plain[2].activation_bytes

"""ONNX and TorchScript export: one file runs at every batch size and resolution and matches PyTorch."""
import json
import warnings

import numpy as np
import pytest
import torch

import cvt
from cvt.cli import main
from cvt.export import check_sizes, export_model
from helpers import TINY as TINY_LAYOUT, randomize_batchnorm

# 32 px, the digits demo's size, where the last stage's keys are one position: the export traces at 64 px.
TINY = dict(TINY_LAYOUT, num_classes=10, img_size=32)
# Shapes the export never saw (it is traced at batch 2, 64x64): other batch sizes, non-square, odd sizes.
UNSEEN_SHAPES = [(1, 32, 32), (3, 64, 64), (1, 80, 48), (3, 56, 72)]


def tiny_model():
    torch.manual_seed(0)
    # Non-trivial BatchNorm statistics, so a graph that dropped or misplaced them would not match.
    return randomize_batchnorm(cvt.create_model("cvt_13_224", **TINY).eval())


LABELS = [f"digit {i}" for i in range(10)]


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    model = tiny_model()
    # What a run fine-tuned at 80 (the model's own size is 64) carries: its labels and its eval preprocessing.
    model.pretrained_cfg.update(label_names=LABELS, input_size=(3, 80, 80), crop_pct=1.0, crop_mode="squash")
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    check = export_model(model, path, "onnx")
    return model, path, check


def assert_matches(run, model):
    generator = torch.Generator().manual_seed(1)
    for batch, h, w in UNSEEN_SHAPES:
        x = torch.randn(batch, 3, h, w, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        out = run(x)
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_onnx_runtime_matches_pytorch_at_any_batch_and_size(onnx_export):
    import onnxruntime

    model, path, check = onnx_export
    assert check.passed and set(check.max_abs_diff) == {(b, h, w) for b in (1, 2) for h, w in check_sizes(model)}
    assert (1, 80, 80) in check.max_abs_diff  # checked at the size it was fine-tuned at, not its own 32
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert isinstance(images.shape[0], str) and images.shape[1] == 3
    assert isinstance(images.shape[2], str) and isinstance(images.shape[3], str)
    assert_matches(lambda x: session.run(None, {images.name: x.numpy()})[0], model)


def test_onnx_file_carries_the_labels_and_the_preprocessing(onnx_export):
    import onnx

    _, path, _ = onnx_export
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(props["label_names"]) == LABELS and props["num_classes"] == "10"
    assert json.loads(props["input_size"]) == [3, 80, 80]
    assert (props["crop_pct"], props["crop_mode"], props["interpolation"]) == ("1.0", "squash", "bicubic")
    assert json.loads(props["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(props["std"]) == pytest.approx([0.229, 0.224, 0.225])


def test_onnx_file_is_self_contained(onnx_export):
    _, path, _ = onnx_export
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.onnx"]


def test_torchscript_matches_pytorch_at_any_batch_and_size(tmp_path):
    model = tiny_model()
    path = tmp_path / "tiny.pt"
    check = export_model(model, path, "torchscript")
    assert check.passed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(path))
    with torch.no_grad():
        assert_matches(lambda x: scripted(x).numpy(), model)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_accelerated_model_exports_and_matches_the_plain_one(tmp_path, fmt):
    model = tiny_model()
    fast = cvt.optimize_for_inference(model)  # compiled: the export looks through the wrapper
    path = tmp_path / f"fast.{fmt}"
    assert export_model(fast, path, fmt).passed
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # noqa: E731
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path))
        run = lambda x: scripted(x).numpy()  # noqa: E731
    with torch.no_grad():
        assert_matches(run, model)


def test_failed_check_leaves_nothing_behind(tmp_path):
    path = tmp_path / "tiny.pt"
    with pytest.raises(ValueError, match="does not reproduce the PyTorch outputs"):
        export_model(tiny_model(), path, "torchscript", atol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_the_model_in_its_mode_and_reports_its_channels(tmp_path):
    torch.manual_seed(0)
    model = cvt.create_model("cvt_13_224", **dict(TINY, in_chans=1)).train()
    check = export_model(model, tmp_path / "gray.pt", "torchscript")
    assert check.passed and model.training
    assert check.summary().startswith(f"1x1x{model.img_size[0]}x{model.img_size[1]}: ")


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="unknown export format 'tflite'.*onnx"):
        export_model(tiny_model(), "x.tflite", "tflite")


def test_cli_export_with_checkpoint(tmp_path, capsys):
    model = tiny_model()
    model.save_pretrained(tmp_path / "weights")
    out = tmp_path / "model.pt"
    main(["export", "--model", "cvt_13_224", "--checkpoint", str(tmp_path / "weights"), "--format", "torchscript",
          "--output", str(out)])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "1x3x64x16" in printed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(out))
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-4, rtol=0)

"""Export to ONNX and TorchScript: one file for every batch size and resolution, checked before it is kept.

CvT has no position embedding, so a single exported graph with a dynamic batch, height and width serves every
input size. An export is written to a temporary file, run at two resolutions (the native one and a non-square
one) and two batch sizes against the PyTorch model, and only moved into place when every output matches.

ONNX goes through `torch.export` (`torch.onnx.export(..., dynamo=True)`) and is checked with ONNX Runtime on
the CPU; `onnx`, `onnxscript` and `onnxruntime` are the optional `export` extra. TorchScript is traced: the
traced graph computes every shape from the input, so it too runs at any batch size and resolution.

A model from `cvt.optimize_for_inference` exports too (its compiled wrapper is looked through), though the
plain model is the one to export: ONNX Runtime folds BatchNorm into the convolutions by itself.

An ONNX file carries what a runtime needs besides the graph as its `metadata_props` (`onnx_metadata`): the label
names and the preprocessing the model was trained or evaluated with (input size, crop, interpolation, mean, std).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .accel import reference_module
from .files import atomic_path
from .weights import label_names

__all__ = ["FORMATS", "ExportCheck", "check_sizes", "export_model", "onnx_metadata"]

FORMATS = ("onnx", "torchscript")
CHECK_BATCH_SIZES = (1, 2)


@dataclass
class ExportCheck:
    """The largest absolute difference from the PyTorch model's outputs, per (batch, height, width) run."""

    max_abs_diff: dict[tuple[int, int, int], float]
    atol: float
    in_chans: int

    @property
    def passed(self) -> bool:
        return all(d <= self.atol for d in self.max_abs_diff.values())

    def summary(self) -> str:
        return ", ".join(f"{b}x{self.in_chans}x{h}x{w}: {d:.1e}" for (b, h, w), d in self.max_abs_diff.items())


EXAMPLE_MIN_SIDE = 64


def used_size(model: nn.Module) -> tuple[int, int]:
    """The resolution the model is used at: the one its weights were trained at where its `pretrained_cfg` records
    it (a fine-tune at another size than the zoo model's), else its own."""
    return tuple(model.pretrained_cfg.get("input_size", (model.in_chans, *model.img_size))[1:])


def check_sizes(model: nn.Module) -> list[tuple[int, int]]:
    """The resolution the model is used at and a non-square one 32 px taller and up to 32 px narrower (224x224 and
    256x192 at 224, 32x32 and 64x16 at 32)."""
    h, w = used_size(model)
    return [(h, w), (h + 32, max(w - 32, (w + 1) // 2, model.min_input_size))]


def onnx_metadata(model: nn.Module) -> dict[str, str]:
    """The ONNX `metadata_props` of an export, all strings (lists as JSON): `label_names` (where the model has
    them, `cvt.weights.label_names`), `num_classes`, and the preprocessing of
    `timm.data.resolve_model_data_config(model)`: `input_size` (C, H, W), `crop_pct`, `crop_mode`,
    `interpolation`, `mean` and `std` (of RGB pixels scaled to 0..1)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    props = {"num_classes": str(model.num_classes), "input_size": json.dumps(list(cfg["input_size"])),
             "crop_pct": str(cfg["crop_pct"]), "crop_mode": cfg["crop_mode"], "interpolation": cfg["interpolation"],
             "mean": json.dumps(list(cfg["mean"])), "std": json.dumps(list(cfg["std"]))}
    names = label_names(model)
    if names:
        props["label_names"] = json.dumps(names)
    return props


def _export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    batch = torch.export.Dim("batch")
    height = torch.export.Dim("height", min=model.min_input_size)
    width = torch.export.Dim("width", min=model.min_input_size)
    program = torch.onnx.export(
        model, (example,), dynamo=True, verbose=False, input_names=["images"], output_names=["logits"],
        dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
    )
    program.model.metadata_props.update(onnx_metadata(model))
    # One self-contained file (every CvT is far below protobuf's 2 GB limit), so it can be moved into place whole.
    program.save(path, external_data=False)


def _load_onnx(path: str) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x.numpy()})[0]


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    # TorchScript is deprecated upstream but still what many C++ and mobile runtimes load; the warning is noise here.
    # So is the tracer's about the model's checks of the input shape, which hold for every input that runs.
    # trace's own check_trace is skipped: export_model runs the saved file against the model at more shapes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), path)


def _load_torchscript(path: str) -> Callable[[torch.Tensor], np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(path)
    return lambda x: module(x).numpy()


_EXPORTERS = {"onnx": (_export_onnx, _load_onnx), "torchscript": (_export_torchscript, _load_torchscript)}


def _compare(run: Callable[[torch.Tensor], np.ndarray], model: nn.Module, atol: float) -> ExportCheck:
    generator = torch.Generator().manual_seed(0)
    diffs = {}
    for h, w in check_sizes(model):
        for batch in CHECK_BATCH_SIZES:
            x = torch.randn(batch, model.in_chans, h, w, generator=generator)
            expected = model(x).numpy()
            diffs[(batch, h, w)] = float(np.abs(run(x) - expected).max())
    return ExportCheck(diffs, atol, model.in_chans)


@torch.no_grad()
def export_model(model: nn.Module, path: str | os.PathLike, fmt: str, atol: float = 1e-4) -> ExportCheck:
    """Export `model` (a CvT) to `path` as "onnx" or "torchscript" and check the file against PyTorch.

    The file is written under a temporary name, run at `check_sizes(model)` with batch sizes 1 and 2, and moved to
    `path` only if every output is within `atol` of the model's; otherwise nothing is left at `path` and a
    ValueError says how far off it was. Returns the differences. The model is exported in eval mode and left in
    the mode it came in.
    """
    if fmt not in _EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {FORMATS}")
    export, load = _EXPORTERS[fmt]
    model = reference_module(model)
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp:
            # torch.export specialises a dimension whose example size is 1: so batch 2, and sides of at least
            # 64 px, where the last stage's keys (at stride 32 in the released layouts) still span 2 positions.
            example = torch.randn(2, model.in_chans, *(max(side, EXAMPLE_MIN_SIDE) for side in used_size(model)))
            export(model, example, str(tmp))
            check = _compare(load(str(tmp)), model, atol)
            if not check.passed:
                raise ValueError(f"the {fmt} export does not reproduce the PyTorch outputs within {atol:g} "
                                 f"(max abs diff {check.summary()}); nothing was written to {path}")
    finally:
        model.train(was_training)
    return check

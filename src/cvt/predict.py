"""Classify image files with a CvT checkpoint, or with the released weights: top-k labels and probabilities.

Labels are the checkpoint's own class names (a model trained or fine-tuned by `cvt train`, a Hugging Face
directory with id2label) or, for a 1000-class model, the ImageNet-1k names timm bundles.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .data import UnreadableImageError, eval_transform, read_image
from .engine import pick_device
from .accel import optimize_for_inference
from .model import load_model
from .weights import label_names


@torch.no_grad()
def predict(images: list[str | os.PathLike], checkpoint: str | os.PathLike | None = None,
            model_name: str | None = None, topk: int = 5, device: str = "auto") -> list[dict[str, Any]]:
    """For each image: its path and the `topk` (label, class index, probability) predictions, best first.

    The weights are `checkpoint`'s, or without one the released weights of `model_name` (`name` or `name.tag`),
    downloaded from the Hugging Face Hub (`cvt.model.load_model`). Images are prepared as the model's held-out
    images were (`timm.data.resolve_model_data_config`: the input size and crop it was trained or evaluated at).
    Fewer than `topk` predictions come back when the model has fewer classes."""
    from timm.data import resolve_model_data_config

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk (--topk) must be a whole number of at least 1, the predictions to show per image; "
                         f"got {topk!r}")
    model = load_model(checkpoint, model_name)
    device_ = pick_device(device)
    fast = optimize_for_inference(model.to(device_), compile=False)
    names = label_names(model) or [f"class {i}" for i in range(model.num_classes)]
    data_cfg = resolve_model_data_config(model)
    _, h, w = data_cfg["input_size"]
    transform = eval_transform({"img_size": h if h == w else (h, w)}, data_cfg)
    mode = "RGB" if model.in_chans == 3 else "L"
    results = []
    for path in images:
        path = Path(path)
        try:
            image = read_image(path, mode)
        except UnreadableImageError as e:
            raise UnreadableImageError(f"cannot read {path} as an image ({e}): pass image files Pillow reads, "
                                       "such as JPEG or PNG") from None
        probs = fast(transform(image).unsqueeze(0).to(device_)).softmax(dim=-1)[0].float().cpu()
        values, indices = probs.topk(min(topk, len(probs)))
        results.append({"image": str(path), "predictions": [
            {"label": names[i], "index": i, "probability": p} for p, i in zip(values.tolist(), indices.tolist())]})
    return results

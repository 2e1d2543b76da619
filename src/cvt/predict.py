"""Classify image files with a CvT checkpoint, or with the released weights: top-k labels and probabilities.

Labels are the checkpoint's own class names (a model trained or fine-tuned by `cvt train`, a Hugging Face
directory with id2label) or, for a 1000-class model, the ImageNet-1k names timm bundles.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .data import eval_transform
from .engine import pick_device
from .accel import optimize_for_inference
from .model import CvT, create_model, model_from_checkpoint
from .weights import label_names


@torch.no_grad()
def predict(images: list[str | os.PathLike], checkpoint: str | os.PathLike | None = None,
            model_name: str | None = None, topk: int = 5, device: str = "auto") -> list[dict[str, Any]]:
    """For each image: its path and the `topk` (label, class index, probability) predictions, best first.

    The weights are `checkpoint`'s, or without one the released weights of `model_name` (`name` or `name.tag`),
    downloaded from the Hugging Face Hub."""
    model = classifier(checkpoint, model_name)
    device_ = pick_device(device)
    fast = optimize_for_inference(model.to(device_), compile=False)
    names = label_names(model) or [f"class {i}" for i in range(model.num_classes)]
    transform = eval_transform({"img_size": model.pretrained_cfg["input_size"][-1]}, model.pretrained_cfg)
    mode = "RGB" if model.in_chans == 3 else "L"
    results = []
    for path in images:
        path = Path(path)
        try:
            image = Image.open(path).convert(mode)
        except (OSError, SyntaxError) as e:
            raise ValueError(f"cannot read {path} as an image ({e}): pass image files Pillow reads, "
                             "such as JPEG or PNG") from None
        probs = fast(transform(image).unsqueeze(0).to(device_)).softmax(dim=-1)[0].float().cpu()
        values, indices = probs.topk(min(topk, len(probs)))
        results.append({"image": str(path), "predictions": [
            {"label": names[i], "index": i, "probability": p} for p, i in zip(values.tolist(), indices.tolist())]})
    return results


def classifier(checkpoint: str | os.PathLike | None, model_name: str | None) -> CvT:
    if checkpoint is not None:
        return model_from_checkpoint(checkpoint, model_name)
    if model_name is None:
        raise ValueError("no weights to classify with: name the released ones to download (--model NAME or "
                         "NAME.TAG, see cvt.list_pretrained()) or give local ones (--checkpoint PATH)")
    return create_model(model_name, pretrained=True)

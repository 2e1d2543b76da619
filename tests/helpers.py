"""What several test files share: the tiny model layout, random BatchNorm state, the official fixtures."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cvt.model import CvT
from cvt.model import cvt_kwargs_from_official_spec, load_weights

# CvT-13's layout at widths 16/32/48: every code path, in milliseconds.
TINY = dict(embed_dims=(16, 32, 48), depths=(1, 1, 2), num_heads=(1, 2, 3))
# Golden outputs of the official implementation, kept with the tests (tests/fixtures/official/README.md).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"


def randomize_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Random running statistics and affine parameters, so that a wrong or missing BatchNorm use shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    return model


def official_model(name: str) -> tuple[CvT, dict[str, torch.Tensor]]:
    """The fixture's model with the official state dict loaded (eval mode), and its inputs and outputs."""
    folder = FIXTURES / name
    spec = json.loads((folder / "spec.json").read_text())
    model = CvT(num_classes=spec["num_classes"], norm_eps=spec["layer_norm_eps"],
                **cvt_kwargs_from_official_spec(spec["spec"]))
    load_weights(model, folder / "state_dict.safetensors")
    return model.eval(), load_file(folder / "io.safetensors")

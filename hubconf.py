"""torch.hub entry points, one per zoo model, each `cvt.create_model(name, pretrained=..., **kwargs)`:

    model = torch.hub.load("<owner>/<repo>", "cvt_13_224", pretrained=True)  # the released weights
    model = torch.hub.load("path/to/checkout", "cvt_21_384", source="local", num_classes=10)

`torch.hub.list` names them. Only callables belong in this module's namespace as entry points, so helpers are
private and nothing callable is imported.
"""
import os
import sys

dependencies = ["torch", "torchvision", "timm", "safetensors", "huggingface_hub", "yaml"]

# torch.hub imports this file from the repository it downloaded (or the local checkout): run that code, not
# another installed copy of cvt.
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(os.path.join(_SRC, "cvt")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

import cvt  # noqa: E402  (after the path set-up above)
from cvt.model import ZOO as _ZOO  # noqa: E402


def _entry_point(name: str):
    def entry_point(pretrained=False, **kwargs):
        return cvt.create_model(name, pretrained=pretrained, **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (f"{name}: `pretrained=True` downloads the released weights from the Hugging Face Hub, "
                           "a path reads local ones; other arguments as cvt.create_model's.")
    return entry_point


for _name in _ZOO:
    globals()[_name] = _entry_point(_name)

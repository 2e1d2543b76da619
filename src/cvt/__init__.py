"""CvT: the Convolutional vision Transformer (Wu et al., ICCV 2021), exact to the official release.

    import cvt
    model = cvt.create_model("cvt_13_224", pretrained="CvT-13-224x224-IN-1k.pth")
    fast = cvt.optimize_for_inference(model)

Every module below is an attribute after a plain `import cvt` (`cvt.inspect.attention_maps`, `cvt.export`,
`cvt.weights`, ...), imported on first use, so that `import cvt` stays quick.
"""
import importlib as _importlib

from .accel import optimize_for_inference
from .flops import count_macs
from .model import CvT, create_model, list_models, list_pretrained

__all__ = ["CvT", "count_macs", "create_model", "list_models", "list_pretrained", "optimize_for_inference"]
__version__ = "0.1.0"

# The package's public modules (all of them but __main__).
MODULES = ("ablations", "accel", "cli", "data", "engine", "export", "files", "flops", "hf", "inspect", "model",
           "predict", "process", "shards", "tables", "weights")


def __getattr__(name: str):
    """`cvt.<module>` for each of MODULES, imported on first use (PEP 562)."""
    if name in MODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *MODULES})

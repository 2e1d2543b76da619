"""CvT: the Convolutional vision Transformer (Wu et al., ICCV 2021), exact to the official release.

    import cvt
    model = cvt.create_model("cvt_13_224", pretrained="CvT-13-224x224-IN-1k.pth")
    fast = cvt.optimize_for_inference(model)
"""
from .accel import optimize_for_inference
from .flops import count_macs
from .model import CvT, create_model, list_models, list_pretrained

__all__ = ["CvT", "count_macs", "create_model", "list_models", "list_pretrained", "optimize_for_inference"]
__version__ = "0.1.0"

"""Other libraries take the `features_only` model as a backbone: a torchvision Faster R-CNN trains and predicts
on its feature pyramid, and transformers' TimmBackbone wraps it by its timm name."""
from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import cvt
from helpers import TINY

IMAGE_SIZE = 128


class FeaturePyramidBackbone(nn.Module):
    """What torchvision's BackboneWithFPN builds (an FPN over the stage maps, with `out_channels` for the
    detector) around any model returning a list of maps. BackboneWithFPN itself cannot take ours: its
    IntermediateLayerGetter calls the backbone's children one after the other, and CvT's stages pass a
    (map, class token) pair on."""

    def __init__(self, features: nn.Module, out_channels: int):
        super().__init__()
        self.body = features
        self.fpn = FeaturePyramidNetwork(features.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))


def tiny_faster_rcnn() -> FasterRCNN:
    torch.manual_seed(0)
    features = cvt.create_model("cvt_13_224", features_only=True, **TINY)
    backbone = FeaturePyramidBackbone(features, out_channels=32)
    levels = len(features.feature_info.channels()) + 1  # the stage maps and the FPN's max-pooled level
    anchors = AnchorGenerator(sizes=tuple((8 * 2 ** i,) for i in range(levels)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes=3, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE,
                      rpn_anchor_generator=anchors, box_roi_pool=roi_pool)


def test_faster_rcnn_trains_and_detects_on_the_feature_pyramid():
    model = tiny_faster_rcnn()
    images = list(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)))
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 30.0, 120.0, 100.0], [5.0, 5.0, 40.0, 40.0]]),
                "labels": torch.tensor([2, 1])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    stem = model.backbone.body.model.stage0.patch_embed.proj.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0  # the detector's loss reaches the backbone's input

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for detection in detections:
        assert detection["boxes"].shape[1:] == (4,)
        assert detection["boxes"].shape[0] == detection["labels"].shape[0] == detection["scores"].shape[0]
        assert set(detection["labels"].tolist()) <= {1, 2}  # 0 is the background


def test_transformers_timm_backbone_wraps_it_by_name():
    from transformers import TimmBackbone, TimmBackboneConfig

    # built from a config, it has random weights (TimmBackbone.from_pretrained passes pretrained=True to timm)
    config = TimmBackboneConfig(backbone="cvt_13_224", out_indices=(0, 1, 2))
    backbone = TimmBackbone(config, **TINY).eval()
    assert backbone.channels == [16, 32, 48]
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 64, 96)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 48, 4, 6)]
    only_last = TimmBackbone(TimmBackboneConfig(backbone="cvt_13_224", out_indices=(2,)), **TINY)
    assert only_last.channels == [48]

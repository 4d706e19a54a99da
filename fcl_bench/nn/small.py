"""Client small models: any timm CNN (``num_classes=0``) followed by a projection to a common width, so
that server-side fusion works across heterogeneous architectures."""

from __future__ import annotations

import timm
import torch
from torch import nn


class SmallModel(nn.Module):
    """``x (B, 3, H, W) -> E (B, width)``: timm backbone features, then a linear projection."""

    def __init__(self, arch: str, width: int):
        super().__init__()
        try:
            self.backbone = timm.create_model(arch, pretrained=False, num_classes=0)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ValueError(f"unknown small-model architecture '{arch}': {e}. "
                             "Use any timm CNN name, e.g. resnet18, mobilenetv3_large_100") from None
        self.arch = arch
        self.width = width
        # timm models with a pre-logits stage (MobileNetV3's conv_head, VGG's ConvMlp) output
        # head_hidden_size features rather than num_features
        out = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.proj = nn.Linear(out, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x))


def build_small_model(arch: str, width: int) -> SmallModel:
    return SmallModel(arch, width)

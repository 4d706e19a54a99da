"""Client small models: any timm CNN (``num_classes=0``) followed by a projection to a common width, so
that server-side fusion works across heterogeneous architectures.

Every method builds its CNNs through the run's :func:`small_model_factory` (``MethodEnv.build_small_model``),
which decides where a backbone starts (the ``small_pretrained`` run option):

- ``small_pretrained=false``: timm's random init;
- ``true`` on a dataset with pretraining classes (the synthetic dataset, offline): the backbone pretrained by
  the suite on ``dataset.pretrain`` (:func:`fcl_bench.nn.pretrain.pretrain_small_model`; shipped or cached
  like the tiny ViT), never on an FCL class;
- ``true`` on a real dataset: timm's pretrained tag (``timm.create_model(arch, pretrained=True)``, from the
  hub or timm's local cache).

The projection always starts from its seeded random init, and the backbone is built (drawing its random
init) before any pretrained weights are loaded, so both settings draw the same random numbers.

With the ``channels_last`` run option the factory puts the backbone's parameters in channels-last memory
layout and the model hands its input to the backbone in that layout: the same model, computed by other
convolution kernels (on a CPU, oneDNN's channels-last depthwise and 1x1 convolutions are much faster than
the default layout's at these sizes). State dicts leave the model contiguous (the wire and the checkpoints
copy tensors to contiguous), and loading one into the model keeps its layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

if TYPE_CHECKING:
    from fcl_bench.data import Dataset, Preprocess


class SmallModelError(ValueError):
    """A small model that cannot be built or whose pretrained weights cannot be had; says what to do."""


def small_backbone(arch: str, pretrained: bool = False) -> nn.Module:
    """The timm model ``arch`` without its classifier (``num_classes=0``): ``(B, 3, H, W) -> (B, D)``.

    VGG's pre-logits stage is dropped too (:func:`_without_conv_mlp`): the features are its conv body's,
    globally pooled."""
    try:
        return _without_conv_mlp(timm.create_model(arch, pretrained=pretrained, num_classes=0))
    except RuntimeError as e:  # timm: "Unknown model (...)"
        if not timm.is_model(arch):
            raise SmallModelError(f"unknown small-model architecture '{arch}': {e}. "
                                  "Use any timm CNN name, e.g. resnet18, mobilenetv3_large_100") from None
        raise
    except Exception as e:  # network failures from the hub, an arch without pretrained weights
        if not pretrained:
            raise
        raise SmallModelError(
            f"could not fetch timm's pretrained weights for small model '{arch}' ({type(e).__name__}: {e}). "
            "Offline? Download them on a connected machine into timm's cache, or run with "
            "-o small_pretrained=false (random init)") from None


def _without_conv_mlp(model: nn.Module) -> nn.Module:
    """``model`` with a ``ConvMlp`` pre-logits stage (timm's VGG: the classifier's two 4096-wide layers as a
    7x7 and a 1x1 conv, 102.8M of VGG-16's 134.8M parameters) replaced by the identity, so its features are
    the globally pooled conv body's (``num_features``, 512), as VGG is used as a feature extractor
    (torchvision's ``vgg16().features``). Kept, that stage is unnormalised and made for a 7x7 map: at 32 px it
    sees the 1x1 map replicated to 7x7, its features grow to ~1e7 under Adam's first steps and Fed-LSCL's
    generated LoRA (both factors linear in the features) diverges within a task."""
    from timm.models.vgg import ConvMlp

    if isinstance(getattr(model, "pre_logits", None), ConvMlp):
        model.pre_logits = nn.Identity()
        model.head_hidden_size = model.num_features
    return model


def feature_width(model: nn.Module) -> int:
    """The width of ``model``'s features: timm models with a pre-logits stage (MobileNetV3's conv_head)
    output ``head_hidden_size`` features rather than ``num_features``."""
    return getattr(model, "head_hidden_size", None) or model.num_features


class SmallModel(nn.Module):
    """``x (B, 3, H, W) -> E (B, width)``: timm backbone features, then a linear projection."""

    def __init__(self, arch: str, width: int):
        super().__init__()
        self.backbone = small_backbone(arch)
        self.arch = arch
        self.width = width
        self.proj = nn.Linear(feature_width(self.backbone), width)
        self.channels_last = False

    def to_channels_last(self) -> SmallModel:
        """Parameters and inputs of the backbone in channels-last layout from now on (see the module docstring)."""
        self.backbone.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(self.backbone(x))


def build_small_model(arch: str, width: int) -> SmallModel:
    """A small model at timm's random init (seeded by the global torch RNG)."""
    return SmallModel(arch, width)


def pretrained_backbone_state(arch: str, dataset: Dataset, pre: Preprocess, device: torch.device | str = "cpu",
                              progress: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The pretrained state dict of ``arch``'s backbone for a run on ``dataset`` with inputs through ``pre``,
    and one line saying where it comes from (see the module docstring)."""
    if dataset.pretrain is not None:
        from fcl_bench.nn import pretrain

        backbone, report = pretrain.pretrain_small_model(arch, dataset, pre, device=device, progress=progress)
        return backbone.state_dict(), (f"{arch} backbone pretrained on {dataset.name}'s pretraining classes "
                                       f"({report['origin']}, sha256 {report['weights_sha256'][:12]})")
    with torch.random.fork_rng(devices=[]):  # the random init it overwrites must not move the run's RNG
        backbone = small_backbone(arch, pretrained=True)
    return backbone.state_dict(), f"{arch} backbone from timm's pretrained weights ({backbone.pretrained_cfg.get('tag') or 'default tag'})"


def small_model_factory(pretrained: bool, dataset: Dataset, pre: Preprocess, device: torch.device | str = "cpu",
                        log: Callable[[str], None] = print, progress: bool = True,
                        channels_last: bool = False) -> Callable[[str, int], SmallModel]:
    """The run's ``(arch, width) -> SmallModel``: random init, or with ``pretrained`` the backbone of
    :func:`pretrained_backbone_state` (fetched once per arch, on the first model of that arch); with
    ``channels_last`` in channels-last layout."""
    states: dict[str, dict[str, torch.Tensor]] = {}

    def make(arch: str, width: int) -> SmallModel:
        model = SmallModel(arch, width)
        if pretrained:
            if arch not in states:
                states[arch], line = pretrained_backbone_state(arch, dataset, pre, device, progress)
                log(line)
            model.backbone.load_state_dict(states[arch])
        return model.to_channels_last() if channels_last else model

    return make

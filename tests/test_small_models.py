"""Client small models: every architecture of the paper's Fig. 4 builds and runs at the synthetic image size."""

from __future__ import annotations

import pytest
import torch

from fcl_bench.nn.small import build_small_model

FIG4_ARCHS = ["resnet18", "mobilenetv3_large_100", "densenet121", "efficientnet_b3", "vgg16"]


@pytest.mark.parametrize("arch", FIG4_ARCHS)
def test_fig4_arch_runs_at_32px_and_projects_to_common_width(arch):
    torch.manual_seed(0)
    model = build_small_model(arch, 48).train()
    x = torch.randn(2, 3, 32, 32)
    e = model(x)
    assert e.shape == (2, 48)
    e.square().mean().backward()
    assert model.proj.weight.grad is not None and torch.isfinite(model.proj.weight.grad).all()


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown small-model architecture 'resnet_nope'"):
        build_small_model("resnet_nope", 8)

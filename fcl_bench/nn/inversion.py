"""Gradient inversion: a fixed, shared LeNet, the gradient a client shares through it, iDLG label inference
and L-BFGS gradient matching (DLG / iDLG), as GLFC's proxy server uses them and as privacy checks of any
gradient-sharing method can.

* :class:`LeNet` / :func:`shared_lenet`: the DLG LeNet (three 5x5 convolutions with sigmoid activations,
  12 channels, strides 2, 2, 1, then one linear layer), every weight and bias drawn from U(-0.5, 0.5)
  under a fixed seed, so every party that builds it with the same seed holds the same network without
  anything crossing the wire. At 32x32x3 with 100 classes it has 85,036 parameters (the official GLFC
  count: 912 + 3,612 + 3,612 + 76,900);
* :func:`input_gradient`: ``d CE(net(x), y) / d params`` for one sample, the tensors a client shares;
* :func:`idlg_labels`: iDLG (Zhao et al., 2020): with CE on one sample and non-negative features h (the
  sigmoid output), the last layer's weight gradient row c is ``(p_c - [c = y]) h``, negative only for the
  true class, so ``y = argmin_c sum_j dW[c, j]``;
* :func:`matching_loss` / :func:`invert_gradient`: DLG's reconstruction, ``x* = argmin_x sum_l
  ||d CE(net(x), y)/d theta_l - g_l||^2`` from ``x_0 ~ N(0, 1)`` with L-BFGS, returning the last iterates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeNet", "idlg_labels", "input_gradient", "invert_gradient", "matching_loss", "shared_lenet"]


def _conv_out(size: int) -> int:
    """Spatial size after a 5x5 convolution with padding 2 and stride 2."""
    return math.ceil(size / 2)


class LeNet(nn.Module):
    """DLG's LeNet for ``(B, channels, H, W)`` images -> ``(B, num_classes)`` logits; sigmoid activations
    (twice differentiable, and non-negative features for iDLG)."""

    def __init__(self, num_classes: int, channels: int = 3, height: int = 32, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), nn.Sigmoid(),
        )
        self.hidden = 12 * _conv_out(_conv_out(height)) * _conv_out(_conv_out(width))
        self.fc = nn.Linear(self.hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def shared_lenet(seed: int, num_classes: int, image_shape: Sequence[int],
                 device: torch.device | str = "cpu") -> LeNet:
    """The LeNet every party builds identically from ``seed``: all weights and biases ~ U(-0.5, 0.5) (the
    official init), drawn on the CPU with a private generator (the global RNG is untouched), frozen."""
    c, h, w = (int(s) for s in image_shape)
    net = LeNet(num_classes, c, h, w)
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5)
    return net.to(device).eval().requires_grad_(False)


def _grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
    params = list(net.parameters())
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        try:
            loss = F.cross_entropy(net(x), y)
            return torch.autograd.grad(loss, params, create_graph=create_graph)
        finally:
            for p in params:
                p.requires_grad_(False)


def input_gradient(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """``d CE(net(x), y) / d theta`` per parameter of ``net`` (in ``net.parameters()`` order), detached.
    ``x``: ``(1, C, H, W)``, ``y``: ``(1,)`` int64."""
    return [g.detach().clone() for g in _grads(net, x.detach(), y, create_graph=False)]


def idlg_labels(last_weight_grads: torch.Tensor) -> torch.Tensor:
    """iDLG label inference: ``last_weight_grads`` ``(n, num_classes, hidden)`` (or one ``(num_classes,
    hidden)``), the last linear layer's weight gradients of ``n`` single-sample CE losses -> ``(n,)`` labels,
    the row with the most negative sum (exact when the layer's input is non-negative)."""
    g = last_weight_grads if last_weight_grads.ndim == 3 else last_weight_grads.unsqueeze(0)
    return g.sum(-1).argmin(-1)


def matching_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Sequence[torch.Tensor],
                  create_graph: bool = True) -> torch.Tensor:
    """``sum_l ||d CE(net(x), y)/d theta_l - target_l||^2``, differentiable in ``x`` (``create_graph``)."""
    grads = _grads(net, x, y, create_graph=create_graph)
    return sum(((g - t) ** 2).sum() for g, t in zip(grads, target))


def invert_gradient(net: nn.Module, target: Sequence[torch.Tensor], label: int, shape: Sequence[int],
                    iterations: int, keep: int, lr: float = 0.1, max_iter: int = 20,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[float]]:
    """DLG reconstruction of one image from its gradient ``target`` (per parameter of ``net``) and ``label``.

    Starts from ``x_0 ~ N(0, 1)`` of ``shape`` ``(C, H, W)`` (drawn on the CPU from ``generator``) and takes
    ``iterations`` :class:`torch.optim.LBFGS` steps (``lr``, ``max_iter`` inner iterations each) on
    :func:`matching_loss`. Returns the last ``keep`` iterates ``(min(keep, iterations), C, H, W)`` (the
    official GLFC keeps 20 of 250 as its proxy set) and the matching loss before the first step and after
    every step (``iterations + 1`` values). A non-finite loss stops the run early; the iterates kept are then
    the finite ones before it.
    """
    device = target[0].device
    x0 = torch.randn(1, *shape, generator=generator).to(device)
    x = x0.clone().requires_grad_(True)
    y = torch.tensor([int(label)], device=device)
    opt = torch.optim.LBFGS([x], lr=lr, max_iter=max_iter)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = matching_loss(net, x, y, target)
        loss.backward(inputs=[x])  # the image only: the shared net stays fixed, its .grad untouched
        return loss

    with torch.no_grad():
        losses = [float(matching_loss(net, x, y, target, create_graph=False))]
    iterates: list[torch.Tensor] = []
    for _ in range(iterations):
        opt.step(closure)
        with torch.no_grad():
            loss = float(matching_loss(net, x, y, target, create_graph=False))
        if not math.isfinite(loss) or not torch.isfinite(x).all():
            break
        losses.append(loss)
        iterates.append(x.detach()[0].clone())
        del iterates[:-keep]
    if not iterates:
        iterates = [x0[0]]
    return torch.stack(iterates), losses

"""Weighted averaging of trainable parameters: the one FedAvg helper every method reuses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def trainable_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` (``requires_grad``), detached; never buffers such as
    BatchNorm running statistics, never frozen weights."""
    return {prefix + n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy ``state`` (as produced by :func:`trainable_state`) into ``model``'s parameters in place."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and prefix + n not in state]
    if missing:
        raise KeyError(f"download lacks trainable parameters: {missing[:5]}")
    for n, p in params.items():
        if prefix + n in state:
            p.copy_(state[prefix + n].to(p.device, p.dtype))


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_k w_k * state_k / sum_k w_k`` per tensor (float64 accumulation), e.g. FedAvg with ``w_k = n_k``.

    All states must hold the same names and shapes.
    """
    if not states:
        raise ValueError("nothing to average")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"averaging weights must sum to a positive number, got {list(weights)}")
    keys = list(states[0].keys())
    for i, s in enumerate(states[1:], 1):
        if set(s.keys()) != set(keys):
            raise ValueError(f"states to average hold different tensors: state {i} differs from state 0 in "
                             f"{sorted(set(s.keys()) ^ set(keys))[:5]}")
        # broadcasting would silently average tensors of different shapes
        bad = [k for k in keys if s[k].shape != states[0][k].shape]
        if bad:
            raise ValueError(f"state {i} has other shapes than state 0 for {bad[:5]}: "
                             f"{tuple(s[bad[0]].shape)} vs {tuple(states[0][bad[0]].shape)}")
    out = {}
    for k in keys:
        acc = sum(s[k].double() * (w / total) for s, w in zip(states, weights))
        if not states[0][k].is_floating_point():
            acc = acc.round()  # integer tensors (counters): nearest, not truncated toward zero
        out[k] = acc.to(states[0][k].dtype)
    return out

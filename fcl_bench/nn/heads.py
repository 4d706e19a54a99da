"""Classification heads shared by methods."""

from __future__ import annotations

import math

import torch
from torch import nn


def masked_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with every class outside ``allowed`` (global ids) set to -inf."""
    mask = torch.full((logits.shape[1],), float("-inf"), device=logits.device, dtype=logits.dtype)
    mask[allowed] = 0
    return logits + mask


class GrowingHead(nn.Module):
    """A linear head over the classes a client has seen; rows are added per task, old rows kept.

    ``forward`` returns logits over ALL ``num_classes`` global classes, ``-inf`` for classes without a row,
    so predictions are always indexed by global class id.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))
        self.register_buffer("classes", torch.empty(0, dtype=torch.long))

    def add_classes(self, classes: list[int]) -> None:
        """Append rows for ``classes`` (global ids not yet in the head), initialised like ``nn.Linear``."""
        new = [c for c in classes if c not in set(self.classes.tolist())]
        if not new:
            return
        dev = self.weight.device
        w = torch.empty(len(new), self.in_features, device=dev)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.in_features)
        b = torch.empty(len(new), device=dev).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.data, w]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, b]))
        self.classes = torch.cat([self.classes, torch.as_tensor(new, device=self.classes.device)])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved head may hold more rows than this fresh one: take its size before loading
        w = state_dict.get(prefix + "weight")
        if w is not None and w.shape != self.weight.shape:
            dev = self.weight.device
            self.weight = nn.Parameter(torch.empty(w.shape, device=dev))
            self.bias = nn.Parameter(torch.empty(w.shape[0], device=dev))
            self.classes = torch.empty(w.shape[0], dtype=torch.long, device=self.classes.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, in_features)`` -> logits ``(B, num_classes)``."""
        local = nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        out = torch.full((x.shape[0], self.num_classes), float("-inf"), device=x.device, dtype=local.dtype)
        out[:, self.classes] = local
        return out

"""Class prototypes in feature space: the scaled Euclidean distance, nearest-prototype logits and PILoRA's
server-side prototype re-weighting.

* :func:`prototype_distance`: ``d_k(f) = sqrt((|f|^2 + |c_k|^2 - 2 f.c_k) / d)`` for every feature and
  prototype (PILoRA's ``compute_distance``; the squared term is clamped at a tiny positive value, so rounding
  can neither produce a NaN nor an infinite gradient at ``f = c_k``);
* :func:`reweight_prototypes`: one class's uploaded prototypes ``p_k`` (one per client) fused by how close
  each is to the clients' class means ``mu_j``: ``D_k = sum_j |p_k - mu_j|``, ``s = 1 / D`` min-max
  normalised over the clients, ``w = softmax(s / tau)``, ``p = sum_k w_k p_k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["prototype_distance", "reweight_prototypes", "reweight_weights"]

_TINY = 1e-12


def prototype_distance(features: Tensor, prototypes: Tensor) -> Tensor:
    """``(B, d)`` features, ``(C, d)`` prototypes -> ``(B, C)`` distances ``sqrt(|f - c|^2 / d)``.

    Computed as ``|f|^2 + |c|^2 - 2 f.c`` (as the official code does) and clamped at ``1e-12`` before the
    square root.
    """
    if features.dim() != 2 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"prototype_distance needs features (B, d) and prototypes (C, d); got "
                         f"{tuple(features.shape)} and {tuple(prototypes.shape)}")
    sq = (features.pow(2).sum(1, keepdim=True) + prototypes.pow(2).sum(1)[None, :]
          - 2 * features @ prototypes.T)
    return (sq / features.shape[1]).clamp_min(_TINY).sqrt()


def reweight_weights(prototypes: Tensor, means: Tensor, temperature: float = 0.2) -> Tensor:
    """The fusion weights ``(K,)`` of ``K`` uploaded prototypes ``(K, d)`` of one class given ``J`` class
    means ``(J, d)`` (``J >= 1``).

    Division-by-zero guards: ``D_k`` is clamped at ``1e-12`` (a prototype equal to every mean gets the
    largest ``s``, not an infinity); when all ``s`` are equal (one client, or all distances equal) the
    min-max range is zero and every normalised ``s`` is 0, so the weights are uniform.
    """
    if prototypes.dim() != 2 or means.dim() != 2 or prototypes.shape[1] != means.shape[1] or not len(means):
        raise ValueError(f"reweight_weights needs prototypes (K, d) and at least one mean (J, d); got "
                         f"{tuple(prototypes.shape)} and {tuple(means.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    D = torch.cdist(prototypes.double(), means.double()).sum(1)
    s = 1.0 / D.clamp_min(_TINY)
    span = s.max() - s.min()
    norm = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    return torch.softmax(norm / temperature, dim=0)


def reweight_prototypes(prototypes: Tensor, means: Tensor | None, temperature: float = 0.2) -> Tensor:
    """One class's fused prototype ``(d,)``: ``sum_k w_k p_k`` (:func:`reweight_weights`); with no class
    mean at all (``means`` ``None`` or empty) the plain average of the prototypes."""
    if means is None or not len(means):
        return prototypes.mean(0)
    w = reweight_weights(prototypes, means, temperature)
    return (w[:, None] * prototypes.double()).sum(0).to(prototypes.dtype)

"""Exemplar selection for replay buffers: iCaRL herding and lowest-loss class-balanced selection.

Both return positions into the candidate set, so a client keeps its raw samples as a view on its own data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["herding", "herding_per_class", "lowest_loss_per_class"]


def herding(features: torch.Tensor, m: int) -> np.ndarray:
    """iCaRL herding (Rebuffi et al., 2017, Alg. 4): ``m`` positions of ``features`` ``(n, d)``, in selection
    order, chosen greedily so that the running mean of the L2-normalised chosen features stays closest to
    the mean of all of them: step ``k`` picks ``argmin_i || mu - (x_i + sum_{j<k} p_j) / k ||``. Each sample
    is picked at most once; ``m > n`` returns all ``n``.
    """
    x = torch.nn.functional.normalize(features.detach().double(), dim=1)
    n = x.shape[0]
    m = min(int(m), n)
    mu = x.mean(0)
    chosen: list[int] = []
    acc = torch.zeros_like(mu)
    available = torch.ones(n, dtype=torch.bool)
    for k in range(1, m + 1):
        dist = ((mu - (x + acc) / k) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(torch.argmin(dist))
        chosen.append(i)
        available[i] = False
        acc += x[i]
    return np.asarray(chosen, dtype=np.int64)


def herding_per_class(features: torch.Tensor, labels: np.ndarray, classes: Sequence[int], m: int) -> np.ndarray:
    """Herding within each class of ``classes``: sorted positions, at most ``m`` per class."""
    keep = []
    for c in classes:
        pos = np.flatnonzero(np.asarray(labels) == c)
        if len(pos):
            keep.append(pos[herding(features[torch.as_tensor(pos)], m)])
    return np.sort(np.concatenate(keep)) if keep else np.empty(0, dtype=np.int64)


def lowest_loss_per_class(losses: np.ndarray, labels: np.ndarray, classes: Sequence[int], m: int) -> np.ndarray:
    """Class-balanced selection: the ``m`` positions of lowest ``losses`` in each class of ``classes``
    (ties broken by position), sorted."""
    losses, labels = np.asarray(losses), np.asarray(labels)
    keep = []
    for c in classes:
        pos = np.flatnonzero(labels == c)
        keep.append(pos[np.argsort(losses[pos], kind="stable")[:m]])
    return np.sort(np.concatenate(keep)) if keep else np.empty(0, dtype=np.int64)

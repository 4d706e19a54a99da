"""Frozen-feature cache: the frozen foundation model's outputs, computed once per sample and reused across
rounds, clients and methods of a run.

Two kinds of entry: ``cls`` (final-norm CLS feature, ``(d,)`` per sample) and ``prefix`` at block ``b``
(the tokens entering block ``b``, ``(N, d)`` per sample). An entry is keyed by the foundation model's key,
the layer, the dataset fingerprint and split, and the preprocessing key, so two runs or two methods that
share all four share the values. The cache must be bypassed when inputs are augmented (the frozen output
then differs per epoch): call the foundation model directly, or construct with ``enabled=False``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from fcl_bench.data import Batch, ImageSource
from fcl_bench.nn.foundation import FoundationModel


class FeatureCache:
    """Lazily filled per-split tables of frozen outputs.

    ``sources``: split name -> :class:`ImageSource`. ``max_bytes``: a table that would exceed it is not
    kept (outputs are then recomputed each time, with a warning), so paper-scale prefix caches cannot
    exhaust memory. ``storage``: where the tables live (default: the model's device).
    """

    def __init__(self, foundation: FoundationModel, sources: dict[str, ImageSource], fingerprint: str,
                 batch_size: int = 256, enabled: bool = True, max_bytes: float = 8e9,
                 storage: torch.device | str | None = None):
        self.fm = foundation
        self.sources = sources
        self.fingerprint = fingerprint
        self.batch_size = batch_size
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.storage = torch.device(storage) if storage is not None else foundation.device
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._refused: set[tuple] = set()
        self.hits = 0
        self.misses = 0

    def key(self, layer: str, split: str) -> tuple:
        return (self.fm.key, layer, self.fingerprint, split, self.fm.preprocess.key())

    def _compute(self, layer: str, split: str, idx: np.ndarray) -> torch.Tensor:
        src = self.sources[split]
        outs = []
        for s in range(0, len(idx), self.batch_size):
            x = src.load(idx[s:s + self.batch_size], self.fm.preprocess, self.fm.device)
            if layer == "cls":
                outs.append(self.fm.cls(x))
            else:
                outs.append(self.fm.prefix(x, int(layer.split(":")[1])))
        return torch.cat(outs)

    def _lookup(self, layer: str, batch: Batch) -> torch.Tensor:
        idx = batch.index.cpu().numpy()
        key = self.key(layer, batch.split)
        if not self.enabled or key in self._refused:
            self.misses += len(idx)
            return self._compute(layer, batch.split, idx) if batch._x is None else self._from_x(layer, batch.x)
        if key not in self._tables:
            probe = self._compute(layer, batch.split, idx[:1])
            n = len(self.sources[batch.split])
            nbytes = n * probe[0].numel() * probe.element_size()
            if nbytes > self.max_bytes:
                warnings.warn(f"feature cache for {layer} on {batch.split} would need {nbytes / 1e9:.1f} GB "
                              f"(> max_bytes {self.max_bytes / 1e9:.1f} GB): recomputing instead", stacklevel=2)
                self._refused.add(key)
                return self._lookup(layer, batch)
            values = torch.zeros((n, *probe.shape[1:]), dtype=probe.dtype, device=self.storage)
            self._tables[key] = (values, torch.zeros(n, dtype=torch.bool))
        values, filled = self._tables[key]
        t_idx = torch.as_tensor(idx)
        missing = t_idx[~filled[t_idx]].unique()
        if len(missing):
            values[missing.to(values.device)] = self._compute(layer, batch.split, missing.numpy()).to(self.storage)
            filled[missing] = True
        self.hits += len(idx) - len(missing)
        self.misses += len(missing)
        return values[t_idx.to(values.device)].to(self.fm.device)

    def _from_x(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        return self.fm.cls(x) if layer == "cls" else self.fm.prefix(x, int(layer.split(":")[1]))

    def cls(self, batch: Batch) -> torch.Tensor:
        """Final-norm CLS features of the frozen model for ``batch``: ``(B, d)``."""
        return self._lookup("cls", batch)

    def prefix(self, batch: Batch, block: int) -> torch.Tensor:
        """Tokens entering block ``block`` of the frozen model for ``batch``: ``(B, N, d)``."""
        if not 0 <= block <= self.fm.depth:
            raise ValueError(f"block {block} does not exist: the model has blocks 0..{self.fm.depth - 1}")
        return self._lookup(f"prefix:{block}", batch)

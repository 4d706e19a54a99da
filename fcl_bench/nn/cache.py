"""Frozen-feature cache: the frozen foundation model's outputs, computed once per sample and reused across
rounds, clients and methods of a run.

Two kinds of entry: ``cls`` (final-norm CLS feature, ``(d,)`` per sample) and ``prefix`` at block ``b``
(the tokens entering block ``b``, ``(N, d)`` per sample). An entry is keyed by the foundation model's key,
the layer, the dataset fingerprint and split, and the preprocessing key, so two runs or two methods that
share all four share the values. The cache must be bypassed when inputs are augmented (the frozen output
then differs per epoch): call the foundation model directly, or construct with ``enabled=False``.

Filling the cache is shared harness work, not a method's: it runs outside any FLOP counter the
accounting has open (so a method's FLOPs do not depend on which run of a process filled the cache first)
and is counted on its own (``fill_samples``, ``fill_flops``, ``fill_seconds``).

Methods never see the cache itself: each client gets a :class:`FeatureView` that answers only for its
own training batches and, while the harness evaluates it, test batches; the server's view answers only
for the server-held split.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np
import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

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
        self.fill_samples = 0
        self.fill_flops = 0
        self.fill_seconds = 0.0

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

    def _fill(self, layer: str, split: str, idx: np.ndarray) -> torch.Tensor:
        """Compute entries to store: hidden from any FLOP counter the caller has open, counted here."""
        t0 = time.perf_counter()
        with _disable_current_modes(), FlopCounterMode(display=False) as counter:
            out = self._compute(layer, split, idx)
        self.fill_flops += int(counter.get_total_flops())
        self.fill_samples += len(idx)
        self.fill_seconds += time.perf_counter() - t0
        return out

    def fill_totals(self) -> dict[str, float]:
        """Cache-fill work so far: samples, FLOPs, seconds."""
        return {"samples": self.fill_samples, "flops": self.fill_flops, "seconds": self.fill_seconds}

    def _lookup(self, layer: str, batch: Batch) -> torch.Tensor:
        idx = batch.index.cpu().numpy()
        key = self.key(layer, batch.split)
        if not self.enabled or key in self._refused:
            self.misses += len(idx)
            return self._compute(layer, batch.split, idx) if batch._x is None else self._from_x(layer, batch.x)
        if key not in self._tables:
            with _disable_current_modes():  # sizing the table is harness work too
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
            values[missing.to(values.device)] = self._fill(layer, batch.split, missing.numpy()).to(self.storage)
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


class FeatureView:
    """A :class:`FeatureCache` as one party may use it: only for batches of samples it may see.

    ``allowed``: split -> boolean mask over that split's samples (``None`` for a split it may not read).
    The harness widens the mask when a client starts a task and opens the test split only while it
    evaluates the client (:meth:`open_test`). A batch outside the mask is a ``PermissionError``.
    """

    def __init__(self, cache: FeatureCache, who: str, allowed: dict[str, np.ndarray] | None = None):
        self._cache = cache
        self.who = who
        self._allowed: dict[str, np.ndarray] = dict(allowed or {})
        self._test_open = False

    def allow(self, split: str, indices: np.ndarray) -> None:
        """Let this party read ``indices`` of ``split`` from now on."""
        n = len(self._cache.sources[split])
        mask = self._allowed.get(split)
        if mask is None:
            mask = np.zeros(n, dtype=bool)
        mask[np.asarray(indices, dtype=np.int64)] = True
        self._allowed[split] = mask

    @contextlib.contextmanager
    def open_test(self):
        """While the harness evaluates this party: test batches are answered."""
        self._test_open = True
        try:
            yield
        finally:
            self._test_open = False

    def _check(self, batch: Batch) -> None:
        if batch.split == "test":
            if self._test_open:
                return
            raise PermissionError(f"{self.who}: test features are available only inside predict")
        mask = self._allowed.get(batch.split)
        idx = batch.index.cpu().numpy()
        if mask is None or not mask[idx].all():
            raise PermissionError(f"{self.who}: the batch holds {batch.split} samples this party does not hold")

    def cls(self, batch: Batch) -> torch.Tensor:
        """Final-norm CLS features of the frozen model for ``batch``: ``(B, d)``."""
        self._check(batch)
        return self._cache.cls(batch)

    def prefix(self, batch: Batch, block: int) -> torch.Tensor:
        """Tokens entering block ``block`` of the frozen model for ``batch``: ``(B, N, d)``."""
        self._check(batch)
        return self._cache.prefix(batch, block)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

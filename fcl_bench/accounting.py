"""Compute accounting: wall time, FLOPs (``torch.utils.flop_counter``), peak memory.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which slows the counted code
down; with ``mode="sampled"`` (the default) only the first measured call of each task of each party (a
client's first round it takes part in, the server's first aggregation) is counted and its later calls in
the task reuse that count (rows say ``flops_measured``). ``mode="all"`` counts every
round, ``"off"`` none. Peak memory is the CUDA allocator's peak on GPU, else the process's peak RSS
(``ru_maxrss``: a process-wide high-water mark, not per client).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Measurement:
    seconds: float = 0.0
    flops: int | None = None
    flops_measured: bool = False
    peak_memory_bytes: int = 0
    memory_kind: str = "process_rss"


def _rss_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Accountant:
    """Measures client rounds and server steps; keeps the measured FLOPs per (party, task) for sampled mode.

    ``party`` is a client id or a server step name (``"server:round"`` ...).
    """

    def __init__(self, device: torch.device, mode: str = "sampled"):
        if mode not in ("sampled", "all", "off"):
            raise ValueError(f"flops mode must be sampled, all or off; got '{mode}'")
        self.device = device
        self.mode = mode
        self._flops: dict[tuple[int | str, int], int] = {}

    @contextlib.contextmanager
    def measure(self, party: int | str, task: int) -> Iterator[Measurement]:
        m = Measurement()
        count = self.mode == "all" or (self.mode == "sampled" and (party, task) not in self._flops)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        counter = FlopCounterMode(display=False) if count else contextlib.nullcontext()
        t0 = time.perf_counter()
        with counter:
            yield m
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            m.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
            m.memory_kind = "cuda_allocator"
        else:
            m.peak_memory_bytes = _rss_peak_bytes()
        m.seconds = time.perf_counter() - t0
        if count:
            m.flops = int(counter.get_total_flops())
            m.flops_measured = True
            self._flops[(party, task)] = m.flops
        elif self.mode == "sampled":
            m.flops = self._flops.get((party, task))


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` holds the seconds."""
    out = [0.0]
    t0 = time.perf_counter()
    yield out
    out[0] = time.perf_counter() - t0

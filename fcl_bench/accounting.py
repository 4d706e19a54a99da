"""Compute accounting: wall time, FLOPs, peak memory.

FLOPs are counted by :class:`FlopCounter`, a dispatch mode that applies the formulas of
``torch.utils.flop_counter`` (matrix products, convolutions, attention; forward and backward; an
elementwise op counts 0) exactly as :class:`torch.utils.flop_counter.FlopCounterMode` does, without its
per-module bookkeeping. A counted op pays a Python round trip, so counting every op slows the counted
code down by a third or more; three modes:

* ``"all"``: every op of every client round and server step is counted.
* ``"sampled"`` (the default): each measured call is cut into *steps* at every optimiser step
  (``torch.optim`` step hooks) and at the call's start and end. A step is described by its *signature*,
  the sequence of outermost module calls it makes (module calls made outside any other module's
  forward: the module's structure (its and its submodules' classes), the shapes and ``requires_grad`` of all its parameters, train/eval mode, grad
  mode, and the shape, dtype and ``requires_grad`` of every tensor argument). The FLOPs of a step whose signature was already
  counted for the same kind of party (any client, or one kind of server step) are taken from that count:
  the clients share their signatures, so a step one client counted is reused by the others. A step whose signature is new is
  counted: the counter is switched on where its signature departs from every known one (at its first
  module call for a new batch size, a new phase or a new model), and what ran before that point is
  credited from the known step it matched so far. Ops before a step's first module call are always
  counted, so work done without modules (a closed-form solve, a Gram matrix) is never reused.
  The result equals ``"all"`` whenever a step's FLOPs are a function of its signature, i.e. when every
  shape that sets a matrix product's size reaches some outermost module call of the step as an input or
  parameter shape, a module's forward takes no data-dependent branch that changes its FLOPs, and the
  ops between two module calls do not depend on which module is called next.
  Where a step cannot be credited exactly (it ends where the known steps went on, or departs right after
  a point where the known steps ended) its FLOPs are estimated from the nearest known step and the
  measurement says so (``flops_exact = False``; :attr:`Accountant.inexact` counts them).
  ``tests/test_flops.py`` checks sampled against all on the smoke preset.
* ``"off"``: nothing is counted (rows carry ``flops = None``).

``flops_measured`` of a measurement is True when all its FLOPs were counted during that very call (mode
``"all"``, or a sampled call none of whose steps reused an earlier count), False when some were taken from
identical earlier steps. Peak memory is the CUDA allocator's peak on GPU, else the process's peak RSS
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
import torch.optim.optimizer as _optim
from torch import nn
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
    _len_torch_dispatch_stack,
)
from torch.utils.flop_counter import flop_registry

__all__ = ["Accountant", "FlopCounter", "Measurement", "timer"]

_aten = torch.ops.aten
#: Metadata queries FlopCounterMode leaves to the default handling (they never carry FLOPs).
_PASS = {_aten.sym_is_contiguous.default, _aten.is_contiguous.default, _aten.is_contiguous.memory_format,
         _aten.is_strides_like_format.default, _aten.is_non_overlapping_and_dense.default, _aten.size.default,
         _aten.sym_size.default, _aten.stride.default, _aten.sym_stride.default, _aten.storage_offset.default,
         _aten.sym_storage_offset.default, _aten.numel.default, _aten.sym_numel.default, _aten.dim.default,
         torch.ops.prim.layout.default}


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of the ops run while it is active (``total``), with ``torch.utils.flop_counter``'s
    formulas and the same handling of ops without a formula (decomposed, then counted) as
    ``FlopCounterMode``, so totals equal ``FlopCounterMode.get_total_flops()``."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.ops = 0      # ops dispatched through the counter (each pays a Python round trip)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in _PASS:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):
            return NotImplemented
        formula = flop_registry.get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


@dataclass
class Measurement:
    seconds: float = 0.0
    flops: int | None = None
    flops_measured: bool = False
    flops_exact: bool = True
    peak_memory_bytes: int = 0
    memory_kind: str = "process_rss"


def _rss_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _Node:
    """A point in the signatures of the steps seen so far: ``flops`` counted from the step's first module
    call up to this one; ``after``: up to the end of this call's forward (when it ran counted);
    ``end``: the step's FLOPs when a step ended here; ``children`` by next call."""

    __slots__ = ("after", "children", "end", "flops")

    def __init__(self, flops: int) -> None:
        self.flops = flops
        self.children: dict[tuple, _Node] = {}
        self.end: int | None = None
        self.after: int | None = None


def _module_type(module: nn.Module) -> tuple[str, ...]:
    """A module's structure: the qualified class names of it and of every submodule, in order. Modules of
    one structure with the same parameter shapes and inputs (two clients' CNNs, a model and its frozen
    copy) are one module to a signature."""
    return tuple(f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules())


def _tensor_sig(a) -> tuple | None:
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), a.dtype, a.requires_grad)
    if isinstance(a, (tuple, list)):
        return tuple(_tensor_sig(b) for b in a)
    return None


class _Sampler:
    """One sampled measurement: cuts the call into steps and walks each step's signature through the
    known steps of its party (see the module docstring)."""

    def __init__(self, root: _Node) -> None:
        self.root = root
        self.counter = FlopCounter()
        self.on = False            # the counter is on the dispatch stack
        self.paused = False        # taken off for an optimiser's update (no FLOPs), still counting the step
        self.total = 0             # FLOPs of finished steps (and the preambles)
        self.reused = False
        self.exact = True
        self.steps = {"counted": 0, "partial": 0, "reused": 0}   # how each step's FLOPs were had
        self._start_step()

    # -- switching the counter ----------------------------------------------------------------------
    def _push(self) -> None:
        if not self.on:
            self.counter.__enter__()
            self.on = True

    def _pop(self) -> None:
        if self.on:
            self.counter.__exit__(None, None, None)
            self.on = False

    def _counted(self) -> int:
        return self.counter.total - self.mark

    # -- steps ---------------------------------------------------------------------------------------
    def _start_step(self) -> None:
        self.node: _Node | None = None  # None: before the step's first module call (the preamble, counted)
        self.offset = 0                 # FLOPs credited for the part of the step run with the counter off
        self.mark = self.counter.total
        self.departed = False           # the counter went on mid-step, where the step left the known ones
        self.ops0 = self.counter.ops
        self._push()

    def pause(self) -> None:
        """An optimiser update without a closure: elementwise ops only, never FLOPs; not worth counting."""
        if self.on:
            self._pop()
            self.paused = True

    def _end_step(self) -> None:
        if self.paused:
            self.paused = False
            self.on = True  # what the step's logic below sees; the counter itself is pushed again next
            self._end_step()
            self.on = False
            return
        if self.node is not None or self.counter.ops > self.ops0:    # an empty tail is no step
            self.steps["reused" if not self.on else "partial" if self.departed else "counted"] += 1
        if self.node is None:  # no module call: all of it was counted
            self.total += self._counted()
        elif self.on:          # recording a new signature
            flops = self.offset + self._counted()
            self.node.end = flops
            self.total += self.preamble + flops
        elif self.node.end is not None:
            self.total += self.preamble + self.node.end
            self.reused = True
        else:                  # ended where every known step went on: estimate from the nearest child
            self.exact = False
            self.reused = True
            self.total += self.preamble + min(c.flops for c in self.node.children.values())

    def boundary(self) -> None:
        """An optimiser step finished: the current step ends, the next begins."""
        self._end_step()
        self._start_step()

    def finish(self) -> None:
        self._end_step()
        self._pop()

    def returned(self) -> None:
        """The outermost module call of the current node returned: note the FLOPs up to here."""
        if self.on and not self.paused and self.node is not None and self.node is not self.root:
            self.node.after = self.offset + self._counted()

    def event(self, key: tuple) -> None:
        if self.node is None:  # the preamble ends at the step's first module call
            self.preamble = self._counted()
            self.node = self.root
            self.offset = 0
            self.mark = self.counter.total
            if key in self.root.children:
                self._pop()
        node = self.node
        if self.on:
            rel = self.offset + self._counted()
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(rel)
            self.node = child
            return
        child = node.children.get(key)
        if child is not None:
            self.node = child
            return
        # departs from every known step: credit what ran since the last call, count from here
        if node.children:
            rel = next(iter(node.children.values())).flops
        else:
            # right after a call where the known steps ended: what ran of this step is that call's forward
            # (``after``; the known steps' ``end`` also holds their backward), plus any FLOPs between its
            # return and this call, which were not counted: an estimate
            rel = node.flops if node.end is None else node.end if node.after is None else node.after
            if node is not self.root:
                self.exact = False
        self.reused = True
        self.departed = True
        self.node = node.children[key] = _Node(rel)
        self.offset = rel
        self._push()
        self.mark = self.counter.total


class Accountant:
    """Measures client rounds and server steps; keeps, per party, the signatures and FLOPs of the
    steps counted so far (sampled mode).

    ``party`` is a client id or a server step name (``"server:round"`` ...). ``inexact`` counts the
    sampled steps whose FLOPs had to be estimated (see the module docstring).
    """

    def __init__(self, device: torch.device, mode: str = "sampled"):
        if mode not in ("sampled", "all", "off"):
            raise ValueError(f"flops mode must be sampled, all or off; got '{mode}'")
        self.device = device
        self.mode = mode
        self._roots: dict[str, _Node] = {}
        self._flops: dict[tuple[int | str, int], int] = {}  # last measured FLOPs per (party, task)
        self.inexact = 0
        #: sampled mode: steps whose FLOPs were counted whole, counted from where they left the known steps
        #: (the rest credited), or taken whole from a known step; ``ops``: ops run through a counter (any mode)
        self.steps = {"counted": 0, "partial": 0, "reused": 0}
        self.ops = 0

    @staticmethod
    def _tree(party: int | str) -> str:
        """The signature tree ``party``'s steps are looked up in: one for all clients (they run the same
        method's code on models of the same structure, so a step one client counted is known to all),
        one per kind of server step."""
        return "clients" if isinstance(party, int) else party

    @contextlib.contextmanager
    def _sampled(self, party: int | str, task: int) -> Iterator[_Sampler]:
        sampler = _Sampler(self._roots.setdefault(self._tree(party), _Node(0)))
        counter = sampler.counter

        def ours() -> bool:
            # a call made while someone else's dispatch mode is in charge (the feature cache's fill, which
            # hides itself from any counter) is not part of the step
            n = _len_torch_dispatch_stack()
            if sampler.on:
                return n == 1 and _get_current_dispatch_mode_stack()[0] is counter
            return n == 0

        depth = [0]

        def pre_hook(module: nn.Module, args: tuple) -> None:
            depth[0] += 1
            if depth[0] == 1 and ours():  # an outermost module call: its submodules' calls follow from it
                params = tuple((tuple(p.shape), p.requires_grad) for p in module.parameters())
                sampler.event((_module_type(module), params, module.training, torch.is_grad_enabled(),
                               tuple(_tensor_sig(a) for a in args)))

        def post_hook(module: nn.Module, args: tuple, out) -> None:
            depth[0] -= 1
            if depth[0] == 0 and ours():
                sampler.returned()

        def step_pre_hook(opt, args, kwargs) -> None:
            if ours() and not args and kwargs.get("closure") is None:
                sampler.pause()

        def step_hook(opt, args, kwargs) -> None:
            if sampler.paused or ours():
                sampler.boundary()

        h1 = nn.modules.module.register_module_forward_pre_hook(pre_hook)
        h2 = _optim.register_optimizer_step_post_hook(step_hook)
        h3 = nn.modules.module.register_module_forward_hook(post_hook, always_call=True)
        h4 = _optim.register_optimizer_step_pre_hook(step_pre_hook)
        try:
            yield sampler
        finally:
            h1.remove()
            h2.remove()
            h3.remove()
            h4.remove()
            sampler.finish()

    @contextlib.contextmanager
    def measure(self, party: int | str, task: int) -> Iterator[Measurement]:
        m = Measurement()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.mode == "all":
            ctx = FlopCounter()
        elif self.mode == "sampled":
            ctx = self._sampled(party, task)
        else:
            ctx = contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx as counting:
            yield m
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            m.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
            m.memory_kind = "cuda_allocator"
        else:
            m.peak_memory_bytes = _rss_peak_bytes()
        m.seconds = time.perf_counter() - t0
        if self.mode == "all":
            m.flops, m.flops_measured = counting.total, True
            self.ops += counting.ops
        elif self.mode == "sampled":
            m.flops, m.flops_measured, m.flops_exact = counting.total, not counting.reused, counting.exact
            self.inexact += not counting.exact
            self.ops += counting.counter.ops
            for k, n in counting.steps.items():
                self.steps[k] += n
        if m.flops is not None:
            self._flops[(party, task)] = m.flops


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` holds the seconds."""
    out = [0.0]
    t0 = time.perf_counter()
    yield out
    out[0] = time.perf_counter() - t0

"""Batched per-sample LoRA on one block of a frozen timm ViT (Fed-LSCL's adapted ViT, paper section 4.2).

Every sample ``i`` carries its own factors ``A_i`` ``(d, r)`` and ``B_i`` ``(r, out)``; the adapted qkv
projection of block ``b`` is ``qkv(y) + scale * (y A_i) B_i`` with ``y = norm1(h)``. This is the LoRA
weight update ``W + scale * (A_i B_i)^T`` applied to the input, computed with two batched matmuls
instead of materialising per-sample weights (``O(N r (d + out))`` per sample instead of ``O(d out)``).

Targets: ``"qkv"`` adapts all of q, k, v (``out = 3d``); ``"qv"`` adapts q and v (``out = 2d``) and leaves
the keys unchanged (the delta's k third is zero).

The LoRA block shared by Fed-LSCL, PILoRA and LoRM (issue 12) is :func:`lora_forward`: LoRA on any of the
four linears of any block (:data:`LORA_LAYERS`), given as *delta objects* with ``.delta(x)`` mapping the
layer input ``(B, N, d_in)`` to an additive output change ``(B, N, d_out)``:

* :class:`PerSampleLoRA` -- Fed-LSCL's per-sample factors ``A (B, d_in, r)``, ``B (B, r, d_out)``;
* :class:`SharedLoRA` -- one LoRA for the whole batch in peft's convention, ``W' = W + scale * B @ A`` with
  ``A (r, d_in)``, ``B (d_out, r)``;
* :class:`SumLoRA` -- a sum of deltas (e.g. one :class:`SharedLoRA` per task slot);
* :class:`Scatter` -- writes deltas into chosen output column ranges (e.g. q and v of a fused qkv:
  :func:`qv`, :func:`qv_joint`).

:func:`lora_forward` is functional (it reads the frozen ViT, never writes it; no hooks, no module swaps),
batched, differentiable in the factors, and can return the input of every adapted layer from the same pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fcl_bench.nn.vit_ops import LINEAR_LAYERS, block_forward, embed, final_cls, run_blocks

__all__ = [
    "LORA_LAYERS",
    "LORA_TARGETS",
    "Delta",
    "LoRAGenerator",
    "LoRATarget",
    "PerSampleLoRA",
    "Scatter",
    "SharedLoRA",
    "SumLoRA",
    "kaiming_lora",
    "lora_forward",
    "lora_layer_shape",
    "qv",
    "qv_joint",
    "adapted_forward",
    "check_target",
    "expand_to_qkv",
    "lora_factor_shapes",
    "lora_qkv_delta",
    "lora_scale",
    "per_sample_lora_delta",
    "reference_lora_loop",
    "target_delta",
]

LoRATarget = Literal["qkv", "qv"]
LORA_TARGETS: tuple[str, ...] = ("qkv", "qv")


def check_target(target: str) -> None:
    """Raise ``ValueError`` unless ``target`` is one of :data:`LORA_TARGETS`."""
    if target not in LORA_TARGETS:
        raise ValueError(f"unknown LoRA target {target!r}; choose one of {LORA_TARGETS}")


def lora_factor_shapes(d: int, rank: int, target: LoRATarget) -> tuple[int, int, int]:
    """``(d_in, r, out)`` of the factors ``A (d_in, r)`` and ``B (r, out)`` for a width-``d`` block."""
    check_target(target)
    if d < 1 or rank < 1:
        raise ValueError(f"LoRA needs width d >= 1 and rank >= 1, got d={d}, rank={rank}")
    return d, rank, (3 if target == "qkv" else 2) * d


def per_sample_lora_delta(h: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``scale * (h_i @ A_i) @ B_i`` for every sample at once.

    Args:
        h: ``(B, N, d_in)`` inputs of the adapted linear layer.
        A: ``(B, d_in, r)`` per-sample down factors.
        B: ``(B, r, out)`` per-sample up factors.
    Returns:
        ``(B, N, out)``.
    """
    if h.dim() != 3 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"per_sample_lora_delta needs h (B, N, d_in), A (B, d_in, r), B (B, r, out); "
                         f"got h {tuple(h.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    if not (h.shape[0] == A.shape[0] == B.shape[0]) or h.shape[2] != A.shape[1] or A.shape[2] != B.shape[1]:
        raise ValueError(f"per_sample_lora_delta shape mismatch: h {tuple(h.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)} (need equal batch, h.d_in == A.d_in, A.r == B.r)")
    return torch.bmm(torch.bmm(h, A), B) * scale


def expand_to_qkv(delta: Tensor, target: LoRATarget) -> Tensor:
    """A target's delta ``(B, N, out)`` -> a qkv delta ``(B, N, 3d)`` (``"qv"``: zeros in the k third)."""
    check_target(target)
    if target == "qkv":
        return delta
    dq, dv = delta.chunk(2, dim=-1)
    return torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


def lora_qkv_delta(y: Tensor, A: Tensor, B: Tensor, scale: float, target: LoRATarget) -> Tensor:
    """Per-sample LoRA change of a qkv projection with input ``y`` ``(B, N, d)`` -> ``(B, N, 3d)``.

    The factors are cast to ``y``'s dtype, so float32 factors work with a half-precision model.
    """
    return expand_to_qkv(per_sample_lora_delta(y, A.to(y.dtype), B.to(y.dtype), scale), target)


class LoRAGenerator(nn.Module):
    """Fed-LSCL's parameter generator phi: one linear layer from a feature ``E`` to per-sample LoRA factors.

    Output layout of ``linear`` (rows of its weight and bias): the first ``d * r`` rows are ``A`` (row-major
    ``(d, r)``), the remaining ``r * out`` rows are ``B`` (row-major ``(r, out)``). ``B``'s rows of weight and
    bias start at zero, so ``B = 0`` for any input and the adapted ViT starts equal to the frozen one,
    while ``A`` keeps nn.Linear's default init (weight and bias), so gradients reach ``B`` from step one.
    The server reads and writes ``.linear`` directly (one-by-one distillation is a ridge solve on it).
    """

    def __init__(self, feature_dim: int, dim: int, rank: int, target: LoRATarget = "qkv") -> None:
        super().__init__()
        self.dim, self.rank, self.out = lora_factor_shapes(dim, rank, target)
        self.target = target
        self.a_numel = self.dim * self.rank
        self.linear = nn.Linear(feature_dim, self.a_numel + self.rank * self.out)
        with torch.no_grad():
            self.linear.weight[self.a_numel:].zero_()
            self.linear.bias[self.a_numel:].zero_()

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``features`` ``(B, e)`` -> ``A`` ``(B, d, r)``, ``B`` ``(B, r, out)``."""
        if features.dim() != 2 or features.shape[1] != self.linear.in_features:
            raise ValueError(f"LoRAGenerator expects features (B, {self.linear.in_features}), "
                             f"got {tuple(features.shape)}")
        flat = self.linear(features)
        a = flat[:, :self.a_numel].reshape(-1, self.dim, self.rank)
        b = flat[:, self.a_numel:].reshape(-1, self.rank, self.out)
        return a, b


def _check_args(vit: nn.Module, block_idx: int, target: str) -> int:
    """Validate the adapted block and target; return the ViT's depth."""
    check_target(target)
    depth = len(vit.blocks)
    if not 0 <= block_idx < depth:
        raise ValueError(f"block_idx must be in [0, {depth}) for this ViT, got {block_idx}")
    return depth


def adapted_forward(
        vit: nn.Module,
        h_in: Tensor,
        block_idx: int,
        A: Tensor,
        B: Tensor,
        scale: float,
        target: LoRATarget = "qkv",
) -> Tensor:
    """Final-norm CLS feature ``(B, d)`` of the ViT with per-sample LoRA on block ``block_idx``'s qkv.

    Args:
        vit: the frozen timm VisionTransformer (read only).
        h_in: ``(B, N, d)`` tokens entering block ``block_idx`` (e.g. from a frozen-prefix cache).
        A, B: per-sample factors ``(B, d, r)`` and ``(B, r, out)``, see :func:`lora_factor_shapes`.
        scale: LoRA scale (``alpha / r``).
        target: ``"qkv"`` or ``"qv"``.
    """
    _check_args(vit, block_idx, target)
    return lora_forward(vit, None, {(block_idx, "qkv"): target_delta(PerSampleLoRA(A, B, scale), target, vit)},
                        start_block=block_idx, tokens=h_in)


def reference_lora_loop(
        vit: nn.Module,
        h_in: Tensor,
        block_idx: int,
        A: Tensor,
        B: Tensor,
        scale: float,
        target: LoRATarget = "qkv",
) -> Tensor:
    """Slow reference for :func:`adapted_forward` (tests and benchmarks only): one sample at a time.

    Each sample gets its own merged weight ``W + scale * expand(A_i B_i)^T`` run through timm's own
    ``Block.forward`` (via ``functional_call`` on a private copy of the block), so it shares no code with
    the batched path.
    """
    depth = _check_args(vit, block_idx, target)
    block = copy.deepcopy(vit.blocks[block_idx])
    weight = block.attn.qkv.weight
    feats = []
    for i in range(h_in.shape[0]):
        update = scale * A[i] @ B[i]  # (d, out)
        if target == "qv":
            zeros_k = update.new_zeros(update.shape[0], update.shape[1] // 2)
            update = torch.cat([update[:, :zeros_k.shape[1]], zeros_k, update[:, zeros_k.shape[1]:]], dim=1)
        merged = {"attn.qkv.weight": weight + update.T}
        h = functional_call(block, merged, (h_in[i:i + 1],))
        feats.append(final_cls(vit, run_blocks(vit, h, block_idx + 1, depth)))
    return torch.cat(feats)


def lora_scale(alpha: float, rank: int) -> float:
    """The usual LoRA scale ``alpha / r``."""
    if rank < 1 or not math.isfinite(alpha):
        raise ValueError(f"lora_scale needs rank >= 1 and a finite alpha, got alpha={alpha}, rank={rank}")
    return alpha / rank


# --- the shared LoRA block (issue 12) --------------------------------------------------------------------

#: The timm ViT block linears LoRA can adapt: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``.
LORA_LAYERS: tuple[str, ...] = LINEAR_LAYERS
_LAYER_PATHS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}


def _layer(vit: nn.Module, block: int, layer: str) -> nn.Linear:
    if layer not in LORA_LAYERS:
        raise ValueError(f"unknown LoRA layer {layer!r}; choose one of {LORA_LAYERS}")
    depth = len(vit.blocks)
    if not 0 <= block < depth:
        raise ValueError(f"LoRA block must be in [0, {depth}) for this ViT, got {block}")
    parent, name = _LAYER_PATHS[layer]
    lin = getattr(getattr(vit.blocks[block], parent, None), name, None)
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"block {block}'s {parent}.{name} is not an nn.Linear ({type(lin).__name__}); "
                         f"LoRA needs a timm VisionTransformer with plain Attention and Mlp")
    return lin


def lora_layer_shape(vit: nn.Module, block: int, layer: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of linear ``layer`` (one of :data:`LORA_LAYERS`) of block ``block``."""
    lin = _layer(vit, block, layer)
    return lin.in_features, lin.out_features


@runtime_checkable
class Delta(Protocol):
    """An additive change of a linear's output: ``delta(x)``, ``x`` ``(B, N, d_in)`` -> ``(B, N, d_out)``."""

    def delta(self, x: Tensor) -> Tensor: ...


class PerSampleLoRA:
    """Per-sample LoRA (Fed-LSCL): ``scale * (x_i @ A_i) @ B_i`` with ``A`` ``(B, d_in, r)``, ``B`` ``(B, r, d_out)``.

    The factors are cast to the input's dtype (float32 factors next to a half-precision model).
    """

    def __init__(self, A: Tensor, B: Tensor, scale: float) -> None:
        if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
            raise ValueError(f"PerSampleLoRA needs A (B, d_in, r) and B (B, r, d_out) with equal B and r; got "
                             f"A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.A, self.B, self.scale = A, B, scale

    def delta(self, x: Tensor) -> Tensor:
        return per_sample_lora_delta(x, self.A.to(x.dtype), self.B.to(x.dtype), self.scale)


class SharedLoRA:
    """One LoRA for every sample, peft's convention: ``W' = W + scale * B @ A``, ``A`` ``(r, d_in)``,
    ``B`` ``(d_out, r)``; ``delta(x) = scale * (x @ A^T) @ B^T``."""

    def __init__(self, A: Tensor, B: Tensor, scale: float = 1.0) -> None:
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"SharedLoRA needs A (r, d_in) and B (d_out, r) with the same r; got "
                             f"A {tuple(A.shape)}, B {tuple(B.shape)}")
        self.A, self.B, self.scale = A, B, scale

    def delta(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.A.shape[1]:
            raise ValueError(f"SharedLoRA: input width {x.shape[-1]} != A's d_in {self.A.shape[1]}")
        out = (x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T
        return out if self.scale == 1.0 else out * self.scale

    def weight(self) -> Tensor:
        """The weight update ``scale * B @ A`` ``(d_out, d_in)``."""
        return self.scale * self.B @ self.A


class SumLoRA:
    """The sum of several deltas (e.g. the task slots of PILoRA/LoRM): ``delta = sum of parts' deltas``."""

    def __init__(self, parts: Sequence[Delta]) -> None:
        if not parts:
            raise ValueError("SumLoRA needs at least one part")
        self.parts = list(parts)

    def delta(self, x: Tensor) -> Tensor:
        out = self.parts[0].delta(x)
        for p in self.parts[1:]:
            out = out + p.delta(x)
        return out


class Scatter:
    """Deltas written into column ranges of a wider output, zeros elsewhere.

    ``parts``: ``(ranges, delta)`` pairs; ``delta``'s output columns fill the ``(start, stop)`` ``ranges``
    in order (their total width must equal the delta's width). Ranges must not overlap.
    """

    def __init__(self, d_out: int, parts: Sequence[tuple[Sequence[tuple[int, int]], Delta]]) -> None:
        spans = sorted((a, b) for ranges, _ in parts for a, b in ranges)
        for (a, b), nxt in zip(spans, spans[1:] + [(d_out, d_out)]):
            if not 0 <= a < b <= nxt[0] <= d_out:
                raise ValueError(f"Scatter ranges must be non-empty, disjoint and inside [0, {d_out}); got {spans}")
        self.d_out, self.parts = d_out, [(tuple(map(tuple, r)), d) for r, d in parts]

    def delta(self, x: Tensor) -> Tensor:
        pieces: list[tuple[int, Tensor]] = []
        for ranges, d in self.parts:
            out = d.delta(x)
            widths = [b - a for a, b in ranges]
            if out.shape[-1] != sum(widths):
                raise ValueError(f"Scatter: a delta of width {out.shape[-1]} for ranges {ranges} "
                                 f"(width {sum(widths)})")
            pieces += [(a, t) for (a, _), t in zip(ranges, out.split(widths, dim=-1))]
        pieces.sort(key=lambda p: p[0])
        cols, pos = [], 0
        for a, t in pieces:
            if a > pos:
                cols.append(t.new_zeros(*t.shape[:-1], a - pos))
            cols.append(t)
            pos = a + t.shape[-1]
        if pos < self.d_out:
            cols.append(cols[-1].new_zeros(*cols[-1].shape[:-1], self.d_out - pos))
        return torch.cat(cols, dim=-1)


def qv(q: Delta | None, v: Delta | None, dim: int) -> Scatter:
    """A fused-qkv delta ``(.., 3 dim)`` from separate q and v deltas (each ``(.., dim)``); k unchanged."""
    parts = [(((0, dim),), q)] if q is not None else []
    parts += [(((2 * dim, 3 * dim),), v)] if v is not None else []
    return Scatter(3 * dim, parts)


def qv_joint(delta: Delta, dim: int) -> Scatter:
    """A fused-qkv delta from one delta of width ``2 dim`` (first half -> q, second half -> v)."""
    return Scatter(3 * dim, [(((0, dim), (2 * dim, 3 * dim)), delta)])


def target_delta(delta: Delta, target: LoRATarget, vit_or_dim: nn.Module | int) -> Delta:
    """Fed-LSCL's targets as deltas on ``qkv``: ``"qkv"`` -> ``delta``; ``"qv"`` -> :func:`qv_joint`."""
    check_target(target)
    if target == "qkv":
        return delta
    dim = vit_or_dim if isinstance(vit_or_dim, int) else vit_or_dim.blocks[0].attn.qkv.out_features // 3
    return qv_joint(delta, dim)


def kaiming_lora(d_in: int, d_out: int, rank: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """peft's default init: ``A`` ``(r, d_in)`` Kaiming-uniform (a = sqrt(5), as nn.Linear), ``B`` ``(d_out, r)`` zero."""
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a (r, d_in) weight: U(-1/sqrt(d_in), ..)
    A = (torch.rand(rank, d_in, generator=generator, dtype=dtype) * 2 - 1) * bound
    return A, torch.zeros(d_out, rank, dtype=dtype)


def lora_forward(
        vit: nn.Module,
        x: Tensor | None,
        deltas: Mapping[tuple[int, str], Delta | None],
        *,
        return_inputs: bool = False,
        start_block: int = 0,
        tokens: Tensor | None = None,
) -> Tensor | tuple[Tensor, dict[tuple[int, str], Tensor]]:
    """Final-norm CLS feature ``(B, d)`` of the frozen ViT with LoRA deltas on chosen block linears.

    Args:
        vit: a timm VisionTransformer (read only: nothing is written to it, no hooks, no module swaps).
        x: images ``(B, 3, H, W)``; ignored (may be ``None``) when ``tokens`` is given.
        deltas: ``{(block, layer): delta}`` with ``layer`` in :data:`LORA_LAYERS`; each delta's
            ``.delta(input)`` is added to that linear's output. A ``None`` delta leaves the layer unchanged
            but still reports its input (for Gram matrices of a frozen layer).
        return_inputs: also return ``{(block, layer): input (B, N, d_in)}`` for every key of ``deltas``.
            The inputs are not detached: with grad enabled they are part of the graph (they depend on the
            earlier blocks' LoRA); call under ``torch.no_grad()`` or ``.detach()`` them to keep them.
        start_block: the first block to run; blocks before it are frozen and must carry no delta.
        tokens: ``(B, N, d)`` tokens entering ``start_block`` (e.g. from the frozen-prefix cache); without
            them the images are embedded and blocks ``< start_block`` run frozen.
    """
    depth = len(vit.blocks)
    if not 0 <= start_block < depth:
        raise ValueError(f"start_block must be in [0, {depth}) for this ViT, got {start_block}")
    per_block: dict[int, dict[str, Delta | None]] = {}
    for (b, layer), d in deltas.items():
        _layer(vit, b, layer)
        if b < start_block:
            raise ValueError(f"a delta on block {b} < start_block {start_block} would be skipped")
        if d is not None and not isinstance(d, Delta):
            raise TypeError(f"delta for {(b, layer)} has no .delta(x) method: {type(d).__name__}")
        per_block.setdefault(b, {})[layer] = d
    if tokens is None:
        if x is None:
            raise ValueError("lora_forward needs images x or tokens")
        tokens = run_blocks(vit, embed(vit, x), 0, start_block)
    inputs: dict[tuple[int, str], Tensor] = {}
    h = tokens
    for b in range(start_block, depth):
        if b not in per_block:
            h = vit.blocks[b](h)
            continue
        fns = {layer: _observed(d, (b, layer), inputs if return_inputs else None)
               for layer, d in per_block[b].items()}
        h = block_forward(vit.blocks[b], h, linear_deltas=fns)
    feat = final_cls(vit, h)
    return (feat, inputs) if return_inputs else feat


def _observed(d: Delta | None, key: tuple[int, str], inputs: dict | None):
    def fn(y: Tensor) -> Tensor | None:
        if inputs is not None:
            inputs[key] = y
        return None if d is None else d.delta(y)
    return fn

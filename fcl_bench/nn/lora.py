"""Batched per-sample LoRA on one block of a frozen timm ViT (Fed-LSCL's adapted ViT, paper section 4.2).

Every sample ``i`` carries its own factors ``A_i`` ``(d, r)`` and ``B_i`` ``(r, out)``; the adapted qkv
projection of block ``b`` is ``qkv(y) + scale * (y A_i) B_i`` with ``y = norm1(h)``. This is the LoRA
weight update ``W + scale * (A_i B_i)^T`` applied to the input, computed with two batched matmuls
instead of materialising per-sample weights (``O(N r (d + out))`` per sample instead of ``O(d out)``).

Targets: ``"qkv"`` adapts all of q, k, v (``out = 3d``); ``"qv"`` adapts q and v (``out = 2d``) and leaves
the keys unchanged (the delta's k third is zero).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fcl_bench.nn.vit_ops import block_forward, final_cls, run_blocks

__all__ = [
    "LORA_TARGETS",
    "LoRAGenerator",
    "LoRATarget",
    "adapted_forward",
    "check_target",
    "expand_to_qkv",
    "lora_factor_shapes",
    "lora_qkv_delta",
    "lora_scale",
    "per_sample_lora_delta",
    "reference_lora_loop",
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
    depth = _check_args(vit, block_idx, target)
    h = block_forward(vit.blocks[block_idx], h_in, qkv_delta=lambda y: lora_qkv_delta(y, A, B, scale, target))
    return final_cls(vit, run_blocks(vit, h, block_idx + 1, depth))


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

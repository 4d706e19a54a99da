"""Closed-form merging of linear layers: RegMean (Jin et al., ICLR 2023) and LoRM's factor-wise variants
(Salami et al., ICLR 2025).

RegMean merges linear maps ``W_i`` ``(d_out, d_in)`` that each saw inputs ``X_i`` ``(n_i, d_in)`` by the
weight that best reproduces all their outputs on their own inputs,

    W* = argmin_W  sum_i ||X_i W^T - X_i W_i^T||_F^2  =  (sum_i W_i G_i) (sum_i G_i)^+,   G_i = X_i^T X_i,

so only the Gram matrices ``G_i`` ``(d_in, d_in)`` leave a client, never the inputs. RegMean softens them,
``G~ = alpha G + (1 - alpha) diag(G)`` (:func:`soften`); at ``alpha = 0`` only the diagonal is left, and a
Gram is then carried as the vector of its diagonal ``(d_in,)``. Every function here takes a Gram either as
a matrix ``(d, d)`` or as such a diagonal vector ``(d,)``.

LoRM merges LoRA factors of ``W0 + B A`` (``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``) one factor at a time:

* A-round (``B`` shared): ``A* = (sum_i A_i G_i) (sum_i G_i)^+`` -- :func:`regmean` on the ``A_i``
  (exact for the objective ``sum_i ||X_i (B A)^T - X_i (B A_i)^T||^2`` when ``B`` has full column rank);
* B-round (``A`` shared): ``B* = (sum_i B_i A G_i) A^T (A (sum_i G_i) A^T)^+`` -- :func:`merge_b`, the
  minimiser of ``sum_i ||X_i A^T B^T - X_i A^T B_i^T||^2``;
* head: ``W* = (sum_i W_i G_i) (sum_i G_i)^-1`` (a pseudo-inverse if the sum is singular), the bias
  averaged with weights ``n_i`` -- :func:`merge_head`;
* across tasks: ``W = W0 + (sum_t B_t A_t G_t) (sum_t G_t)^+`` -- :func:`merge_tasks`, returned as the
  low-rank factors ``B_all (d_out, T r)``, ``A_all (T r, d_in)`` with ``A'_t = A_t G_t (sum_s G_s)^+``, so
  the merged update ``B_all @ A_all`` never has to be materialised or sent.

Everything is computed in float64 and returned in the dtype of the first factor. Pseudo-inverses use
``torch.linalg.pinv(hermitian=True)``'s default cut-off (singular values below ``max(d) * eps * s_max``
are treated as zero); a diagonal Gram is inverted entrywise with the same cut-off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["gram", "merge_b", "merge_head", "merge_tasks", "pinv_gram", "regmean", "soften", "sum_grams"]

_F64 = torch.float64


def gram(x: Tensor, diagonal: bool = False) -> Tensor:
    """``X^T X`` in float64 over every row of ``x`` ``(..., d)`` (all tokens of all samples) -> ``(d, d)``,
    or only its diagonal ``(d,)`` (the sums of squares) with ``diagonal``."""
    x = x.reshape(-1, x.shape[-1]).to(_F64)
    return (x * x).sum(0) if diagonal else x.T @ x


def soften(G: Tensor, alpha: float) -> Tensor:
    """RegMean's ``alpha G + (1 - alpha) diag(G)`` of a full Gram ``(d, d)``; at ``alpha == 0`` the diagonal
    vector ``(d,)`` (what is then sent), at ``alpha == 1`` ``G`` itself. A diagonal vector is returned as is."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the RegMean alpha must be in [0, 1], got {alpha}")
    if G.dim() == 1:
        return G
    if alpha == 0.0:
        return torch.diagonal(G).clone()
    if alpha == 1.0:
        return G
    return alpha * G + (1.0 - alpha) * torch.diag(torch.diagonal(G))


def _matrix(G: Tensor) -> Tensor:
    return torch.diag(G) if G.dim() == 1 else G


def sum_grams(grams: Sequence[Tensor]) -> Tensor:
    """The sum of Grams in float64; diagonal vectors stay a vector unless some Gram is a matrix."""
    if not grams:
        raise ValueError("no Gram matrices to sum")
    if all(G.dim() == 1 for G in grams):
        return torch.stack([G.to(_F64) for G in grams]).sum(0)
    return torch.stack([_matrix(G.to(_F64)) for G in grams]).sum(0)


def _rmul(E: Tensor, G: Tensor) -> Tensor:
    """``E @ G`` for a Gram given as a matrix or as its diagonal."""
    return E * G if G.dim() == 1 else E @ G


def pinv_gram(G: Tensor) -> Tensor:
    """Pseudo-inverse of a symmetric PSD Gram in float64: a matrix for a matrix, a vector for a diagonal."""
    G = G.to(_F64)
    if G.dim() == 2:
        return torch.linalg.pinv(G, hermitian=True)
    cut = G.numel() * torch.finfo(_F64).eps * G.abs().max() if G.numel() else 0.0
    keep = G.abs() > cut
    return torch.where(keep, 1.0 / torch.where(keep, G, torch.ones_like(G)), torch.zeros_like(G))


def regmean(weights: Sequence[Tensor], grams: Sequence[Tensor]) -> Tensor:
    """RegMean: ``(sum_i W_i G_i) (sum_i G_i)^+`` for ``W_i`` ``(m, d)`` and Grams of ``d`` (LoRM's A-round).

    Returns ``(m, d)`` in ``W_0``'s dtype.
    """
    _same_count(weights, grams)
    S = torch.stack([_rmul(W.to(_F64), G.to(_F64)) for W, G in zip(weights, grams)]).sum(0)
    return _rmul(S, pinv_gram(sum_grams(grams))).to(weights[0].dtype)


def merge_b(bs: Sequence[Tensor], A: Tensor, grams: Sequence[Tensor]) -> Tensor:
    """LoRM's B-round: ``(sum_i B_i A G_i) A^T (A (sum_i G_i) A^T)^+`` for ``B_i`` ``(d_out, r)`` sharing
    ``A`` ``(r, d_in)``; Grams of ``d_in``. Returns ``(d_out, r)`` in ``B_0``'s dtype."""
    _same_count(bs, grams)
    A64 = A.to(_F64)
    S = torch.stack([_rmul(B.to(_F64) @ A64, G.to(_F64)) for B, G in zip(bs, grams)]).sum(0)  # (d_out, d_in)
    core = _rmul(A64, sum_grams(grams)) @ A64.T  # (r, r): A G A^T (G symmetric)
    return (S @ A64.T @ torch.linalg.pinv(core, hermitian=True)).to(bs[0].dtype)


def merge_head(weights: Sequence[Tensor], biases: Sequence[Tensor], grams: Sequence[Tensor],
               counts: Sequence[float]) -> tuple[Tensor, Tensor]:
    """RegMean of linear heads: ``W* = (sum_i W_i G_i) (sum_i G_i)^-1`` (the pseudo-inverse, which is the
    inverse when the sum is non-singular), ``b*`` = the ``counts``-weighted mean of the biases.

    ``W_i`` ``(C, d)``, ``b_i`` ``(C,)``, Grams of ``d``, ``counts`` the clients' sample counts (> 0 in sum).
    """
    _same_count(weights, grams)
    if len(biases) != len(weights) or len(counts) != len(weights):
        raise ValueError(f"{len(weights)} heads but {len(biases)} biases and {len(counts)} counts")
    total = float(sum(counts))
    if total <= 0:
        raise ValueError(f"bias averaging weights must sum to a positive number, got {list(counts)}")
    S = torch.stack([_rmul(W.to(_F64), G.to(_F64)) for W, G in zip(weights, grams)]).sum(0)  # (C, d)
    # the pseudo-inverse is the inverse of a non-singular sum, and does not fail on a singular one
    W = _rmul(S, pinv_gram(sum_grams(grams)))
    b = sum(bi.to(_F64) * (float(n) / total) for bi, n in zip(biases, counts))
    return W.to(weights[0].dtype), b.to(biases[0].dtype)


def merge_tasks(bs: Sequence[Tensor], As: Sequence[Tensor], grams: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """RegMean across tasks of LoRA updates ``B_t A_t``: ``(sum_t B_t A_t G_t)(sum_t G_t)^+`` as factors.

    Args:
        bs: ``B_t`` ``(d_out, r_t)``; As: ``A_t`` ``(r_t, d_in)``; grams: ``G_t`` of ``d_in`` (per task,
            summed over its clients).
    Returns:
        ``(A_all (sum r_t, d_in), B_all (d_out, sum r_t))`` with ``B_all @ A_all`` the merged update:
        ``A_all`` stacks ``A_t G_t (sum_s G_s)^+``, ``B_all`` stacks the ``B_t`` side by side.
    """
    _same_count(bs, grams)
    if len(As) != len(bs):
        raise ValueError(f"{len(bs)} B factors but {len(As)} A factors")
    P = pinv_gram(sum_grams(grams))
    a_all = torch.cat([_rmul(_rmul(A.to(_F64), G.to(_F64)), P) for A, G in zip(As, grams)], 0)
    b_all = torch.cat([B.to(_F64) for B in bs], 1)
    return a_all.to(As[0].dtype), b_all.to(bs[0].dtype)


def _same_count(factors: Sequence[Tensor], grams: Sequence[Tensor]) -> None:
    if not factors:
        raise ValueError("nothing to merge")
    if len(factors) != len(grams):
        raise ValueError(f"{len(factors)} factors but {len(grams)} Gram matrices")

"""Run a timm Vision Transformer in pieces, with per-sample adapters, without touching the model.

The foundation model is shared by every client and method, so nothing here writes to it: no monkeypatched
``forward``, no attribute writes, no hooks. Adapted blocks are computed by :func:`block_forward`, which
reads a timm ``Block``'s weights and reproduces its forward (``x + ls1(attn(norm1(x)))``, then the MLP
branch) with two insertion points inside attention:

* ``qkv_delta``: a per-sample additive change of the qkv projection's output (LoRA, see ``lora.py``);
* ``prefix_kv``: per-sample key/value prefixes concatenated after the head split (prefix tuning, see
  ``prompts.py``); queries are unchanged, so the output keeps the input's token count.

and, through ``linear_deltas``, an additive change of any of the block's four linears' outputs (``qkv``,
``proj``, ``fc1``, ``fc2``; LoRA on any linear, see ``lora.py``). With ``fc1``/``fc2`` changed, the MLP
is recomputed as timm's ``Mlp`` (fc1, act, drop1, norm, fc2, drop2).

With neither, :func:`block_forward` equals ``block(h)``. Works on any
``timm.models.vision_transformer.VisionTransformer`` whose blocks are pre-norm ``Block`` s with a fused
``attn.qkv`` linear (every ViT/DeiT/AugReg/CLIP-style ViT in timm).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LINEAR_LAYERS",
    "LinearDelta",
    "QKVDelta",
    "block_forward",
    "check_block",
    "embed",
    "final_cls",
    "final_tokens",
    "run_blocks",
]

#: A qkv change: a tensor ``(B, N, 3 * attn_dim)`` or a callable mapping the qkv input ``norm1(x)``
#: ``(B, N, d)`` to such a tensor.
QKVDelta = Tensor | Callable[[Tensor], Tensor]

#: A change of one linear's output: maps the linear's input ``(B, N, d_in)`` to ``(B, N, d_out)`` or to
#: ``None`` (no change; lets a caller only observe the input).
LinearDelta = Callable[[Tensor], Tensor | None]

#: The block linears ``linear_deltas`` can change, in forward order.
LINEAR_LAYERS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "num_heads", "q_norm", "k_norm", "proj", "proj_drop", "attn_drop")
_MLP_PARTS = ("fc1", "act", "drop1", "norm", "fc2", "drop2")


def embed(vit: nn.Module, x: Tensor) -> Tensor:
    """Images ``(B, 3, H, W)`` -> tokens entering block 0, ``(B, N, d)`` (prefix tokens first).

    The same steps as timm's ``forward_features`` before its blocks: patch embedding, class/register
    tokens and positional embedding, patch dropout, pre-norm.
    """
    h = vit.patch_embed(x)
    h = vit._pos_embed(h)
    h = vit.patch_drop(h)
    return vit.norm_pre(h)


def run_blocks(vit: nn.Module, h: Tensor, start: int, end: int) -> Tensor:
    """Run the frozen blocks ``start .. end - 1`` on tokens ``h`` ``(B, N, d)``."""
    depth = len(vit.blocks)
    if not 0 <= start <= end <= depth:
        raise ValueError(f"run_blocks needs 0 <= start <= end <= depth={depth}, got start={start}, end={end}")
    for blk in vit.blocks[start:end]:
        h = blk(h)
    return h


def final_tokens(vit: nn.Module, h: Tensor) -> Tensor:
    """Tokens after the last block ``(B, N, d)`` -> the final norm applied to every token."""
    return vit.norm(h)


def final_cls(vit: nn.Module, h: Tensor) -> Tensor:
    """Tokens after the last block ``(B, N, d)`` -> final-norm CLS feature ``(B, d)``.

    The norm is per token, so only the CLS token is normalised.
    """
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("final_cls: this ViT has no class token (class_token=False); "
                         "use final_tokens(vit, h) and pool the tokens instead")
    return vit.norm(h[:, 0])


def check_block(block: nn.Module) -> None:
    """Raise ``ValueError`` unless ``block`` looks like a timm pre-norm ``Block`` with a fused qkv."""
    missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
    missing += [f"attn.{p}" for p in _ATTN_PARTS if hasattr(block, "attn") and not hasattr(block.attn, p)]
    if missing:
        raise ValueError(f"block_forward supports timm VisionTransformer pre-norm Blocks; "
                         f"{type(block).__name__} lacks {missing}")
    if not isinstance(block.attn.qkv, nn.Linear):
        raise ValueError(f"block_forward needs attn.qkv to be one nn.Linear (fused q, k, v); "
                         f"got {type(block.attn.qkv).__name__}")


def block_forward(
        block: nn.Module,
        h: Tensor,
        qkv_delta: QKVDelta | None = None,
        prefix_kv: tuple[Tensor, Tensor] | None = None,
        linear_deltas: Mapping[str, LinearDelta] | None = None,
) -> Tensor:
    """One timm ``Block`` computed functionally on ``h`` ``(B, N, d)`` -> ``(B, N, d)``.

    Args:
        block: a block of a (frozen) timm VisionTransformer; it is read, never modified.
        h: tokens entering the block.
        qkv_delta: added to the qkv projection's output, see :data:`QKVDelta`.
        prefix_kv: ``(pk, pv)``, each ``(B, Lp, d)`` (or ``(1, Lp, d)``, shared by the batch): keys and values
            prepended per sample after the head split. ``Lp = 0`` is allowed and changes nothing.
        linear_deltas: ``{layer: delta}`` for layers in :data:`LINEAR_LAYERS`, each added to that linear's
            output (see :data:`LinearDelta`); ``"qkv"`` here and ``qkv_delta`` are exclusive.
    """
    check_block(block)
    deltas = dict(linear_deltas or {})
    unknown = sorted(set(deltas) - set(LINEAR_LAYERS))
    if unknown:
        raise ValueError(f"linear_deltas: unknown layers {unknown}; choose from {LINEAR_LAYERS}")
    if qkv_delta is not None and "qkv" in deltas:
        raise ValueError("give the qkv change either as qkv_delta or as linear_deltas['qkv'], not both")
    if qkv_delta is None:
        qkv_delta = deltas.get("qkv")
    attn_out = _attention(block.attn, block.norm1(h), qkv_delta, prefix_kv, deltas.get("proj"))
    h = h + block.drop_path1(block.ls1(attn_out))
    y = block.norm2(h)
    if "fc1" in deltas or "fc2" in deltas:
        mlp_out = _mlp(block.mlp, y, deltas.get("fc1"), deltas.get("fc2"))
    else:
        mlp_out = block.mlp(y)
    return h + block.drop_path2(block.ls2(mlp_out))


def _changed_linear(layer: nn.Module, x: Tensor, delta: LinearDelta | None, name: str) -> Tensor:
    """``layer(x)`` plus ``delta(x)`` (cast to the output's dtype), shape-checked."""
    out = layer(x)
    change = None if delta is None else delta(x)
    if change is None:
        return out
    if change.shape != out.shape:
        raise ValueError(f"the {name} delta must have the {name} output's shape {tuple(out.shape)}, "
                         f"got {tuple(change.shape)}")
    return out + change.to(out.dtype)


def _mlp(mlp: nn.Module, y: Tensor, fc1_delta: LinearDelta | None, fc2_delta: LinearDelta | None) -> Tensor:
    """timm ``Mlp.forward`` on ``y`` with changes of fc1's and fc2's outputs."""
    missing = [p for p in _MLP_PARTS if not hasattr(mlp, p)]
    if missing or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise ValueError(f"LoRA on fc1/fc2 supports timm's Mlp (fc1, act, drop1, norm, fc2, drop2 with linear "
                         f"fc1/fc2); {type(mlp).__name__} lacks {missing or 'linear fc1/fc2'}")
    x = mlp.drop1(mlp.act(_changed_linear(mlp.fc1, y, fc1_delta, "fc1")))
    return mlp.drop2(_changed_linear(mlp.fc2, mlp.norm(x), fc2_delta, "fc2"))


def _attention(
        attn: nn.Module,
        y: Tensor,
        qkv_delta: QKVDelta | None,
        prefix_kv: tuple[Tensor, Tensor] | None,
        proj_delta: LinearDelta | None = None,
) -> Tensor:
    """timm ``Attention.forward`` on normed tokens ``y`` ``(B, N, d)`` with the insertion points."""
    b, n, _ = y.shape
    heads = attn.num_heads
    attn_dim = attn.qkv.out_features // 3
    head_dim = attn_dim // heads
    qkv = F.linear(y, attn.qkv.weight, attn.qkv.bias)
    delta = None
    if qkv_delta is not None:
        delta = qkv_delta(y) if callable(qkv_delta) else qkv_delta
    if delta is not None:
        if delta.shape != qkv.shape:
            raise ValueError(f"qkv_delta must have the qkv output's shape {tuple(qkv.shape)}, "
                             f"got {tuple(delta.shape)}")
        qkv = qkv + delta.to(qkv.dtype)  # adapters may be float32 next to a bf16/fp16 model
    q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix_kv is not None and prefix_kv[0].shape[1] != prefix_kv[1].shape[1]:
        raise ValueError(f"prefix pk and pv need the same length, got {prefix_kv[0].shape[1]} and "
                         f"{prefix_kv[1].shape[1]}")
    if prefix_kv is not None and prefix_kv[0].shape[1] > 0:
        pk, pv = (_split_heads(p.to(k.dtype), b, heads, head_dim, name) for p, name in zip(prefix_kv, ("pk", "pv")))
        # Prefixes are free parameters in the head space: k_norm is applied to the input's keys only.
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    x = x.transpose(1, 2).reshape(b, n, attn_dim)
    # Newer timm Attention has an output norm and an optional sigmoid gate; older ones lack the attributes.
    out_norm = getattr(attn, "norm", None)
    if out_norm is not None:
        x = out_norm(x)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        x = x * gate(y).sigmoid()
    return attn.proj_drop(_changed_linear(attn.proj, x, proj_delta, "proj"))


def _split_heads(p: Tensor, batch: int, heads: int, head_dim: int, name: str) -> Tensor:
    """Prefix ``(B or 1, Lp, heads * head_dim)`` -> ``(B, heads, Lp, head_dim)``."""
    if p.dim() != 3 or p.shape[0] not in (1, batch) or p.shape[2] != heads * head_dim:
        raise ValueError(f"prefix {name} must be ({batch} or 1, Lp, {heads * head_dim}), got {tuple(p.shape)}")
    p = p.expand(batch, -1, -1)
    return p.reshape(batch, p.shape[1], heads, head_dim).transpose(1, 2)

"""Prompt tuning and prefix tuning for a frozen timm ViT (L2P, DualPrompt, FedMGP).

* :class:`PromptPool` (L2P, FedMGP's global prompt): ``M`` prompts of ``Lp`` tokens with keys ``(M, d)``;
  a query picks the top-N prompts by cosine similarity and their tokens are inserted after the CLS (and
  register) tokens at layer 0.
* :class:`PrefixPool` (DualPrompt's G- and E-prompts, FedMGP's local prompts): ``M`` entries, each holding
  separate key and value prefixes for several layers, stored as ``(M, L_layers, 2, Lp, d)`` (2 = K, V).
  :func:`fcl_bench.nn.vit_ops.block_forward` prepends them to the block's keys and values.
* :func:`forward_with_prompts` runs the ViT with either or both and returns the final-norm tokens.

Selection is per sample by default: a sample's prompts never depend on the rest of its batch. The
official codes' batch-wise selection (most frequent top-N of the batch, used for every sample, also at
test time) is the labelled option ``batchwise=True``.

Positional embedding of prompt tokens (``prompt_pos_embed``): ``none`` inserts them after the positional
embedding, so they get none (the JAX original of L2P); ``cls`` adds the CLS token's positional embedding to
every prompt token (the PyTorch port, which enlarges ``pos_embed`` by copying the CLS entry over the prompt
positions).

Init: prompts and keys are ``uniform(-1, 1)``, the official L2P / DualPrompt default (``prompt_init`` and
``prompt_key_init`` = ``'uniform'``); ``init="zero"`` is the official alternative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcl_bench.nn.vit_ops import block_forward

__all__ = [
    "PrefixMap",
    "PrefixPool",
    "PromptPool",
    "combine_prefixes",
    "forward_with_prompts",
    "insert_prompts",
    "mean_prompt_tokens",
    "prompt_token_slice",
    "pull_loss",
    "select_by_keys",
]

#: Per-layer prefixes: block index -> ``(pk, pv)``, each ``(B, Lp, d)`` (or ``(1, Lp, d)``, shared).
PrefixMap = Mapping[int, tuple[Tensor, Tensor]]
PromptInit = Literal["uniform", "zero"]
PromptPosEmbed = Literal["none", "cls"]


def _init_(t: Tensor, init: PromptInit, generator: torch.Generator | None) -> None:
    if init == "uniform":
        nn.init.uniform_(t, -1.0, 1.0, generator=generator)
    elif init == "zero":
        nn.init.zeros_(t)
    else:
        raise ValueError(f"unknown prompt init {init!r}; choose 'uniform' or 'zero'")


def select_by_keys(query: Tensor, keys: Tensor, top_n: int, batchwise: bool = False) -> tuple[Tensor, Tensor]:
    """Pick entries by cosine similarity of a query with their keys.

    Args:
        query: ``(B, d)``, e.g. the frozen ViT's final-norm CLS feature.
        keys: ``(M, d)``.
        top_n: entries per sample.
        batchwise: the official codes' batch trick (a labelled option, off by default): the ``top_n``
            indices chosen most often in the batch (ties: lower index) are used for every sample.
    Returns:
        ``idx`` ``(B, top_n)`` (int64, most similar first when per sample) and ``sim`` ``(B, M)``.
    """
    m = keys.shape[0]
    if not 1 <= top_n <= m:
        raise ValueError(f"top_n must be in [1, pool size {m}], got {top_n}")
    if query.dim() != 2 or query.shape[1] != keys.shape[1]:
        raise ValueError(f"query must be (B, {keys.shape[1]}), got {tuple(query.shape)}")
    sim = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T
    idx = sim.topk(top_n, dim=1).indices
    if batchwise:
        counts = torch.bincount(idx.flatten(), minlength=m)
        major = torch.sort(counts, descending=True, stable=True).indices[:top_n]
        idx = major.unsqueeze(0).expand(query.shape[0], -1)
    return idx, sim


def pull_loss(sim: Tensor, idx: Tensor) -> Tensor:
    """L2P's surrogate term: per sample, the summed similarity of its chosen keys, averaged over the batch.

    ``sim`` ``(B, M)``, ``idx`` ``(B, N)`` -> scalar; the training loss subtracts ``lambda`` times it.
    """
    return sim.gather(1, idx).sum(dim=1).mean()


class _KeyedPool(nn.Module):
    """Shared key handling of the two pools."""

    keys: nn.Parameter | None

    def _make_keys(self, pool_size: int, dim: int, init: PromptInit, gen: torch.Generator | None,
                   with_keys: bool) -> None:
        if not with_keys:
            self.register_parameter("keys", None)
            return
        self.keys = nn.Parameter(torch.empty(pool_size, dim))
        _init_(self.keys.data, init, gen)

    def select(self, query: Tensor, top_n: int = 1, batchwise: bool = False) -> tuple[Tensor, Tensor]:
        """``query`` ``(B, d)`` -> ``(idx (B, top_n), sim (B, M))``, see :func:`select_by_keys`."""
        if self.keys is None:
            raise ValueError("this pool was built with with_keys=False; pass indices to gather() directly")
        return select_by_keys(query, self.keys, top_n, batchwise)


class PromptPool(_KeyedPool):
    """``pool_size`` prompts of ``length`` tokens of width ``dim`` (``prompts (M, Lp, d)``), keys ``(M, d)``."""

    def __init__(self, pool_size: int, length: int, dim: int, init: PromptInit = "uniform",
                 with_keys: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if pool_size < 1 or length < 1 or dim < 1:
            raise ValueError(f"PromptPool needs pool_size, length, dim >= 1, got {pool_size}, {length}, {dim}")
        self.prompts = nn.Parameter(torch.empty(pool_size, length, dim))
        _init_(self.prompts.data, init, generator)
        self._make_keys(pool_size, dim, init, generator, with_keys)

    def gather(self, idx: Tensor) -> Tensor:
        """``idx`` ``(B, N)`` -> the chosen prompts' tokens, concatenated in order, ``(B, N * Lp, d)``."""
        if idx.dim() != 2:
            raise ValueError(f"PromptPool.gather expects idx (B, N), got {tuple(idx.shape)}")
        chosen = self.prompts[idx]  # (B, N, Lp, d)
        return chosen.reshape(idx.shape[0], -1, self.prompts.shape[-1])


class PrefixPool(_KeyedPool):
    """Per-layer key/value prefixes: ``prefixes (M, L_layers, 2, Lp, d)``, optional keys ``(M, d)``.

    ``layers`` are the block indices the ``L_layers`` slots apply to (DualPrompt: G at ``(0, 1)``, E at
    ``(2, 3, 4)``). A shared prefix (G-prompt) is a pool of one without keys, gathered with ``idx = [0]``.
    """

    def __init__(self, pool_size: int, layers: Sequence[int], length: int, dim: int,
                 init: PromptInit = "uniform", with_keys: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.layers = tuple(int(i) for i in layers)
        if pool_size < 1 or length < 1 or dim < 1 or not self.layers:
            raise ValueError(f"PrefixPool needs pool_size, length, dim >= 1 and at least one layer, got "
                             f"{pool_size}, {length}, {dim}, layers={self.layers}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"PrefixPool layers must be distinct, got {self.layers}")
        self.prefixes = nn.Parameter(torch.empty(pool_size, len(self.layers), 2, length, dim))
        _init_(self.prefixes.data, init, generator)
        self._make_keys(pool_size, dim, init, generator, with_keys)

    def gather(self, idx: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        """``idx`` ``(B,)`` or ``(B, k)`` -> ``{layer: (pk, pv)}``, each ``(B, k * Lp, d)``.

        Indexing keeps the batch axis first, so sample ``i`` gets exactly entry ``idx[i]``'s K and V
        (the public DualPrompt code reshapes a ``(L, 2, B, ...)`` tensor into ``(L, B, 2, ...)`` instead of
        permuting, which mixes K and V across samples).
        """
        if idx.dim() == 1:
            idx = idx.unsqueeze(1)
        if idx.dim() != 2:
            raise ValueError(f"PrefixPool.gather expects idx (B,) or (B, k), got {tuple(idx.shape)}")
        b, k = idx.shape
        chosen = self.prefixes[idx]  # (B, k, L, 2, Lp, d)
        _, _, n_layers, _, length, dim = chosen.shape
        chosen = chosen.permute(0, 2, 3, 1, 4, 5).reshape(b, n_layers, 2, k * length, dim)
        return {layer: (chosen[:, j, 0], chosen[:, j, 1]) for j, layer in enumerate(self.layers)}


def combine_prefixes(*maps: PrefixMap) -> dict[int, tuple[Tensor, Tensor]]:
    """Merge prefix maps; where several give the same layer, their prefixes are concatenated in order."""
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for m in maps:
        for layer, (pk, pv) in m.items():
            if layer not in out:
                out[layer] = (pk, pv)
                continue
            ok, ov = out[layer]
            b = max(ok.shape[0], pk.shape[0])
            out[layer] = (torch.cat([ok.expand(b, -1, -1), pk.expand(b, -1, -1)], dim=1),
                          torch.cat([ov.expand(b, -1, -1), pv.expand(b, -1, -1)], dim=1))
    return out


def insert_prompts(vit: nn.Module, tokens: Tensor, prompts: Tensor, pos_embed: PromptPosEmbed = "none") -> Tensor:
    """Insert prompt tokens ``(B or 1, P, d)`` after the prefix (CLS, register) tokens of ``tokens`` ``(B, N, d)``.

    ``tokens`` come from :func:`fcl_bench.nn.vit_ops.embed`, so the patch tokens already carry their
    positional embedding. ``pos_embed="none"``: the prompts get none (the JAX original of L2P); ``"cls"``:
    each prompt token gets the CLS token's positional embedding (the PyTorch port). The prompts pass through
    ``norm_pre`` (a per-token norm, Identity in most ViTs) like the rest of the sequence does there.
    """
    if prompts.dim() != 3 or prompts.shape[0] not in (1, tokens.shape[0]) or prompts.shape[2] != tokens.shape[2]:
        raise ValueError(f"prompts must be ({tokens.shape[0]} or 1, P, {tokens.shape[2]}), "
                         f"got {tuple(prompts.shape)}")
    n_prefix = vit.num_prefix_tokens
    prompts = prompts.to(tokens.dtype)
    if pos_embed == "cls":
        if getattr(vit, "cls_token", None) is None or getattr(vit, "no_embed_class", False):
            raise ValueError("prompt_pos_embed='cls' needs a ViT whose class token has a positional embedding")
        prompts = prompts + vit.pos_embed[:, :1].to(tokens.dtype)
    elif pos_embed != "none":
        raise ValueError(f"prompt_pos_embed must be 'none' or 'cls', got {pos_embed!r}")
    prompts = vit.norm_pre(prompts.expand(tokens.shape[0], -1, -1))
    return torch.cat([tokens[:, :n_prefix], prompts, tokens[:, n_prefix:]], dim=1)


def prompt_token_slice(vit: nn.Module, n_prompt_tokens: int) -> slice:
    """Positions of the inserted prompt tokens in :func:`forward_with_prompts`'s output."""
    return slice(vit.num_prefix_tokens, vit.num_prefix_tokens + n_prompt_tokens)


def mean_prompt_tokens(vit: nn.Module, out_tokens: Tensor, n_prompt_tokens: int) -> Tensor:
    """L2P's head input: mean of the output tokens ``(B, N', d)`` at the prompt positions -> ``(B, d)``."""
    if n_prompt_tokens < 1:
        raise ValueError(f"mean_prompt_tokens needs at least one prompt token, got {n_prompt_tokens}")
    return out_tokens[:, prompt_token_slice(vit, n_prompt_tokens)].mean(dim=1)


def forward_with_prompts(
        vit: nn.Module,
        tokens: Tensor,
        prompts: Tensor | None = None,
        prefixes: PrefixMap | None = None,
        prompt_pos_embed: PromptPosEmbed = "none",
) -> Tensor:
    """Run the frozen ViT with prompt tokens and/or per-layer prefixes -> final-norm tokens ``(B, N', d)``.

    Args:
        vit: the frozen timm VisionTransformer (read only).
        tokens: ``(B, N, d)`` from :func:`fcl_bench.nn.vit_ops.embed`.
        prompts: ``(B, P, d)`` per-sample prompt tokens inserted after the CLS token at layer 0
            (prompt tuning); then ``N' = N + P`` and :func:`prompt_token_slice` gives their positions.
        prompt_pos_embed: ``none`` or ``cls``, the positional embedding the prompts get (:func:`insert_prompts`).
        prefixes: ``{block: (pk, pv)}``, each ``(B, Lp, d)``: prefix tuning on those blocks.
    """
    if tokens.dim() != 3:
        raise ValueError(f"forward_with_prompts expects tokens (B, N, d) from embed(vit, images), "
                         f"got {tuple(tokens.shape)}")
    prefixes = prefixes or {}
    depth = len(vit.blocks)
    bad = [i for i in prefixes if not 0 <= i < depth]
    if bad:
        raise ValueError(f"prefix layers {bad} are outside this ViT's blocks 0..{depth - 1}")
    h = tokens if prompts is None else insert_prompts(vit, tokens, prompts, prompt_pos_embed)
    for i, blk in enumerate(vit.blocks):
        h = block_forward(blk, h, prefix_kv=prefixes[i]) if i in prefixes else blk(h)
    return vit.norm(h)

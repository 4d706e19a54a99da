"""FedAvg+L2P: Learning to Prompt (Wang et al., CVPR 2022) on the frozen ViT, averaged with FedAvg.

Mechanisms (official google-research/l2p and its PyTorch port JH-LEE-KR/l2p-pytorch):
  * a pool of ``pool_size`` (M) prompts of ``length`` (Lp) tokens with keys ``(M, d)``;
  * query = the frozen ViT's final-norm CLS feature without prompts (``embedding_key='cls'``), read from
    the run's feature cache; cosine similarity with the keys; the top ``top_n`` (N) prompts are inserted
    after the CLS token at layer 0 (prompt tuning: ``[CLS; P_1..P_N; patches]``, the patches keep their
    positional embedding, the prompts get none);
  * head = linear over all classes on the mean of the output tokens at the prompt positions
    (``head_type='prompt'``), initialised like timm's ViT head;
  * positional embedding of the prompts (``prompt_pos_embed``): ``none``, the JAX original (prompts are
    inserted after the position embedding and get none), or ``cls``, the PyTorch port (its ``pos_embed`` is
    enlarged by copying the CLS token's entry over the prompt positions, so every prompt token gets the CLS
    token's position embedding);
  * loss = CE on logits with classes outside the current task set to ``-inf`` (``train_mask``) minus
    ``pull_lambda`` * mean over the batch of the summed cosine similarities of the chosen keys;
  * Adam (constant lr, re-created each task), gradient-norm clipping 1.0;
  * communicated, down and up: prompts, keys, head (n_k-weighted average of each).

Named defaults (``defaults``): ``pytorch`` (the PyTorch port's CIFAR-100 config, default): M=10, Lp=5,
N=5, lambda=0.1, prompt_pos_embed=cls; ``jax`` (the original's ``cifar100_l2p.py``): M=10, Lp=10, N=4,
lambda=1.0, prompt_pos_embed=none. Both use ``lr = 0.03 * batch_size / 256``. The fields ``pool_size``,
``length``, ``top_n``, ``pull_lambda`` and ``lr`` default to ``None`` and ``prompt_pos_embed`` to ``auto``
(``none`` is one of its values), meaning "take it from ``defaults``"; a value set explicitly always wins,
whatever the order of the ``-o`` options: ``-o l2p.defaults=jax -o l2p.top_n=5`` is the JAX preset with N=5.

Per-sample selection by default: a sample's prompts depend on its own query only. ``batchwise=True`` is
the official codes' default trick (the N indices chosen most often in the batch are used for every
sample, at training and at test time), kept as a labelled option: it makes predictions depend on the
batch. The server broadcasts its seeded initial prompts, keys and head at the first task start.

Normalisation: inputs follow the foundation model's ``Preprocess`` (the tiny ViT: mean = std = 0.5; timm
ViT-B: its pretrained config), the same pipeline as every other method and the feature cache. The
official codes feed [0, 1] inputs (no normalisation) to a ViT pretrained on normalised ones; we do not
copy that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from fcl_bench.api import Client, ClientEnv, Method, MethodEnv, Server, ServerEnv
from fcl_bench.config import ConfigError
from fcl_bench.data import Batch
from fcl_bench.nn.averaging import N_KEY
from fcl_bench.nn.prompt_methods import PromptClient, linear_head, prompt_server, scaled_lr
from fcl_bench.nn.prompts import PromptPool, forward_with_prompts, mean_prompt_tokens, pull_loss
from fcl_bench.registry import register

#: The named defaults: the PyTorch port's CIFAR-100 config and the JAX original's.
L2P_DEFAULTS: dict[str, dict[str, Any]] = {
    "pytorch": dict(pool_size=10, length=5, top_n=5, pull_lambda=0.1, base_lr=0.03, prompt_pos_embed="cls"),
    "jax": dict(pool_size=10, length=10, top_n=4, pull_lambda=1.0, base_lr=0.03, prompt_pos_embed="none"),
}


@dataclass
class L2PConfig:
    defaults: Literal["pytorch", "jax"] = "pytorch"  # which named defaults fill the None fields below
    pool_size: int | None = None       # M (None: from `defaults`)
    length: int | None = None          # Lp, tokens per prompt
    top_n: int | None = None           # N, prompts per sample
    pull_lambda: float | None = None   # lambda of the key pull term
    lr: float | None = None            # Adam; None: 0.03 * batch_size / 256
    clip_grad: float = 1.0             # max gradient norm (<= 0: off)
    batchwise: bool = False            # official batch-wise selection (predictions depend on the batch)
    train_mask: bool = True            # logits outside the current task set to -inf in training
    init: Literal["uniform", "zero"] = "uniform"  # prompts and keys
    # positional embedding of the prompts: none (JAX original) | cls (PyTorch port) | auto (from `defaults`)
    prompt_pos_embed: Literal["auto", "none", "cls"] = "auto"

    def validate(self) -> None:
        """Raise :class:`ConfigError` for unknown ``defaults`` or values that cannot work once filled in."""
        if self.defaults not in L2P_DEFAULTS:
            raise ConfigError(f"l2p.defaults must be one of {', '.join(L2P_DEFAULTS)}; got '{self.defaults}'")
        d = L2P_DEFAULTS[self.defaults]
        size = {k: int(d[k]) if getattr(self, k) is None else getattr(self, k)
                for k in ("pool_size", "length", "top_n")}
        for k, v in size.items():
            if v < 1:
                raise ConfigError(f"l2p.{k} must be >= 1, got {v}")
        if size["top_n"] > size["pool_size"]:
            raise ConfigError(f"l2p.top_n ({size['top_n']}) cannot exceed l2p.pool_size "
                              f"({size['pool_size']}); lower top_n or enlarge the pool")
        if self.prompt_pos_embed not in ("auto", "none", "cls"):
            raise ConfigError(f"l2p.prompt_pos_embed must be none, cls or auto; got '{self.prompt_pos_embed}'")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"l2p.lr must be > 0 (or none for 0.03 * batch_size / 256), got {self.lr}")

    def resolved(self, batch_size: int) -> L2PConfig:
        """A copy with every ``None`` field filled from ``defaults`` (explicit values kept)."""
        self.validate()
        d = L2P_DEFAULTS[self.defaults]
        fill = {k: d[k] for k in ("pool_size", "length", "top_n", "pull_lambda") if getattr(self, k) is None}
        if self.lr is None:
            fill["lr"] = scaled_lr(d["base_lr"], batch_size)
        if self.prompt_pos_embed == "auto":
            fill["prompt_pos_embed"] = d["prompt_pos_embed"]
        return dataclasses.replace(self, **fill)


class L2PModel(nn.Module):
    """The trainable part: ``pool`` (prompts ``(M, Lp, d)``, keys ``(M, d)``) and ``head`` ``(C, d)``."""

    def __init__(self, cfg: L2PConfig, dim: int, num_classes: int):
        super().__init__()
        self.pool = PromptPool(cfg.pool_size, cfg.length, dim, init=cfg.init)
        self.head = linear_head(dim, num_classes)


class L2PClient(PromptClient):
    def __init__(self, cfg: L2PConfig, env: ClientEnv):
        model = L2PModel(cfg, env.foundation.embed_dim, env.scenario.num_classes)
        super().__init__(env, model, cfg.lr, cfg.clip_grad, cfg.pull_lambda, cfg.train_mask)
        self.cfg = cfg

    def forward(self, batch: Batch, train: bool) -> tuple[Tensor, Tensor]:
        pool = self.model.pool
        idx, sim = pool.select(self.query(batch), self.cfg.top_n, self.cfg.batchwise)
        prompts = pool.gather(idx)  # (B, N * Lp, d)
        out = forward_with_prompts(self.vit, self.tokens(batch), prompts=prompts,
                                   prompt_pos_embed=self.cfg.prompt_pos_embed)
        feat = mean_prompt_tokens(self.vit, out, prompts.shape[1])
        return self.model.head(feat.to(self.model.head.weight.dtype)), pull_loss(sim, idx)


@register
class L2P(Method):
    name = "l2p"
    description = "FedAvg+L2P: key-matched prompt pool on the frozen ViT; prompts, keys, head averaged"
    Config = L2PConfig
    uploads = ("pool.*", "head.*", N_KEY)

    def __init__(self, config: L2PConfig, env: MethodEnv):
        super().__init__(config.resolved(env.batch_size), env)
        if getattr(env.foundation.vit, "cls_token", None) is None:
            raise ValueError("l2p queries with the frozen CLS feature; this foundation model has no class "
                             "token (use a ViT with class_token=True)")
        c = self.config
        env.log(f"[l2p] defaults={c.defaults}: pool_size={c.pool_size} length={c.length} top_n={c.top_n} "
                f"pull_lambda={c.pull_lambda} lr={c.lr:g} prompt_pos_embed={c.prompt_pos_embed} batchwise={c.batchwise}")

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return L2PClient(self.config, env)

    def server(self, env: ServerEnv) -> Server:
        return prompt_server(env, lambda: L2PModel(self.config, env.foundation.embed_dim, env.scenario.num_classes))


__all__ = ["L2P", "L2PClient", "L2PConfig", "L2PModel", "L2P_DEFAULTS"]

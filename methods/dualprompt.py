"""FedAvg+DualPrompt (Wang et al., ECCV 2022) on the frozen ViT, averaged with FedAvg.

Mechanisms (JH-LEE-KR/dualprompt-pytorch, CIFAR-100 config; google-research/l2p ``cifar100_dualprompt``):
  * G-prompt: one shared prefix of ``g_length`` (5) tokens on blocks ``g_layers`` (0, 1);
  * E-prompt pool: ``e_pool_size`` (10) prefixes of ``e_length`` (5) tokens on blocks ``e_layers``
    (2, 3, 4) with keys ``(M, d)``; the top-1 entry by cosine similarity of the query (the frozen ViT's
    final-norm CLS feature, from the feature cache) with the keys, the same index in all its blocks;
  * prefix tuning: ``K' = [p_K; K]``, ``V' = [p_V; V]`` with separate ``p_K``, ``p_V``, queries unchanged
    (:class:`~fcl_bench.nn.prompts.PrefixPool`, which gathers per sample with the correct permute; the
    public code reshapes ``(L, 2, B, ...)`` into ``(L, B, 2, ...)``, mixing K and V across the batch);
  * training uses the task's own E-prompt (prompt mask: task ``t`` -> entry ``t``) and the pull term on its
    key (lambda 1.0); at the start of task ``t > 0`` entry ``t`` is initialised from entry ``t - 1``
    (``shared_prompt_pool=True``); the key is not copied (``shared_prompt_key=False``; ``copy_key``);
  * head = linear over all classes on the final-norm CLS token (``head_type='token'``);
  * CE with classes outside the current task masked (``train_mask``), Adam ``0.03 * batch_size / 256``,
    re-created each task, gradient-norm clipping 1.0;
  * communicated, down and up: G-prompt, E-prompts, keys, head (n_k-weighted average of each).

Tasks beyond the pool (``t >= e_pool_size``) train with key-matched selection and no copy, as the
official code does when the mask would index past the pool. Block indices past the foundation model's
last block are clamped to it (duplicates dropped; overlapping G and E prefixes on one block are
concatenated): on the tiny default ViT (depth 6) and ViT-B (depth 12) nothing changes; on depth 4 the
E-prompt uses blocks (2, 3). Per-sample selection by default; ``batchwise=True`` is the official trick
(predictions depend on the batch), a labelled option. The server broadcasts its seeded initial prompts,
keys and head at the first task start. Inputs follow the foundation model's ``Preprocess`` (the official code feeds [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fcl_bench.api import Client, ClientEnv, Method, MethodEnv, Server, ServerEnv, Task
from fcl_bench.config import ConfigError
from fcl_bench.data import Batch
from fcl_bench.nn.averaging import N_KEY
from fcl_bench.nn.prompt_methods import PromptClient, fit_layers, linear_head, prompt_server, scaled_lr
from fcl_bench.nn.prompts import PrefixPool, combine_prefixes, forward_with_prompts, pull_loss
from fcl_bench.registry import register


@dataclass
class DualPromptConfig:
    g_length: int = 5                          # G-prompt tokens per block
    g_layers: tuple[int, ...] = (0, 1)         # G-prompt blocks (clamped to the model's depth)
    e_pool_size: int = 10                      # E-prompt pool size
    e_length: int = 5                          # E-prompt tokens per block (20 for ImageNet-R)
    e_layers: tuple[int, ...] = (2, 3, 4)      # E-prompt blocks (clamped to the model's depth)
    pull_lambda: float = 1.0                   # weight of the key pull term
    lr: float | None = None                    # Adam; None: 0.03 * batch_size / 256
    clip_grad: float = 1.0                     # max gradient norm (<= 0: off)
    prompt_mask: bool = True                   # train task t with E-prompt t
    copy_prompt: bool = True                   # init E-prompt t from t - 1 (shared_prompt_pool)
    copy_key: bool = False                     # also its key (shared_prompt_key; off in the official config)
    batchwise: bool = False                    # official batch-wise selection (batch-dependent predictions)
    train_mask: bool = True                    # logits outside the current task set to -inf in training
    init: Literal["uniform", "zero"] = "uniform"  # prefixes and keys

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot work."""
        for k in ("g_length", "e_pool_size", "e_length"):
            if getattr(self, k) < 1:
                raise ConfigError(f"dualprompt.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("g_layers", "e_layers"):
            layers = getattr(self, k)
            if not layers or min(layers) < 0:
                raise ConfigError(f"dualprompt.{k} needs block indices >= 0, e.g. {k}=0,1; "
                                  f"got {list(layers)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"dualprompt.lr must be > 0 (or none for 0.03 * batch_size / 256), "
                              f"got {self.lr}")


class DualPromptModel(nn.Module):
    """The trainable part: ``g`` (prefixes ``(1, Lg, 2, Lp, d)``), ``e`` (prefixes ``(M, Le, 2, Lp, d)``,
    keys ``(M, d)``) and ``head`` ``(C, d)``."""

    def __init__(self, cfg: DualPromptConfig, g_layers: tuple[int, ...], e_layers: tuple[int, ...], dim: int,
                 num_classes: int):
        super().__init__()
        self.g = PrefixPool(1, g_layers, cfg.g_length, dim, init=cfg.init, with_keys=False)
        self.e = PrefixPool(cfg.e_pool_size, e_layers, cfg.e_length, dim, init=cfg.init)
        self.head = linear_head(dim, num_classes)


class DualPromptClient(PromptClient):
    def __init__(self, cfg: DualPromptConfig, env: ClientEnv, g_layers: tuple[int, ...],
                 e_layers: tuple[int, ...]):
        model = DualPromptModel(cfg, g_layers, e_layers, env.foundation.embed_dim, env.scenario.num_classes)
        lr = cfg.lr if cfg.lr is not None else scaled_lr(0.03, env.batch_size)
        super().__init__(env, model, lr, cfg.clip_grad, cfg.pull_lambda, cfg.train_mask)
        self.cfg = cfg

    def start_task(self, task: Task) -> None:
        t, e = task.index, self.model.e
        if self.cfg.copy_prompt and 0 < t < e.prefixes.shape[0]:
            with torch.no_grad():
                e.prefixes[t] = e.prefixes[t - 1]
                if self.cfg.copy_key:
                    e.keys[t] = e.keys[t - 1]
        super().start_task(task)

    def select(self, batch: Batch, train: bool) -> tuple[Tensor, Tensor]:
        """E-prompt indices ``(B, 1)`` and similarities ``(B, M)``; the task's own entry when training."""
        e = self.model.e
        idx, sim = e.select(self.query(batch), 1, self.cfg.batchwise)
        t = self.task.index if self.task is not None else -1
        if train and self.cfg.prompt_mask and 0 <= t < e.prefixes.shape[0]:
            idx = torch.full_like(idx, t)
        return idx, sim

    def forward(self, batch: Batch, train: bool) -> tuple[Tensor, Tensor]:
        idx, sim = self.select(batch, train)
        shared = torch.zeros(1, dtype=torch.long, device=idx.device)
        prefixes = combine_prefixes(self.model.g.gather(shared), self.model.e.gather(idx))
        out = forward_with_prompts(self.vit, self.tokens(batch), prefixes=prefixes)
        feat = out[:, 0]  # final-norm CLS token
        return self.model.head(feat.to(self.model.head.weight.dtype)), pull_loss(sim, idx)


@register
class DualPrompt(Method):
    name = "dualprompt"
    description = "FedAvg+DualPrompt: shared G-prefix + key-matched E-prefix pool on the frozen ViT, averaged"
    Config = DualPromptConfig
    uploads = ("g.*", "e.*", "head.*", N_KEY)

    def __init__(self, config: DualPromptConfig, env: MethodEnv):
        super().__init__(config, env)
        config.validate()
        if getattr(env.foundation.vit, "cls_token", None) is None:
            raise ValueError("dualprompt queries with and classifies the CLS token; this foundation model "
                             "has no class token (use a ViT with class_token=True)")
        depth = env.foundation.depth
        self.g_layers = fit_layers(config.g_layers, depth)
        self.e_layers = fit_layers(config.e_layers, depth)
        if (self.g_layers, self.e_layers) != (tuple(config.g_layers), tuple(config.e_layers)):
            env.log(f"[dualprompt] the foundation model has {depth} blocks: G-prompt on blocks "
                    f"{self.g_layers}, E-prompt on blocks {self.e_layers}")
        if env.scenario.num_tasks > config.e_pool_size:
            env.log(f"[dualprompt] {env.scenario.num_tasks} tasks > e_pool_size {config.e_pool_size}: tasks "
                    f"from {config.e_pool_size} on train with key-matched E-prompts (official behaviour)")

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return DualPromptClient(self.config, env, self.g_layers, self.e_layers)

    def server(self, env: ServerEnv) -> Server:
        return prompt_server(env, lambda: DualPromptModel(self.config, self.g_layers, self.e_layers,
                                                          env.foundation.embed_dim, env.scenario.num_classes))

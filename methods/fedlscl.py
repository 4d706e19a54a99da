"""Fed-LSCL: Large-Small Model Collaborative Framework for Federated Continual Learning (the seed paper,
sections 4.1-4.5, Algorithm 1).

Per client i: a small model theta_i (timm CNN + projection to width e, from ``env.make_small_model``) gives
``E = theta_i(x)``; a parameter generator phi_i (one linear layer, :class:`~fcl_bench.nn.lora.LoRAGenerator`)
turns E into per-sample LoRA factors ``A (d, r)``, ``B (r, out)`` for the qkv projection of one block ``b``
of the frozen ViT; the adapted ViT runs blocks < b frozen (from the frozen-prefix cache), adds
``scale * (h A) B`` to block b's qkv per sample, runs the rest frozen; a local head H_i on the final-norm CLS
token covers the client's seen classes (it grows per task, old rows kept).

Each round (Algorithm 1):
  * Stage 1, collaborative training: ``CE(H_i(Theta_i(x)), y)`` on the current task; theta_i, phi_i, H_i
    trained with Adam (lr 1e-3).
  * Stage 2, small-model continual fine-tuning (tasks after the first): on the buffer B^{n-1} of earlier
    tasks, CE plus Eq. 4, ``mean_buffer(lambda_E ||E - E'||^2 + lambda_W ||W - W'||^2)``, with E', W' from
    frozen copies of theta and phi saved when the previous task ended (after the server's last download);
    ``W' = phi^{n-1}(E')`` (Alg. 1 line 17). E' and W' are fixed within a task, so they are computed once
    per task (at its first Stage 2) and looked up per batch.
  * Buffer (4.3.2): per class, the M samples with the lowest CE under the current model; with several
    rounds per task, the current task's slots are re-selected after each round, earlier tasks' slots are
    fixed. Raw samples never leave the client.
  * Upload: phi_i and the feature set ``FS_i = theta_i(buffer)`` (B^n: earlier tasks + current task).
  * Server: One-by-One Distillation (Eq. 5, :mod:`fcl_bench.nn.o2d`), a personalised phi_bar_i per client.

Choices the paper leaves open (Config defaults): lambda_E = lambda_W = 1; O2D lambda = 1; LoRA rank 4
with alpha = rank (scale 1); block 3 (the paper's most stable, Fig. 3); qkv target; Adam state reset at
each task (the head grows); ``env.epochs`` local epochs of each stage per round; the buffer selection is
an extra no-grad pass over the current task's data after each round; Stage 2 runs the small model's
BatchNorm layers in eval mode (running statistics frozen), so E and E' are computed alike (and a buffer
of one sample is harmless); Stage 1 on a task of one sample does the same for its forward passes (logged).
Ablations (Table 2): ``collab=False``
(the small model classifies alone: CNN -> head, no ViT, FedAvg of the small models, so they must share an
arch), ``continual_finetune=False`` (no Stage 2), ``aggregation`` = o2d | fedavg (one n_k-weighted average
generator for everyone; no feature set uploaded) | none (no communication after training). The ablations
that average a model (``collab=False``: theta; ``aggregation=fedavg``: phi) start every client from one
initial model that the server broadcasts at the first task start, as FedAvg does; with O2D (the paper's
method) each client keeps its own initial generator.

A client that sits out every round of a task (``participation < 1``) selects its buffer slots for that
task when the task ends, so its buffer still covers every task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcl_bench.api import (
    Client,
    ClientEnv,
    DownloadKind,
    Method,
    MethodEnv,
    Payload,
    RoundInfo,
    Server,
    ServerEnv,
    Task,
)
from fcl_bench.config import ConfigError
from fcl_bench.data import Batch, ClientData, concat_views
from fcl_bench.nn.averaging import N_KEY, load_trainable, seeded, trainable_state, weighted_average
from fcl_bench.nn.distill import batchnorm_eval, frozen_copy
from fcl_bench.nn.exemplars import lowest_loss_per_class
from fcl_bench.nn.heads import GrowingHead
from fcl_bench.nn.lora import LoRAGenerator, PerSampleLoRA, lora_forward, lora_scale, target_delta
from fcl_bench.nn.o2d import o2d_closed_form, o2d_gradient
from fcl_bench.nn.training import optimizer_step, single_sample_guard
from fcl_bench.registry import register
from fcl_bench.state import State


@dataclass
class FedLSCLConfig:
    lr: float = 1e-3                    # Adam, paper section 5.1
    rank: int = 4                       # LoRA rank r
    lora_alpha: float = 4.0             # scale = lora_alpha / rank
    target: Literal["qkv", "qv"] = "qkv"
    block: int = 3                      # adapted ViT block (Fig. 3)
    buffer_per_class: int = 20          # M (Fig. 5)
    lambda_e: float = 1.0               # Eq. 4 feature term
    lambda_w: float = 1.0               # Eq. 4 generated-parameter term
    o2d_lambda: float = 1.0             # Eq. 5 anchor weight
    o2d_solver: Literal["closed_form", "gradient"] = "closed_form"  # gradient: L-BFGS (non-linear generators)
    o2d_steps: int = 100                # L-BFGS iterations of the gradient solver
    collab: bool = True                 # Table 2: large-small collaboration
    continual_finetune: bool = True     # Table 2: Stage 2
    aggregation: Literal["o2d", "fedavg", "none"] = "o2d"  # Table 2
    prefix_cache: bool = True           # frozen blocks < b from the feature cache (off: recomputed)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first value that cannot work (before any data is loaded)."""
        for k in ("rank", "buffer_per_class", "o2d_steps"):
            if getattr(self, k) < 1:
                raise ConfigError(f"fedlscl.{k} must be >= 1, got {getattr(self, k)}")
        if self.block < 0:
            raise ConfigError(f"fedlscl.block must be >= 0 (a ViT block index), got {self.block}")
        for k in ("lambda_e", "lambda_w", "o2d_lambda"):
            if getattr(self, k) < 0:
                raise ConfigError(f"fedlscl.{k} must be >= 0, got {getattr(self, k)}")


def _check(cfg: FedLSCLConfig, env: MethodEnv) -> None:
    cfg.validate()
    if cfg.collab:
        env.foundation.check_block(cfg.block)
    elif len(set(env.small_archs)) > 1:
        raise ValueError("fedlscl with collab=false averages the small models, so every client needs the same "
                         f"arch; got {env.small_archs}")


class FedLSCLClient(Client):
    def __init__(self, cfg: FedLSCLConfig, env: ClientEnv):
        self.cfg, self.env, self.id = cfg, env, env.client_id
        self.theta = env.make_small_model()
        e = env.small_width
        if cfg.collab:
            fm = env.foundation
            self.phi = LoRAGenerator(e, fm.embed_dim, cfg.rank, cfg.target).to(env.device)
            self.head = GrowingHead(fm.embed_dim, env.scenario.num_classes).to(env.device)
            self.scale = lora_scale(cfg.lora_alpha, cfg.rank)
        else:
            self.phi = None
            self.head = GrowingHead(e, env.scenario.num_classes).to(env.device)
        self.old: tuple[nn.Module, nn.Module | None] | None = None  # frozen theta^{n-1}, phi^{n-1}
        self.buffers: list[ClientData] = []   # fixed slots of earlier tasks
        self.current_slots: ClientData | None = None
        self.task: Task | None = None
        self.opt: torch.optim.Optimizer | None = None
        self._old_cache: tuple | None = None  # E', W' of B^{n-1} for the current task (_old_targets)

    # -- model -------------------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [m for m in (self.theta, self.phi, self.head) if m is not None]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for m in self.modules() for p in m.parameters() if p.requires_grad)

    def _prefix(self, batch: Batch) -> torch.Tensor:
        if self.cfg.prefix_cache:
            return self.env.features.prefix(batch, self.cfg.block)
        return self.env.foundation.prefix(batch.x, self.cfg.block)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (logits over all classes, E, flat generated W or None)."""
        E = self.theta(batch.x)
        if not self.cfg.collab:
            return self.head(E), E, None
        A, B = self.phi(E)
        vit, block = self.env.foundation.vit, self.cfg.block
        delta = target_delta(PerSampleLoRA(A, B, self.scale), self.cfg.target, vit)
        feat = lora_forward(vit, None, {(block, "qkv"): delta}, start_block=block, tokens=self._prefix(batch))
        return self.head(feat), E, torch.cat([A.flatten(1), B.flatten(1)], 1)

    # -- protocol ----------------------------------------------------------------------------------
    def start_task(self, task: Task) -> None:
        self.head.add_classes(task.classes)
        self._begin(task)
        self.current_slots = None
        self._old_cache = None

    def _begin(self, task: Task) -> None:
        self.task = task
        params = [p for m in self.modules() for p in m.parameters()]
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr)

    def _step(self, loss: torch.Tensor) -> None:
        optimizer_step(loss, self.opt, f"client {self.id} loss")

    def _train_mode(self, on: bool) -> None:
        for m in self.modules():
            m.train(on)

    def train_round(self, info: RoundInfo) -> Payload:
        env, g = self.env, self.env.generator
        self._train_mode(True)
        for _ in range(env.epochs):                                     # Stage 1
            for batch in self.task.train.batches(env.batch_size, shuffle=True, generator=g):
                with env.autocast(), single_sample_guard(env, self.task.train, self.theta):
                    logits, _, _ = self.forward(batch)
                    loss = F.cross_entropy(logits.float(), batch.y)
                self._step(loss)
        if self.cfg.continual_finetune and self.old is not None and self.buffers:   # Stage 2
            old_buffer = concat_views(self.buffers)
            self._old_targets(old_buffer)
            # BatchNorm in eval mode: E is then computed exactly as E' (frozen running statistics), so
            # Eq. 4 compares like with like instead of batch statistics of a small buffer batch
            batchnorm_eval(self.theta)
            for _ in range(env.epochs):
                for batch in old_buffer.batches(env.batch_size, shuffle=True, generator=g):
                    with env.autocast():
                        loss = self.continual_loss(batch)
                    self._step(loss)
        self._select_current_slots()
        return self._upload()

    @torch.no_grad()
    def _old_targets(self, buffer: ClientData) -> None:
        """E' and W' of every sample of ``buffer`` (B^{n-1}), from the frozen theta^{n-1} and phi^{n-1}.

        Both are fixed for the whole task (frozen models, fixed buffer, no augmentation), so they are
        computed once per task, at its first Stage 2, and looked up by sample afterwards; the cache is keyed
        on the task and the buffer's samples and dropped at every task start.
        """
        key = (self.task.index, buffer.indices.tobytes())
        if self._old_cache is not None and self._old_cache[0] == key:
            return
        old_theta, old_phi = self.old
        Es, Ws = [], []
        for b in buffer.batches(self.env.eval_batch_size):
            with self.env.autocast():
                E_old = old_theta(b.x)
                Es.append(E_old)
                if old_phi is not None:
                    A_o, B_o = old_phi(E_old)
                    Ws.append(torch.cat([A_o.flatten(1), B_o.flatten(1)], 1))
        order = np.argsort(buffer.indices, kind="stable")
        self._old_cache = (key, buffer.indices[order], order, torch.cat(Es), torch.cat(Ws) if Ws else None)

    def _old_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached (E', W') rows of ``batch``'s samples."""
        _, sorted_idx, order, E_all, W_all = self._old_cache
        idx = batch.index.cpu().numpy()
        at = np.searchsorted(sorted_idx, idx)
        if not (at < len(sorted_idx)).all() or not (sorted_idx[np.minimum(at, len(sorted_idx) - 1)] == idx).all():
            raise KeyError(f"client {self.id}: a Stage 2 batch holds samples outside the buffer B^(n-1)")
        rows = torch.as_tensor(order[at], device=E_all.device)
        return E_all[rows], None if W_all is None else W_all[rows]

    def continual_loss(self, batch: Batch) -> torch.Tensor:
        """CE on buffer samples + Eq. 4 against the frozen previous theta and phi (E', W' from the per-task
        cache, :meth:`_old_targets`)."""
        logits, E, W = self.forward(batch)
        E_old, W_old = self._old_rows(batch)
        loss = F.cross_entropy(logits.float(), batch.y)
        reg = self.cfg.lambda_e * ((E - E_old) ** 2).sum(1)
        if W is not None:
            reg = reg + self.cfg.lambda_w * ((W - W_old) ** 2).sum(1)
        return loss + reg.float().mean()

    @torch.no_grad()
    def _select_current_slots(self) -> None:
        """Class-balanced buffer: the M lowest-CE samples of each class of the current task."""
        self._train_mode(False)
        data = self.task.train
        losses = []
        for batch in data.batches(self.env.eval_batch_size):
            with self.env.autocast():
                logits, _, _ = self.forward(batch)
            losses.append(F.cross_entropy(logits.float(), batch.y, reduction="none").cpu())
        loss = torch.cat(losses).numpy()
        self.current_slots = data.subset(lowest_loss_per_class(loss, data.labels, self.task.classes,
                                                               self.cfg.buffer_per_class))

    @torch.no_grad()
    def _feature_set(self) -> torch.Tensor:
        buf = concat_views(self.buffers + [self.current_slots])
        self.theta.eval()
        return torch.cat([self.theta(b.x).float() for b in buf.batches(self.env.eval_batch_size)])

    def _upload(self) -> Payload:
        n = torch.tensor([len(self.task.train)], dtype=torch.int64)
        if not self.cfg.collab:
            return {**{f"theta.{k}": v for k, v in trainable_state(self.theta).items()}, N_KEY: n}
        agg = self.cfg.aggregation
        if agg == "none":
            return {}
        up = {"phi.weight": self.phi.linear.weight.detach(), "phi.bias": self.phi.linear.bias.detach(), N_KEY: n}
        if agg == "o2d":
            up["fs"] = self._feature_set()
        return up

    def receive(self, download: Payload, kind: DownloadKind) -> None:
        if not download:
            return
        if not self.cfg.collab:
            load_trainable(self.theta, {k[len("theta."):]: v for k, v in download.items()})
            return
        with torch.no_grad():
            self.phi.linear.weight.copy_(download["phi.weight"])
            self.phi.linear.bias.copy_(download["phi.bias"])

    def end_task(self) -> None:
        if self.current_slots is None:  # sat out every round of this task
            self._select_current_slots()
        self.buffers.append(self.current_slots)
        self.old = (frozen_copy(self.theta), frozen_copy(self.phi) if self.phi is not None else None)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self._train_mode(False)
        return self.forward(batch)[0]

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> State:
        old = None
        if self.old is not None:
            old = {"theta": self.old[0].state_dict(),
                   "phi": None if self.old[1] is None else self.old[1].state_dict()}
        return {"theta": self.theta.state_dict(), "phi": None if self.phi is None else self.phi.state_dict(),
                "head": self.head.state_dict(), "old": old,
                "buffers": [b.indices for b in self.buffers],
                "current_slots": None if self.current_slots is None else self.current_slots.indices,
                "task": -1 if self.task is None else self.task.index,
                "opt": None if self.opt is None else self.opt.state_dict()}

    def load_state_dict(self, state: State) -> None:
        self.theta.load_state_dict(state["theta"])
        if self.phi is not None:
            self.phi.load_state_dict(state["phi"])
        self.head.load_state_dict(state["head"])
        self.old = None
        if state["old"] is not None:
            old_phi = None
            if self.phi is not None:
                old_phi = frozen_copy(self.phi)
                old_phi.load_state_dict(state["old"]["phi"])
            old_theta = frozen_copy(self.theta)
            old_theta.load_state_dict(state["old"]["theta"])
            self.old = (old_theta, old_phi)
        self._old_cache = None
        self.buffers = [self.env.view(ix) for ix in state["buffers"]]
        self.current_slots = None if state["current_slots"] is None else self.env.view(state["current_slots"])
        if state["task"] >= 0:
            self._begin(self.env.task(state["task"]))
            self.opt.load_state_dict(state["opt"])


class FedLSCLServer(Server):
    """O2D (personalised generators, to each participant) or, for the averaging ablations, an n_k-weighted
    average to every client after a broadcast of the initial model at the first task start."""

    def __init__(self, cfg: FedLSCLConfig, env: ServerEnv):
        self.cfg, self.env = cfg, env

    @property
    def averages(self) -> bool:
        return not self.cfg.collab or self.cfg.aggregation == "fedavg"

    def start_task(self, task_index: int) -> Mapping[int, Payload]:
        if task_index > 0 or not self.averages:
            return {}
        env = self.env
        if not self.cfg.collab:
            theta = seeded(env.seed, lambda: env.build_small_model(0))
            init = {f"theta.{k}": v for k, v in trainable_state(theta).items()}
        else:
            phi = seeded(env.seed, lambda: LoRAGenerator(env.small_width, env.foundation.embed_dim, self.cfg.rank,
                                                         self.cfg.target))
            init = {"phi.weight": phi.linear.weight.detach(), "phi.bias": phi.linear.bias.detach()}
        return {c: init for c in range(env.scenario.num_clients)}

    def aggregate(self, uploads: Mapping[int, Payload], info: RoundInfo) -> Mapping[int, Payload]:
        ids = sorted(c for c in uploads if uploads[c])
        if not ids:
            return {}
        if self.averages:
            states = [{k: v for k, v in uploads[c].items() if k not in (N_KEY, "fs")} for c in ids]
            avg = weighted_average(states, [float(uploads[c][N_KEY]) for c in ids])
            return {c: avg for c in range(self.env.scenario.num_clients)}
        return {i: self._o2d(i, uploads, ids) for i in ids}

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        return None

    def _o2d(self, i: int, uploads: Mapping[int, Payload], ids: list[int]) -> Payload:
        lam = self.cfg.o2d_lambda
        student = (uploads[i]["phi.weight"], uploads[i]["phi.bias"])
        others = [j for j in ids if j != i]
        if self.cfg.o2d_solver == "closed_form":
            W, b = o2d_closed_form(student, [(uploads[j]["phi.weight"], uploads[j]["phi.bias"], uploads[j]["fs"])
                                             for j in others], lam)
            return {"phi.weight": W, "phi.bias": b}
        out = o2d_gradient(_linear(*student), [(_linear(uploads[j]["phi.weight"], uploads[j]["phi.bias"]),
                                                uploads[j]["fs"]) for j in others], lam, steps=self.cfg.o2d_steps)
        return {"phi.weight": out.weight.detach(), "phi.bias": out.bias.detach()}


def _linear(W: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0]).to(W.device, W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    return lin


@register
class FedLSCL(Method):
    name = "fedlscl"
    description = ("Fed-LSCL: client CNNs generate per-sample LoRA for a frozen ViT block; buffer-based continual "
                   "fine-tuning; One-by-One Distillation of the generators")
    Config = FedLSCLConfig
    global_space = False  # each client's head covers its own classes only
    uploads = ("phi.weight", "phi.bias", "fs", "theta.*", N_KEY)

    def __init__(self, config: FedLSCLConfig, env: MethodEnv):
        super().__init__(config, env)
        _check(config, env)
        # what leaves a client under this configuration: theta only when the small models are averaged
        if not config.collab:
            self.uploads = ("theta.*", N_KEY)
        elif config.aggregation == "none":
            self.uploads = ()
        elif config.aggregation == "fedavg":
            self.uploads = ("phi.weight", "phi.bias", N_KEY)
        else:
            self.uploads = ("phi.weight", "phi.bias", "fs", N_KEY)

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return FedLSCLClient(self.config, env)

    def server(self, env: ServerEnv) -> Server:
        return FedLSCLServer(self.config, env)

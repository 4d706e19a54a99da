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
    ``W' = phi^{n-1}(E')`` (Alg. 1 line 17).
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
generator for everyone; no feature set uploaded) | none (no communication after training).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcl_bench.api import Client, Env, Method, Payload, Server, Task
from fcl_bench.data import Batch, ClientData, concat_views
from fcl_bench.nn.averaging import load_trainable, trainable_state, weighted_average
from fcl_bench.nn.heads import GrowingHead
from fcl_bench.nn.lora import LoRAGenerator, adapted_forward, check_target, lora_scale
from fcl_bench.nn.o2d import o2d_closed_form, o2d_gradient
from fcl_bench.nn.training import optimizer_step, single_sample_guard
from fcl_bench.registry import register

N_KEY = "__num_samples__"


@dataclass
class FedLSCLConfig:
    lr: float = 1e-3                    # Adam, paper section 5.1
    rank: int = 4                       # LoRA rank r
    lora_alpha: float = 4.0             # scale = lora_alpha / rank
    target: str = "qkv"                 # "qkv" or "qv"
    block: int = 3                      # adapted ViT block (Fig. 3)
    buffer_per_class: int = 20          # M (Fig. 5)
    lambda_e: float = 1.0               # Eq. 4 feature term
    lambda_w: float = 1.0               # Eq. 4 generated-parameter term
    o2d_lambda: float = 1.0             # Eq. 5 anchor weight
    o2d_solver: str = "closed_form"     # "closed_form" (linear generator) or "gradient"
    o2d_steps: int = 100                # L-BFGS iterations of the gradient solver
    collab: bool = True                 # Table 2: large-small collaboration
    continual_finetune: bool = True     # Table 2: Stage 2
    aggregation: str = "o2d"            # Table 2: o2d | fedavg | none
    prefix_cache: bool = True           # frozen blocks < b from the feature cache (off: recomputed)


def _check(cfg: FedLSCLConfig, env: Env) -> None:
    check_target(cfg.target)
    if cfg.aggregation not in ("o2d", "fedavg", "none"):
        raise ValueError(f"fedlscl.aggregation must be o2d, fedavg or none; got '{cfg.aggregation}'")
    if cfg.o2d_solver not in ("closed_form", "gradient"):
        raise ValueError(f"fedlscl.o2d_solver must be closed_form or gradient; got '{cfg.o2d_solver}'")
    if cfg.buffer_per_class < 1:
        raise ValueError(f"fedlscl.buffer_per_class must be >= 1, got {cfg.buffer_per_class}")
    if cfg.collab:
        env.foundation.check_block(cfg.block)
    elif len(set(env.small_archs)) > 1:
        raise ValueError("fedlscl with collab=false averages the small models, so every client needs the same "
                         f"arch; got {env.small_archs}")


class FedLSCLClient(Client):
    def __init__(self, cfg: FedLSCLConfig, env: Env, cid: int):
        self.cfg, self.env, self.id = cfg, env, cid
        self.theta = env.make_small_model(cid)
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
        feat = adapted_forward(self.env.foundation.vit, self._prefix(batch), self.cfg.block, A, B, self.scale,
                               self.cfg.target)
        return self.head(feat), E, torch.cat([A.flatten(1), B.flatten(1)], 1)

    # -- protocol ----------------------------------------------------------------------------------
    def start_task(self, task: Task) -> None:
        self.task = task
        self.head.add_classes(task.classes)
        params = [p for m in self.modules() for p in m.parameters()]
        self.opt = torch.optim.Adam(params, lr=self.cfg.lr)
        self.current_slots = None

    def _step(self, loss: torch.Tensor) -> None:
        optimizer_step(loss, self.opt, f"client {self.id} loss")

    def _train_mode(self, on: bool) -> None:
        for m in self.modules():
            m.train(on)

    def train_round(self) -> Payload:
        env, g = self.env, self.env.generator(self.id)
        self._train_mode(True)
        for _ in range(env.epochs):                                     # Stage 1
            for batch in self.task.train.batches(env.batch_size, shuffle=True, generator=g):
                with env.autocast(), single_sample_guard(env, self.id, self.task.train, self.theta):
                    logits, _, _ = self.forward(batch)
                    loss = F.cross_entropy(logits.float(), batch.y)
                self._step(loss)
        if self.cfg.continual_finetune and self.old is not None and self.buffers:   # Stage 2
            old_buffer = concat_views(self.buffers)
            # BatchNorm in eval mode: E is then computed exactly as E' (frozen running statistics), so
            # Eq. 4 compares like with like instead of batch statistics of a small buffer batch
            _batchnorm_eval(self.theta)
            for _ in range(env.epochs):
                for batch in old_buffer.batches(env.batch_size, shuffle=True, generator=g):
                    with env.autocast():
                        loss = self.continual_loss(batch)
                    self._step(loss)
        self._select_current_slots()
        return self._upload()

    def continual_loss(self, batch: Batch) -> torch.Tensor:
        """CE on buffer samples + Eq. 4 against the frozen previous theta and phi."""
        logits, E, W = self.forward(batch)
        old_theta, old_phi = self.old
        with torch.no_grad():
            E_old = old_theta(batch.x)
        loss = F.cross_entropy(logits.float(), batch.y)
        reg = self.cfg.lambda_e * ((E - E_old) ** 2).sum(1)
        if W is not None:
            with torch.no_grad():
                A_o, B_o = old_phi(E_old)
            W_old = torch.cat([A_o.flatten(1), B_o.flatten(1)], 1)
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
        keep = []
        for c in self.task.classes:
            pos = np.flatnonzero(data.labels == c)
            keep.append(pos[np.argsort(loss[pos], kind="stable")[: self.cfg.buffer_per_class]])
        self.current_slots = data.subset(np.sort(np.concatenate(keep)))

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

    def receive(self, download: Payload) -> None:
        if not download:
            return
        if not self.cfg.collab:
            load_trainable(self.theta, {k[len("theta."):]: v for k, v in download.items()})
            return
        with torch.no_grad():
            self.phi.linear.weight.copy_(download["phi.weight"])
            self.phi.linear.bias.copy_(download["phi.bias"])

    def end_task(self) -> None:
        self.buffers.append(self.current_slots)
        frozen = [copy.deepcopy(m).eval().requires_grad_(False) if m is not None else None
                  for m in (self.theta, self.phi)]
        self.old = (frozen[0], frozen[1])

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self._train_mode(False)
        return self.forward(batch)[0]


class FedLSCLServer(Server):
    def __init__(self, cfg: FedLSCLConfig, env: Env):
        self.cfg, self.env = cfg, env

    def aggregate(self, uploads: Mapping[int, Payload]) -> Mapping[int, Payload]:
        ids = sorted(c for c in uploads if uploads[c])
        if not ids:
            return {}
        if not self.cfg.collab or self.cfg.aggregation == "fedavg":
            states = [{k: v for k, v in uploads[c].items() if k not in (N_KEY, "fs")} for c in ids]
            avg = weighted_average(states, [float(uploads[c][N_KEY]) for c in ids])
            return {c: avg for c in ids}
        return {i: self._o2d(i, uploads, ids) for i in ids}

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


def _batchnorm_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


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
    global_space = False  # heads cover only the client's own classes: global space = client space

    def __init__(self, config: FedLSCLConfig, env: Env):
        super().__init__(config, env)
        _check(config, env)

    def client(self, client_id: int) -> Client:
        return FedLSCLClient(self.config, self.env, client_id)

    def server(self) -> Server:
        return FedLSCLServer(self.config, self.env)

"""LoRM (Salami et al., ICLR 2025): federated continual learning by closed-form merging of LoRA factors.

Mechanisms (official aimagelab/fed-mammoth, ``_models/lorm.py`` on ``lora_pre.py`` and ``regmean.py``):
  * the frozen ViT with LoRA ``W0 + B A`` (``A`` ``(r, d_in)``, ``B`` ``(d_out, r)``, scale 1: the official
    adds ``B @ A`` unscaled) on every ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` of every
    block, and a full linear head over all classes (timm's init: truncated normal 0.02, zero bias);
  * at every task start ``A`` is re-initialised (Kaiming-uniform, a = sqrt(5)) by the server and broadcast
    through ``Server.start_task``, and ``B = 0``; a task's LoRA trains on top of ``W0`` alone (the official
    ``cl_merge = individual_mean``: earlier tasks' updates are not in the training model);
  * rounds alternate the trained factor: B, A, B, A, B (round 0 of a task trains ``B``; with fewer rounds the
    pattern is cut short); the head trains in every round;
  * client loss: CE on the current task's classes (logits of the others masked: the official slices
    ``[offset, offset + classes_per_task)``); AdamW re-created every round, two parameter groups (the
    trained factor at ``lr_A``/``lr_B``, the head at ``lr``), weight decay 0 (README);
  * after local training, one no-grad pass over the task's data (``gram_passes``) gives the Gram matrices
    ``G = sum X^T X`` of every LoRA layer's input (all tokens) and of the head's input (the final-norm CLS
    feature) under the client's trained model; each is softened, ``G~ = alpha G + (1 - alpha) diag(G)``,
    with ``alpha_backbone = 0`` (README; only the diagonal, ``d_in`` floats, is uploaded) and
    ``alpha_head = 0.5`` (the full ``d x d`` head Gram is uploaded);
  * server, in float64 with pseudo-inverses (:mod:`fcl_bench.nn.regmean`): A-round
    ``A* = (sum A_i G~_i)(sum G~_i)^+``; B-round ``B* = (sum B_i A G~_i) A^T (A (sum G~_i) A^T)^+``; head
    ``W* = (sum W_i G~_i)(sum G~_i)^-1``, bias averaged with weights n_k;
  * at the end of task t the test model is the RegMean merge across tasks,
    ``W = W0 + (sum_tau B_tau A_tau G_tau)(sum_tau G_tau)^+``, with ``G_tau`` the task's softened backbone
    Grams summed over clients.

How the merged model is evaluated: ``(sum_tau B_tau A_tau G_tau)(sum_tau G_tau)^+`` equals ``B_all @ A_all``
with ``B_all = [B_0 .. B_t]`` ``(d_out, (t+1) r)`` and ``A_all`` stacking ``A_tau G_tau (sum G)^+``
(:func:`~fcl_bench.nn.regmean.merge_tasks`). The server sends these factors at the end of each task and each
client predicts with them as one :class:`~fcl_bench.nn.lora.SharedLoRA` per layer through
:func:`~fcl_bench.nn.lora.lora_forward`: the shared frozen ViT is never written, and the full
``d_out x d_in`` update is never sent (at ViT-B it would be 85M floats per client and task).

Communication per client and round: down ``A`` and ``B`` of every layer + head (at ViT-B 147,456 r +
head floats; the official sends both factors every round); up the trained factor + head + the backbone Gram
diagonals + the head Gram + n_k. At the first task start the head is broadcast with ``A``; at every other
task start only ``A``. At each task end the merged factors ``A_all``, ``B_all`` go down.

Named defaults (``defaults``; the README's CIFAR-100 commands): ``beta0.5`` (Dirichlet 0.5): lr 3e-3, r 1;
``beta0.1``: lr 3e-4, r 16. Both: 5 rounds x 5 epochs, batch 16, weight decay 0, ``alpha_head = 0.5``,
``alpha_backbone = 0``. ``rank`` and ``lr`` default to ``None`` (from ``defaults``); an explicit value wins.
Epochs and batch size are the run's (``-o epochs=5 -o batch_size=16`` gives the paper's); the offline presets
use fewer epochs to stay within CPU minutes.

Choices where the paper and code are silent or where we deliberately differ from the official code:
  * Grams are computed under the client's trained model ``W0 + B_i A_i`` (standard RegMean: each model's
    own inputs). The official computes them under ``W0 + mean(earlier task updates, current B A)``, which
    needs the full ``d_out x d_in`` mean of earlier updates sent down every round; we do not send it.
  * The task Grams ``G_tau`` of the cross-task merge are each client's latest Gram upload of the task (its
    last round), summed over clients. The official asks the clients for one more Gram pass after the last
    aggregation (under the aggregated model); the harness's schedule has no upload after ``end_task``, so
    we reuse the last round's (one fewer upload per task; the inputs differ by local vs aggregated LoRA).
    A client that sat out every round of a task contributes no Gram to it.
  * The merge formula is applied from the first task on (the official uses ``W0 + B_0 A_0`` directly after
    task 0); they agree wherever ``G_0`` is non-singular, as with a diagonal Gram of non-zero inputs.
  * The Gram pass runs in float32 (no autocast) and accumulates in float64; Grams are sent as float32
    (the official ``gram_dtype = 32``). No augmentation exists in this harness, so one pass is exact.
  * A round in which no participant holds a sample of the task leaves the factors and head unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from fcl_bench.data import Batch
from fcl_bench.nn.averaging import N_KEY, seeded
from fcl_bench.nn.heads import masked_logits
from fcl_bench.nn.lora import LORA_LAYERS, SharedLoRA, kaiming_lora, lora_forward, lora_layer_shape
from fcl_bench.nn.prompt_methods import linear_head
from fcl_bench.nn.regmean import gram, merge_b, merge_head, merge_tasks, regmean, soften
from fcl_bench.nn.training import train_epochs
from fcl_bench.registry import register
from fcl_bench.state import State

#: The README's CIFAR-100 commands, by Dirichlet beta.
LORM_DEFAULTS: dict[str, dict[str, Any]] = {
    "beta0.5": dict(lr=3e-3, rank=1),
    "beta0.1": dict(lr=3e-4, rank=16),
}


@dataclass
class LoRMConfig:
    defaults: Literal["beta0.5", "beta0.1"] = "beta0.5"  # which README command fills the None fields
    rank: int | None = None            # LoRA rank r (None: from `defaults`)
    lr: float | None = None            # AdamW lr of the head, and of the factors unless lr_a / lr_b
    lr_a: float | None = None          # lr of A in A-rounds (None: lr; the official lr_A = -1)
    lr_b: float | None = None          # lr of B in B-rounds (None: lr; the official lr_B = -1)
    weight_decay: float = 0.0          # AdamW (README wd_reg = 0)
    alpha_backbone: float = 0.0        # RegMean softening of the LoRA layers' Grams (0: diagonal only)
    alpha_head: float = 0.5            # RegMean softening of the head Gram
    gram_passes: int = 1               # passes over the task's data for the Grams (official regmean_rounds)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for unknown ``defaults`` or values that cannot work once filled in."""
        if self.defaults not in LORM_DEFAULTS:
            raise ConfigError(f"lorm.defaults must be one of {', '.join(LORM_DEFAULTS)}; got '{self.defaults}'")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"lorm.rank must be >= 1, got {self.rank}")
        for k in ("lr", "lr_a", "lr_b"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                raise ConfigError(f"lorm.{k} must be > 0 (or none for the default), got {v}")
        if self.weight_decay < 0:
            raise ConfigError(f"lorm.weight_decay must be >= 0, got {self.weight_decay}")
        for k in ("alpha_backbone", "alpha_head"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"lorm.{k} is a RegMean alpha in [0, 1], got {getattr(self, k)}")
        if self.gram_passes < 1:
            raise ConfigError(f"lorm.gram_passes must be >= 1, got {self.gram_passes}")

    def resolved(self) -> LoRMConfig:
        """A copy with every ``None`` field filled from ``defaults`` (explicit values kept)."""
        self.validate()
        d = LORM_DEFAULTS[self.defaults]
        rank = d["rank"] if self.rank is None else self.rank
        lr = d["lr"] if self.lr is None else self.lr
        return dataclasses.replace(self, rank=rank, lr=lr, lr_a=lr if self.lr_a is None else self.lr_a,
                                   lr_b=lr if self.lr_b is None else self.lr_b)


Layer = tuple[int, str]  # (block, layer name)


def lora_layers(vit: nn.Module) -> dict[str, tuple[Layer, int, int]]:
    """``{"<block>.<layer>": ((block, layer), d_in, d_out)}`` for every LoRA layer of every block."""
    out = {}
    for b in range(len(vit.blocks)):
        for layer in LORA_LAYERS:
            out[f"{b}.{layer}"] = ((b, layer), *lora_layer_shape(vit, b, layer))
    return out


def trained_factor(round_index: int) -> Literal["A", "B"]:
    """The factor a round trains: B, A, B, A, ... (round 0 of a task trains B)."""
    return "B" if round_index % 2 == 0 else "A"


def _a(key: str) -> str:
    return f"lora.{key}.A"


def _b(key: str) -> str:
    return f"lora.{key}.B"


def _gram(key: str) -> str:
    return f"gram.{key}"


HEAD_GRAM = "gram.head"


class LoRMClient(Client):
    def __init__(self, cfg: LoRMConfig, env: ClientEnv):
        self.cfg, self.env, self.id = cfg, env, env.client_id
        self.vit = env.foundation.vit
        self.layers = lora_layers(self.vit)
        dev, r = env.device, cfg.rank
        self.A = {k: torch.zeros(r, d_in, device=dev) for k, (_, d_in, _) in self.layers.items()}
        self.B = {k: torch.zeros(d_out, r, device=dev) for k, (_, _, d_out) in self.layers.items()}
        self.head = linear_head(env.foundation.embed_dim, env.scenario.num_classes).to(dev)  # replaced by w_0
        self.merged: dict[str, tuple[Tensor, Tensor]] = {}  # the test model's (A_all, B_all) per layer
        self.task: Task | None = None
        self.allowed: Tensor | None = None
        self._trained = 0

    # -- model -------------------------------------------------------------------------------------
    def _features(self, batch: Batch, factors: Mapping[str, tuple[Tensor, Tensor]], inputs: bool = False):
        deltas = {self.layers[k][0]: SharedLoRA(A, B) for k, (A, B) in factors.items()}
        return lora_forward(self.vit, None, deltas, tokens=self.env.features.prefix(batch, 0),
                            return_inputs=inputs)

    def _current(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {k: (self.A[k], self.B[k]) for k in self.layers}

    def trainable_parameters(self) -> int:
        return self._trained

    # -- protocol ----------------------------------------------------------------------------------
    def receive(self, download: Payload, kind: DownloadKind) -> None:
        dev = self.env.device
        for k in self.layers:
            if _a(k) in download:
                self.A[k] = download[_a(k)].to(dev)
            if _b(k) in download:
                self.B[k] = download[_b(k)].to(dev)
            if f"merged.{k}.A" in download:
                self.merged[k] = (download[f"merged.{k}.A"].to(dev), download[f"merged.{k}.B"].to(dev))
        if "head.weight" in download:
            with torch.no_grad():
                self.head.weight.copy_(download["head.weight"])
                self.head.bias.copy_(download["head.bias"])

    def start_task(self, task: Task) -> None:
        # A came with the server's start download; a task's LoRA starts at B = 0
        self.B = {k: torch.zeros_like(v) for k, v in self.B.items()}
        self._begin(task)

    def _begin(self, task: Task) -> None:
        self.task = task
        self.allowed = torch.as_tensor(task.classes, device=self.env.device)

    def train_round(self, info: RoundInfo) -> Payload:
        which = trained_factor(info.round)
        frozen = self.A if which == "B" else self.B
        trained = {k: v.detach().clone().requires_grad_(True)
                   for k, v in (self.B if which == "B" else self.A).items()}
        lr = self.cfg.lr_b if which == "B" else self.cfg.lr_a
        opt = torch.optim.AdamW([{"params": list(trained.values()), "lr": lr},
                                 {"params": list(self.head.parameters()), "lr": self.cfg.lr}],
                                lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self._trained = sum(v.numel() for v in trained.values()) + sum(p.numel() for p in self.head.parameters())

        def factors() -> dict[str, tuple[Tensor, Tensor]]:
            return {k: (frozen[k], trained[k]) if which == "B" else (trained[k], frozen[k]) for k in self.layers}

        def loss(batch: Batch) -> Tensor:
            logits = self.head(self._features(batch, factors()).float())
            return F.cross_entropy(masked_logits(logits, self.allowed), batch.y)

        self.head.train()
        train_epochs(self.env, self.task.train, loss, opt)
        new = {k: v.detach() for k, v in trained.items()}
        if which == "B":
            self.B = new
        else:
            self.A = new
        up: Payload = {(_b(k) if which == "B" else _a(k)): v for k, v in new.items()}
        up.update({"head.weight": self.head.weight.detach(), "head.bias": self.head.bias.detach()})
        up.update(self.grams())
        up[N_KEY] = torch.tensor([len(self.task.train)], dtype=torch.int64)
        return up

    @torch.no_grad()
    def grams(self) -> dict[str, Tensor]:
        """Softened Grams of every LoRA layer's input (all tokens) and of the head input, under the current
        model, over the task's data: ``gram.<block>.<layer>`` (a diagonal ``(d_in,)`` at ``alpha_backbone =
        0``, else ``(d_in, d_in)``) and ``gram.head`` ``(d, d)``; float32."""
        diag = self.cfg.alpha_backbone == 0.0
        acc: dict[str, Tensor] = {}
        factors = self._current()
        for _ in range(self.cfg.gram_passes):
            for batch in self.task.train.batches(self.env.eval_batch_size):
                feat, inputs = self._features(batch, factors, inputs=True)
                for k, (layer, _, _) in self.layers.items():
                    g = gram(inputs[layer], diagonal=diag)
                    acc[k] = acc[k] + g if k in acc else g
                g = gram(feat)
                acc["head"] = acc["head"] + g if "head" in acc else g
        if not acc:  # no sample of this task: zero Grams
            d = self.env.foundation.embed_dim
            acc = {k: torch.zeros(d_in if diag else (d_in, d_in), dtype=torch.float64)
                   for k, (_, d_in, _) in self.layers.items()}
            acc["head"] = torch.zeros(d, d, dtype=torch.float64)
        out = {_gram(k): soften(acc[k], self.cfg.alpha_backbone).float() for k in self.layers}
        out[HEAD_GRAM] = soften(acc["head"], self.cfg.alpha_head).float()
        return out

    def end_task(self) -> None:
        return None

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        self.head.eval()
        factors = self.merged if self.merged else self._current()
        return self.head(self._features(batch, factors).float())

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> State:
        return {"A": dict(self.A), "B": dict(self.B), "head": self.head.state_dict(),
                "merged_A": {k: a for k, (a, _) in self.merged.items()},
                "merged_B": {k: b for k, (_, b) in self.merged.items()},
                "task": -1 if self.task is None else self.task.index}

    def load_state_dict(self, state: State) -> None:
        dev = self.env.device
        self.A = {k: v.to(dev) for k, v in state["A"].items()}
        self.B = {k: v.to(dev) for k, v in state["B"].items()}
        self.head.load_state_dict(state["head"])
        self.merged = {k: (state["merged_A"][k].to(dev), state["merged_B"][k].to(dev)) for k in state["merged_A"]}
        if state["task"] >= 0:
            self._begin(self.env.task(state["task"]))


class LoRMServer(Server):
    """Broadcasts ``A`` at every task start, merges the trained factor and the head in closed form after
    every round, and the tasks' LoRA updates by RegMean at every task end."""

    def __init__(self, cfg: LoRMConfig, env: ServerEnv):
        self.cfg, self.env = cfg, env
        vit = env.foundation.vit
        self.layers = lora_layers(vit)
        self.dim, self.num_classes = env.foundation.embed_dim, env.scenario.num_classes
        self.A: dict[str, Tensor] = {}
        self.B: dict[str, Tensor] = {}
        self.head: dict[str, Tensor] = {}
        self.task_grams: dict[int, dict[str, Tensor]] = {}  # client -> its latest backbone Grams this task
        self.history: list[dict[str, Tensor]] = []           # per task: A, B and G of every layer

    def _everyone(self, payload: Payload) -> dict[int, Payload]:
        return {c: payload for c in range(self.env.scenario.num_clients)}

    def _factors(self) -> Payload:
        return {**{_a(k): v for k, v in self.A.items()}, **{_b(k): v for k, v in self.B.items()}}

    def start_task(self, task_index: int) -> Mapping[int, Payload]:
        r, dev = self.cfg.rank, self.env.device
        for k, (_, d_in, d_out) in self.layers.items():
            A, B = kaiming_lora(d_in, d_out, r, generator=self.env.generator)
            self.A[k], self.B[k] = A.to(dev), B.to(dev)
        self.task_grams = {}
        down: Payload = {_a(k): v for k, v in self.A.items()}
        if task_index == 0:
            head = seeded(self.env.seed, lambda: linear_head(self.dim, self.num_classes))
            self.head = {"head.weight": head.weight.detach().to(dev), "head.bias": head.bias.detach().to(dev)}
            down.update(self.head)
        return self._everyone(down)

    def aggregate(self, uploads: Mapping[int, Payload], info: RoundInfo) -> Mapping[int, Payload]:
        ids = sorted(c for c in uploads if uploads[c] and int(uploads[c][N_KEY].item()) > 0)
        if ids:
            ups = [uploads[c] for c in ids]
            which = trained_factor(info.round)
            for k in self.layers:
                grams = [u[_gram(k)] for u in ups]
                if which == "B":
                    self.B[k] = merge_b([u[_b(k)] for u in ups], self.A[k], grams)
                else:
                    self.A[k] = regmean([u[_a(k)] for u in ups], grams)
            W, b = merge_head([u["head.weight"] for u in ups], [u["head.bias"] for u in ups],
                              [u[HEAD_GRAM] for u in ups], [float(u[N_KEY].item()) for u in ups])
            self.head = {"head.weight": W, "head.bias": b}
            for c, u in zip(ids, ups):
                self.task_grams[c] = {k: u[_gram(k)] for k in self.layers}
        return self._everyone({**self._factors(), **self.head})

    def end_task(self, task_index: int) -> Mapping[int, Payload]:
        clients = sorted(self.task_grams)
        entry: dict[str, Tensor] = {}
        for k, (_, d_in, _) in self.layers.items():
            entry[f"{k}.A"], entry[f"{k}.B"] = self.A[k], self.B[k]
            if clients:
                entry[f"{k}.G"] = torch.stack([self.task_grams[c][k].double() for c in clients]).sum(0)
            else:  # no client trained in this task: its update gets no weight in the merge
                shape = (d_in,) if self.cfg.alpha_backbone == 0.0 else (d_in, d_in)
                entry[f"{k}.G"] = torch.zeros(shape, dtype=torch.float64, device=self.env.device)
        self.history.append(entry)
        down: Payload = {}
        for k in self.layers:
            a_all, b_all = merge_tasks([h[f"{k}.B"] for h in self.history], [h[f"{k}.A"] for h in self.history],
                                       [h[f"{k}.G"] for h in self.history])
            down[f"merged.{k}.A"], down[f"merged.{k}.B"] = a_all, b_all
        return self._everyone(down)

    def state_dict(self) -> State:
        return {"A": dict(self.A), "B": dict(self.B), "head": dict(self.head),
                "task_grams": {c: dict(g) for c, g in self.task_grams.items()},
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: State) -> None:
        dev = self.env.device
        self.A = {k: v.to(dev) for k, v in state["A"].items()}
        self.B = {k: v.to(dev) for k, v in state["B"].items()}
        self.head = {k: v.to(dev) for k, v in state["head"].items()}
        self.task_grams = {int(c): {k: v.to(dev) for k, v in g.items()} for c, g in state["task_grams"].items()}
        self.history = [{k: v.to(dev) for k, v in h.items()} for h in state["history"]]


@register
class LoRM(Method):
    name = "lorm"
    description = "LoRM: LoRA on every ViT linear, alternating A/B rounds merged in closed form, RegMean across tasks"
    Config = LoRMConfig
    uploads = ("lora.*.A", "lora.*.B", "head.weight", "head.bias", "gram.*", N_KEY)

    def __init__(self, config: LoRMConfig, env: MethodEnv):
        super().__init__(config.resolved(), env)
        c = self.config
        env.log(f"[lorm] defaults={c.defaults}: rank={c.rank} lr={c.lr:g} lr_a={c.lr_a:g} lr_b={c.lr_b:g} "
                f"weight_decay={c.weight_decay:g} alpha_backbone={c.alpha_backbone:g} alpha_head={c.alpha_head:g}; "
                f"epochs={env.epochs} batch_size={env.batch_size} (the run's; paper: 5 epochs, batch 16)")

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return LoRMClient(self.config, env)

    def server(self, env: ServerEnv) -> Server:
        return LoRMServer(self.config, env)


__all__ = ["LORM_DEFAULTS", "LoRM", "LoRMClient", "LoRMConfig", "LoRMServer", "lora_layers", "trained_factor"]

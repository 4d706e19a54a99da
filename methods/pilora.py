"""PILoRA: Prototype guided Incremental LoRA for federated class-incremental learning (Guo et al., ECCV 2024;
official code Ghy0501/PILoRA, ``PILoRA-cifar``).

Model: the frozen ViT with, per task ``t``, a new LoRA slot on the q and v projections of one block (block
0, rank 4; ``A`` Kaiming-uniform as ``nn.Linear``, ``B = 0``; W' = W + B A, no scaling, as the official
``_LoRA_qkv_timm``), and one prototype ``c_k`` per class (init ``0.1 * N(0, 1)``). The feature is the
final-norm CLS token; ``d_k(f) = sqrt((|f|^2 + |c_k|^2 - 2 f.c_k) / d)``
(:func:`~fcl_bench.nn.prototypes.prototype_distance`).

Client, per round (``env.epochs`` local epochs):
  * loss = ``CE(-d / T, y) + 0.001 * mean_i d_{y_i}(f_i) + 0.01 * (|A_q^t|_1 + |A_v^t|_1)
    + 0.5 * sum_{s<t} (|A_q^s (A_q^t)^T|_1 + |A_v^s (A_v^t)^T|_1)`` (the last term from task 1 on);
  * only the current slot (its four factors) and the prototypes of the client's current classes train;
    earlier slots and every other prototype are constants;
  * Adam, weight decay 1e-5, two learning rates: LoRA 1e-5 (``encoders_lr``), prototypes 2e-3
    (``centers_lr`` of ``train_q.sh``; ``options.py``'s default is 3e-3), both on a cosine over the task's
    rounds, ``lr_r = lr * (1 + cos(pi r / R)) / 2``; a fresh Adam every round (as the official
    ``LocalUpdate``);
  * upload: the current slot's ``A_q, B_q, A_v, B_v`` (``4 d r``), the current classes' prototypes, the
    per-class means of the round's training features (the features of the training passes, detached, as the
    official code collects them) with their sample counts, and n_k.

Server, per round: n_k-weighted average of the slot's factors; for each class of the round, the uploaded
prototypes are fused by :func:`~fcl_bench.nn.prototypes.reweight_prototypes` (``D_k = sum_j |p_k - mu_j|``
over the class means of the clients that hold samples of it, ``s = 1/D`` min-max normalised with
division-by-zero guards, ``w = softmax(s / 0.2)``); no class mean: plain average. It sends the averaged slot
and the whole prototype table ``(C, d)`` to every client (``4 d r + d C`` floats down). At each task start it
broadcasts the task's seeded initial slot (so every client starts from the same ``A``) and the prototypes.

Inference: nearest prototype, logits ``-d_k(f)``, with the features of the ViT carrying the SUM of all task
slots trained so far; the evaluation restricts them to the seen classes.

Choices where the paper/code is silent or that differ from the official code (Config defaults):
  * local training also uses the sum of all slots so far (earlier ones frozen), the same model as
    inference; the official client forward uses the current slot alone (``switch_lora``) while its global
    model uses ``(A^0 + A^t)``/``(B^0 + B^t)`` -- a product of sums of task 0 and the current task only.
    Neither is copied (trap);
  * the CE runs over all ``C`` prototypes (``ce_classes=all``, as the official ``compute_distance`` over
    all centers); ``seen`` restricts it to the client's seen classes;
  * clients hold different classes per task in this benchmark, so "current classes" are the client's own
    task classes; the server reads each upload's class ids from the scenario metadata (the same order as
    ``task.classes``), so no ids travel;
  * the squared distance is clamped at 1e-12 before the square root (the official code can NaN);
  * no early stopping on test accuracy and no test-set model selection (official traps);
  * block 0's input tokens (patch embedding + positions) come from the frozen-feature cache
    (``prefix_cache``); nothing after block 0 is frozen, so no more can be cached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

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
from fcl_bench.nn.averaging import N_KEY, weighted_average
from fcl_bench.nn.lora import SharedLoRA, SumLoRA, kaiming_lora, lora_forward, qv
from fcl_bench.nn.prototypes import prototype_distance, reweight_prototypes
from fcl_bench.nn.training import optimizer_step
from fcl_bench.registry import register
from fcl_bench.state import State

#: The current slot's factors on the wire: ``A`` ``(r, d)``, ``B`` ``(d, r)`` of q and of v.
SLOT_KEYS: tuple[str, ...] = ("lora.q.A", "lora.q.B", "lora.v.A", "lora.v.B")


@dataclass
class PILoRAConfig:
    rank: int = 4                   # r of every task slot
    block: int = 0                  # the adapted block (q and v of its qkv)
    lora_lr: float = 1e-5           # encoders_lr (train_q.sh)
    proto_lr: float = 2e-3          # centers_lr (train_q.sh)
    weight_decay: float = 1e-5      # Adam, both groups
    schedule: Literal["cosine", "constant"] = "cosine"  # over the task's rounds
    temperature: float = 1.0        # T of CE(-d / T)
    pl_weight: float = 0.001        # the d_y pull term
    l1_weight: float = 0.01         # L1 of the current A_q, A_v
    ortho_weight: float = 0.5       # sum over earlier slots of |A^s (A^t)^T|_1
    proto_init_std: float = 0.1     # c_k ~ proto_init_std * N(0, 1)
    reweight_temperature: float = 0.2  # server softmax temperature
    ce_classes: Literal["all", "seen"] = "all"  # classes in the CE: all C (official) or the client's seen
    prefix_cache: bool = True       # block-`block` input tokens from the frozen-feature cache

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first value that cannot work."""
        if self.rank < 1:
            raise ConfigError(f"pilora.rank must be >= 1, got {self.rank}")
        if self.block < 0:
            raise ConfigError(f"pilora.block must be >= 0 (a ViT block index), got {self.block}")
        for k in ("lora_lr", "proto_lr", "temperature", "reweight_temperature"):
            if not getattr(self, k) > 0:
                raise ConfigError(f"pilora.{k} must be > 0, got {getattr(self, k)}")
        for k in ("weight_decay", "pl_weight", "l1_weight", "ortho_weight", "proto_init_std"):
            if getattr(self, k) < 0:
                raise ConfigError(f"pilora.{k} must be >= 0, got {getattr(self, k)}")


# -- the mechanisms, as functions ---------------------------------------------------------------------------

def initial_slot(dim: int, rank: int, seed: int, task: int) -> dict[str, Tensor]:
    """Task ``task``'s initial slot: ``A_q``, ``A_v`` Kaiming-uniform ``(r, d)``, ``B_q = B_v = 0`` ``(d, r)``."""
    g = torch.Generator().manual_seed(seed * 1009 + 7919 * (task + 1))
    aq, bq = kaiming_lora(dim, dim, rank, g)
    av, bv = kaiming_lora(dim, dim, rank, g)
    return dict(zip(SLOT_KEYS, (aq, bq, av, bv)))


def initial_prototypes(num_classes: int, dim: int, std: float, seed: int) -> Tensor:
    """``(C, d)`` prototypes ``std * N(0, 1)``, seeded."""
    return std * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed * 1009 + 1))


def slots_delta(slots: Sequence[Mapping[str, Tensor]], dim: int):
    """The fused-qkv delta of the SUM of ``slots``' q and v LoRAs (k unchanged)."""
    q = SumLoRA([SharedLoRA(s["lora.q.A"], s["lora.q.B"]) for s in slots])
    v = SumLoRA([SharedLoRA(s["lora.v.A"], s["lora.v.B"]) for s in slots])
    return qv(q, v, dim)


def l1_loss(slot: Mapping[str, Tensor]) -> Tensor:
    """``|A_q|_1 + |A_v|_1`` of the current slot."""
    return slot["lora.q.A"].abs().sum() + slot["lora.v.A"].abs().sum()


def orthogonality_loss(old: Sequence[Mapping[str, Tensor]], slot: Mapping[str, Tensor]) -> Tensor:
    """``sum_{s<t} |A_q^s (A_q^t)^T|_1 + |A_v^s (A_v^t)^T|_1`` (entrywise L1 of ``r x r`` products)."""
    loss = slot["lora.q.A"].new_zeros(())
    for s in old:
        for k in ("lora.q.A", "lora.v.A"):
            loss = loss + (s[k] @ slot[k].T).abs().sum()
    return loss


def dce_loss(dist: Tensor, y: Tensor, temperature: float, pl_weight: float) -> Tensor:
    """``CE(-dist / T, y) + pl_weight * mean_i dist[i, y_i]`` (the official ``DCE``)."""
    return F.cross_entropy(-dist / temperature, y) + pl_weight * dist.gather(1, y[:, None]).mean()


def cosine_factor(rnd: int, rounds: int) -> float:
    """``(1 + cos(pi r / R)) / 2``: 1 at the task's first round."""
    return 0.5 * (1 + math.cos(math.pi * rnd / rounds))


# -- client ----------------------------------------------------------------------------------------------

class PILoRAClient(Client):
    def __init__(self, cfg: PILoRAConfig, env: ClientEnv):
        self.cfg, self.env, self.id = cfg, env, env.client_id
        self.vit = env.foundation.vit
        self.dim = env.foundation.embed_dim
        self.num_classes = env.scenario.num_classes
        self.slots: list[dict[str, Tensor]] = []      # finished tasks' slots (constants)
        self.current: dict[str, nn.Parameter] | None = None
        self.protos = torch.zeros(self.num_classes, self.dim, device=env.device)  # replaced at the first start
        self.task: Task | None = None

    # -- model ---------------------------------------------------------------------------------------
    def _tokens(self, batch: Batch) -> Tensor:
        if self.cfg.prefix_cache:
            return self.env.features.prefix(batch, self.cfg.block)
        return self.env.foundation.prefix(batch.x, self.cfg.block)

    def all_slots(self) -> list[Mapping[str, Tensor]]:
        return self.slots + ([self.current] if self.current is not None else [])

    def features(self, batch: Batch) -> Tensor:
        """Final-norm CLS features ``(B, d)`` (float32) with the sum of every slot so far on q and v."""
        slots = self.all_slots()
        deltas = {(self.cfg.block, "qkv"): slots_delta(slots, self.dim)} if slots else {}
        with self.env.autocast():
            feat = lora_forward(self.vit, None, deltas, start_block=self.cfg.block, tokens=self._tokens(batch))
        return feat.float()

    def trainable_parameters(self) -> int:
        n_cur = len(self.task.classes) if self.task is not None else 0
        return 4 * self.dim * self.cfg.rank + n_cur * self.dim

    # -- protocol ------------------------------------------------------------------------------------
    def receive(self, download: Payload, kind: DownloadKind) -> None:
        if not download:
            return
        if "protos" in download:
            self.protos = download["protos"].to(self.env.device, torch.float32).clone()
        if SLOT_KEYS[0] in download:
            if self.current is None:
                self.current = {k: nn.Parameter(download[k].to(self.env.device, torch.float32).clone())
                                for k in SLOT_KEYS}
            else:
                with torch.no_grad():
                    for k in SLOT_KEYS:
                        self.current[k].copy_(download[k])

    def start_task(self, task: Task) -> None:
        if self.current is None:
            raise RuntimeError("pilora: the task's initial slot did not arrive before start_task")
        self.task = task

    def train_round(self, info: RoundInfo) -> Payload:
        cfg, env, task = self.cfg, self.env, self.task
        f = cosine_factor(info.round, info.rounds_per_task) if cfg.schedule == "cosine" else 1.0
        cur = torch.as_tensor(task.classes, device=env.device)
        cur_protos = nn.Parameter(self.protos[cur].clone())
        opt = torch.optim.Adam([{"params": list(self.current.values()), "lr": cfg.lora_lr * f},
                                {"params": [cur_protos], "lr": cfg.proto_lr * f}], weight_decay=cfg.weight_decay)
        ce_idx, label_map = self._ce_classes(task)
        pos = torch.full((self.num_classes,), -1, dtype=torch.long, device=env.device)
        pos[cur] = torch.arange(len(cur), device=env.device)
        sums = torch.zeros(len(cur), self.dim, dtype=torch.float64, device=env.device)
        counts = torch.zeros(len(cur), dtype=torch.int64, device=env.device)
        for _ in range(env.epochs):
            for batch in task.train.batches(env.batch_size, shuffle=True, generator=env.generator):
                feat = self.features(batch)
                table = self.protos.index_copy(0, cur, cur_protos)
                dist = prototype_distance(feat, table[ce_idx])
                loss = dce_loss(dist, label_map[batch.y], cfg.temperature, cfg.pl_weight)
                loss = loss + cfg.l1_weight * l1_loss(self.current)
                if self.slots:
                    loss = loss + cfg.ortho_weight * orthogonality_loss(self.slots, self.current)
                optimizer_step(loss, opt, f"client {self.id} loss")
                p = pos[batch.y]
                sums.index_add_(0, p, feat.detach().double())
                counts.index_add_(0, p, torch.ones_like(p))
        with torch.no_grad():
            self.protos[cur] = cur_protos.detach()
        means = (sums / counts.clamp_min(1)[:, None]).float()
        return {**{k: v.detach() for k, v in self.current.items()}, "protos": cur_protos.detach(),
                "means": means, "counts": counts, N_KEY: torch.tensor([len(task.train)], dtype=torch.int64)}

    def _ce_classes(self, task: Task) -> tuple[Tensor, Tensor]:
        """(class ids whose distances enter the CE, map from global label to CE column)."""
        dev = self.env.device
        ids = torch.arange(self.num_classes, device=dev) if self.cfg.ce_classes == "all" else \
            torch.as_tensor(task.seen_classes, device=dev)
        label_map = torch.full((self.num_classes,), -1, dtype=torch.long, device=dev)
        label_map[ids] = torch.arange(len(ids), device=dev)
        return ids, label_map

    def end_task(self) -> None:
        if self.current is not None:
            self.slots.append({k: v.detach().clone() for k, v in self.current.items()})
        self.current = None

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        return -prototype_distance(self.features(batch), self.protos)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> State:
        return {"slots": [dict(s) for s in self.slots],
                "current": None if self.current is None else {k: v.detach() for k, v in self.current.items()},
                "protos": self.protos, "task": -1 if self.task is None else self.task.index}

    def load_state_dict(self, state: State) -> None:
        dev = self.env.device
        self.slots = [{k: v.to(dev) for k, v in s.items()} for s in state["slots"]]
        self.current = None
        if state["current"] is not None:
            self.receive(dict(state["current"]), "start")
        self.protos = state["protos"].to(dev).clone()
        self.task = self.env.task(state["task"]) if state["task"] >= 0 else None


# -- server ----------------------------------------------------------------------------------------------

class PILoRAServer(Server):
    """n_k-weighted slot averaging and per-class prototype re-weighting; slot + all prototypes to everyone."""

    def __init__(self, cfg: PILoRAConfig, env: ServerEnv):
        self.cfg, self.env = cfg, env
        self.dim = env.foundation.embed_dim
        self.protos = initial_prototypes(env.scenario.num_classes, self.dim, cfg.proto_init_std,
                                         env.seed).to(env.device)
        self.slot: dict[str, Tensor] = {}

    def _to_all(self) -> dict[int, Payload]:
        payload = {**self.slot, "protos": self.protos}
        return {c: payload for c in range(self.env.scenario.num_clients)}

    def start_task(self, task_index: int) -> Mapping[int, Payload]:
        self.slot = {k: v.to(self.env.device)
                     for k, v in initial_slot(self.dim, self.cfg.rank, self.env.seed, task_index).items()}
        return self._to_all()

    def aggregate(self, uploads: Mapping[int, Payload], info: RoundInfo) -> Mapping[int, Payload]:
        ids = sorted(c for c in uploads if uploads[c])
        if not ids:
            return {}
        weights = [float(uploads[c][N_KEY].item()) for c in ids]
        if sum(weights) > 0:
            self.slot = weighted_average([{k: uploads[c][k] for k in SLOT_KEYS} for c in ids], weights)
        self.protos = fuse_prototypes(self.protos, {c: uploads[c] for c in ids},
                                      {c: self.env.scenario.client_tasks[c][info.task] for c in ids},
                                      self.cfg.reweight_temperature)
        return self._to_all()

    def state_dict(self) -> State:
        return {"protos": self.protos, "slot": dict(self.slot)}

    def load_state_dict(self, state: State) -> None:
        self.protos = state["protos"].to(self.env.device)
        self.slot = {k: v.to(self.env.device) for k, v in state["slot"].items()}


def fuse_prototypes(table: Tensor, uploads: Mapping[int, Payload], classes: Mapping[int, Sequence[int]],
                    temperature: float) -> Tensor:
    """A new prototype table: each class any upload carries is the re-weighted fusion of its uploaded
    prototypes, weighed against the class means of the uploads with samples of it; other rows unchanged.

    ``uploads[c]`` holds ``protos``, ``means`` ``(n_c, d)`` and ``counts`` ``(n_c,)`` for ``classes[c]``.
    """
    out = table.clone()
    per_class: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
    for c, up in uploads.items():
        for i, k in enumerate(classes[c]):
            protos, means = per_class.setdefault(int(k), ([], []))
            protos.append(up["protos"][i])
            if int(up["counts"][i]) > 0:
                means.append(up["means"][i])
    for k, (protos, means) in per_class.items():
        out[k] = reweight_prototypes(torch.stack(protos), torch.stack(means) if means else None,
                                     temperature).to(out.dtype)
    return out


@register
class PILoRA(Method):
    name = "pilora"
    description = ("PILoRA: a new q/v LoRA per task on ViT block 0 (sum of all at inference), class prototypes "
                   "with distance-based CE, orthogonality between task LoRAs, prototype re-weighting")
    Config = PILoRAConfig
    uploads = (*SLOT_KEYS, "protos", "means", "counts", N_KEY)

    def __init__(self, config: PILoRAConfig, env: MethodEnv):
        super().__init__(config, env)
        config.validate()
        env.foundation.check_block(config.block)

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return PILoRAClient(self.config, env)

    def server(self, env: ServerEnv) -> Server:
        return PILoRAServer(self.config, env)

"""FedAvg+ViT ("FedViT"): the frozen foundation ViT with a linear head over all classes; only the head trains,
travels and is averaged (n_k-weighted).

The head reads the frozen model's final-norm CLS feature ``(B, d)``. Those features never change, so they
come from the run's feature cache (:class:`~fcl_bench.nn.cache.FeatureCache`): each sample goes through the
ViT once per run, whatever the rounds, clients and tasks. ``cache=False`` recomputes them every step (for
the benchmark and as a check). Training: cross-entropy with logits restricted to the classes the client has
seen so far (like :mod:`fcl_bench.methods.fedavg`), Adam lr 1e-3 (the paper's protocol), the optimiser
re-created each task; the server broadcasts the initial head at the first task start, so every client
starts from it. Communicated per round: the head (``d * C + C`` floats), down and up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fcl_bench.api import Client, ClientEnv, DownloadKind, Method, Payload, RoundInfo, Server, ServerEnv, Task
from fcl_bench.data import Batch
from fcl_bench.nn.averaging import (
    N_KEY,
    AveragingServer,
    load_trainable,
    seeded,
    trainable_state,
    upload_with_count,
)
from fcl_bench.nn.heads import masked_logits
from fcl_bench.nn.training import ModelClient, optimizer_step
from fcl_bench.registry import register


@dataclass
class FedViTConfig:
    lr: float = 1e-3             # Adam, the paper's protocol
    weight_decay: float = 0.0
    cache: bool = True           # frozen CLS features from the feature cache (off: recomputed every step)


class FedViTClient(ModelClient):
    """A linear head ``(C, d)`` on the frozen ViT's CLS feature; the ViT itself is only read."""

    def __init__(self, cfg: FedViTConfig, env: ClientEnv):
        self.cfg, self.env, self.id = cfg, env, env.client_id
        # replaced by the server's initial head before the first task
        self.model = nn.Linear(env.foundation.embed_dim, env.scenario.num_classes).to(env.device)
        self.task: Task | None = None
        self.opt: torch.optim.Optimizer | None = None

    def features(self, batch: Batch) -> torch.Tensor:
        """Frozen final-norm CLS features ``(B, d)``."""
        if self.cfg.cache:
            return self.env.features.cls(batch)
        return self.env.foundation.cls(batch.x)

    def _begin(self, task: Task) -> None:
        self.task = task
        self.allowed = torch.as_tensor(task.seen_classes, device=self.env.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr,
                                    weight_decay=self.cfg.weight_decay)

    def train_round(self, info: RoundInfo) -> Payload:
        for _ in range(self.env.epochs):
            for batch in self.task.train.batches(self.env.batch_size, shuffle=True, generator=self.env.generator):
                feats = self.features(batch).float()
                loss = F.cross_entropy(masked_logits(self.model(feats), self.allowed), batch.y)
                optimizer_step(loss, self.opt, f"client {self.id} loss")
        return upload_with_count(trainable_state(self.model), len(self.task.train))

    def receive(self, download: Payload, kind: DownloadKind) -> None:
        load_trainable(self.model, download)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.model(self.features(batch).float())


@register
class FedViT(Method):
    name = "fedvit"
    description = "FedAvg+ViT: frozen ViT, cached CLS features, a linear head averaged by n_k"
    Config = FedViTConfig
    uploads = ("weight", "bias", N_KEY)

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return FedViTClient(self.config, env)

    def server(self, env: ServerEnv) -> Server:
        def initial() -> dict[str, torch.Tensor]:
            head = seeded(env.seed, lambda: nn.Linear(env.foundation.embed_dim, env.scenario.num_classes))
            return trainable_state(head.to(env.device))

        return AveragingServer(env, initial)

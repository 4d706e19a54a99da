"""FedAvg+ViT ("FedViT"): the frozen foundation ViT with a linear head over all classes; only the head trains,
travels and is averaged (n_k-weighted).

The head reads the frozen model's final-norm CLS feature ``(B, d)``. Those features never change, so they
come from the run's feature cache (:class:`~fcl_bench.nn.cache.FeatureCache`): each sample goes through the
ViT once per run, whatever the rounds, clients and tasks. ``cache=False`` recomputes them every step (for
the benchmark and as a check). Training: cross-entropy with logits restricted to the classes the client has
seen so far (like :mod:`fcl_bench.methods.fedavg`), Adam lr 1e-3 (the paper's protocol), the optimiser
re-created each task; every client starts from the same seeded head. Communicated per round: the head
(``d * C + C`` floats), down and up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fcl_bench.api import Client, Env, Method, Payload, Server, Task
from fcl_bench.data import Batch
from fcl_bench.federation import check_finite
from fcl_bench.methods.fedavg import AveragingServer, masked_logits, upload_with_count
from fcl_bench.nn.averaging import load_trainable, trainable_state
from fcl_bench.registry import register


@dataclass
class FedViTConfig:
    lr: float = 1e-3             # Adam, the paper's protocol
    weight_decay: float = 0.0
    cache: bool = True           # frozen CLS features from the feature cache (off: recomputed every step)


class FedViTClient(Client):
    """A linear head ``(C, d)`` on the frozen ViT's CLS feature; the ViT itself is only read."""

    def __init__(self, cfg: FedViTConfig, env: Env, client_id: int):
        self.cfg, self.env, self.id = cfg, env, client_id
        # every client starts from the same head, as if the server had broadcast its initial model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(env.seed)
            self.model = nn.Linear(env.foundation.embed_dim, env.scenario.num_classes).to(env.device)
        self.task: Task | None = None

    def features(self, batch: Batch) -> torch.Tensor:
        """Frozen final-norm CLS features ``(B, d)``."""
        if self.cfg.cache:
            return self.env.features.cls(batch)
        return self.env.foundation.cls(batch.x)

    def start_task(self, task: Task) -> None:
        self.task = task
        self.allowed = torch.as_tensor(task.seen_classes, device=self.env.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr,
                                    weight_decay=self.cfg.weight_decay)

    def train_round(self) -> Payload:
        g = self.env.generator(self.id)
        for _ in range(self.env.epochs):
            for batch in self.task.train.batches(self.env.batch_size, shuffle=True, generator=g):
                feats = self.features(batch).float()
                loss = F.cross_entropy(masked_logits(self.model(feats), self.allowed), batch.y)
                check_finite(loss.detach(), f"client {self.id} loss")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        return upload_with_count(trainable_state(self.model), len(self.task.train))

    def receive(self, download: Payload) -> None:
        load_trainable(self.model, download)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        return self.model(self.features(batch).float())


@register
class FedViT(Method):
    name = "fedvit"
    description = "FedAvg+ViT: frozen ViT, cached CLS features, a linear head averaged by n_k"
    Config = FedViTConfig

    def client(self, client_id: int) -> Client:
        return FedViTClient(self.config, self.env, client_id)

    def server(self) -> Server:
        return AveragingServer()

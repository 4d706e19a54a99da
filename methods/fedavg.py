"""FedAvg (McMahan et al., 2017) in the FCL protocol: one global model, the client small-model arch with a
linear head over all classes, n_k-weighted averaging of the trainable parameters.

Choices: the client trains with cross-entropy on its current task's data with logits restricted to the
classes it has seen so far (unseen classes masked), Adam (lr 1e-3, the paper's protocol), ``env.epochs``
local epochs per round. Every client starts from the same initial weights (seeded by the run's seed), as if
the server had broadcast w_0. BatchNorm running statistics stay local (only trainable parameters are averaged).
All clients must use the same small-model arch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fcl_bench.api import Client, Env, Method, Payload, Server, Task
from fcl_bench.data import Batch
from fcl_bench.nn.averaging import load_trainable, trainable_state, weighted_average
from fcl_bench.nn.training import train_epochs
from fcl_bench.registry import register

N_KEY = "__num_samples__"


class Classifier(nn.Module):
    """Small model (CNN + projection) followed by a linear head over all classes."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def masked_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with every class outside ``allowed`` (global ids) set to -inf."""
    mask = torch.full((logits.shape[1],), float("-inf"), device=logits.device, dtype=logits.dtype)
    mask[allowed] = 0
    return logits + mask


def upload_with_count(state: Mapping[str, torch.Tensor], n: int) -> Payload:
    """A model payload plus the sample count n_k used as the averaging weight."""
    return {**state, N_KEY: torch.tensor([n], dtype=torch.int64)}


class AveragingServer(Server):
    """n_k-weighted average of every uploaded tensor (except the count); the same model to every client."""

    def aggregate(self, uploads: Mapping[int, Payload]) -> Mapping[int, Payload]:
        ids = sorted(uploads)
        states = [{k: v for k, v in uploads[c].items() if k != N_KEY} for c in ids]
        weights = [float(uploads[c][N_KEY].item()) for c in ids]
        avg = weighted_average(states, weights)
        return {c: avg for c in ids}


@dataclass
class FedAvgConfig:
    lr: float = 1e-3  # Adam, the paper's protocol for every method
    weight_decay: float = 0.0


class FedAvgClient(Client):
    """Local training of the global model; subclasses override :meth:`loss` or :meth:`before_step`."""

    def __init__(self, cfg: FedAvgConfig, env: Env, client_id: int):
        self.cfg, self.env, self.id = cfg, env, client_id
        # every client starts from the same weights, the server's initial global model w_0 (McMahan et al.):
        # averaging independently initialised networks after the first round would mix unrelated units
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(env.seed)
            self.model = Classifier(env.make_small_model(client_id), env.small_width,
                                    env.scenario.num_classes).to(env.device)
        self.task: Task | None = None

    def start_task(self, task: Task) -> None:
        self.task = task
        self.allowed = torch.as_tensor(task.seen_classes, device=self.env.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(masked_logits(self.model(batch.x), self.allowed), batch.y)

    def before_step(self) -> None:
        """Hook between backward and the optimiser step (FedProx adds its proximal gradient here)."""

    def train_round(self) -> Payload:
        self.model.train()
        train_epochs(self.env, self.id, self.task.train, self.loss, self.opt, self.before_step, model=self.model)
        return upload_with_count(trainable_state(self.model), len(self.task.train))

    def receive(self, download: Payload) -> None:
        load_trainable(self.model, download)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        return self.model(batch.x)


@register
class FedAvg(Method):
    name = "fedavg"
    description = "FedAvg: one global small model (CNN + head over all classes), n_k-weighted averaging"
    Config = FedAvgConfig
    uses_foundation = False
    client_class = FedAvgClient

    def __init__(self, config, env: Env):
        super().__init__(config, env)
        if len(set(env.small_archs)) > 1:
            raise ValueError(f"{self.name} averages one model, so every client needs the same small-model arch; "
                             f"got {env.small_archs}")

    def client(self, client_id: int) -> Client:
        return self.client_class(self.config, self.env, client_id)

    def server(self) -> Server:
        return AveragingServer()

"""FedAvg (McMahan et al., 2017) in the FCL protocol: one global model, the client small-model arch with a
linear head over all classes, n_k-weighted averaging of the trainable parameters.

The server builds the initial global model w_0 and broadcasts it at the first task start (a ``"start"``
download, counted on the wire); every client loads it, so all start from the same weights. After each
round the server sends the n_k-weighted average of the participants' uploads to every client.

Choices: the client trains with cross-entropy on its current task's data with logits restricted to the
classes it has seen so far (unseen classes masked), Adam (lr 1e-3, the paper's protocol), re-created each
task, ``env.epochs`` local epochs per round. BatchNorm running statistics stay local by default (the
evaluated model is then FedBN-like, and the reports say so); ``average_bn_stats=True`` averages them with
the parameters (n_k-weighted; ``num_batches_tracked`` rounded). All clients must use the same
small-model arch.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from fcl_bench.nn.training import ModelClient, train_epochs
from fcl_bench.registry import register


class Classifier(nn.Module):
    """Small model (CNN + projection) followed by a linear head over all classes."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class FedAvgConfig:
    lr: float = 1e-3               # Adam, the paper's protocol for every method
    weight_decay: float = 0.0
    average_bn_stats: bool = False  # also average BatchNorm running statistics (off: FedBN-like, stats local)


class FedAvgClient(ModelClient):
    """Local training of the global model; subclasses override :meth:`loss` or :meth:`before_step`."""

    def __init__(self, cfg: FedAvgConfig, env: ClientEnv):
        self.cfg, self.env, self.id = cfg, env, env.client_id
        # the weights are replaced by the server's w_0 before the first task
        self.model = Classifier(env.make_small_model(), env.small_width, env.scenario.num_classes).to(env.device)
        self.task: Task | None = None
        self.opt: torch.optim.Optimizer | None = None

    def _begin(self, task: Task) -> None:
        self.task = task
        self.allowed = torch.as_tensor(task.seen_classes, device=self.env.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(masked_logits(self.model(batch.x), self.allowed), batch.y)

    def before_step(self) -> None:
        """Hook between backward and the optimiser step (FedProx adds its proximal gradient here)."""

    def train_round(self, info: RoundInfo) -> Payload:
        self.model.train()
        train_epochs(self.env, self.task.train, self.loss, self.opt, self.before_step, model=self.model)
        state = trainable_state(self.model, with_bn_stats=self.cfg.average_bn_stats)
        return upload_with_count(state, len(self.task.train))

    def receive(self, download: Payload, kind: DownloadKind) -> None:
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
    uploads = ("backbone.*", "head.*", N_KEY)
    client_class = FedAvgClient

    def __init__(self, config, env: MethodEnv):
        super().__init__(config, env)
        if len(set(env.small_archs)) > 1:
            raise ValueError(f"{self.name} averages one model, so every client needs the same small-model arch; "
                             f"got {env.small_archs}")

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return self.client_class(self.config, env)

    @staticmethod
    def global_model(env: ServerEnv, with_bn_stats: bool):
        """``(build, initial)``: a builder of the global model (client 0's arch, a head over all classes, on
        the device) and the seeded initial state ``w_0`` the server broadcasts."""
        def build() -> Classifier:
            return Classifier(env.build_small_model(0), env.small_width, env.scenario.num_classes).to(env.device)

        def initial() -> dict[str, torch.Tensor]:
            return trainable_state(seeded(env.seed, build), with_bn_stats=with_bn_stats)

        return build, initial

    def server(self, env: ServerEnv) -> Server:
        return AveragingServer(env, self.global_model(env, self.config.average_bn_stats)[1])

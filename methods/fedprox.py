"""FedProx (Li et al., 2020): FedAvg plus the proximal term (mu/2)*||w - w_global||^2 on the trainable
parameters, anchored at this round's global model (what the client last received: the server's w_0
before the first round). Added as the gradient mu*(w - w_global) before each optimiser step, as the
official code does. ``mu`` is explicit (official README sweeps 0.001..1; default 0.01)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fcl_bench.api import DownloadKind, Payload, Task
from fcl_bench.methods.fedavg import FedAvg, FedAvgClient, FedAvgConfig
from fcl_bench.registry import register
from fcl_bench.state import State


@dataclass
class FedProxConfig(FedAvgConfig):
    mu: float = 0.01


class FedProxClient(FedAvgClient):
    anchor: list[torch.Tensor] | None = None

    def start_task(self, task: Task) -> None:
        super().start_task(task)
        if self.anchor is None:
            self._set_anchor()

    def _set_anchor(self) -> None:
        self.anchor = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def before_step(self) -> None:
        if self.cfg.mu == 0:
            return
        for p, w0 in zip((p for p in self.model.parameters() if p.requires_grad), self.anchor):
            if p.grad is not None:
                p.grad.add_(p.detach() - w0, alpha=self.cfg.mu)

    def receive(self, download: Payload, kind: DownloadKind) -> None:
        super().receive(download, kind)
        self._set_anchor()

    def state_dict(self) -> State:
        return {**super().state_dict(), "anchor": self.anchor}

    def load_state_dict(self, state: State) -> None:
        super().load_state_dict(state)
        anchor = state.get("anchor")
        self.anchor = None if anchor is None else [a.to(self.env.device) for a in anchor]


@register
class FedProx(FedAvg):
    name = "fedprox"
    description = "FedProx: FedAvg + proximal term mu/2*||w - w_global||^2 (mu default 0.01)"
    Config = FedProxConfig
    client_class = FedProxClient

"""A plugin method for the registry-wide contract tests: federated class prototypes on frozen features.

Each client uploads per-class sums and counts of the frozen CLS features of its current task; the server
adds them up and sends every client the global prototypes; ``predict`` scores a sample by its negative
distance to each prototype (classes without one score -inf).
"""

from dataclasses import dataclass

import torch

from fcl_bench.api import Client, Method, Server


@dataclass
class ProtoConfig:
    scale: float = 1.0


class ProtoClient(Client):
    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        C, d = env.scenario.num_classes, env.foundation.embed_dim
        self.protos = torch.zeros(C, d, device=env.device)
        self.known = torch.zeros(C, dtype=torch.bool, device=env.device)
        self.task = None

    def start_task(self, task):
        self.task = task

    def train_round(self, info):
        C, d = self.protos.shape
        sums = torch.zeros(C, d, device=self.env.device)
        counts = torch.zeros(C, device=self.env.device)
        for batch in self.task.train.batches(self.env.batch_size):
            f = self.env.features.cls(batch).float()
            sums.index_add_(0, batch.y, f)
            counts.index_add_(0, batch.y, torch.ones(len(batch), device=self.env.device))
        return {"sums": sums, "counts": counts}

    def receive(self, download, kind):
        self.protos = download["protos"].clone()
        self.known = download["known"].bool().clone()

    @torch.no_grad()
    def predict(self, batch):
        f = self.env.features.cls(batch).float()
        scores = -self.cfg.scale * torch.cdist(f, self.protos)
        return scores.masked_fill(~self.known, float("-inf"))

    def state_dict(self):
        return {"protos": self.protos, "known": self.known, "task": -1 if self.task is None else self.task.index}

    def load_state_dict(self, state):
        self.protos = state["protos"].to(self.env.device)
        self.known = state["known"].to(self.env.device)
        self.task = None if state["task"] < 0 else self.env.task(state["task"])


class ProtoServer(Server):
    def __init__(self, env):
        self.env = env
        C, d = env.scenario.num_classes, env.foundation.embed_dim
        self.sums = torch.zeros(C, d, device=env.device)
        self.counts = torch.zeros(C, device=env.device)

    def aggregate(self, uploads, info):
        if info.is_last:  # every round re-sends this task's statistics: keep the last round's
            for up in uploads.values():
                self.sums += up["sums"]
                self.counts += up["counts"]
        known = self.counts > 0
        protos = self.sums / self.counts.clamp(min=1)[:, None]
        return {c: {"protos": protos, "known": known.to(torch.uint8)} for c in range(self.env.scenario.num_clients)}

    def state_dict(self):
        return {"sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state):
        self.sums = state["sums"].to(self.env.device)
        self.counts = state["counts"].to(self.env.device)


class ProtoAvg(Method):
    name = "contract-protoavg"
    description = "class prototypes of frozen features, summed by the server (contract-test plugin)"
    Config = ProtoConfig
    uploads = ("sums", "counts")

    def client(self, client_id, env):
        return ProtoClient(self.config, env)

    def server(self, env):
        return ProtoServer(env)

"""Weighted averaging: the one FedAvg block every method reuses.

* :func:`trainable_state` / :func:`load_trainable`: what an averaged model sends (trainable parameters only,
  never frozen weights, BatchNorm running statistics only when asked for) and takes back;
* :data:`N_KEY` and :func:`upload_with_count`: the single name under which a client uploads its sample
  count n_k, the averaging weight;
* :func:`weighted_average`: ``sum_k n_k state_k / sum_k n_k`` per tensor;
* :class:`AveragingServer`: broadcasts the initial global model ``w_0`` at the first task start and the
  n_k-weighted average of the uploads after every round, to every client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fcl_bench.api import Payload, RoundInfo, Server, ServerEnv
from fcl_bench.state import State

N_KEY = "__num_samples__"
"""The payload name of a client's sample count n_k (int64 ``(1,)``), the averaging weight."""


def _is_bn_stat(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and name in (
        "running_mean", "running_var", "num_batches_tracked")


def bn_stats(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """BatchNorm running statistics of ``model`` (``running_mean``, ``running_var``, ``num_batches_tracked``)."""
    out = {}
    for mname, m in model.named_modules():
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and _is_bn_stat(m, bname):
                out[prefix + (f"{mname}.{bname}" if mname else bname)] = b.detach()
    return out


def trainable_state(model: nn.Module, prefix: str = "", with_bn_stats: bool = False) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` (``requires_grad``), detached; never frozen weights, and
    BatchNorm running statistics only with ``with_bn_stats``."""
    out = {prefix + n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if with_bn_stats:
        out.update(bn_stats(model, prefix))
    return out


@torch.no_grad()
def load_trainable(model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy ``state`` (as produced by :func:`trainable_state`) into ``model`` in place: every trainable
    parameter must be there; BatchNorm statistics are copied when present."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and prefix + n not in state]
    if missing:
        raise KeyError(f"download lacks trainable parameters: {missing[:5]}")
    for n, p in params.items():
        if prefix + n in state:
            p.copy_(state[prefix + n].to(p.device, p.dtype))
    for n, b in bn_stats(model).items():
        if prefix + n in state:
            b.copy_(state[prefix + n].to(b.device, b.dtype))


def upload_with_count(state: Mapping[str, torch.Tensor], n: int) -> Payload:
    """A model payload plus the sample count n_k used as the averaging weight."""
    return {**state, N_KEY: torch.tensor([n], dtype=torch.int64)}


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under a fixed CPU seed, leaving the global RNG untouched (a server's initial model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_k w_k * state_k / sum_k w_k`` per tensor (float64 accumulation), e.g. FedAvg with ``w_k = n_k``.

    All states must hold the same names and shapes.
    """
    if not states:
        raise ValueError("nothing to average")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"averaging weights must sum to a positive number, got {list(weights)}")
    keys = list(states[0].keys())
    for i, s in enumerate(states[1:], 1):
        if set(s.keys()) != set(keys):
            raise ValueError(f"states to average hold different tensors: state {i} differs from state 0 in "
                             f"{sorted(set(s.keys()) ^ set(keys))[:5]}")
        # broadcasting would silently average tensors of different shapes
        bad = [k for k in keys if s[k].shape != states[0][k].shape]
        if bad:
            raise ValueError(f"state {i} has other shapes than state 0 for {bad[:5]}: "
                             f"{tuple(s[bad[0]].shape)} vs {tuple(states[0][bad[0]].shape)}")
    out = {}
    for k in keys:
        acc = sum(s[k].double() * (w / total) for s, w in zip(states, weights))
        if not states[0][k].is_floating_point():
            acc = acc.round()  # integer tensors (counters): nearest, not truncated toward zero
        out[k] = acc.to(states[0][k].dtype)
    return out


class AveragingServer(Server):
    """FedAvg's server: the initial global model to every client at the first task start (``"start"``
    download; ``initial`` builds its state, ``None`` sends nothing), then after every round the n_k-weighted
    average of the participants' uploads (every tensor but :data:`N_KEY`) to every client.
    """

    def __init__(self, env: ServerEnv, initial: Callable[[], Mapping[str, torch.Tensor]] | None = None):
        self.env = env
        self.initial = initial
        self.global_state: dict[str, torch.Tensor] = {}

    def start_task(self, task_index: int) -> Mapping[int, Payload]:
        if task_index > 0 or self.initial is None:
            return {}
        self.global_state = {k: v.detach() for k, v in self.initial().items()}
        return {c: self.global_state for c in range(self.env.scenario.num_clients)}

    def aggregate(self, uploads: Mapping[int, Payload], info: RoundInfo) -> Mapping[int, Payload]:
        ids = sorted(c for c in uploads if uploads[c])
        if not ids:
            return {}
        states = [{k: v for k, v in uploads[c].items() if k != N_KEY} for c in ids]
        weights = [float(uploads[c][N_KEY].item()) for c in ids]
        self.global_state = weighted_average(states, weights)
        return {c: self.global_state for c in range(self.env.scenario.num_clients)}

    def state_dict(self) -> State:
        return {"global": dict(self.global_state)}

    def load_state_dict(self, state: State) -> None:
        self.global_state = {k: v.to(self.env.device) for k, v in state["global"].items()}

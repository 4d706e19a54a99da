"""Local training loops shared by methods: one optimiser step, and epochs over a client's data."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fcl_bench.api import Env
from fcl_bench.data import Batch, ClientData
from fcl_bench.federation import check_finite


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, what: str,
                   before_step: Callable[[], None] | None = None) -> None:
    """Check ``loss`` is finite (else the run fails with ``what`` named), backward, optional hook between
    backward and step (gradient clipping, FedProx's proximal gradient), step."""
    check_finite(loss.detach(), what)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    opt.step()


def train_epochs(env: Env, client_id: int, data: ClientData, loss_fn: Callable[[Batch], torch.Tensor],
                 opt: torch.optim.Optimizer, before_step: Callable[[], None] | None = None) -> None:
    """``env.epochs`` shuffled passes over ``data`` (the client's seeded generator), one step per batch,
    the loss computed under ``env.autocast()``."""
    g = env.generator(client_id)
    for _ in range(env.epochs):
        for batch in data.batches(env.batch_size, shuffle=True, generator=g):
            with env.autocast():
                loss = loss_fn(batch)
            optimizer_step(loss, opt, f"client {client_id} loss", before_step)

"""Local training loops shared by methods: one optimiser step, epochs over a client's data, and BatchNorm
in eval mode for a training set of one sample.

A batch of one sample cannot be normalised by BatchNorm in train mode (torch raises "Expected more than 1
value per channel"). :meth:`fcl_bench.data.ClientData.batches` folds a trailing single sample into the
previous batch, so only a set of one sample in all gives such a batch; for it, the training helpers run the
model's BatchNorm layers in eval mode for those steps (running statistics used and left unchanged, the
other parameters trained as usual) and say so once per client in the run log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

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


@contextmanager
def batchnorm_eval(*modules: nn.Module | None) -> Iterator[None]:
    """The BatchNorm layers of ``modules`` that are in train mode run in eval mode inside the block; their
    mode is restored on exit."""
    layers = [m for mod in modules if mod is not None for m in mod.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


def single_sample_guard(env: Env, client_id: int, data: ClientData,
                        *modules: nn.Module | None) -> AbstractContextManager:
    """:func:`batchnorm_eval` of ``modules`` when ``data`` holds exactly one sample (logged once per client
    and run through ``env.log``); a no-op otherwise."""
    if len(data) != 1:
        return nullcontext()
    logged: set = env.__dict__.setdefault("_single_sample_logged", set())
    if client_id not in logged:
        logged.add(client_id)
        env.log(f"client {client_id}: a training set of one sample; BatchNorm layers run in eval mode "
                "(running statistics, not updated) for its steps")
    return batchnorm_eval(*modules)


def train_epochs(env: Env, client_id: int, data: ClientData, loss_fn: Callable[[Batch], torch.Tensor],
                 opt: torch.optim.Optimizer, before_step: Callable[[], None] | None = None,
                 model: nn.Module | None = None) -> None:
    """``env.epochs`` shuffled passes over ``data`` (the client's seeded generator), one step per batch,
    the loss computed under ``env.autocast()``. ``model``: the module trained, whose BatchNorm layers run in
    eval mode when ``data`` holds a single sample (:func:`single_sample_guard`)."""
    g = env.generator(client_id)
    with single_sample_guard(env, client_id, data, model):
        for _ in range(env.epochs):
            for batch in data.batches(env.batch_size, shuffle=True, generator=g):
                with env.autocast():
                    loss = loss_fn(batch)
                optimizer_step(loss, opt, f"client {client_id} loss", before_step)

"""Local training shared by methods: one optimiser step, epochs over a client's data, BatchNorm in eval mode
for a training set of one sample, and :class:`ModelClient`, the state handling of a client that trains one
module.

A batch of one sample cannot be normalised by BatchNorm in train mode (torch raises "Expected more than 1
value per channel"). :meth:`fcl_bench.data.ClientData.batches` folds a trailing single sample into the
previous batch, so only a set of one sample in all gives such a batch; for it, the training helpers run the
model's BatchNorm layers in eval mode for those steps (running statistics used and left unchanged, the
other parameters trained as usual) and say so once per client in the run log.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from fcl_bench.api import Client, ClientEnv, Task
from fcl_bench.checks import NonFiniteError, check_finite
from fcl_bench.data import Batch, ClientData
from fcl_bench.nn.distill import batchnorm_eval
from fcl_bench.state import State


def check_finite_gradients(opt: torch.optim.Optimizer, what: str) -> None:
    """Raise :class:`~fcl_bench.checks.NonFiniteError` naming ``what`` if a gradient of a parameter of ``opt``
    holds NaN or inf: a finite loss can still back-propagate an overflow, and one step with such a gradient
    turns the weights NaN, which would show only later, as NaN predictions."""
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    # fast path: a NaN or inf anywhere makes the sum of every gradient element non-finite, so a finite sum
    # proves them all finite (one concatenation and one reduction instead of an isfinite per tensor; this
    # check took ~6 % of a FedAvg run on quick); a non-finite sum (also a finite overflow) is decided
    # tensor by tensor
    if torch.isfinite(torch.cat([g.reshape(-1) for g in grads]).sum(dtype=torch.float32)):
        return
    finite = torch.stack([torch.isfinite(g).all() for g in grads])
    if not finite.all():
        bad = [tuple(g.shape) for g, ok in zip(grads, finite.tolist()) if not ok]
        raise NonFiniteError(f"{what}: the loss is finite but the gradients of {len(bad)} of {len(grads)} "
                             f"parameter tensors are not (NaN or inf; shapes {', '.join(map(str, bad[:3]))}"
                             f"{', ...' if len(bad) > 3 else ''}); the step would make the weights NaN. "
                             "Lower the method's lr or clip its gradients")


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, what: str,
                   before_step: Callable[[], None] | None = None) -> None:
    """Check ``loss`` is finite (else the run fails with ``what`` named), backward, optional hook between
    backward and step (gradient clipping, FedProx's proximal gradient), check the gradients are finite
    (:func:`check_finite_gradients`), step."""
    check_finite(loss.detach(), what)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    check_finite_gradients(opt, what)
    opt.step()


def single_sample_guard(env: ClientEnv, data: ClientData, module: nn.Module | None) -> AbstractContextManager:
    """BatchNorm of ``module`` in eval mode while ``data`` holds exactly one sample (logged once per client
    through ``env.log``); a no-op otherwise."""
    if len(data) != 1 or module is None:
        return nullcontext()
    if not env.notes.get("single_sample"):
        env.notes["single_sample"] = True
        env.log(f"client {env.client_id}: a training set of one sample; BatchNorm layers run in eval mode "
                "(running statistics, not updated) for its steps")
    return batchnorm_eval(module)


def train_epochs(env: ClientEnv, data: ClientData, loss_fn: Callable[[Batch], torch.Tensor],
                 opt: torch.optim.Optimizer, before_step: Callable[[], None] | None = None,
                 model: nn.Module | None = None) -> None:
    """``env.epochs`` shuffled passes over ``data`` (the client's seeded generator), one step per batch,
    the loss computed under ``env.autocast()``. ``model``: the module trained, whose BatchNorm layers run in
    eval mode when ``data`` holds a single sample (:func:`single_sample_guard`)."""
    with single_sample_guard(env, data, model):
        for _ in range(env.epochs):
            for batch in data.batches(env.batch_size, shuffle=True, generator=env.generator):
                with env.autocast():
                    loss = loss_fn(batch)
                optimizer_step(loss, opt, f"client {env.client_id} loss", before_step)


class ModelClient(Client):
    """A client whose state is one module ``self.model``, the current task and the optimiser ``self.opt``
    that :meth:`_begin` builds for it. ``start_task`` calls ``_begin``; ``state_dict`` /
    ``load_state_dict`` save and restore all three (the task is taken back from the client's env)."""

    model: torch.nn.Module
    env: ClientEnv
    task: Task | None = None
    opt: torch.optim.Optimizer | None = None

    def _begin(self, task: Task) -> None:
        """Set ``self.task`` and build ``self.opt`` (and whatever else the task needs)."""
        raise NotImplementedError

    def start_task(self, task: Task) -> None:
        self._begin(task)

    def state_dict(self) -> State:
        return {"model": self.model.state_dict(), "task": -1 if self.task is None else self.task.index,
                "opt": None if self.opt is None else self.opt.state_dict()}

    def load_state_dict(self, state: State) -> None:
        self.model.load_state_dict(state["model"])
        if state["task"] >= 0:
            self._begin(self.env.task(state["task"]))
            self.opt.load_state_dict(state["opt"])

"""Benchmarks (pytest-benchmark; ratios within one run): a Fed-LSCL Stage-1 training step with and without the
frozen-prefix cache, and against a frozen-ViT-plus-linear-head step (the overhead of collaboration).

    pytest tests/test_bench_fedlscl.py --benchmark-enable --benchmark-group-by=group

With ``--benchmark-disable`` (the default in this project) each runs once, as a test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import smoke_config, started, workspace

from fcl_bench.methods.fedlscl import FedLSCL, FedLSCLConfig

BATCH = 32


@pytest.fixture(scope="module")
def setup():
    cfg = dataclasses.replace(smoke_config(), train_per_class=BATCH, batch_size=BATCH)
    ws = workspace(cfg)
    client, _ = started(FedLSCL, FedLSCLConfig(), ws, cfg)
    env, data = client.env, client.task.train
    batch = data.batch(np.arange(min(BATCH, len(data))))
    _ = batch.x
    env.features.prefix(batch, FedLSCLConfig().block)  # the cache is filled once, as after a run's first pass
    env.features.cls(batch)
    return (ws, cfg), None, batch


def _fedlscl_step(setup_ws, _task, batch, cached: bool):
    ws, cfg = setup_ws
    client, _ = started(FedLSCL, FedLSCLConfig(prefix_cache=cached), ws, cfg)
    client._train_mode(True)

    def step():
        logits, _, _ = client.forward(batch)
        client._step(F.cross_entropy(logits, batch.y))
    return step


@pytest.mark.benchmark(group="fedlscl-step")
def test_bench_fedlscl_step_cached(benchmark, setup):
    env, task, batch = setup
    benchmark.pedantic(_fedlscl_step(env, task, batch, True), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="fedlscl-step")
def test_bench_fedlscl_step_uncached(benchmark, setup):
    env, task, batch = setup
    benchmark.pedantic(_fedlscl_step(env, task, batch, False), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="fedlscl-step")
def test_bench_frozen_vit_head_step(benchmark, setup):
    (ws, _), task, batch = setup
    fm = ws.foundation
    head = torch.nn.Linear(fm.embed_dim, ws.scenario.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)

    def step():  # what collaboration is compared with: the frozen ViT's features and a trained head
        loss = F.cross_entropy(head(fm.cls(batch.x)), batch.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)

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

from fcl_bench.api import Task
from fcl_bench.config import preset
from fcl_bench.data import ClientData
from fcl_bench.federation import Workspace, build_env
from fcl_bench.methods.fedlscl import FedLSCL, FedLSCLConfig

BATCH = 32


@pytest.fixture(scope="module")
def setup():
    cfg = dataclasses.replace(preset("smoke"), foundation_pretrained=False, train_per_class=BATCH,
                              batch_size=BATCH)
    ws = Workspace.create(cfg, progress=False)
    env = build_env(ws, FedLSCL, lambda s: None, progress=False)
    sc = ws.scenario
    data = ClientData(ws.dataset.train, sc.train_indices[0][0], "train", ws.foundation.preprocess, ws.device)
    task = Task(index=0, classes=list(sc.client_tasks[0][0]), seen_classes=sc.seen_classes(0, 0), train=data)
    batch = data.batch(np.arange(min(BATCH, len(data))))
    _ = batch.x
    env.features.prefix(batch, FedLSCLConfig().block)  # the cache is filled once, as after a run's first pass
    env.features.cls(batch)
    return env, task, batch


def _fedlscl_step(env, task, batch, cached: bool):
    client = FedLSCL(FedLSCLConfig(prefix_cache=cached), env).client(0)
    client.start_task(task)
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
    env, task, batch = setup
    head = torch.nn.Linear(env.foundation.embed_dim, env.scenario.num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)

    def step():  # what collaboration is compared with: the frozen ViT's features and a trained head
        loss = F.cross_entropy(head(env.foundation.cls(batch.x)), batch.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)

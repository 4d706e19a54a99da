"""Benchmark: a whole FedAvg+ViT run with the frozen-feature cache vs without it.

Workspace: the ``quick`` preset's protocol (3 clients, 3 tasks x 4 classes, 2 rounds per task, tiny ViT)
with 24 training and 12 test samples per class and random foundation weights (the cost does not depend on
them). ``cached``: every benchmark round starts from an empty cache, so the run pays for its one pass over
the data; ``cached_warm``: the cache was filled by an earlier run on the same workspace (another seed-mate
method or a repeat), the steady state of a suite; ``uncached``: the ViT runs at every step and every
evaluation. Run with
``pytest tests/test_bench_fedvit.py --benchmark-enable``; under the default ``--benchmark-disable`` each case
runs once as a plain test. Both cases share one group, whose relative column is the ratio.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import run, workspace

from fcl_bench.config import preset
from fcl_bench.federation import RunResult
from fcl_bench.methods.fedvit import FedViT, FedViTConfig
from fcl_bench.nn.cache import FeatureCache
from fcl_bench.workspace import Workspace

ROUNDS = {"rounds": 3, "iterations": 1, "warmup_rounds": 0}


@pytest.fixture(scope="module")
def ws() -> Workspace:
    cfg = dataclasses.replace(preset("quick"), foundation_pretrained=False, train_per_class=24,
                              test_per_class=12)
    w = workspace(cfg)
    w.run_cfg = cfg
    w.ensure_foundation(progress=False)
    return w


def _fresh_cache(ws: Workspace) -> FeatureCache:
    ws.features = FeatureCache(ws.foundation, {"train": ws.dataset.train, "test": ws.dataset.test},
                               ws.dataset.fingerprint, batch_size=ws.cfg.eval_batch_size)
    return ws.features


def _run(ws: Workspace, cache: bool) -> RunResult:
    return run(FedViT, FedViTConfig(cache=cache), ws, ws.run_cfg)


def _touched(ws: Workspace) -> int:
    """Distinct (split, sample) pairs a run reads: every client's training and test samples."""
    sc = ws.scenario
    train = np.unique(np.concatenate([ix for client in sc.train_indices for ix in client]))
    test = np.unique(np.concatenate([ix for client in sc.test_indices for ix in client]))
    return len(train) + len(test)


@pytest.mark.benchmark(group="fedvit-run")
def test_bench_fedvit_cached(benchmark, ws: Workspace) -> None:
    caches: list[FeatureCache] = []

    def setup():
        caches.append(_fresh_cache(ws))
        return (ws, True), {}

    res = benchmark.pedantic(_run, setup=setup, **ROUNDS)
    assert 0.0 <= res.metrics["final_acc"] <= 1.0
    # each sample went through the ViT once per run, whatever the rounds, epochs and evaluations
    assert caches[-1].misses == _touched(ws)


@pytest.mark.benchmark(group="fedvit-run")
def test_bench_fedvit_uncached(benchmark, ws: Workspace) -> None:
    caches: list[FeatureCache] = []

    def setup():
        caches.append(_fresh_cache(ws))
        return (ws, False), {}

    res = benchmark.pedantic(_run, setup=setup, **ROUNDS)
    assert 0.0 <= res.metrics["final_acc"] <= 1.0
    assert caches[-1].misses == 0 and caches[-1].hits == 0  # the cache was never consulted


@pytest.mark.benchmark(group="fedvit-run")
def test_bench_fedvit_cached_warm(benchmark, ws: Workspace) -> None:
    cache = _fresh_cache(ws)
    _run(ws, True)  # fill it once, outside the timing
    filled = cache.misses
    res = benchmark.pedantic(_run, args=(ws, True), **ROUNDS)
    assert 0.0 <= res.metrics["final_acc"] <= 1.0
    assert cache.misses == filled  # timed runs never called the ViT

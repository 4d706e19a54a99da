"""On the quick preset the CNN-only methods are no constant predictors: after the first task every client's
predictions in the harness's evaluation cover more than one class.

The CNN-only methods (``uses_foundation = False``) are the ones that collapsed. They train their CNN from the
server's w_0, and with one local epoch per round (2 rounds, 2-6 batches per client) the BatchNorm running
statistics were still mostly their initial values (momentum 0.1) when the client was evaluated in eval
mode: every layer mis-normalised, the features shrank to a constant and every sample got the same class
(exactly 25.00 % on 4 balanced classes). On quick they now start from the CNN backbone pretrained on the
synthetic pretraining classes (``small_pretrained``), whose running statistics fit the data from the start.

Why the first task and only these methods: the first task is the one with the fewest optimiser steps behind
the statistics, and it is the real schedule (server start, rounds over the wire, server end, client end,
the evaluation) on the quick preset as shipped; the whole run of the five methods takes minutes, too much
for CI. The methods with a foundation model classify frozen pretrained features, which did not collapse
(their quick accuracies are far from 1/k), and one first task of theirs costs more than this whole test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fcl_bench import registry
from fcl_bench.config import preset
from fcl_bench.federation import Federation
from fcl_bench.workspace import Workspace

QUICK = dataclasses.replace(preset("quick"), device="cpu")
CNN_ONLY = [m for m in registry.available_methods() if not registry.get_method(m).uses_foundation]


@pytest.fixture(scope="module")
def ws() -> Workspace:
    return Workspace.create(QUICK.workspace())


def record_predictions(fed: Federation) -> dict[int, set[int]]:
    """Wrap every client's ``predict`` so the classes it predicts in the evaluation (argmax over its seen
    classes: the client space) are collected per client."""
    seen: dict[int, set[int]] = {c: set() for c in fed.clients}

    def wrap(c: int, predict):
        def recorded(batch):
            logits = predict(batch)
            mask = torch.full((logits.shape[1],), float("-inf"))
            mask[fed.ws.scenario.seen_classes(c, fed.next_task)] = 0.0
            seen[c] |= set((logits.float() + mask).argmax(1).tolist())
            return logits
        return recorded

    for c, client in fed.clients.items():
        client.predict = wrap(c, client.predict)
    return seen


def test_quick_starts_the_cnn_only_methods_from_a_pretrained_cnn():
    assert {"fedavg", "fedprox", "glfc", "target", "mfcl"} <= set(CNN_ONLY)
    assert QUICK.small_pretrained and QUICK.local_epochs(uses_foundation=False) == QUICK.epochs


#: FedAvg and FedProx are the cheap ones (about a minute together on 2 threads); the three with server-side
#: synthesis or reconstruction cost a minute or more each, so they are marked slow (``-m "not slow"`` skips them).
CHEAP = ("fedavg", "fedprox")


@pytest.mark.parametrize("name", [m if m in CHEAP else pytest.param(m, marks=pytest.mark.slow) for m in CNN_ONLY])
def test_no_cnn_only_method_is_a_constant_predictor_on_quick(name, ws):
    cls = registry.get_method(name)
    fed = Federation(cls, cls.Config(), ws, QUICK, log=lambda line: None, progress=False, flops="off")
    predicted = record_predictions(fed)
    fed.start_task(0)
    for r in range(QUICK.rounds_per_task):
        fed.run_round(0, r)
    fed.end_task(0)  # the harness's evaluation calls the recorded predict
    for c in range(QUICK.clients):
        assert len(predicted[c]) > 1, f"{name}: client {c} predicts only class {predicted[c]} after the first task"

"""The plugin contract, checked for every registered method and a test plugin (like timm's tests over
``list_models()``): every future method gets these checks without writing them.

For each method, on the smoke protocol: logits over all classes; a prediction independent of the rest of
its batch; only the tensors the method declares leave a client; the shared frozen ViT bitwise unchanged;
same seed, same metrics; a ``state_dict`` round trip (through safetensors bytes) gives identical
predictions and an identical server; ``participation=0.5`` runs; a random-init timm ViT runs.
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import federation, smoke_config, workspace

from fcl_bench import registry
from fcl_bench import state as S
from fcl_bench.federation import TIMING_KEYS, participants

PLUGIN = Path(__file__).parent / "plugins" / "contract_plugin.py"
registry.load_plugin_file(PLUGIN)
BUILTIN = [m for m in registry.available_methods() if not m.startswith("contract-")]
METHODS = BUILTIN + ["contract-protoavg"]
RUN = smoke_config(small_models="test_resnet")


def deterministic(metrics: dict) -> dict:
    """``metrics`` without timings and memory, which differ between identical runs."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def ws():
    w = workspace(RUN)
    w.ensure_foundation(progress=False)
    return w


@pytest.fixture(scope="module", params=METHODS)
def trained(request, ws):
    """(method name, federation after a full smoke run, its result, the frozen ViT's state before)."""
    name = request.param
    cls = registry.get_method(name)
    before = {k: v.clone() for k, v in ws.foundation.vit.state_dict().items()}
    fed = federation(cls, cls.Config(), ws, RUN, flops="off")
    return name, fed, fed.run(), before


def _test_batch(fed, client: int = 0, n: int = 6):
    data = fed.ws.test_view(client, 0)
    return data.batch(np.arange(min(n, len(data))))


def _predict(fed, c: int, batch) -> torch.Tensor:
    view = fed.client_envs[c].features
    if view is None:
        return fed.clients[c].predict(batch)
    with view.open_test():
        return fed.clients[c].predict(batch)


def test_logits_cover_all_classes(trained):
    _, fed, res, _ = trained
    for c in fed.clients:
        batch = _test_batch(fed, c)
        logits = _predict(fed, c, batch)
        assert logits.shape == (len(batch), fed.ws.scenario.num_classes)
        assert not torch.isnan(logits).any()
    assert len(res.metrics["acc"]) == fed.T


def test_a_prediction_does_not_depend_on_the_rest_of_its_batch(trained):
    _, fed, _, _ = trained
    batch = _test_batch(fed)
    data = fed.ws.test_view(0, 0)
    pos = np.arange(len(batch))
    full = _predict(fed, 0, batch)
    alone = torch.cat([_predict(fed, 0, data.batch(pos[i:i + 1])) for i in pos])
    perm = np.random.default_rng(0).permutation(len(pos))
    shuffled = _predict(fed, 0, data.batch(pos[perm]))
    torch.testing.assert_close(alone, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shuffled, full[perm], atol=1e-4, rtol=1e-4)


def test_only_declared_tensors_leave_a_client(trained):
    name, fed, res, _ = trained
    declared = tuple(fed.method.uploads)
    if name in BUILTIN:
        assert "*" not in declared, f"{name} must declare what its clients upload"
    sent = {n for manifest in res.metrics["wire"]["client_uploads"].values() for n in manifest}
    assert all(any(fnmatchcase(n, p) for p in declared) for n in sent), (sent, declared)
    vit_names = set(fed.ws.foundation.vit.state_dict())
    assert not sent & vit_names


def test_the_frozen_vit_is_bitwise_unchanged(trained, ws):
    _, _, _, before = trained
    vit = ws.foundation.vit
    after = vit.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())


def test_same_seed_same_metrics(trained, ws):
    name, _, res, _ = trained
    cls = registry.get_method(name)
    again = federation(cls, cls.Config(), ws, RUN, flops="off").run()
    assert deterministic(again.metrics) == deterministic(res.metrics)


def test_a_state_dict_round_trip_gives_identical_predictions(trained, ws):
    name, fed, _, _ = trained
    cls = registry.get_method(name)
    fresh = federation(cls, cls.Config(), ws, RUN, flops="off")
    for c in fed.clients:
        data = S.encode(fed.clients[c].state_dict())  # the bytes a checkpoint or a Flower message holds
        for t in range(fed.T):
            fresh.open_task(c, t)
        fresh.clients[c].load_state_dict(S.decode(data))
        batch = _test_batch(fed, c)
        torch.testing.assert_close(_predict(fresh, c, batch), _predict(fed, c, batch), atol=0, rtol=0)
    server_state = S.decode(S.encode(fed.server.state_dict()))
    fresh.server.load_state_dict(server_state)
    a, b = S.encode(fresh.server.state_dict()), S.encode(fed.server.state_dict())
    assert S.decode(a).keys() == S.decode(b).keys() and a == b


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_with_half_the_clients_per_round(name, ws):
    cls = registry.get_method(name)
    run = dataclasses.replace(RUN, participation=0.5)
    fed = federation(cls, cls.Config(), ws, run, flops="off")
    res = fed.run()
    rounds = res.rounds[res.rounds.phase == "round"]
    assert len(rounds) == fed.T * fed.R * 1  # 2 clients x 0.5 = one trains per round
    for t in range(fed.T):
        for r in range(fed.R):
            got = rounds[(rounds.task == t) & (rounds["round"] == r)].client.tolist()
            assert tuple(got) == participants(fed.K, 0.5, run.seed, t, r)
    assert np.isfinite(res.metrics["final_acc"]) and res.metrics["participation"] == 0.5
    # every client is still evaluated after every task
    assert all(len(row) == fed.T for row in res.metrics["accuracy_matrix"])


#: the data-free methods' synthesis, cut to a few generator steps: at test_vit's 160 px their offline
#: constants dominate this test's time, and what is checked here is that every method runs at that size
SMALL_SYNTHESIS = {"target": dict(syn_rounds=1, syn_iterations=2, syn_batch=8),
                   "mfcl": dict(gen_iterations=2, gen_batch=8, syn_size=8)}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_on_a_random_init_timm_vit(name):
    cls = registry.get_method(name)
    run = dataclasses.replace(RUN, foundation="test_vit", foundation_pretrained=False)
    w = workspace(run)
    res = federation(cls, cls.Config(**SMALL_SYNTHESIS.get(name, {})), w, run, flops="off").run()
    assert w.preprocess.input_size == 160  # test_vit's own input pipeline, whether or not it was loaded
    assert (w.foundation is None) == (not cls.uses_foundation)
    assert 0.0 <= res.metrics["final_acc"] <= 1.0


def test_participants_are_seeded_distinct_and_vary_by_round():
    draws = {participants(10, 0.3, 7, t, r) for t in range(3) for r in range(3)}
    assert all(len(p) == 3 and len(set(p)) == 3 and list(p) == sorted(p) for p in draws)
    assert len(draws) > 1
    assert participants(10, 0.3, 7, 1, 2) == participants(10, 0.3, 7, 1, 2)
    assert participants(4, 1.0, 7, 0, 0) == (0, 1, 2, 3)
    assert participants(4, 0.01, 7, 0, 0).__len__() == 1  # at least one client trains


@pytest.mark.parametrize("name", ["fedlscl", "fedvit", "l2p"])
def test_client_flops_do_not_depend_on_which_run_filled_the_cache(name, ws):
    from fcl_bench.nn.cache import FeatureCache

    cls = registry.get_method(name)
    fresh = dataclasses.replace(ws, features=FeatureCache(ws.foundation, {"train": ws.dataset.train,
                                                                          "test": ws.dataset.test},
                                                          ws.dataset.fingerprint))
    first = federation(cls, cls.Config(), fresh, RUN, flops="sampled").run().metrics
    second = federation(cls, cls.Config(), fresh, RUN, flops="sampled").run().metrics
    assert first["cache_fill"]["samples"] > 0 and first["cache_fill"]["flops"] > 0  # counted apart
    assert second["cache_fill"]["samples"] == 0
    assert first["client_flops"] == second["client_flops"] > 0

"""FedAvg+ViT, FedAvg+L2P, FedAvg+DualPrompt: per-sample inference, what crosses the wire, the frozen model
left untouched, the feature cache, the named L2P defaults and DualPrompt's task prompts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import round_info, smoke_config, started, workspace
from helpers import run as run_method
from safetensors.torch import save as st_save

from fcl_bench.config import ConfigError, apply_overrides
from fcl_bench.methods.dualprompt import DualPrompt, DualPromptConfig
from fcl_bench.methods.fedvit import FedViT, FedViTConfig
from fcl_bench.methods.l2p import L2P, L2PConfig
from fcl_bench.nn.averaging import N_KEY
from fcl_bench.nn.cache import FeatureCache, FeatureView
from fcl_bench.nn.foundation import FoundationModel
from fcl_bench.nn.prompt_methods import fit_layers
from fcl_bench.nn.prompts import pull_loss
from fcl_bench.nn.tiny_vit import build_tiny_vit

METHODS = {"fedvit": (FedViT, FedViTConfig), "l2p": (L2P, L2PConfig),
           "dualprompt": (DualPrompt, DualPromptConfig)}
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ws():
    w = workspace(smoke_config())
    w.ensure_foundation(progress=False)
    return w


@pytest.fixture(scope="module")
def frozen_state(ws):
    """The frozen ViT's state dict before any method ran."""
    return {k: v.clone() for k, v in ws.foundation.vit.state_dict().items()}


def _client(ws, name, cfg=None, client=0):
    """Client ``client`` of method ``name`` after the first task started (the server's w_0 received)."""
    method_cls, cfg_cls = METHODS[name]
    c, _ = started(method_cls, cfg if cfg is not None else cfg_cls(), ws, client=client)
    return c


# -- per-sample inference ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedvit", "l2p", "dualprompt"])
def test_prediction_does_not_depend_on_the_batch(ws, name):
    c = _client(ws, name)
    data = c.task.train
    pos = np.arange(8)
    full = c.predict(data.batch(pos))
    alone = torch.cat([c.predict(data.batch(pos[i:i + 1])) for i in range(len(pos))])
    perm = np.random.default_rng(0).permutation(len(pos))
    shuffled = c.predict(data.batch(pos[perm]))
    torch.testing.assert_close(alone, full, **TOL)
    torch.testing.assert_close(shuffled, full[perm], **TOL)
    assert not torch.allclose(full[0], full[1], **TOL)  # distinct samples, distinct predictions


def _two_entry_keys(c, keys: torch.nn.Parameter, a: int, b: int) -> None:
    """Key 0 = sample a's query, key 1 = sample b's: alone, a picks entry 0; among many b's, entry 1 wins."""
    q = c.query(c.task.train.batch(np.array([a, b])))
    with torch.no_grad():
        keys.copy_(q)


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_batchwise_selection_lets_the_batch_change_a_prediction(ws, name):
    a, b = 0, 1
    out = {}
    for batchwise in (False, True):
        if name == "l2p":
            c = _client(ws, name, L2PConfig(pool_size=2, top_n=1, batchwise=batchwise))
            keys = c.model.pool.keys
        else:
            c = _client(ws, name, DualPromptConfig(e_pool_size=2, batchwise=batchwise))
            keys = c.model.e.keys
        _two_entry_keys(c, keys, a, b)
        data = c.task.train
        alone = c.predict(data.batch(np.array([a])))[0]
        crowded = c.predict(data.batch(np.array([a, b, b, b])))[0]
        out[batchwise] = torch.allclose(alone, crowded, **TOL)
    assert out == {False: True, True: False}


# -- the forward passes against references built from timm's own modules ------------------------------

def _frozen_query(vit, x):
    """The unprompted model's final-norm CLS feature, straight from timm."""
    return vit.forward_features(x)[:, 0]


@pytest.mark.parametrize("pos", ["none", "cls"])
def test_l2p_forward_matches_a_timm_reference(ws, pos):
    c = _client(ws, "l2p", L2PConfig(prompt_pos_embed=pos))
    vit, pool, cfg = c.vit, c.model.pool, c.cfg
    batch = c.task.train.batch(np.arange(5))
    with torch.no_grad():
        logits, _ = c.forward(batch, train=False)
        x = batch.x
        sim = torch.nn.functional.cosine_similarity(_frozen_query(vit, x)[:, None], pool.keys[None], dim=-1)
        idx = sim.topk(cfg.top_n, dim=1).indices  # per sample, most similar first
        prompts = pool.prompts[idx].flatten(1, 2)  # (B, N * Lp, d)
        h = vit._pos_embed(vit.patch_embed(x))  # [CLS; patches] with positions, as timm embeds them
        if pos == "cls":  # the PyTorch port: pos_embed enlarged with copies of the CLS entry
            prompts = prompts + vit.pos_embed[:, :1]
        h = torch.cat([h[:, :1], prompts, h[:, 1:]], dim=1)  # prompt tuning at layer 0, after the CLS token
        out = vit.norm(vit.blocks(h))
        expected = c.model.head(out[:, 1:1 + prompts.shape[1]].mean(1))
    torch.testing.assert_close(logits, expected, **TOL)


def test_l2p_prompt_pos_embed_values_give_different_outputs(ws):
    batch = _client(ws, "l2p").task.train.batch(np.arange(4))
    with torch.no_grad():
        out = {pos: _client(ws, "l2p", L2PConfig(prompt_pos_embed=pos)).forward(batch, train=False)[0]
               for pos in ("none", "cls")}
    assert (out["none"] - out["cls"]).abs().max() > 1e-4


def test_dualprompt_forward_matches_a_reference_from_the_raw_parameters(ws):
    from fcl_bench.nn.prompts import forward_with_prompts

    c = _client(ws, "dualprompt")
    vit, g, e = c.vit, c.model.g, c.model.e
    batch = c.task.train.batch(np.arange(5))
    with torch.no_grad():
        logits, _ = c.forward(batch, train=False)
        x = batch.x
        sim = torch.nn.functional.cosine_similarity(_frozen_query(vit, x)[:, None], e.keys[None], dim=-1)
        k = sim.argmax(1)  # top-1 E-prompt per sample, the same entry on all its blocks
        # prefixes (pool, layer, K/V, Lp, d): G on blocks 0-1 shared by the batch, E on blocks 2-4 per sample
        pre = {b: (g.prefixes[0, j, 0][None], g.prefixes[0, j, 1][None]) for j, b in enumerate((0, 1))}
        pre |= {b: (e.prefixes[k, j, 0], e.prefixes[k, j, 1]) for j, b in enumerate((2, 3, 4))}
        out = forward_with_prompts(vit, vit._pos_embed(vit.patch_embed(x)), prefixes=pre)
        expected = c.model.head(out[:, 0])
        # training swaps in the task's own entry (task 0 -> entry 0)
        train_logits, _ = c.forward(batch, train=True)
        pre |= {b: (e.prefixes[[0] * 5, j, 0], e.prefixes[[0] * 5, j, 1]) for j, b in enumerate((2, 3, 4))}
        out = forward_with_prompts(vit, vit._pos_embed(vit.patch_embed(x)), prefixes=pre)
        expected_train = c.model.head(out[:, 0])
    torch.testing.assert_close(logits, expected, **TOL)
    torch.testing.assert_close(train_logits, expected_train, **TOL)
    assert (k != 0).any() and not torch.allclose(logits, train_logits)  # the two paths differ on this batch


# -- end to end: the wire, the frozen model ------------------------------------------------------------

def _expected_sizes(name: str, d: int, C: int) -> dict[str, tuple[int, ...]]:
    """What each method must send: prompts + keys + head (or the head alone), from the method specs."""
    head = {"weight": (C, d), "bias": (C,)}
    if name == "fedvit":
        return head
    head = {f"head.{k}": v for k, v in head.items()}
    if name == "l2p":
        return {"pool.prompts": (10, 5, d), "pool.keys": (10, d), **head}
    return {"g.prefixes": (1, 2, 2, 5, d), "e.prefixes": (10, 3, 2, 5, d), "e.keys": (10, d), **head}


@pytest.mark.parametrize("name", ["fedvit", "l2p", "dualprompt"])
def test_smoke_run_sends_only_trainable_tensors_and_leaves_the_vit_unchanged(ws, frozen_state, name):
    method_cls, cfg_cls = METHODS[name]
    res = run_method(method_cls, cfg_cls(), ws)
    cfg = ws.cfg
    assert len(res.metrics["acc"]) == cfg.tasks and 0.0 <= res.metrics["final_acc"] <= 1.0
    # only prompts, keys and head left the clients; nothing named like a backbone weight
    expected = _expected_sizes(name, ws.foundation.embed_dim, ws.scenario.num_classes)
    vit_names = set(frozen_state)
    for manifest in res.metrics["wire"]["client_uploads"].values():
        assert set(manifest) == set(expected) | {N_KEY}, manifest
        assert not vit_names & set(manifest)
        assert {k: tuple(v["shape"]) for k, v in manifest.items() if k != N_KEY} == expected
    # bytes per round are the safetensors size of those tensors (plus n_k going up)
    zeros = {k: torch.zeros(s) for k, s in expected.items()}
    up = len(st_save({**zeros, N_KEY: torch.zeros(1, dtype=torch.int64)}))
    rounds = res.rounds[res.rounds.phase == "round"]
    assert (rounds.bytes_up == up).all() and (rounds.bytes_down == len(st_save(zeros))).all()
    assert (rounds.trainable_params == sum(int(np.prod(s)) for s in expected.values())).all()
    # the shared frozen ViT: bitwise unchanged, still eval, still without grads
    vit = ws.foundation.vit
    after = vit.state_dict()
    assert set(after) == vit_names and all(torch.equal(after[k], v) for k, v in frozen_state.items())
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())


# -- FedAvg+ViT and the feature cache ------------------------------------------------------------------

def test_fedvit_reads_the_frozen_model_only_on_the_first_pass(ws, monkeypatch):
    c = _client(ws, "fedvit")
    cache = FeatureCache(ws.foundation, {"train": ws.dataset.train, "test": ws.dataset.test},
                         ws.dataset.fingerprint)  # fresh: the first round must fill it
    c.env.features = FeatureView(cache, "client 0", {"train": np.ones(len(ws.dataset.train), dtype=bool)})
    env = c.env
    calls = {"n": 0}
    real_cls = ws.foundation.cls

    def counting_cls(x):
        calls["n"] += len(x)
        return real_cls(x)

    monkeypatch.setattr(ws.foundation, "cls", counting_cls)
    n = len(c.task.train)
    c.train_round(round_info())
    first = calls["n"]
    assert env.features.misses == n and first >= n  # (the cache probes one sample to size its table)
    c.train_round(round_info())
    assert (env.features.misses, calls["n"]) == (n, first)  # second round: all hits, the ViT untouched
    assert env.features.hits == n
    # without the cache: the same predictions, and every step calls the model again
    batch = next(c.task.train.batches(8))
    cached = c.predict(batch)
    c.cfg = FedViTConfig(cache=False)
    torch.testing.assert_close(c.predict(batch), cached, **TOL)
    calls["n"] = 0
    c.train_round(round_info())
    assert calls["n"] == n


# -- L2P defaults ----------------------------------------------------------------------------------

def test_l2p_named_defaults_and_explicit_overrides():
    torch_cfg = L2PConfig().resolved(batch_size=64)
    assert (torch_cfg.pool_size, torch_cfg.length, torch_cfg.top_n, torch_cfg.pull_lambda) == (10, 5, 5, 0.1)
    assert torch_cfg.lr == pytest.approx(0.03 * 64 / 256)
    jax_cfg = apply_overrides(L2PConfig(), {"defaults": "jax"}, "l2p").resolved(16)
    assert (jax_cfg.pool_size, jax_cfg.length, jax_cfg.top_n, jax_cfg.pull_lambda) == (10, 10, 4, 1.0)
    assert torch_cfg.prompt_pos_embed == "cls" and jax_cfg.prompt_pos_embed == "none"
    # "none" is a value of its own here, not "take it from the defaults"
    assert apply_overrides(L2PConfig(), {"prompt_pos_embed": "none"}, "l2p").resolved(16).prompt_pos_embed == "none"
    assert apply_overrides(L2PConfig(), {"defaults": "jax", "prompt_pos_embed": "cls"},
                           "l2p").resolved(16).prompt_pos_embed == "cls"
    with pytest.raises(ConfigError, match="prompt_pos_embed"):
        apply_overrides(L2PConfig(), {"prompt_pos_embed": "sin"}, "l2p")
    # an explicit value wins whatever the order of the overrides
    for order in ({"defaults": "jax", "top_n": "5"}, {"top_n": "5", "defaults": "jax"}):
        r = apply_overrides(L2PConfig(), order, "l2p").resolved(16)
        assert (r.length, r.top_n, r.pull_lambda) == (10, 5, 1.0)
    with pytest.raises(ConfigError, match="pytorch"):
        apply_overrides(L2PConfig(), {"defaults": "tf"}, "l2p")
    with pytest.raises(ConfigError, match="top_n"):  # checked when the overrides are parsed, before any run
        apply_overrides(L2PConfig(), {"pool_size": "3", "top_n": "4"}, "l2p")
    with pytest.raises(ConfigError, match="top_n"):  # jax: N=4 > M=3
        apply_overrides(L2PConfig(), {"defaults": "jax", "pool_size": "3"}, "l2p")
    with pytest.raises(ValueError, match="defaults"):
        L2PConfig(defaults="tf").resolved(16)


def test_l2p_pull_term_draws_the_chosen_keys_to_the_queries(ws):
    c = _client(ws, "l2p", L2PConfig(pull_lambda=1.0))
    batch = c.task.train.batch(np.arange(len(c.task.train)))

    def pull():
        with torch.no_grad():
            idx, sim = c.model.pool.select(c.query(batch), c.cfg.top_n)
            return float(pull_loss(sim, idx))

    before, keys = pull(), c.model.pool.keys.detach().clone()
    c.train_round(round_info())
    assert pull() > before
    assert not torch.equal(c.model.pool.keys, keys)


# -- DualPrompt -----------------------------------------------------------------------------------

def test_dualprompt_trains_the_task_prompt_and_seeds_the_next_from_it(ws):
    c, fed = started(DualPrompt, DualPromptConfig(), ws)
    e = c.model.e
    p0, k0 = e.prefixes.detach().clone(), e.keys.detach().clone()
    c.train_round(round_info())
    changed = (e.prefixes.detach() != p0).flatten(1).any(1)
    assert changed.tolist() == [True] + [False] * 9  # the prompt mask: task 0 trains E-prompt 0 only
    assert (e.keys.detach() != k0).any(1).tolist() == [True] + [False] * 9
    c.start_task(fed.open_task(0, 1))
    assert torch.equal(e.prefixes[1], e.prefixes[0])
    assert torch.equal(e.keys[1], k0[1])  # the key is not copied (official shared_prompt_key=False)
    idx, _ = c.select(c.task.train.batch(np.arange(4)), train=True)
    assert idx.flatten().tolist() == [1, 1, 1, 1]


def test_dualprompt_layers_are_clamped_on_a_shallow_vit(ws):
    assert fit_layers((2, 3, 4), 6) == (2, 3, 4)
    assert fit_layers((2, 3, 4), 4) == (2, 3)
    assert fit_layers((0, 1), 1) == (0,)
    with pytest.raises(ValueError, match=">= 0"):
        fit_layers((-1,), 6)
    torch.manual_seed(0)
    fm = FoundationModel(build_tiny_vit(depth=2), "tiny-depth2", ws.foundation.preprocess, ws.device, {})
    shallow = dataclasses.replace(ws, foundation=fm, features=FeatureCache(
        fm, {"train": ws.dataset.train, "test": ws.dataset.test}, ws.dataset.fingerprint))
    c, fed = started(DualPrompt, DualPromptConfig(), shallow)
    assert (fed.method.g_layers, fed.method.e_layers) == ((0, 1), (1,))
    c.train_round(round_info())
    assert c.predict(c.task.train.batch(np.arange(3))).shape == (3, ws.scenario.num_classes)


@pytest.mark.parametrize("over", [dict(e_pool_size="0"), dict(e_layers="-1,2"), dict(lr="-1")])
def test_dualprompt_rejects_bad_overrides(over):
    with pytest.raises(ConfigError, match=f"dualprompt.{next(iter(over))}"):
        apply_overrides(DualPromptConfig(), over, "dualprompt")



def test_dualprompt_checks_a_config_built_in_code(ws):
    with pytest.raises(ValueError, match="dualprompt.g_layers"):
        started(DualPrompt, DualPromptConfig(g_layers=()), ws)

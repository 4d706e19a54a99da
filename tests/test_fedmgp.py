"""FedMGP: what crosses the wire, the server's prompt fusion on the server-held split, per-sample inference,
the two stages, the two paths and the class-wise local prompts."""

from __future__ import annotations

import json
from fnmatch import fnmatchcase

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import federation, round_info, smoke_config, workspace
from helpers import run as run_method
from safetensors.torch import save as st_save

from fcl_bench.config import ConfigError, preset
from fcl_bench.methods.fedmgp import KEY, PROMPT, FedMGP, FedMGPConfig, FedMGPModel, token_mse
from fcl_bench.nn.averaging import trainable_state
from fcl_bench.nn.prompts import forward_with_prompts, mean_prompt_tokens

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ws():
    w = workspace(smoke_config())
    w.ensure_foundation(progress=False)
    return w


@pytest.fixture(scope="module")
def frozen_state(ws):
    return {k: v.clone() for k, v in ws.foundation.vit.state_dict().items()}


def _started(ws, cfg=None):
    fed = federation(FedMGP, cfg or FedMGPConfig(), ws)
    fed.start_task(0)
    return fed


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


# -- presets and the server-held split -------------------------------------------------------------------

def test_presets_that_run_fedmgp_hold_a_server_split_recorded_in_the_scenario(ws, tmp_path):
    for name, n in (("smoke", 2), ("quick", 8), ("paper-cifar100", 20)):
        assert preset(name).server_per_class == n
    sc = ws.scenario
    ws.scenario.save(tmp_path / "scenario.json")
    saved = json.loads((tmp_path / "scenario.json").read_text())
    assert sorted(saved["server"]) == sc.server_indices.tolist()
    labels = ws.dataset.train.labels[sc.server_indices]
    assert sorted(np.unique(labels)) == sorted(sc.public_classes)
    assert all((labels == c).sum() == 2 for c in sc.public_classes)


def test_a_scenario_without_a_server_split_fails_at_once_naming_the_option():
    run = smoke_config(server_per_class="0")
    w = workspace(run)
    with pytest.raises(ConfigError, match=r"-o server_per_class=N"):
        federation(FedMGP, FedMGPConfig(), w, run)


# -- the wire -------------------------------------------------------------------------------------------

def test_bytes_each_way_are_prompt_plus_key_12288_floats_at_vit_b_sizes():
    model = FedMGPModel(FedMGPConfig(), (2, 3, 4), dim=768, num_classes=100)
    up = trainable_state(model.global_pool, prefix="global_pool.")
    assert {k: tuple(v.shape) for k, v in up.items()} == {PROMPT: (1, 15, 768), KEY: (1, 768)}
    assert sum(v.numel() for v in up.values()) == 15 * 768 + 768 == 12_288
    # the uploads patterns let exactly these leave a client: no local prompt, key or head, no global head
    names = list(model.state_dict())
    allowed = [n for n in names if any(fnmatchcase(n, p) for p in FedMGP.uploads)]
    assert sorted(allowed) == [KEY, PROMPT]
    assert any(n.startswith("local_pool.") for n in names) and any("head" in n for n in names)


def test_wire_manifest_shows_only_the_global_prompt_and_key(ws, frozen_state):
    res = run_method(FedMGP, FedMGPConfig(), ws)
    d = ws.foundation.embed_dim
    expected = {PROMPT: (1, 15, d), KEY: (1, d)}
    uploads = res.metrics["wire"]["client_uploads"]
    assert set(uploads) == {"0", "1"}
    for manifest in uploads.values():
        assert {k: tuple(v["shape"]) for k, v in manifest.items()} == expected
        assert not any("local" in k or "head" in k for k in manifest)
    size = len(st_save({k: torch.zeros(s) for k, s in expected.items()}))
    rounds = res.rounds[res.rounds.phase == "round"]
    assert (rounds.bytes_up == size).all() and (rounds.bytes_down == size).all()
    assert res.metrics["server_seconds"] > 0 and res.metrics["server_samples"] == len(ws.scenario.server_indices)
    after = ws.foundation.vit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_state.items())


# -- the server: fusion by distillation on the server-held split ------------------------------------------

def test_server_fusion_lowers_its_objective_on_server_held_samples_only(ws):
    fed = _started(ws, FedMGPConfig(server_epochs=5))
    info = round_info(participants=(0, 1))
    uploads = {c: fed.clients[c].train_round(info) for c in (0, 1)}
    server = fed.server
    start, teacher = uploads[0][PROMPT], uploads[1][PROMPT]
    assert not torch.equal(start, teacher)
    data = server.distill_data(info, [0, 1])
    before = server.objective(start, [teacher], data)
    down = server.aggregate(uploads, info)
    fused = down[0][PROMPT]
    after = server.objective(fused, [teacher], data)
    assert after < before and len(server.last_losses) == 5
    assert server.last_losses[-1] < server.last_losses[0]
    # the fused prompt and the first participant's key go to every client
    assert set(down) == {0, 1} and torch.equal(down[1][KEY], uploads[0][KEY])
    # what the fusion read: server-held training samples, none held by a client
    sc = ws.scenario
    assert len(server.last_indices) and np.isin(server.last_indices, sc.server_indices).all()
    assert server.env.server_data.split == "train"
    for c in range(sc.num_clients):
        for t in range(sc.num_tasks):
            assert not np.isin(sc.server_indices, sc.train_indices[c][t]).any()
    # and its feature view refuses test batches and client batches
    with pytest.raises(PermissionError):
        server.env.features.prefix(ws.test_view(0, 0).batch(np.arange(2)), 0)
    with pytest.raises(PermissionError):
        server.env.features.prefix(ws.train_view(0, 0).batch(np.arange(2)), 0)


def test_token_mse_is_the_summed_squared_error_over_teachers():
    g = torch.Generator().manual_seed(0)
    out, a, b = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    expected = F.mse_loss(out, a, reduction="sum") + F.mse_loss(out, b, reduction="sum")
    torch.testing.assert_close(token_mse(out, [a, b]), expected)


# -- the client ----------------------------------------------------------------------------------------

def test_a_prediction_does_not_depend_on_the_rest_of_its_batch(ws):
    fed = _started(ws)
    c = fed.clients[0]
    c.train_round(round_info())
    data = ws.test_view(0, 0)
    pos = np.arange(min(8, len(data)))
    with c.env.features.open_test():
        full = c.predict(data.batch(pos))
        alone = torch.cat([c.predict(data.batch(pos[i:i + 1])) for i in range(len(pos))])
        perm = np.random.default_rng(0).permutation(len(pos))
        shuffled = c.predict(data.batch(pos[perm]))
    torch.testing.assert_close(full, alone, **TOL)
    torch.testing.assert_close(full[perm], shuffled, **TOL)


def test_stage2_leaves_stage1_parameters_bitwise_unchanged(ws):
    c = _started(ws).clients[0]
    m = c.model
    c.model.train()
    local0 = _snapshot(m.stage2_parameters())
    c.stage1()
    assert all(torch.equal(a, b) for a, b in zip(local0, m.stage2_parameters()))  # stage 1 trains only its own
    stage1 = _snapshot(m.stage1_parameters())
    c.stage2()
    assert all(torch.equal(a, b) for a, b in zip(stage1, m.stage1_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(local0, m.stage2_parameters()))


def test_stage1_loss_is_masked_ce_minus_the_pull_term(ws):
    c = _started(ws).clients[0]
    batch = c.task.train.batch(np.arange(6))
    with torch.no_grad():
        loss = c.stage1_loss(batch)
        g = c.global_path(batch)
        logits = c.model.global_head(g.feat)
        mask = torch.full_like(logits, float("-inf"))
        mask[:, c.task.classes] = 0
        ce = F.cross_entropy(logits + mask, batch.y)
        q = c.env.features.cls(batch)
        pull = F.cosine_similarity(q, c.model.global_pool.keys[0].expand_as(q), dim=1).mean()
    torch.testing.assert_close(loss, ce - 0.1 * pull, **TOL)


def test_the_two_paths_equal_full_forwards_of_the_frozen_vit(ws):
    c = _started(ws).clients[0]
    vit, batch = c.vit, c.task.train.batch(np.arange(4))
    idx = batch.y.unsqueeze(1)
    with torch.no_grad():
        g = c.global_path(batch)
        local = c.local_path(g.trunk, idx)
        tokens = c.env.features.prefix(batch, 0)
        prompt = c.model.global_pool.prompts
        full_g = forward_with_prompts(vit, tokens, prompts=prompt, prompt_pos_embed="cls")
        full_l = forward_with_prompts(vit, tokens, prompts=prompt, prompt_pos_embed="cls",
                                      prefixes=c.model.local_pool.gather(idx))
    torch.testing.assert_close(g.feat, mean_prompt_tokens(vit, full_g, 15), **TOL)
    torch.testing.assert_close(local, mean_prompt_tokens(vit, full_l, 15), **TOL)
    assert not torch.allclose(local, g.feat)


def test_training_uses_the_true_class_prefix_and_inference_the_top1_key(ws):
    c = _started(ws).clients[0]
    batch = c.task.train.batch(np.arange(len(c.task.train)))
    c.model.zero_grad(set_to_none=True)
    c.stage2_loss(batch).backward()
    pool = c.model.local_pool
    rows = lambda grad: set(np.flatnonzero(grad.flatten(1).abs().sum(1).numpy()))  # noqa: E731
    labels = set(batch.y.tolist())
    assert rows(pool.prefixes.grad) == labels and rows(pool.keys.grad) == labels
    assert c.model.global_pool.prompts.grad is None  # the global path runs without gradient in stage 2
    # inference: the prefix of the key closest to the query (the global path's pre-logits)
    with torch.no_grad():
        q = c.global_path(batch).feat[:2]
        pool.keys[7] = q[0] * 10
        pool.keys[3] = q[1] * 10
        assert c.local_select(q).flatten().tolist() == [7, 3]

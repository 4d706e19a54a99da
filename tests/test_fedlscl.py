"""Fed-LSCL: O2D solvers, cached vs uncached forward, Stage 2, uploads on the wire, heterogeneous clients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import federation, round_info, smoke_config, started, workspace
from helpers import run as run_method
from safetensors.torch import save as st_save
from torch import nn

from fcl_bench.data import concat_views
from fcl_bench.methods.fedlscl import FedLSCL, FedLSCLConfig
from fcl_bench.nn.o2d import o2d_closed_form, o2d_gradient

RUN = smoke_config()


def _smoke_cfg(**kw):
    return dataclasses.replace(RUN, **kw)


@pytest.fixture(scope="module")
def ws():
    return workspace(RUN)


# -- One-by-One Distillation -------------------------------------------------------------------------

def _problem(seed=0, k=3, e=6, m=5, n=40):
    g = torch.Generator().manual_seed(seed)
    gens = [(torch.randn(m, e, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64))
            for _ in range(k)]
    feats = [torch.randn(n + 3 * j, e, generator=g, dtype=torch.float64) for j in range(k)]
    return gens, feats


def _lin(W, b):
    lin = nn.Linear(W.shape[1], W.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    return lin


@pytest.mark.parametrize("lam", [0.05, 1.0, 10.0])
def test_o2d_closed_form_matches_gradient_solver(lam):
    gens, feats = _problem()
    teachers = [(gens[j][0], gens[j][1], feats[j]) for j in (1, 2)]
    W, b = o2d_closed_form(gens[0], teachers, lam)
    out = o2d_gradient(_lin(*gens[0]), [(_lin(*gens[j]), feats[j]) for j in (1, 2)], lam, steps=500)
    torch.testing.assert_close(out.weight.detach(), W, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.bias.detach(), b, atol=1e-6, rtol=1e-6)
    # and the solution is a stationary point: moving away increases the objective
    def objective(W_, b_):
        data = sum((((X @ W_.T + b_) - (X @ Wj.T + bj)) ** 2).sum(1).mean() for Wj, bj, X in teachers)
        return data + lam * (((W_ - gens[0][0]) ** 2).sum() + ((b_ - gens[0][1]) ** 2).sum())
    base = objective(W, b)
    for _ in range(5):
        assert objective(W + 1e-3 * torch.randn_like(W), b) > base


def test_o2d_huge_lambda_returns_student():
    gens, feats = _problem(1)
    W, b = o2d_closed_form(gens[0], [(gens[j][0], gens[j][1], feats[j]) for j in (1, 2)], 1e12)
    torch.testing.assert_close(W, gens[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(b, gens[0][1], atol=1e-6, rtol=0)


def test_o2d_identical_teachers_lambda_zero_returns_teacher():
    gens, feats = _problem(2, e=4, n=50)
    teacher = gens[1]
    W, b = o2d_closed_form(gens[0], [(teacher[0], teacher[1], feats[1]), (teacher[0], teacher[1], feats[2])], 0.0)
    torch.testing.assert_close(W, teacher[0], atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(b, teacher[1], atol=1e-8, rtol=1e-8)


def test_o2d_without_teachers_keeps_student():
    gens, _ = _problem(3)
    W, b = o2d_closed_form(gens[0], [], 1.0)
    assert torch.equal(W, gens[0][0]) and torch.equal(b, gens[0][1])


# -- forward passes ----------------------------------------------------------------------------------

def test_cached_and_uncached_forward_equal(ws):
    c, _ = started(FedLSCL, FedLSCLConfig(), ws)
    env = c.env
    with torch.no_grad():  # make B non-zero so the adapted block really differs from the frozen one
        c.phi.linear.weight.normal_(0, 0.05)
    batch = next(c.task.train.batches(8))
    c.cfg = dataclasses.replace(c.cfg, prefix_cache=True)
    cached = c.predict(batch)
    c.cfg = dataclasses.replace(c.cfg, prefix_cache=False)
    uncached = c.predict(batch)
    own = c.head.classes
    torch.testing.assert_close(cached[:, own], uncached[:, own], atol=1e-5, rtol=1e-5)
    # the prefix cache also equals the model's own prefix pass
    torch.testing.assert_close(env.features.prefix(batch, 3), env.foundation.prefix(batch.x, 3))


def test_adapted_vit_equals_frozen_at_init(ws):
    c, _ = started(FedLSCL, FedLSCLConfig(), ws, client=1)
    env = c.env
    batch = next(c.task.train.batches(6))
    E = c.theta(batch.x)
    A, B = c.phi(E)
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0
    from fcl_bench.nn.lora import adapted_forward
    feat = adapted_forward(env.foundation.vit, env.features.prefix(batch, 3), 3, A, B, 1.0)
    torch.testing.assert_close(feat, env.foundation.cls(batch.x), atol=1e-5, rtol=1e-5)


# -- Stage 2 -----------------------------------------------------------------------------------------

def _drift_after_two_tasks(ws, continual: bool) -> float:
    cfg = FedLSCLConfig(aggregation="none", continual_finetune=continual, lambda_e=10.0, lambda_w=10.0,
                        buffer_per_class=8)
    c, fed = started(FedLSCL, cfg, ws, dataclasses.replace(RUN, epochs=3))
    c.train_round(round_info())
    c.end_task()
    old_theta = c.old[0]
    buffer = c.buffers[0]
    c.start_task(fed.open_task(0, 1))
    c.train_round(round_info(task=1))
    with torch.no_grad():
        batch = buffer.batch(np.arange(len(buffer)))
        c.theta.eval()
        return float(((c.theta(batch.x) - old_theta(batch.x)) ** 2).sum(1).mean())


def test_stage2_keeps_old_features_closer(ws):
    with_stage2 = _drift_after_two_tasks(ws, True)
    without = _drift_after_two_tasks(ws, False)
    assert with_stage2 < 0.7 * without, (with_stage2, without)


def test_stage2_old_targets_computed_once_per_task_and_equal_recomputing(ws):
    """E' and W' come from a per-task cache: the frozen theta^{n-1} runs one pass over B^{n-1} per task
    (not one per round), and the cached rows equal recomputing them on each Stage 2 batch."""
    cfg = FedLSCLConfig(aggregation="none", buffer_per_class=8)
    c, fed = started(FedLSCL, cfg, ws, dataclasses.replace(RUN, epochs=2))
    c.train_round(round_info())
    c.end_task()
    old_theta, old_phi = c.old
    calls = []
    old_theta.register_forward_hook(lambda m, a, o: calls.append(len(a[0])))
    c.start_task(fed.open_task(0, 1))
    buffer = concat_views(c.buffers)
    for r in range(3):
        c.train_round(round_info(task=1, rnd=r, rounds=3))
    # one no-grad pass over the buffer in eval batches, for three rounds of two epochs each
    assert sum(calls) == len(buffer) and len(calls) == -(-len(buffer) // c.env.eval_batch_size), calls
    # the cached rows are the frozen models' outputs, sample by sample, in any batch order
    for batch in buffer.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0)):
        E_c, W_c = c._old_rows(batch)
        with torch.no_grad():
            E = old_theta(batch.x)
            A, B = old_phi(E)
        torch.testing.assert_close(E_c, E, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(W_c, torch.cat([A.flatten(1), B.flatten(1)], 1), atol=1e-6, rtol=1e-5)
    # a new task drops the cache; the next Stage 2 refills it from the new frozen models
    c.end_task()
    c.start_task(fed.open_task(0, 1))
    assert c._old_cache is None
    with pytest.raises(KeyError, match="outside the buffer"):
        c._old_targets(buffer)
        c._old_rows(c.task.train.batch(np.arange(len(c.task.train))))


# -- end to end --------------------------------------------------------------------------------------

def test_smoke_heterogeneous_uploads_are_phi_and_fs_only():
    cfg = _smoke_cfg(small_models=["resnet18", "mobilenetv3_large_100"])
    ws_h = workspace(cfg)
    res = run_method(FedLSCL, FedLSCLConfig(buffer_per_class=4), ws_h, cfg)
    assert len(res.metrics["acc"]) == cfg.tasks
    uploads = res.metrics["wire"]["client_uploads"]
    for manifest in uploads.values():
        assert set(manifest) == {"phi.weight", "phi.bias", "fs", "__num_samples__"}, manifest
        assert manifest["fs"]["shape"][1] == cfg.small_width
    rounds = res.rounds[res.rounds.phase == "round"]
    d = ws_h.foundation.embed_dim
    m = d * 4 + 4 * 3 * d
    for _, row in rounds.iterrows():
        n_seen = len(ws_h.scenario.seen_classes(int(row.client), int(row.task)))
        # the buffer holds min(M, class size) samples per seen class
        labels = ws_h.dataset.train.labels
        sizes = [min(4, int(np.isin(ws_h.scenario.train_indices[int(row.client)][t], np.flatnonzero(labels == k)).sum()))
                 for t in range(int(row.task) + 1) for k in ws_h.scenario.client_tasks[int(row.client)][t]]
        assert len(sizes) == n_seen
        expected = len(st_save({"phi.weight": torch.zeros(m, cfg.small_width), "phi.bias": torch.zeros(m),
                                "fs": torch.zeros(sum(sizes), cfg.small_width),
                                "__num_samples__": torch.zeros(1, dtype=torch.int64)}))
        assert row.bytes_up == expected
        expected_down = len(st_save({"phi.weight": torch.zeros(m, cfg.small_width), "phi.bias": torch.zeros(m)}))
        assert row.bytes_down == expected_down


def test_collab_off_requires_one_arch(ws):
    cfg = _smoke_cfg(small_models=["resnet10t", "mobilenetv3_small_050"])
    with pytest.raises(ValueError, match="same"):
        federation(FedLSCL, FedLSCLConfig(collab=False), ws, cfg)


@pytest.mark.parametrize("over", [dict(collab=False), dict(continual_finetune=False), dict(aggregation="fedavg"),
                                  dict(aggregation="none"), dict(target="qv", block=0),
                                  dict(o2d_solver="gradient", o2d_steps=5)])
def test_ablation_switches_run(ws, over):
    res = run_method(FedLSCL, FedLSCLConfig(buffer_per_class=2, **over), ws, RUN)
    assert 0.0 <= res.metrics["final_acc"] <= 1.0
    names = set().union(*[set(m) for m in res.metrics["wire"]["client_uploads"].values()])
    assert not any(n.startswith(("head", "vit", "blocks")) for n in names)
    if over.get("aggregation") == "none":
        assert res.metrics["bytes_up"] == 0
    if over.get("collab") is False:
        assert all(n.startswith("theta.") or n == "__num_samples__" for n in names)


# -- tasks and buffers that leave one sample over ---------------------------------------------------

def test_stage1_and_stage2_survive_sets_that_leave_one_sample_over(ws):
    logs: list[str] = []
    fed = federation(FedLSCL, FedLSCLConfig(), ws, dataclasses.replace(RUN, batch_size=4), log=logs.append)
    c, env = fed.clients[0], fed.client_envs[0]

    def task(t: int, n: int):
        full = fed.open_task(0, t)
        return dataclasses.replace(full, train=full.train.subset(range(n)))

    c.start_task(task(0, env.batch_size + 1))   # Stage 1: batches of 4 + 1 without folding
    c.train_round(round_info())
    c.end_task()
    assert len(c.buffers[0]) == env.batch_size + 1
    assert not logs
    c.start_task(task(1, 1))                    # Stage 1 on one sample; Stage 2 on a buffer of 4 + 1
    bn = [b.clone() for n, b in c.theta.named_buffers() if n.endswith("running_mean")]
    up = c.train_round(round_info(task=1))
    assert torch.isfinite(up["phi.weight"]).all()
    assert all(torch.equal(a, b) for a, b in zip(bn, [b for n, b in c.theta.named_buffers()
                                                       if n.endswith("running_mean")]))
    assert len(logs) == 1 and "one sample" in logs[0]


# -- the averaging ablations start from one broadcast model ---------------------------------------------

@pytest.mark.parametrize("over, part", [(dict(aggregation="fedavg"), "phi"), (dict(collab=False), "theta"),
                                        (dict(), "phi")])
def test_averaging_ablations_start_every_client_from_the_servers_initial_model(ws, over, part):
    fed = federation(FedLSCL, FedLSCLConfig(**over), ws, RUN)
    fed.start_task(0)
    a, b = (getattr(fed.clients[c], part) for c in (0, 1))
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    start_bytes = [r["bytes_down"] for r in fed.tally.rows if r["phase"] == "start"]
    if over:  # averaged: one w_0 for everyone, sent over the wire
        assert same and len(start_bytes) == fed.K and all(n > 0 for n in start_bytes)
    else:  # O2D keeps each client's own generator: nothing is broadcast
        assert not same and start_bytes == []

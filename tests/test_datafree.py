"""Data-free synthesis (fcl_bench/nn/datafree.py) and the TARGET and MFCL baselines: the BatchNorm-statistics
loss (falls during synthesis, hand-computed values, hooks gone afterwards), pool labels are the teacher's
predictions, the pool's bytes on the wire and a download encoded once, server seconds and FLOPs in the
accounting, MFCL's persistent generator, TARGET's new-class CE, MFCL's head-only L_ft and lr decay, and KD
on the synthetic pool against the same run without it."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import federation, smoke_config, workspace
from torch import nn

from fcl_bench import wire
from fcl_bench.methods.mfcl import GEN_PREFIX, MFCL, OLD_PREFIX, MFCLConfig
from fcl_bench.methods.target import Target, TargetConfig, global_seen
from fcl_bench.nn import datafree as D

RUN = smoke_config(small_models="test_resnet")
TINY_TARGET = dict(syn_rounds=2, syn_iterations=3, syn_batch=8)
TINY_MFCL = dict(gen_iterations=3, gen_batch=8, syn_size=8)


def toy_teacher(seed: int = 0) -> nn.Module:
    """A small BN CNN whose running statistics are far from N(0, 1) (so there is something to match)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    net.train()
    with torch.no_grad():
        for _ in range(20):
            net(torch.rand(16, 3, 8, 8) * 3 + 1)
    return net.eval()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# -- the BatchNorm-statistics loss -------------------------------------------------------------------
def test_bn_loss_l2_and_kl_match_hand_computed_values_and_hooks_come_off():
    net = toy_teacher()
    x = torch.randn(6, 3, 8, 8)
    before = net(x)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs = {}
    handles = [m.register_forward_hook(lambda m, i, o, k=k: inputs.__setitem__(k, i[0])) for k, m in enumerate(bns)]
    net(x)
    for h in handles:
        h.remove()
    l2 = kl = 0.0
    for k, m in enumerate(bns):
        mu, var = inputs[k].mean((0, 2, 3)), inputs[k].var((0, 2, 3), unbiased=False)
        l2 += torch.norm(m.running_var - var) + torch.norm(m.running_mean - mu)
        # KL(N(rm, rv) || N(mu, var)) per channel, averaged over channels, then over layers
        kl += (0.5 * torch.log(var / m.running_var) + (m.running_var + (m.running_mean - mu) ** 2) / (2 * var)
               - 0.5).mean() / len(bns)
    with D.BNStatsLoss(net, "l2") as bn:
        net(x)
        assert torch.allclose(bn.loss(), l2, rtol=1e-5)
    assert _hooks(net) == 0
    with D.BNStatsLoss(net, "kl") as bn:
        net(x)
        assert torch.allclose(bn.loss(), kl, rtol=1e-4, atol=1e-6)
    assert _hooks(net) == 0 and not bn.active
    assert torch.equal(net(x), before)


def test_target_synthesis_lowers_the_bn_loss_and_leaves_the_teacher_unchanged():
    net = toy_teacher()
    x = torch.randn(4, 3, 8, 8)
    before, state = net(x), {k: v.clone() for k, v in net.state_dict().items()}
    cfg = D.TargetSynthesis(rounds=3, iterations=20, batch_size=16, nz=16, ngf=8, bn_momentum=0.0, lr_g=0.02)
    norm = lambda t: t * 3 + 1  # noqa: E731  the "input pipeline" of the teacher's data
    pool, report = D.synthesize_target(net, [0, 1, 2], 8, norm, cfg, torch.Generator().manual_seed(0))
    bn = report.history["bn"]
    assert pool.shape == (48, 3, 8, 8) and 0 <= pool.min() and pool.max() <= 1
    assert np.mean(bn[-5:]) < 0.75 * bn[0]  # the statistics mismatch falls
    assert _hooks(net) == 0 and torch.equal(net(x), before) and not net.training
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    again, _ = D.synthesize_target(net, [0, 1, 2], 8, norm, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(pool, again)  # seeded


def test_mfcl_generator_training_lowers_the_bn_kl():
    net = toy_teacher()
    gen = D.MFCLGenerator(nz=16, img_size=8, channels=16)
    cfg = D.MFCLSynthesis(iterations=40, batch_size=16)
    report = D.train_mfcl_generator(gen, net, [0, 1, 2, 3], cfg, torch.Generator().manual_seed(0))
    bn = report.history["bn"]
    assert np.mean(bn[-5:]) < 0.7 * np.mean(bn[:5])
    assert set(report.history) == {"ce", "ie", "bn", "smooth", "loss"} and not gen.training
    assert _hooks(net) == 0


def test_generators_output_the_dataset_image_size():
    assert D.TargetGenerator(nz=8, ngf=4, img_size=32)(torch.randn(2, 8)).shape == (2, 3, 32, 32)
    assert D.TargetGenerator(nz=8, ngf=4, img_size=30)(torch.randn(2, 8)).shape == (2, 3, 30, 30)
    assert D.MFCLGenerator(nz=8, img_size=64, channels=8)(torch.randn(2, 8)).shape == (2, 3, 64, 64)


def test_target_kd_is_the_official_soft_cross_entropy():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    want = -(F.softmax(t / 2, 1) * F.log_softmax(s / 2, 1)).sum() / 5
    assert torch.allclose(D.soft_cross_entropy(s, t, 2.0), want)


# -- TARGET in a federation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws():
    return workspace(RUN)


def _after_task0(method, cfg, ws, flops="sampled"):
    fed = federation(method, cfg, ws, RUN, flops=flops)
    fed.start_task(0)
    for r in range(fed.R):
        fed.run_round(0, r)
    return fed


@pytest.fixture(scope="module")
def target_run(ws, request):
    """A TARGET federation after task 0's synthesis, the teacher (global model) and the encode calls."""
    fed = _after_task0(Target, TargetConfig(**TINY_TARGET).resolved(), ws)
    teacher = fed.server.global_model()
    calls = []
    real = wire.encode
    mp = pytest.MonkeyPatch()
    mp.setattr(wire, "encode", lambda p, who="payload": calls.append(who) or real(p, who))
    fed.end_task(0)
    mp.undo()
    return fed, teacher, calls


def test_pool_labels_are_the_teacher_predictions(target_run):
    fed, teacher, _ = target_run
    images, labels = fed.clients[0].pool
    classes = torch.as_tensor(global_seen(fed.method_env, 0))
    with torch.no_grad():
        pred = classes[teacher(fed.ws.preprocess.normalise(images.float() / 255))[:, classes].argmax(1)]
    assert images.dtype == torch.uint8 and torch.equal(labels, pred)
    assert set(labels.tolist()) <= set(classes.tolist())


def test_pool_bytes_on_the_wire_are_images_plus_labels_plus_header_encoded_once(target_run):
    fed, _, calls = target_run
    images, labels = fed.clients[1].pool
    n, c, h, w = images.shape
    msg = wire.encode(D.pool_payload(images, labels))
    header = struct.unpack("<Q", msg.data[:8])[0]
    assert msg.nbytes == 8 + header + n * h * w * c + n * 8 and header < 512
    rows = [r for r in fed.tally.rows if r["phase"] == "end_task" and r["task"] == 0]
    assert [r["bytes_down"] for r in rows] == [msg.nbytes] * fed.K  # every client is counted in full
    assert len(calls) == 1  # ... but the one pool is serialised once


def test_server_seconds_and_flops_of_the_synthesis_are_accounted(target_run):
    fed, _, _ = target_run
    row = next(r for r in fed.tally.rows if r["phase"] == "server_end" and r["task"] == 0)
    agg = next(r for r in fed.tally.rows if r["phase"] == "server_round" and r["task"] == 0)
    assert row["server_seconds"] > agg["server_seconds"] and row["server_flops"] > 1e8
    assert row["server_bytes_sent"] == sum(r["bytes_down"] for r in fed.tally.rows
                                           if r["phase"] == "end_task" and r["task"] == 0)
    fed.start_task(1)
    for r in range(fed.R):
        fed.run_round(1, r)
    fed.end_task(1)
    m = fed.result().metrics
    assert m["server_flops"] >= row["server_flops"] and m["server_seconds"] >= row["server_seconds"]


def test_target_task1_ce_reaches_only_new_class_logits(ws):
    fed = _after_task0(Target, TargetConfig(**TINY_TARGET, kd_weight=0.0).resolved(), ws, flops="off")
    fed.end_task(0)
    fed.start_task(1)
    client = fed.clients[0]
    batch = next(client.task.train.batches(8))
    client.model.zero_grad()
    client.loss(batch).backward()
    grad = client.model.head.weight.grad.abs().sum(1)
    new = set(client.task.classes)
    assert all(grad[k] == 0 for k in range(len(grad)) if k not in new)
    assert all(grad[k] > 0 for k in new)
    assert client.teacher is not None and not any(p.requires_grad for p in client.teacher.parameters())


# -- MFCL ------------------------------------------------------------------------------------------------
def test_mfcl_generator_persists_across_tasks_with_a_new_adam(ws, monkeypatch):
    from fcl_bench.methods import mfcl as M
    fed = _after_task0(MFCL, MFCLConfig(**TINY_MFCL).resolved(), ws, flops="off")
    entries, exits, real = [], [], M.D.train_mfcl_generator

    def spy(gen, *a, **k):
        entries.append({n: v.clone() for n, v in gen.state_dict().items()})
        out = real(gen, *a, **k)
        exits.append({n: v.clone() for n, v in gen.state_dict().items()})
        return out

    monkeypatch.setattr(M.D, "train_mfcl_generator", spy)
    first = fed.server.end_task(0)
    fed.server.end_task(0)  # a second synthesis (as after the next task)
    assert all(torch.equal(entries[1][n], exits[0][n]) for n in exits[0])  # starts from the first's weights
    assert not all(torch.equal(entries[0][n], exits[0][n]) for n in exits[0])  # and the first trained it
    # the download: the generator (weights and BN statistics) and the old model, one object for all clients
    payload = first[0]
    assert all(first[c] is payload for c in first) and len(first) == fed.K
    gen_state = {k[len(GEN_PREFIX):]: v for k, v in payload.items() if k.startswith(GEN_PREFIX)}
    assert set(gen_state) == set(exits[0]) and all(torch.equal(gen_state[n], exits[0][n]) for n in gen_state)
    assert any(k.startswith(OLD_PREFIX) and "running_mean" in k for k in payload)


def test_mfcl_end_task_download_is_counted_per_client(ws):
    fed = _after_task0(MFCL, MFCLConfig(**TINY_MFCL).resolved(), ws, flops="off")
    fed.end_task(0)
    gen = fed.server.generator.state_dict()
    old = fed.server.global_state
    tensors = sum(v.numel() * v.element_size() for v in [*gen.values(), *old.values()])
    rows = [r["bytes_down"] for r in fed.tally.rows if r["phase"] == "end_task" and r["task"] == 0]
    assert len(rows) == fed.K and all(tensors < b < tensors + 64 * 1024 for b in rows)
    c = fed.clients[0]
    assert c.has_generator and all(torch.equal(c.generator.state_dict()[k].cpu(), v.cpu()) for k, v in gen.items())


def test_mfcl_lr_decays_from_0_1_toward_0_01_within_a_task():
    cfg = MFCLConfig()
    lrs = [cfg.round_lr(r, 5) for r in range(5)]
    assert lrs[0] == pytest.approx(0.1) and cfg.round_lr(5, 5) == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_mfcl_l_ft_trains_the_head_only_and_l_kd_reads_the_old_head(ws):
    fed = _after_task0(MFCL, MFCLConfig(**TINY_MFCL).resolved(), ws, flops="off")
    fed.end_task(0)
    fed.start_task(1)
    client = fed.clients[0]
    assert client._replaying()
    batch = next(client.task.train.batches(8))
    terms = client.losses(batch)
    client.model.zero_grad()
    terms["ft"].backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in client.model.backbone.parameters())
    assert client.model.head.weight.grad.abs().sum() > 0
    with torch.no_grad():  # move the features off the old model's, else L_kd sits at its minimum
        client.model.backbone.proj.bias.add_(0.1)
    terms = client.losses(batch)
    client.model.zero_grad()
    terms["kd"].backward(retain_graph=True)  # through the frozen old head: reaches the backbone, not the head
    assert client.model.head.weight.grad is None or not client.model.head.weight.grad.any()
    assert any(p.grad is not None and p.grad.any() for p in client.model.backbone.parameters())
    client.model.zero_grad()
    terms["new"].backward()  # the real samples' new-class logits only
    g = client.model.head.weight.grad.abs().sum(1)
    assert all(g[k] == 0 for k in range(len(g)) if k not in set(client.task.classes))


# -- KD on the synthetic pool: the property ------------------------------------------------------------
KD_RUN = smoke_config(small_models="test_resnet", rounds_per_task="2", epochs="5", train_per_class="64",
                      test_per_class="32")


@pytest.mark.xfail(strict=True, reason=(
    "measured, not faithful-by-assumption: on this toy two-task run TARGET's KD (x25, T=2, old classes) on "
    "the synthetic pool leaves LESS old-task accuracy than KD off (about 0.41/0.23 vs 0.78/0.78 per client); "
    "the same happened with more synthesis (8 or 4x30 steps), with a CE-dominated generator, with real "
    "task-0 images as the pool, and with one joint forward of real and synthetic samples. Strict: the test "
    "fails the day the property starts to hold, so the note gets revisited. See docs in methods/target.py."))
def test_kd_on_the_synthetic_pool_leaves_more_old_task_accuracy_than_kd_off():
    ws = workspace(KD_RUN)
    old = {}
    for kd in (25.0, 0.0):
        cfg = TargetConfig(kd_weight=kd, syn_rounds=2, syn_iterations=10, syn_batch=32).resolved()
        res = federation(Target, cfg, ws, KD_RUN, flops="off").run()
        a = np.array(res.metrics["accuracy_matrix"], dtype=float)  # [client, after task, task]
        old[kd] = a[:, 1, 0].mean()
    assert old[25.0] > old[0.0] + 0.05

"""Data-free synthesis (fcl_bench/nn/datafree.py) and the TARGET and MFCL baselines: the BatchNorm-statistics
loss (falls during synthesis, hand-computed values, hooks gone afterwards), pool labels are the teacher's
predictions, the pool's bytes on the wire and a download encoded once, server seconds and FLOPs in the
accounting, MFCL's persistent generator, TARGET's new-class CE, MFCL's head-only L_ft and lr decay, and KD
against the same run without it on a toy with private classes only (TARGET on real old images and MFCL:
within the old classes; TARGET on its synthetic pool: within the old classes and, on the fixed seed, as the
benchmark scores it)."""

from __future__ import annotations

import dataclasses
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


# -- KD against no KD: the property ------------------------------------------------------------------
# A toy where forgetting is not hidden: private classes only (public=0), so no client learns another's old
# classes as its new ones (on the smoke split, client 0's task-2 class 95 is client 1's task-1 class and
# vice versa, so "KD off" kept its old accuracy through the other client's CE); 15 local epochs per round,
# so task 2 moves the backbone.
KD_RUN = smoke_config(small_models="test_resnet", private="4", public="0", server_per_class="0",
                      rounds_per_task="2", epochs="15", train_per_class="64", test_per_class="32")


def old_task_scores(fed) -> tuple[float, float]:
    """After task 2, mean over clients of the task-1 test accuracy (a) as the benchmark scores it, argmax
    over the client's seen classes, and (b) within the task-1 classes only (how well they are kept apart)."""
    res = fed.result()
    bench = np.array(res.metrics["accuracy_matrix"], dtype=float)[:, 1, 0].mean()
    within = []
    for c, client in fed.clients.items():
        cls = torch.as_tensor(fed.ws.scenario.seen_classes(c, 0))
        batch = next(fed.ws.test_view(c, 0).batches(10_000))
        with torch.no_grad():
            pred = cls[client.model.eval()(batch.x)[:, cls].argmax(1)]
        within.append((pred == batch.y).float().mean().item())
    return float(bench), float(np.mean(within))


def _target_scores(ws, kd: float) -> tuple[float, float]:
    # the default (offline) synthesis; with KD off the pool is never read, so a tiny one saves the time
    syn = {} if kd > 0 else TINY_TARGET
    fed = federation(Target, TargetConfig(kd_weight=kd, **syn).resolved(), ws, KD_RUN, flops="off")
    fed.run()
    return old_task_scores(fed)


@pytest.fixture(scope="module")
def kd_ws():
    return workspace(KD_RUN)


@pytest.fixture(scope="module")
def target_kd_off(kd_ws):
    """TARGET with ``kd_weight=0`` on the toy (a tiny pool is synthesised but never read)."""
    return _target_scores(kd_ws, 0.0)


def test_target_kd_on_real_old_images_keeps_the_old_classes_apart_better_than_kd_off(kd_ws, target_kd_off,
                                                                                     monkeypatch):
    """The KD itself (teacher, old-class slice, weight, the pool's uint8 path, client-side crop and flip and
    input pipeline), with a perfect pool: the server's synthesis returns the clients' real task-1 training
    images. Measured (seed 0): within the old classes 0.98 with KD vs 0.88 without; as the benchmark scores
    it (argmax over all seen classes) 0.65 vs 0.71 (without the crop and flip 0.78 vs 0.71, and on seeds 1
    and 2 0.64 vs 0.84 and 0.71 vs 0.69): TARGET's KD is a softmax over the old logits only and its CE one
    over the new logits only, so nothing ranks old against new classes, and most of the toy's forgetting is
    old images taken for new classes. Only (b) is asserted."""
    from fcl_bench.methods import target as M
    sc = kd_ws.scenario
    raw = dataclasses.replace(kd_ws.preprocess, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # [0, 1] images
    idx = np.concatenate([sc.train_indices[c][0] for c in range(sc.num_clients)])
    real = kd_ws.dataset.train.load(idx, raw)
    assert 0 <= real.min() and real.max() <= 1 and len(real) == 256
    monkeypatch.setattr(M.D, "synthesize_target", lambda *a, **k: (real, D.SynthesisReport(images=len(real))))
    bench_on, within_on = _target_scores(kd_ws, 25.0)
    bench_off, within_off = target_kd_off
    assert within_on > within_off + 0.05, (within_on, within_off)


def test_target_kd_on_the_synthetic_pool_leaves_more_old_task_accuracy_than_kd_off(kd_ws, target_kd_off):
    """TARGET as configured by default (offline constants: 2 synthesis rounds x 40 generator steps x 32
    images, about 30 s of CPU; the pool cropped and flipped on the client as the official loader does) with
    KD x25 on its pool against ``kd_weight=0``. Measured (seed 0): as the benchmark scores it 0.80 vs 0.71,
    within the old classes 0.95 vs 0.88 (new task 0.63 vs 0.79); with 10 steps per round instead of 40 the
    KD harms (0.56 vs 0.71, see methods/target.py). The within-old margin is the robust one: on seed 1 the KD keeps the old
    classes apart too (0.98 vs 0.95) but the benchmark's score goes the other way (0.59 vs 0.84), as it does
    with real old images (test above): TARGET's KD (old logits) and CE (new logits) never rank old against
    new classes. The benchmark's score also moves between machines of the same kind with the same code
    and seed (another 2-core x86-64 box: 0.67 vs 0.71): 15 local epochs amplify the last bits of the CPU
    kernels' results. Asserted: the within-old margin of 0.05 only."""
    _, within_on = _target_scores(kd_ws, 25.0)
    _, within_off = target_kd_off
    assert within_on > within_off + 0.05, (within_on, within_off)


MFCL_KD_RUN = smoke_config(small_models="test_resnet", private="4", public="0", server_per_class="0",
                           rounds_per_task="2", epochs="5", train_per_class="64", test_per_class="32")


def test_mfcl_kd_keeps_the_old_classes_apart_better_than_kd_off():
    """MFCL's L_kd (old head on the new and old features, real and synthetic samples) against
    ``kd_weight=0`` on the private-class toy (5 epochs: MFCL's lr 0.1 moves the backbone fast). Measured
    (seed 0): within the old classes 0.84 vs 0.66; as the benchmark scores it both forget everything
    (0.01 vs 0.12): with the offline generator, L_ft's replay does not keep old images out of the new
    classes. Only the within-old score is asserted."""
    ws = workspace(MFCL_KD_RUN)
    within = {}
    for kd in (0.1, 0.0):
        fed = federation(MFCL, MFCLConfig(kd_weight=kd).resolved(), ws, MFCL_KD_RUN, flops="off")
        fed.run()
        within[kd] = old_task_scores(fed)[1]
    assert within[0.1] > within[0.0] + 0.05, within

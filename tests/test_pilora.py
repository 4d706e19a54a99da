"""PILoRA: inference with the sum of every task's LoRA, the loss terms against hand values, the server's
prototype re-weighting, nearest-prototype predictions, what trains, and the bytes on the wire."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import federation, round_info, smoke_config, started, workspace
from safetensors.torch import save as st_save

from fcl_bench.methods.pilora import (
    SLOT_KEYS,
    PILoRA,
    PILoRAConfig,
    cosine_factor,
    dce_loss,
    fuse_prototypes,
    initial_slot,
    l1_loss,
    orthogonality_loss,
)
from fcl_bench.nn.averaging import N_KEY
from fcl_bench.nn.prototypes import prototype_distance, reweight_prototypes, reweight_weights

RUN = smoke_config()
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ws():
    w = workspace(RUN)
    w.ensure_foundation(progress=False)
    return w


def random_slot(dim: int, rank: int, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"lora.q.A": (rank, dim), "lora.q.B": (dim, rank), "lora.v.A": (rank, dim), "lora.v.B": (dim, rank)}
    return {k: scale * torch.randn(*s, generator=g) for k, s in shapes.items()}


def merged_reference(vit, slots, x: torch.Tensor) -> torch.Tensor:
    """CLS feature of a deep copy of the ViT whose block-0 qkv weight holds W + sum_s B_s A_s on q and v."""
    ref = copy.deepcopy(vit)
    d = ref.embed_dim
    with torch.no_grad():
        w = ref.blocks[0].attn.qkv.weight
        for s in slots:
            w[:d] += s["lora.q.B"] @ s["lora.q.A"]
            w[2 * d:] += s["lora.v.B"] @ s["lora.v.A"]
    return ref.forward_features(x)[:, 0]


# -- inference: the sum of all task LoRAs ---------------------------------------------------------------

def test_inference_uses_the_sum_of_every_task_lora(ws):
    c, fed = started(PILoRA, PILoRAConfig(), ws)
    d, r = c.dim, c.cfg.rank
    batch = next(fed.open_task(0, 0).train.batches(5))
    c.slots = [random_slot(d, r, seed=1)]
    c.receive(random_slot(d, r, seed=2), "round")  # the later task's slot
    feats = c.features(batch)
    torch.testing.assert_close(feats, merged_reference(c.vit, c.all_slots(), batch.x), **TOL)
    before = c.predict(batch)
    with torch.no_grad():
        c.current["lora.v.B"].mul_(3.0)  # change only the later task's LoRA
    after = c.predict(batch)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(c.features(batch), merged_reference(c.vit, c.all_slots(), batch.x), **TOL)
    # not task 0 alone
    assert (c.features(batch) - merged_reference(c.vit, c.slots, batch.x)).abs().max() > 1e-3


def test_initial_slot_is_kaiming_a_and_zero_b_so_the_model_starts_frozen(ws):
    c, fed = started(PILoRA, PILoRAConfig(), ws)
    slot = initial_slot(192, 4, seed=0, task=0)
    assert slot["lora.q.A"].shape == (4, 192) and slot["lora.q.B"].shape == (192, 4)
    assert torch.count_nonzero(slot["lora.q.B"]) == 0 and torch.count_nonzero(slot["lora.v.B"]) == 0
    bound = 192 ** -0.5  # kaiming_uniform(a=sqrt 5) on (r, d): U(-1/sqrt(d), 1/sqrt(d))
    assert 0.8 * bound < slot["lora.q.A"].abs().max() <= bound
    assert not torch.equal(slot["lora.q.A"], slot["lora.v.A"])
    assert not torch.equal(slot["lora.q.A"], initial_slot(192, 4, seed=0, task=1)["lora.q.A"])
    batch = next(fed.open_task(0, 0).train.batches(4))
    torch.testing.assert_close(c.features(batch), fed.ws.foundation.cls(batch.x), **TOL)


# -- the loss ---------------------------------------------------------------------------------------------

def test_orthogonality_and_l1_losses_equal_hand_values():
    cur = {"lora.q.A": torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]),
           "lora.v.A": torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, -1.0]])}
    old = [{"lora.q.A": torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]]),
            "lora.v.A": torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])},
           {"lora.q.A": torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
            "lora.v.A": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])}]
    # A_q^0 (A_q)^T = [[1, -1], [6, 3]] -> 11; A_v^0 (A_v)^T = [[1, 2], [0.5, -1]] -> 4.5
    # A_q^1 (A_q)^T = [[2, 1], [1, 0]] -> 4;   A_v^1 = 0 -> 0
    assert orthogonality_loss(old, cur).item() == pytest.approx(11 + 4.5 + 4 + 0)
    assert orthogonality_loss([], cur).item() == 0.0
    assert l1_loss(cur).item() == pytest.approx(5.0 + 3.0)


def test_distance_and_dce_loss_equal_hand_values():
    f = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
    d = prototype_distance(f, c)
    expected = torch.tensor([[5.0, 4.0, 0.0], [0.0, 3.0, 5.0]]) / math.sqrt(2)
    torch.testing.assert_close(d, expected, atol=1e-5, rtol=0)  # 0 -> sqrt(1e-12 / 1) guard, tiny
    assert torch.isfinite(torch.autograd.functional.jacobian(lambda x: prototype_distance(x, c), f)).all()
    y = torch.tensor([2, 1])
    ce = (-torch.log_softmax(-expected, 1)[[0, 1], [2, 1]]).mean()
    pull = (expected[0, 2] + expected[1, 1]) / 2
    assert dce_loss(expected, y, 1.0, 0.001).item() == pytest.approx((ce + 0.001 * pull).item(), rel=1e-6)
    ce_t = (-torch.log_softmax(-expected / 2.0, 1)[[0, 1], [2, 1]]).mean()
    assert dce_loss(expected, y, 2.0, 0.0).item() == pytest.approx(ce_t.item(), rel=1e-6)


def test_cosine_schedule_over_rounds():
    assert cosine_factor(0, 4) == 1.0
    assert cosine_factor(2, 4) == pytest.approx(0.5)
    assert cosine_factor(1, 4) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


# -- the server's re-weighting --------------------------------------------------------------------------

def test_reweighting_on_a_hand_example():
    protos = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    means = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    # D = [1 + 2, 0 + 1, 3 + 2] = [3, 1, 5]; s = 1/D = [1/3, 1, 1/5]; min-max -> [(1/3 - 1/5) / (4/5), 1, 0]
    s = torch.tensor([(1 / 3 - 1 / 5) / (4 / 5), 1.0, 0.0], dtype=torch.float64)
    w = torch.exp(s / 0.2) / torch.exp(s / 0.2).sum()
    torch.testing.assert_close(reweight_weights(protos, means, 0.2), w)
    torch.testing.assert_close(reweight_prototypes(protos, means, 0.2), (w[:, None] * protos).sum(0))
    assert w[1] > w[0] > w[2]  # the prototype closest to the clients' means weighs most


def test_reweighting_guards_division_by_zero():
    means = torch.tensor([[0.0, 0.0]])
    equal = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # all distances equal: max == min
    torch.testing.assert_close(reweight_weights(equal, means), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(reweight_prototypes(equal, means), equal.mean(0))
    one = torch.tensor([[2.0, 3.0]])
    torch.testing.assert_close(reweight_prototypes(one, means), one[0])
    exact = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # D_0 = 0: finite, and the exact one wins
    w = reweight_weights(exact, means)
    assert torch.isfinite(w).all() and w[0] > w[1]
    torch.testing.assert_close(reweight_prototypes(equal, None), equal.mean(0))  # no class mean: plain mean


def test_server_averages_slots_by_n_k_and_fuses_each_class(ws):
    fed = federation(PILoRA, PILoRAConfig(), ws)
    fed.start_task(0)
    server, sc = fed.server, ws.scenario
    d = server.dim
    tasks = {c: sc.client_tasks[c][0] for c in range(sc.num_clients)}
    uploads = {}
    for c in range(sc.num_clients):
        n = len(tasks[c])
        g = torch.Generator().manual_seed(10 + c)
        uploads[c] = {**random_slot(d, 4, seed=20 + c), "protos": torch.randn(n, d, generator=g),
                      "means": torch.randn(n, d, generator=g), "counts": torch.tensor([3] * (n - 1) + [0]),
                      N_KEY: torch.tensor([10 * (c + 1)])}
    before = server.protos.clone()
    down = server.aggregate(uploads, round_info(participants=tuple(uploads)))
    wsum = sum(10 * (c + 1) for c in uploads)
    for k in SLOT_KEYS:
        expected = sum(uploads[c][k] * 10 * (c + 1) for c in uploads) / wsum
        torch.testing.assert_close(down[0][k], expected, **TOL)
    expected_table = fuse_prototypes(before, uploads, tasks, 0.2)
    torch.testing.assert_close(down[1]["protos"], expected_table)
    for k in set(range(sc.num_classes)) - {k for t in tasks.values() for k in t}:
        assert torch.equal(down[0]["protos"][k], before[k])  # classes of no upload unchanged
    k = tasks[0][0]
    holders = [c for c in uploads if k in tasks[c]]
    protos = torch.stack([uploads[c]["protos"][tasks[c].index(k)] for c in holders])
    means = torch.stack([uploads[c]["means"][tasks[c].index(k)] for c in holders
                         if uploads[c]["counts"][tasks[c].index(k)] > 0])
    torch.testing.assert_close(down[0]["protos"][k], reweight_prototypes(protos, means).float())


# -- the client: nearest prototype, what trains ---------------------------------------------------------

def test_predictions_are_the_nearest_prototype(ws):
    c, fed = started(PILoRA, PILoRAConfig(), ws)
    c.receive(random_slot(c.dim, 4, seed=3), "round")
    batch = next(fed.open_task(0, 0).train.batches(8))
    feats = c.features(batch)
    g = torch.Generator().manual_seed(0)
    c.protos = feats[torch.randint(0, len(feats), (c.num_classes,), generator=g)] + \
        0.3 * torch.randn(c.num_classes, c.dim, generator=g)
    logits = c.predict(batch)
    assert logits.shape == (len(batch), c.num_classes) and torch.isfinite(logits).all()
    nearest = torch.cdist(feats.double(), c.protos.double()).argmin(1)
    assert torch.equal(logits.argmax(1), nearest)
    torch.testing.assert_close(-logits, torch.cdist(feats, c.protos) / math.sqrt(c.dim), **TOL)


def test_only_the_current_slot_and_current_prototypes_train(ws):
    c, fed = started(PILoRA, PILoRAConfig(lora_lr=1e-3), ws)
    c.slots = [random_slot(c.dim, 4, seed=5)]  # as if a task were done
    old = {k: v.clone() for k, v in c.slots[0].items()}
    with torch.no_grad():
        c.current["lora.q.B"].add_(0.01)  # B != 0 so A gets gradient from the CE too
    cur_before = {k: v.detach().clone() for k, v in c.current.items()}
    protos_before = c.protos.clone()
    up = c.train_round(round_info())
    assert all(torch.equal(c.slots[0][k], old[k]) for k in old)
    assert all(not torch.equal(c.current[k], cur_before[k]) for k in SLOT_KEYS)
    cur = c.task.classes
    others = sorted(set(range(c.num_classes)) - set(cur))
    assert torch.equal(c.protos[others], protos_before[others])
    assert (c.protos[cur] - protos_before[cur]).abs().amax(1).min() > 0
    torch.testing.assert_close(up["protos"], c.protos[cur])
    # the class means are the means of the round's training features, with their counts
    assert int(up["counts"].sum()) == len(c.task.train) * fed.run_cfg.epochs
    assert up[N_KEY].item() == len(c.task.train)


# -- the wire ---------------------------------------------------------------------------------------------

def test_bytes_per_client_round_equal_the_methods_formula(ws):
    res = federation(PILoRA, PILoRAConfig(), ws, flops="off").run()
    sc, d, r = ws.scenario, ws.foundation.embed_dim, 4
    C = sc.num_classes
    slot = {"lora.q.A": (r, d), "lora.q.B": (d, r), "lora.v.A": (r, d), "lora.v.B": (d, r)}
    rounds = res.rounds[res.rounds.phase == "round"]
    assert len(rounds) > 0
    for row in rounds.itertuples():
        n_cur = len(sc.client_tasks[row.client][row.task])
        up = {**{k: torch.zeros(s) for k, s in slot.items()}, "protos": torch.zeros(n_cur, d),
              "means": torch.zeros(n_cur, d), "counts": torch.zeros(n_cur, dtype=torch.int64),
              N_KEY: torch.zeros(1, dtype=torch.int64)}
        down = {**{k: torch.zeros(s) for k, s in slot.items()}, "protos": torch.zeros(C, d)}
        assert row.bytes_up == len(st_save(up)) and row.bytes_down == len(st_save(down))
        # METHODS.md: up 4 d r + d (current + local classes) floats, down 4 d r + d C floats (+ headers, and
        # the int64 counts and n_k going up)
        floats_up = 4 * d * r + d * (n_cur + n_cur)
        assert floats_up == sum(int(np.prod(v.shape)) for k, v in up.items() if v.is_floating_point())
        assert 4 * d * r + d * C == sum(int(np.prod(v.shape)) for v in down.values())
        assert 0 < row.bytes_up - 4 * floats_up < 1024  # only the headers and the int64 counts and n_k
    manifest = res.metrics["wire"]["client_uploads"]["0"]
    assert set(manifest) == set(slot) | {"protos", "means", "counts", N_KEY}

"""LoRM (methods/lorm.py) and the closed forms it stands on (fcl_bench/nn/regmean.py).

The closed forms are checked against least-squares problems solved independently (``torch.linalg.lstsq``
on the stacked, Kronecker-expanded systems); the method against its mechanisms: A re-initialised and
broadcast, B = 0 at task start, the alternation of trained factors with the other factor bitwise unchanged,
the cross-task merge of one client and one task returning that client's model, and every uploaded tensor
(Grams included) counted on the wire.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import federation, round_info, smoke_config, workspace
from safetensors.torch import save as st_save

from fcl_bench.config import ConfigError, apply_overrides
from fcl_bench.methods.lorm import LoRM, LoRMConfig, lora_layers, trained_factor
from fcl_bench.nn.averaging import N_KEY
from fcl_bench.nn.regmean import gram, merge_b, merge_head, merge_tasks, regmean, soften

F64 = torch.float64
TOL = dict(atol=1e-9, rtol=1e-9)


def rnd(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def root(G: torch.Tensor) -> torch.Tensor:
    """Some ``X~`` with ``X~^T X~ = G`` (rows of pseudo-inputs), from an eigendecomposition."""
    if G.dim() == 1:
        return torch.diag(G.sqrt())
    w, V = torch.linalg.eigh(G)
    return (V * w.clamp_min(0).sqrt()).T


def lstsq(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(X, Y, driver="gelsd").solution  # the minimum-norm solution


def softened_grams(alpha: float, d: int, n: int = 9, clients: int = 3, seed: int = 0) -> list[torch.Tensor]:
    return [soften(gram(rnd(n, d, seed=seed + i)), alpha) for i in range(clients)]


# -- closed forms vs independent least squares ---------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_a_round_equals_least_squares_on_the_stacked_outputs(alpha):
    d_in, d_out, r = 5, 4, 2
    grams = softened_grams(alpha, d_in)
    B = rnd(d_out, r, seed=10)                       # shared, full column rank
    As = [rnd(r, d_in, seed=20 + i) for i in range(3)]
    # min_A sum_i ||X~_i A^T B^T - X~_i A_i^T B^T||^2 ; vec(X A^T B^T) = (B kron X) vec(A^T) (column-major)
    rows = [torch.kron(B, root(G)) for G in grams]
    rhs = [(root(G) @ A.T @ B.T).T.reshape(-1) for G, A in zip(grams, As)]
    vecAt = lstsq(torch.cat(rows), torch.cat(rhs)[:, None])[:, 0]
    A_ref = vecAt.reshape(r, d_in)                   # column-major vec of A^T (d_in, r) = rows of A
    torch.testing.assert_close(regmean(As, grams), A_ref, **TOL)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_b_round_equals_least_squares_on_the_stacked_outputs(alpha):
    d_in, d_out, r = 6, 4, 2
    grams = softened_grams(alpha, d_in, seed=3)
    A = rnd(r, d_in, seed=11)                        # shared
    Bs = [rnd(d_out, r, seed=30 + i) for i in range(3)]
    Z = [root(G) @ A.T for G in grams]               # the pseudo-inputs of B
    Bt = lstsq(torch.cat(Z), torch.cat([z @ B.T for z, B in zip(Z, Bs)]))
    torch.testing.assert_close(merge_b(Bs, A, grams), Bt.T, **TOL)


def test_head_equals_least_squares_and_the_bias_is_the_count_weighted_mean():
    d, C = 5, 7
    grams = softened_grams(0.5, d, seed=5)
    Ws = [rnd(C, d, seed=40 + i) for i in range(3)]
    bs = [rnd(C, seed=50 + i) for i in range(3)]
    X = [root(G) for G in grams]
    W_ref = lstsq(torch.cat(X), torch.cat([x @ W.T for x, W in zip(X, Ws)])).T
    W, b = merge_head(Ws, bs, grams, [1, 2, 5])
    torch.testing.assert_close(W, W_ref, **TOL)
    torch.testing.assert_close(b, (bs[0] + 2 * bs[1] + 5 * bs[2]) / 8, **TOL)


def test_head_falls_back_to_the_pseudo_inverse_when_the_gram_sum_is_singular():
    d, C = 6, 3
    X = [rnd(2, d, seed=60 + i) for i in range(2)]  # rank 4 < 6
    grams = [gram(x) for x in X]
    Ws = [rnd(C, d, seed=70 + i) for i in range(2)]
    W_ref = lstsq(torch.cat(X), torch.cat([x @ W.T for x, W in zip(X, Ws)])).T
    W, _ = merge_head(Ws, [torch.zeros(C, dtype=F64)] * 2, grams, [1, 1])
    torch.testing.assert_close(W, W_ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_rank_deficient_regmean_is_the_minimum_norm_solution(alpha):
    d, m = 6, 3
    X = [rnd(2, d, seed=80 + i) for i in range(2)]  # rank 4 < 6
    grams = [soften(gram(x), alpha) for x in X]
    if alpha == 0.0:
        grams = [g * torch.tensor([1, 1, 0, 1, 1, 1], dtype=F64) for g in grams]  # an input never active
        X = [root(G) for G in grams]
    Ws = [rnd(m, d, seed=90 + i) for i in range(2)]
    ref = lstsq(torch.cat(X), torch.cat([x @ W.T for x, W in zip(X, Ws)])).T
    torch.testing.assert_close(regmean(Ws, grams), ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_task_merge_equals_least_squares_and_its_factors_give_the_update(alpha):
    d_in, d_out = 5, 4
    ranks = [1, 2, 2]
    grams = softened_grams(alpha, d_in, seed=7)
    Bs = [rnd(d_out, r, seed=100 + t) for t, r in enumerate(ranks)]
    As = [rnd(r, d_in, seed=110 + t) for t, r in enumerate(ranks)]
    X = [root(G) for G in grams]
    dW_ref = lstsq(torch.cat(X), torch.cat([x @ (B @ A).T for x, B, A in zip(X, Bs, As)])).T
    a_all, b_all = merge_tasks(Bs, As, grams)
    assert a_all.shape == (sum(ranks), d_in) and b_all.shape == (d_out, sum(ranks))
    torch.testing.assert_close(b_all @ a_all, dW_ref, **TOL)


def test_the_merge_of_one_task_and_one_client_is_that_clients_update():
    B, A = rnd(4, 2, seed=1), rnd(2, 5, seed=2)
    for G in (gram(rnd(9, 5, seed=3)), gram(rnd(9, 5, seed=3), diagonal=True)):
        a_all, b_all = merge_tasks([B], [A], [G])
        torch.testing.assert_close(b_all @ a_all, B @ A, **TOL)
        assert torch.equal(b_all, B)


def test_soften_keeps_the_diagonal_and_scales_the_rest():
    G = gram(rnd(7, 4, seed=0))
    half = soften(G, 0.5)
    torch.testing.assert_close(torch.diagonal(half), torch.diagonal(G))
    off = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(half[off], 0.5 * G[off])
    assert torch.equal(soften(G, 0.0), torch.diagonal(G)) and soften(G, 1.0) is G
    torch.testing.assert_close(gram(rnd(3, 2, 4, seed=1), diagonal=True), (rnd(3, 2, 4, seed=1) ** 2).sum((0, 1)))


# -- the method ------------------------------------------------------------------------------------

RUN = smoke_config(rounds_per_task="3")


@pytest.fixture(scope="module")
def ws():
    w = workspace(RUN)
    w.ensure_foundation(progress=False)
    return w


def test_rounds_alternate_b_a_b_starting_with_b():
    assert [trained_factor(r) for r in range(5)] == ["B", "A", "B", "A", "B"]


def test_named_defaults_and_explicit_overrides():
    assert (LoRMConfig().resolved().rank, LoRMConfig().resolved().lr) == (1, 3e-3)
    c = apply_overrides(LoRMConfig(), {"defaults": "beta0.1"}, "lorm").resolved()
    assert (c.rank, c.lr, c.lr_a, c.lr_b, c.weight_decay) == (16, 3e-4, 3e-4, 3e-4, 0.0)
    c = apply_overrides(LoRMConfig(), {"rank": "4", "defaults": "beta0.1", "lr_a": "1e-2"}, "lorm").resolved()
    assert (c.rank, c.lr, c.lr_a, c.lr_b) == (4, 3e-4, 1e-2, 3e-4)
    with pytest.raises((ConfigError, ValueError), match="defaults"):
        apply_overrides(LoRMConfig(), {"defaults": "beta0.3"}, "lorm").resolved()
    with pytest.raises(ConfigError, match="alpha_head"):
        LoRMConfig(alpha_head=1.5).validate()


def _factors(fed, c: int, which: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in getattr(fed.clients[c], which).items()}


def test_a_is_broadcast_b_is_zero_and_each_round_keeps_the_other_factor_bitwise(ws):
    fed = federation(LoRM, LoRMConfig(), ws, RUN)
    fed.start_task(0)
    A0 = _factors(fed, 0, "A")
    for c in fed.clients:
        assert all(torch.equal(A0[k], v) for k, v in fed.clients[c].A.items())  # one broadcast A
        assert all(not v.any() for v in fed.clients[c].B.values())             # B = 0
    assert all(v.abs().max() > 0 for v in A0.values())
    for r, which in enumerate(["B", "A", "B"]):
        other = "A" if which == "B" else "B"
        before = {c: (_factors(fed, c, which), _factors(fed, c, other)) for c in fed.clients}
        fed.run_round(0, r)
        for c in fed.clients:
            trained, kept = before[c]
            assert all(torch.equal(kept[k], v) for k, v in getattr(fed.clients[c], other).items()), (r, c)
            assert any(not torch.equal(trained[k], v) for k, v in getattr(fed.clients[c], which).items()), (r, c)
    fed.end_task(0)
    fed.start_task(1)  # a new task: a fresh A for everyone, B back to 0
    A1 = _factors(fed, 0, "A")
    assert all(not torch.equal(A1[k], A0[k]) for k in A0)
    for c in fed.clients:
        assert all(torch.equal(A1[k], v) for k, v in fed.clients[c].A.items())
        assert all(not v.any() for v in fed.clients[c].B.values())


def test_one_client_one_task_merged_model_predicts_like_the_clients_own(ws):
    fed = federation(LoRM, LoRMConfig(), ws, RUN)
    fed.start_task(0)
    client, server = fed.clients[0], fed.server
    info = round_info(rounds=1, participants=(0,))
    up = client.train_round(info)
    down = server.aggregate({0: up}, info)
    own = {k: (client.A[k], client.B[k]) for k in client.layers}
    client.receive(down[0], "round")
    for k, (_, B) in own.items():  # one client: the closed-form B is its own (A G A^T is invertible)
        torch.testing.assert_close(client.B[k], B, atol=1e-5, rtol=1e-4)
    client.receive(server.end_task(0)[0], "end")
    for k, (A, B) in own.items():
        a_all, b_all = client.merged[k]
        torch.testing.assert_close(b_all @ a_all, B @ A, atol=1e-6, rtol=1e-4)
    data = fed.ws.test_view(0, 0)
    batch = data.batch(list(range(min(8, len(data)))))
    with fed.client_envs[0].features.open_test():
        merged = client.predict(batch)
        client.merged = {}
        mine = client.predict(batch)
    torch.testing.assert_close(merged, mine, atol=1e-4, rtol=1e-4)


def test_every_upload_and_download_is_counted_on_the_wire_grams_included(ws):
    fed = federation(LoRM, LoRMConfig(), ws, RUN)
    res = fed.run()
    vit = ws.foundation.vit
    layers = lora_layers(vit)
    d, C, r = vit.embed_dim, ws.scenario.num_classes, 1
    z = torch.zeros
    head = {"head.weight": z(C, d), "head.bias": z(C)}
    both = {**{f"lora.{k}.A": z(r, di) for k, (_, di, _) in layers.items()},
            **{f"lora.{k}.B": z(do, r) for k, (_, _, do) in layers.items()}}
    grams = {f"gram.{k}": z(di) for k, (_, di, _) in layers.items()}  # alpha_backbone = 0: diagonals
    grams["gram.head"] = z(d, d)                                       # alpha_head = 0.5: full
    n = {N_KEY: z(1, dtype=torch.int64)}

    def up(which: str) -> int:
        return len(st_save({**{k: v for k, v in both.items() if k.endswith("." + which)}, **head, **grams, **n}))

    rows = res.rounds
    rounds = rows[rows.phase == "round"]
    assert len(rounds) == fed.T * fed.R * fed.K
    for _, row in rounds.iterrows():
        assert row.bytes_up == up(trained_factor(int(row["round"]))), row
        assert row.bytes_down == len(st_save({**both, **head}))
    assert (up("A") - up("B")) != 0  # the alternation shows on the wire
    gram_bytes = 4 * (sum(di for _, di, _ in layers.values()) + d * d)
    assert up("B") - len(st_save({**{k: v for k, v in both.items() if k.endswith(".B")}, **head, **n})) >= gram_bytes
    for _, row in rows[rows.phase == "start"].iterrows():
        a_only = {k: v for k, v in both.items() if k.endswith(".A")}
        assert row.bytes_down == len(st_save({**a_only, **head} if row.task == 0 else a_only))
    for _, row in rows[rows.phase == "end_task"].iterrows():
        t = int(row.task) + 1  # the merged factors of tasks 0..t-1: rank t r
        assert row.bytes_down == len(st_save({**{f"merged.{k}.A": z(t * r, di) for k, (_, di, _) in layers.items()},
                                              **{f"merged.{k}.B": z(do, t * r) for k, (_, _, do) in layers.items()}}))
    manifest = res.metrics["wire"]["client_uploads"]["0"]
    assert manifest["gram.head"]["shape"] == [d, d] and manifest["gram.0.fc2"]["shape"] == [4 * d]


def test_full_backbone_grams_when_alpha_backbone_is_positive(ws):
    run = dataclasses.replace(RUN, rounds_per_task=1)
    res = federation(LoRM, LoRMConfig(alpha_backbone=0.5), ws, run).run()
    manifest = res.metrics["wire"]["client_uploads"]["0"]
    d = ws.foundation.vit.embed_dim
    assert manifest["gram.0.fc2"]["shape"] == [4 * d, 4 * d]
    assert 0.0 <= res.metrics["final_acc"] <= 1.0

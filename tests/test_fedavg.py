"""FedAvg and FedProx: a smoke run, exact bytes on the wire, what leaves a client, the server's initial
broadcast, FedProx(mu=0) == FedAvg, BatchNorm statistics local or averaged, and the n_k-weighted average
against a hand computation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import federation, round_info, smoke_config, workspace
from safetensors.torch import save as st_save

from fcl_bench.methods.fedavg import Classifier, FedAvg, FedAvgConfig
from fcl_bench.methods.fedprox import FedProx, FedProxConfig
from fcl_bench.nn.averaging import N_KEY, AveragingServer, bn_stats, weighted_average
from fcl_bench.nn.small import build_small_model

ARCH, WIDTH = "test_resnet", 64
# batch 8: several local steps per round (with one step, w equals FedProx's anchor and the term is 0)
RUN = smoke_config(small_models=ARCH, small_width=str(WIDTH), batch_size="8")


@pytest.fixture(scope="module")
def ws():
    return workspace(RUN)


@pytest.fixture(scope="module")
def runs(ws) -> dict:
    """name -> (RunResult, {client id: client}) for FedAvg, FedProx(mu=0) and FedProx(mu=1), same seed."""
    out = {}
    for name, cls, cfg in [("fedavg", FedAvg, FedAvgConfig()), ("prox0", FedProx, FedProxConfig(mu=0.0)),
                           ("prox1", FedProx, FedProxConfig(mu=1.0))]:
        fed = federation(cls, cfg, ws, RUN, flops="off")
        out[name] = (fed.run(), dict(fed.clients))
    return out


def _fresh_params(ws) -> dict[str, torch.Tensor]:
    """The trainable parameters of a freshly built FedAvg model, by name (built here, not by the run)."""
    model = Classifier(build_small_model(ARCH, WIDTH), WIDTH, ws.scenario.num_classes)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_smoke_run_completes_with_sane_metrics(runs, ws):
    result, _ = runs["fedavg"]
    m, T, K = result.metrics, ws.scenario.num_tasks, ws.scenario.num_clients
    assert len(m["acc"]) == T and 0.0 <= m["final_acc"] <= 1.0
    assert len(m["accuracy_matrix"]) == K and all(len(row) == T for row in m["accuracy_matrix"][0])
    rounds = result.rounds[result.rounds.phase == "round"]
    assert len(rounds) == T * RUN.rounds_per_task * K
    assert (rounds.train_samples > 0).all() and (rounds.trainable_params > 0).all()


def test_bytes_per_round_are_the_safetensors_size_of_the_trainable_parameters(runs, ws):
    params = _fresh_params(ws)
    up = len(st_save({**params, N_KEY: torch.tensor([123], dtype=torch.int64)}))
    down = len(st_save(params))
    raw = sum(p.numel() * p.element_size() for p in params.values())
    assert raw < down < raw + 200 * len(params)  # tensor bytes plus a JSON header (names, shapes, offsets)
    rounds = runs["fedavg"][0].rounds
    rounds = rounds[rounds.phase == "round"]
    assert set(rounds.bytes_up) == {up}
    assert set(rounds.bytes_down) == {down}
    assert runs["fedavg"][0].metrics["bytes_up"] == up * len(rounds)


def test_only_trainable_small_model_parameters_leave_a_client(runs, ws):
    params = _fresh_params(ws)
    fm_names = set(ws.foundation.vit.state_dict()) if ws.foundation is not None else set()
    uploads = runs["fedavg"][0].metrics["wire"]["client_uploads"]
    assert set(uploads) == {str(c) for c in range(ws.scenario.num_clients)}
    for manifest in uploads.values():
        assert set(manifest) == set(params) | {N_KEY}
        assert not any(name == f or name.endswith("." + f) for name in manifest for f in fm_names)
        assert not any("running_" in name or "num_batches_tracked" in name for name in manifest)
        assert all(manifest[n]["shape"] == list(p.shape) for n, p in params.items())


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(runs):
    (avg, avg_clients), (prox, prox_clients) = runs["fedavg"], runs["prox0"]
    assert prox.metrics["spaces"] == avg.metrics["spaces"]
    assert prox.metrics["accuracy_matrix"] == avg.metrics["accuracy_matrix"]
    for c in avg_clients:
        a, p = avg_clients[c].model.state_dict(), prox_clients[c].model.state_dict()
        assert a.keys() == p.keys()
        assert all(torch.equal(a[k], p[k]) for k in a), f"client {c} differs"


def test_fedprox_with_mu_positive_differs(runs):
    avg, prox = runs["fedavg"][1][0].model.state_dict(), runs["prox1"][1][0].model.state_dict()
    assert not all(torch.equal(avg[k], prox[k]) for k in avg)


def test_after_the_last_round_every_client_holds_the_same_global_weights(runs):
    clients = runs["fedavg"][1]
    ref = {n: p for n, p in clients[0].model.named_parameters()}
    for c in clients.values():
        assert all(torch.equal(p, ref[n]) for n, p in c.model.named_parameters())


def test_clients_start_from_the_server_broadcast_of_w0_counted_on_the_wire(ws):
    fed = federation(FedAvg, FedAvgConfig(), ws, RUN)
    built = [{k: v.clone() for k, v in c.model.state_dict().items()} for c in fed.clients.values()]
    assert not all(torch.equal(built[0][k], built[1][k]) for k in built[0])  # built independently ...
    state = torch.random.get_rng_state()
    fed.start_task(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the server draws w_0 on a forked RNG
    a, b = fed.clients[0].model.state_dict(), fed.clients[1].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "running_" not in k)  # ... and start from one w_0
    w0 = fed.server.global_state
    assert all(torch.equal(a[k], w0[k]) for k in w0)
    start = [r for r in fed.tally.rows if r["phase"] == "start"]
    assert [r["client"] for r in start] == list(fed.clients)
    assert all(r["bytes_down"] == len(st_save(dict(w0))) for r in start)
    server_row = [r for r in fed.tally.rows if r["phase"] == "server_start"][0]
    assert server_row["server_bytes_sent"] == 2 * len(st_save(dict(w0))) and server_row["bytes_down"] == 0


@pytest.mark.parametrize("average", [False, True])
def test_batchnorm_statistics_stay_local_unless_averaged(ws, average):
    fed = federation(FedAvg, FedAvgConfig(average_bn_stats=average), ws, RUN)
    fed.start_task(0)
    info = round_info(participants=(0, 1))
    up = fed.clients[0].train_round(info)
    stats = bn_stats(fed.clients[0].model)
    assert stats and (set(stats) <= set(up)) == average  # running statistics travel only when averaged
    fed.clients[1].train_round(info)
    fed.clients[0].start_task(fed.open_task(0, 0))
    fed.run_round(0, 0)
    s0, s1 = bn_stats(fed.clients[0].model), bn_stats(fed.clients[1].model)
    same = all(torch.equal(s0[k], s1[k]) for k in s0)
    assert same == average


def test_weighted_average_matches_a_hand_computation():
    states = [{"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([[0.5]], dtype=torch.bfloat16),
               "n": torch.tensor([2])},
              {"w": torch.tensor([4.0, 8.0]), "h": torch.tensor([[1.5]], dtype=torch.bfloat16),
               "n": torch.tensor([5])}]
    avg = weighted_average(states, [10, 30])  # n_k = 10 and 30
    assert torch.allclose(avg["w"], torch.tensor([(10 * 1 + 30 * 4) / 40, (10 * 2 + 30 * 8) / 40]))
    assert avg["h"].dtype == torch.bfloat16 and avg["h"].item() == 1.25
    assert avg["n"].item() == 4  # 4.25 rounded to the nearest integer, dtype kept
    assert torch.equal(weighted_average(states[:1], [7])["w"], states[0]["w"])


@pytest.mark.parametrize("states, weights, problem", [
    ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [1, 1], "different tensors"),
    ([{"w": torch.zeros(2)}, {"w": torch.zeros(1)}], [1, 1], "other shapes"),
    ([{"w": torch.zeros(2)}], [0], "positive"),
    ([{"w": torch.zeros(2)}], [1, 2], "1 states but 2 weights"),
    ([], [], "nothing to average"),
])
def test_weighted_average_rejects_mismatched_inputs(states, weights, problem):
    with pytest.raises(ValueError, match=problem):
        weighted_average(states, weights)


def test_averaging_server_weights_by_the_uploaded_sample_counts():
    uploads = {0: {"w": torch.tensor([0.0, 3.0]), N_KEY: torch.tensor([1])},
               2: {"w": torch.tensor([4.0, 7.0]), N_KEY: torch.tensor([3])}}
    env = SimpleNamespace(scenario=SimpleNamespace(num_clients=3), device=torch.device("cpu"))
    server = AveragingServer(env)
    downloads = server.aggregate(uploads, round_info(participants=(0, 2)))
    assert set(downloads) == {0, 1, 2}  # client 1 sat the round out; it gets the new global model too
    for d in downloads.values():
        assert set(d) == {"w"} and torch.equal(d["w"], torch.tensor([3.0, 6.0]))


# -- training sets that leave one sample over -------------------------------------------------------

def _client_on(ws, n: int, logs: list[str]):
    import dataclasses

    fed = federation(FedAvg, FedAvgConfig(), ws, RUN, log=logs.append)
    fed.start_task(0)
    client = fed.clients[0]
    task = client.task
    client.start_task(dataclasses.replace(task, train=task.train.subset(range(n))))
    return client


def _bn_stats(model) -> list[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


def test_a_training_set_of_batch_size_plus_one_trains_in_batchnorm_train_mode(ws):
    logs: list[str] = []
    c = _client_on(ws, RUN.batch_size + 1, logs)
    before = _bn_stats(c.model)
    c.train_round(round_info())  # without folding, the last batch holds one sample and BatchNorm raises
    assert any(not torch.equal(a, b) for a, b in zip(before, _bn_stats(c.model)))
    assert not logs


def test_a_training_set_of_one_sample_runs_batchnorm_in_eval_mode_and_says_so_once(ws):
    logs: list[str] = []
    c = _client_on(ws, 1, logs)
    before = _bn_stats(c.model)
    weights = {k: v.clone() for k, v in c.model.state_dict().items() if "head" in k}
    for _ in range(2):
        c.train_round(round_info())
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(c.model)))   # running stats untouched
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in weights.items())  # but it trained
    assert c.model.training and all(m.training for m in c.model.modules())        # modes restored
    assert len(logs) == 1 and "one sample" in logs[0] and "BatchNorm" in logs[0]


def test_total_bytes_count_every_message_once(runs, ws):
    result = runs["fedavg"][0]
    r = result.rounds
    params = _fresh_params(ws)
    down = len(st_save(params))
    K, T, R = ws.scenario.num_clients, ws.scenario.num_tasks, RUN.rounds_per_task
    assert result.metrics["bytes_down"] == down * K * (1 + T * R)  # w_0 once, then every round
    assert r.loc[r.client == -1, "server_bytes_sent"].sum() == result.metrics["bytes_down"]

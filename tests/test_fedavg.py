"""FedAvg and FedProx: a smoke run, exact bytes on the wire, what leaves a client, FedProx(mu=0) == FedAvg,
and the n_k-weighted average against a hand computation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as st_save

from fcl_bench.config import apply_overrides, preset
from fcl_bench.federation import Workspace, build_env, run_method
from fcl_bench.methods.fedavg import N_KEY, AveragingServer, Classifier, FedAvg, FedAvgConfig
from fcl_bench.methods.fedprox import FedProx, FedProxConfig
from fcl_bench.nn.averaging import weighted_average
from fcl_bench.nn.small import build_small_model

ARCH, WIDTH = "test_resnet", 64


@pytest.fixture(scope="module")
def ws() -> Workspace:
    # batch 8: several local steps per round (with one step, w equals FedProx's anchor and the term is 0)
    cfg = apply_overrides(preset("smoke"), {"foundation_pretrained": "false", "small_models": ARCH,
                                            "small_width": str(WIDTH), "device": "cpu", "batch_size": "8"}, "run")
    return Workspace.create(cfg, progress=False)


def _spy(cls):
    """``cls`` that remembers its clients, to read their final weights after the run."""

    class Spy(cls):
        made: dict = {}

        def client(self, client_id):
            Spy.made[client_id] = super().client(client_id)
            return Spy.made[client_id]

    return Spy


@pytest.fixture(scope="module")
def runs(ws) -> dict:
    """name -> (RunResult, {client id: client}) for FedAvg, FedProx(mu=0) and FedProx(mu=1), same seed."""
    out = {}
    for name, cls, cfg in [("fedavg", FedAvg, FedAvgConfig()), ("prox0", FedProx, FedProxConfig(mu=0.0)),
                           ("prox1", FedProx, FedProxConfig(mu=1.0))]:
        spy = _spy(cls)
        result = run_method(spy, cfg, ws, log=lambda line: None, progress=False, flops="off")
        out[name] = (result, dict(spy.made))
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
    assert len(rounds) == T * ws.cfg.rounds_per_task * K
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


def test_clients_start_from_the_same_initial_model_without_touching_the_global_rng(ws):
    env = build_env(ws, FedAvg, lambda line: None, progress=False)
    state = torch.random.get_rng_state()
    method = FedAvg(FedAvgConfig(), env)
    a, b = method.client(0).model.state_dict(), method.client(1).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    downloads = AveragingServer().aggregate(uploads)
    assert set(downloads) == {0, 2}
    for d in downloads.values():
        assert set(d) == {"w"} and torch.equal(d["w"], torch.tensor([3.0, 6.0]))


# -- training sets that leave one sample over -------------------------------------------------------

def _client_on(ws, n: int, logs: list[str]):
    from fcl_bench.api import Task
    from fcl_bench.data import ClientData

    env = build_env(ws, FedAvg, logs.append, progress=False)
    sc = ws.scenario
    idx = sc.train_indices[0][0][:n]
    client = FedAvg(FedAvgConfig(), env).client(0)
    client.start_task(Task(index=0, classes=list(sc.client_tasks[0][0]), seen_classes=sc.seen_classes(0, 0),
                           train=ClientData(ws.dataset.train, idx, "train", ws.foundation.preprocess, ws.device)))
    return client


def _bn_stats(model) -> list[torch.Tensor]:
    return [b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]


def test_a_training_set_of_batch_size_plus_one_trains_in_batchnorm_train_mode(ws):
    logs: list[str] = []
    c = _client_on(ws, ws.cfg.batch_size + 1, logs)
    before = _bn_stats(c.model)
    c.train_round()  # without folding, the last batch holds one sample and BatchNorm raises
    assert any(not torch.equal(a, b) for a, b in zip(before, _bn_stats(c.model)))
    assert not logs


def test_a_training_set_of_one_sample_runs_batchnorm_in_eval_mode_and_says_so_once(ws):
    logs: list[str] = []
    c = _client_on(ws, 1, logs)
    before = _bn_stats(c.model)
    weights = {k: v.clone() for k, v in c.model.state_dict().items() if "head" in k}
    for _ in range(2):
        c.train_round()
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_stats(c.model)))   # running stats untouched
    assert any(not torch.equal(v, c.model.state_dict()[k]) for k, v in weights.items())  # but it trained
    assert c.model.training and all(m.training for m in c.model.modules())        # modes restored
    assert len(logs) == 1 and "one sample" in logs[0] and "BatchNorm" in logs[0]

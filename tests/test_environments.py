"""What a client and the server can reach (their own data only, test data only inside predict), the
server-held split, and the contract's fail-early rules (abstract methods, configs checked before data,
plan-wide errors reported once, undeclared uploads refused)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import federation, smoke_config, started, workspace

from fcl_bench.api import Client, Method, Server
from fcl_bench.checks import ContractError
from fcl_bench.methods.fedvit import FedViT, FedViTConfig

RUN = smoke_config(small_models="test_resnet", server_per_class="2")


@pytest.fixture(scope="module")
def ws():
    w = workspace(RUN)
    w.ensure_foundation(progress=False)
    return w


def test_a_client_reaches_only_its_own_data(ws):
    c, fed = started(FedViT, FedViTConfig(), ws, RUN)
    env = fed.client_envs[0]
    mine = c.task.train.batch(np.arange(4))
    env.features.cls(mine)  # its own training batch: fine
    other = fed.ws.train_view(1, 0).batch(np.arange(4))
    with pytest.raises(PermissionError, match="does not hold"):
        env.features.cls(other)
    test = fed.ws.test_view(0, 0).batch(np.arange(4))
    with pytest.raises(PermissionError, match="only inside predict"):
        env.features.cls(test)
    with env.features.open_test():  # as the evaluation does around predict
        assert c.predict(test).shape[0] == 4
    with pytest.raises(PermissionError, match="task 1 is not available"):
        env.task(1)  # a future task
    with pytest.raises(PermissionError, match="does not hold"):
        env.view(fed.ws.scenario.train_indices[1][0])
    assert len(env.view(c.task.train.indices[:3])) == 3


def test_the_server_holds_a_split_no_client_has(ws):
    fed = federation(FedViT, FedViTConfig(), ws, RUN)
    env = fed.server_env
    sc = ws.scenario
    assert env.server_data is not None and len(env.server_data) == 2 * len(sc.public_classes)
    assert env.scenario.server_samples == len(env.server_data)
    clients = np.concatenate([ix for client in sc.train_indices for ix in client])
    assert not np.isin(env.server_data.indices, clients).any()
    env.features.cls(env.server_data.batch(np.arange(3)))
    with pytest.raises(PermissionError):
        env.features.cls(ws.train_view(0, 0).batch(np.arange(2)))
    assert env.server_data.split == "train" and all(v is not ws.dataset.test for v in vars(env).values())
    no_split = smoke_config(server_per_class="0")
    plain = federation(FedViT, FedViTConfig(), workspace(no_split), no_split)
    assert plain.server_env.server_data is None and plain.server_env.scenario.server_samples == 0


class _NoPredictClient(Client):
    def start_task(self, task):
        pass

    def train_round(self, info):
        return {}


class _NoPredict(Method):
    name = "nopredict"

    def client(self, client_id, env):
        return _NoPredictClient()

    def server(self, env):
        return None


def test_a_client_without_predict_fails_at_construction(ws):
    with pytest.raises(TypeError, match="predict"):
        federation(_NoPredict, None, ws, RUN)


class _Leaky(FedViT):
    name = "leaky"
    uploads = ("weight", "__num_samples__")  # "bias" is not declared


def test_an_undeclared_upload_is_refused_naming_the_method_and_tensor(ws):
    fed = federation(_Leaky, FedViTConfig(), ws, RUN)
    fed.start_task(0)
    with pytest.raises(ContractError, match=r"leaky: client 0 upload: 'bias' is not among"):
        fed.run_round(0, 0)


class _NanClient(Client):
    def __init__(self, n):
        self.n = n

    def start_task(self, task):
        pass

    def train_round(self, info):
        return {}

    def predict(self, batch):
        return torch.full((len(batch), self.n), float("nan"))


class _NanServer(Server):
    def aggregate(self, uploads, info):
        return {}


class _NanMethod(Method):
    name = "nanlogits"
    uses_foundation = False

    def client(self, client_id, env):
        return _NanClient(env.scenario.num_classes)

    def server(self, env):
        return _NanServer()


def test_nan_logits_are_a_contract_error_not_zero_accuracy(ws):
    with pytest.raises(ContractError, match="nanlogits client 0.predict returned NaN"):
        federation(_NanMethod, None, ws, RUN).run()


def test_a_bad_method_choice_fails_before_any_data_is_loaded(cli, monkeypatch, tmp_path):
    from fcl_bench import workspace as W

    def no_data(*a, **k):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(W, "load_data", no_data)
    res = cli("run", "--methods", "fedlscl", "-o", "fedlscl.aggregation=bogus", "--out", tmp_path / "r",
              "--preset", "smoke", "--quiet")
    assert res.exit_code != 0 and "fedlscl.aggregation: 'bogus' is not one of o2d, fedavg, none" in res.output
    assert not (tmp_path / "r").exists()


def test_a_plan_wide_error_is_reported_once_before_anything_runs(cli, tmp_path):
    res = cli("run", "--methods", "fedavg,fedvit", "--seeds", "1,2", "--dataset", "cifar100", "--out",
              tmp_path / "r", "--preset", "smoke", "--quiet")
    assert res.exit_code != 0
    assert res.output.count("needs a data root") == 1 and "FAILED" not in res.output
    assert not (tmp_path / "r").exists()
    res = cli("run", "--methods", "fedavg", "--foundation", "not_a_vit", "--out", tmp_path / "r", "--quiet")
    assert res.exit_code != 0 and "unknown foundation model 'not_a_vit'" in res.output
    assert not (tmp_path / "r").exists()


def test_participation_and_server_split_are_validated():
    from fcl_bench.config import ConfigError, apply_overrides, preset

    with pytest.raises(ConfigError, match="participation"):
        apply_overrides(preset("smoke"), {"participation": "0"}, "run")
    assert dataclasses.replace(preset("smoke"), participation=0.5).workspace() == preset("smoke").workspace()
    assert apply_overrides(preset("smoke"), {"server_per_class": "3"}, "run").workspace() != \
        preset("smoke").workspace()

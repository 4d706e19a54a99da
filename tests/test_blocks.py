"""Shared blocks of the v2 contract: serialisable state, distillation (KD, frozen copies, BatchNorm eval),
exemplar selection (herding, lowest loss), and the restricted feature views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fcl_bench import state as S
from fcl_bench.nn.distill import batchnorm_eval, frozen_copy, kd_loss
from fcl_bench.nn.exemplars import herding, herding_per_class, lowest_loss_per_class

# -- state ---------------------------------------------------------------------------------------------


def test_state_round_trips_nested_structures_exactly():
    opt_model = nn.Linear(3, 2)
    opt = torch.optim.Adam(opt_model.parameters())
    opt_model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"w": torch.randn(2, 3), "half": torch.ones(2, dtype=torch.bfloat16), "i": torch.arange(3),
             "nested": {"a": [torch.zeros(1), 1, 2.5, None, True, "s"], "t": (1, torch.ones(2))},
             "ints": {0: "zero", 7: torch.tensor([7])}, "np": np.arange(5, dtype=np.int64),
             "nan": math.nan, "inf": -math.inf, "opt": opt.state_dict(), "dunder": {"__tensor__": 1}}
    back = S.decode(S.encode(state))
    assert torch.equal(back["w"], state["w"]) and back["half"].dtype == torch.bfloat16
    assert back["nested"]["a"][1:] == [1, 2.5, None, True, "s"] and isinstance(back["nested"]["t"], tuple)
    assert back["ints"][0] == "zero" and torch.equal(back["ints"][7], torch.tensor([7]))
    assert isinstance(back["np"], np.ndarray) and back["np"].tolist() == [0, 1, 2, 3, 4]
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert back["dunder"] == {"__tensor__": 1}  # a user dict that looks like a placeholder stays a dict
    fresh = torch.optim.Adam(nn.Linear(3, 2).parameters())
    fresh.load_state_dict(back["opt"])  # an optimiser state (int keys) loads back
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_state_refuses_python_objects_and_names_where():
    with pytest.raises(S.StateError, match=r"state\.model.*Linear"):
        S.encode({"model": nn.Linear(2, 2)})


def test_rng_state_round_trip_replays_the_same_draws():
    g = torch.Generator().manual_seed(3)
    saved = S.decode(S.encode(S.rng_state({5: g})))
    a = (torch.rand(3), np.random.rand(2), torch.rand(2, generator=g))
    S.set_rng_state(saved, {5: g})
    b = (torch.rand(3), np.random.rand(2), torch.rand(2, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


# -- distillation ----------------------------------------------------------------------------------------

def test_kd_loss_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    expected = 0.0
    for i in range(2):
        ps = np.exp(s[i].numpy() / T) / np.exp(s[i].numpy() / T).sum()
        pt = np.exp(t[i].numpy() / T) / np.exp(t[i].numpy() / T).sum()
        expected += (pt * (np.log(pt) - np.log(ps))).sum()
    expected = expected / 2 * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    # on a subset of the classes: only those columns, renormalised
    sub = kd_loss(s, t, T, classes=[0, 2]).item()
    assert sub == pytest.approx(kd_loss(s[:, [0, 2]], t[:, [0, 2]], T).item()) and sub != pytest.approx(expected)
    assert kd_loss(s, s, T).item() == pytest.approx(0.0, abs=1e-7)
    s_req, t_req = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    kd_loss(s_req, t_req, T).backward()
    assert s_req.grad is not None and t_req.grad is None  # the teacher is never differentiated


def test_frozen_copy_is_independent_eval_and_without_grad():
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    c = frozen_copy(m)
    assert m.training and not c.training and not any(p.requires_grad for p in c.parameters())
    with torch.no_grad():
        m[0].weight.add_(1.0)
    assert not torch.equal(m[0].weight, c[0].weight)


def test_batchnorm_eval_freezes_running_statistics_and_restores_modes():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    before = m[1].running_mean.clone()
    with batchnorm_eval(m):
        assert not m[1].training and m[0].training
        m(torch.randn(8, 3))
        m(torch.randn(1, 3))  # one sample is fine in eval mode
    assert torch.equal(m[1].running_mean, before) and m[1].training
    batchnorm_eval(m)
    assert not m[1].training  # called plainly, the switch stays


# -- exemplars --------------------------------------------------------------------------------------------

def _herding_reference(x: np.ndarray, m: int) -> list[int]:
    """Rebuffi et al. Alg. 4 written out directly in numpy."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mu = x.mean(0)
    chosen: list[int] = []
    for k in range(1, m + 1):
        best, best_d = None, np.inf
        for i in range(len(x)):
            if i in chosen:
                continue
            d = np.linalg.norm(mu - (x[i] + x[chosen].sum(0)) / k)
            if d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_matches_the_algorithm_written_out():
    x = np.random.default_rng(0).normal(size=(30, 5))
    assert herding(torch.as_tensor(x), 10).tolist() == _herding_reference(x, 10)
    assert sorted(herding(torch.as_tensor(x), 99).tolist()) == list(range(30))  # m > n: all, once each
    # the running mean of the chosen approaches the class mean faster than a random choice
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    err = np.linalg.norm(xn[herding(torch.as_tensor(x), 5)].mean(0) - xn.mean(0))
    rnd = np.mean([np.linalg.norm(xn[np.random.default_rng(s).choice(30, 5, replace=False)].mean(0) - xn.mean(0))
                   for s in range(20)])
    assert err < rnd


def test_per_class_selections_are_class_balanced():
    labels = np.array([0, 1, 0, 1, 0, 2, 1, 0])
    losses = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.3, 0.05, 0.2])
    assert lowest_loss_per_class(losses, labels, [0, 1], 2).tolist() == [1, 2, 6, 7]  # ties by position
    feats = torch.randn(8, 4)
    picked = herding_per_class(feats, labels, [0, 2], 3)
    assert np.bincount(labels[picked], minlength=3).tolist() == [3, 0, 1]

"""Presets: the ``standard`` preset builds the paper's CIFAR-100 protocol shape on the synthetic data (no
training), its default seeds reach the plan, and ``cnn_only_epochs`` reaches only the CNN-only methods."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fcl_bench import cli as cli_module
from fcl_bench.config import PRESET_HELP, PRESET_SEEDS, PRESETS, ConfigError, apply_overrides, preset
from fcl_bench.federation import env_fields
from fcl_bench.workspace import Workspace


@pytest.fixture(scope="module")
def standard_ws() -> Workspace:
    return Workspace.create(dataclasses.replace(preset("standard"), device="cpu").workspace())


def test_standard_builds_the_papers_class_counts(standard_ws):
    ws = standard_ws
    sc, cfg = ws.scenario, ws.cfg
    assert ws.dataset.num_classes >= 100  # 5 clients x 15 private + 25 public
    assert sc.num_clients == 5 and sc.num_tasks == 5
    public = set(sc.public_classes)
    assert len(public) == 25
    privates = [set(p) for p in sc.private_classes]
    assert all(len(p) == 15 for p in privates)
    assert len(set().union(*privates)) == 75, "a private class belongs to two clients"
    assert not public & set().union(*privates)
    assert len(sc.used_classes()) == 100
    for c in range(5):
        assert [len(t) for t in sc.client_tasks[c]] == [8] * 5
        assert set(sc.client_classes(c)) == privates[c] | public  # every task's classes: own + shared
        # every class of the client has training samples on it; public classes split by Dirichlet(0.5)
        labels = ws.dataset.train.labels[np.concatenate(sc.train_indices[c])]
        assert set(np.unique(labels).tolist()) <= privates[c] | public
        assert all((labels == k).sum() == cfg.train_per_class for k in privates[c])
    # a public class's samples: the server's split plus the clients' shares, never on two parties
    train_labels = ws.dataset.train.labels
    for k in sorted(public)[:3]:
        held = [int((train_labels[np.concatenate(sc.train_indices[c])] == k).sum()) for c in range(5)]
        assert sum(held) + int((train_labels[sc.server_indices] == k).sum()) == cfg.train_per_class
    assert int((train_labels[sc.server_indices] == sc.public_classes[0]).sum()) == cfg.server_per_class
    assert cfg.alpha == 0.5 and preset("standard").rounds_per_task == 5


def test_standard_runs_the_papers_three_seeds_by_default(monkeypatch, cli, tmp_path):
    planned = []
    monkeypatch.setattr(cli_module, "execute", lambda specs, runner=None: planned.append(specs) or True)
    monkeypatch.setattr("fcl_bench.executor.preflight", lambda specs: None)
    for args, seeds in ((("--preset", "standard"), [42, 1999, 2024]),
                        (("--preset", "standard", "--seeds", "7"), [7]),
                        (("--preset", "standard", "-o", "seed=5"), [5]),
                        (("--preset", "smoke"), [42])):  # other presets keep their one seed
        planned.clear()
        res = cli("run", "--methods", "fedavg", "--out", tmp_path, *args)
        assert res.exit_code == 0, res.output
        assert [s.run.seed for s in planned[0]] == seeds, args
    assert set(PRESET_SEEDS) <= set(PRESETS) and set(PRESET_HELP) == set(PRESETS)


def test_cnn_only_epochs_reaches_only_methods_without_a_foundation_model(standard_ws):
    quick = dataclasses.replace(preset("quick"), cnn_only_epochs=10)
    assert quick.local_epochs(uses_foundation=False) == 10
    assert quick.local_epochs(uses_foundation=True) == quick.epochs == 1
    run = dataclasses.replace(preset("standard"), cnn_only_epochs=3, epochs=2)
    assert env_fields(standard_ws, run, None, None, print, uses_foundation=False)["epochs"] == 3
    assert env_fields(standard_ws, run, None, None, print, uses_foundation=True)["epochs"] == 2
    assert dataclasses.replace(run, cnn_only_epochs=None).local_epochs(False) == 2
    with pytest.raises(ConfigError, match="cnn_only_epochs must be >= 1"):
        apply_overrides(quick, {"cnn_only_epochs": "0"}, "run")

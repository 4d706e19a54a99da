"""Helpers for building a method's clients and server in a small workspace, as the schedule does."""

from __future__ import annotations

import dataclasses

import numpy as np

from fcl_bench.api import RoundInfo
from fcl_bench.config import RunConfig, apply_overrides, preset
from fcl_bench.data import Dataset, ImageSource
from fcl_bench.federation import Federation, RunResult
from fcl_bench.workspace import Workspace

QUIET = dict(log=lambda line: None, progress=False)


def smoke_config(**overrides: str) -> RunConfig:
    """The smoke preset with a random-init tiny ViT on the CPU, plus ``-o``-style string overrides."""
    return apply_overrides(preset("smoke"), {"foundation_pretrained": "false", "device": "cpu", **overrides}, "run")


def workspace(run: RunConfig) -> Workspace:
    return Workspace.create(run.workspace())


def federation(method_cls, cfg, ws: Workspace, run: RunConfig | None = None, **kw) -> Federation:
    """A :class:`Federation` built but not started (``run`` defaults to the smoke config of ``ws``)."""
    run = run or dataclasses.replace(smoke_config(), **{f: getattr(ws.cfg, f) for f in ws.cfg.__dataclass_fields__})
    return Federation(method_cls, cfg, ws, run, **{**QUIET, **kw})


def started(method_cls, cfg, ws: Workspace, run: RunConfig | None = None, client: int = 0, **kw):
    """(client ``client`` after the first task started, its federation)."""
    fed = federation(method_cls, cfg, ws, run, **kw)
    fed.start_task(0)
    return fed.clients[client], fed


def round_info(task: int = 0, rnd: int = 0, rounds: int = 1, participants: tuple[int, ...] = (0,)) -> RoundInfo:
    return RoundInfo(task=task, round=rnd, rounds_per_task=rounds, participants=participants)


def run(method_cls, cfg, ws: Workspace, run: RunConfig | None = None, flops: str = "off", **kw) -> RunResult:
    return federation(method_cls, cfg, ws, run, flops=flops, **kw).run()


def tiny_synthetic(root) -> Dataset:
    """A synthetic dataset of 6 FCL and 6 pretraining classes (8 pretraining images each), generated in ``root``."""
    from fcl_bench.datasets.synthetic import load_synthetic

    return load_synthetic(root=root, num_classes=6, train_per_class=6, test_per_class=3, pretrain_classes=6,
                          pretrain_train_per_class=8, pretrain_test_per_class=2)


class ForbiddenSource(ImageSource):
    """A split that fails on any read: pretraining must never touch the FCL classes."""

    def __init__(self, n: int):
        self.labels = np.zeros(n, dtype=np.int64)

    def load(self, indices, pre, device="cpu"):
        raise AssertionError("pretraining read an FCL image")


def guarded(ds: Dataset) -> Dataset:
    """``ds`` with FCL splits that fail on any read (its pretraining classes intact)."""
    return Dataset(name="guarded", train=ForbiddenSource(len(ds.train)), test=ForbiddenSource(len(ds.test)),
                   classes=ds.classes, fingerprint="guarded", pretrain=ds.pretrain)

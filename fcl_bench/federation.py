"""The federation loop: tasks x rounds, the wire, evaluation, accounting, progress.

:class:`Workspace` holds what every method of a run shares for one (dataset, seed): the data, the
scenario, the frozen foundation model and its feature cache. :func:`run_method` runs one method in it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fcl_bench import wire
from fcl_bench.accounting import Accountant, timer
from fcl_bench.api import Env, Method, Payload, ScenarioInfo, Task
from fcl_bench.config import RunConfig
from fcl_bench.data import ClientData, Dataset, cap_per_class
from fcl_bench.metrics import summarise
from fcl_bench.nn.cache import FeatureCache
from fcl_bench.nn.foundation import FoundationModel, load_foundation
from fcl_bench.nn.small import build_small_model
from fcl_bench.scenario import Scenario, ScenarioSpec, build_scenario


class NonFiniteError(RuntimeError):
    """A loss or an uploaded tensor became NaN or infinite."""


def check_finite(value: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``value`` holds NaN or inf."""
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"{what} is not finite (NaN or inf)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N]; got '{name}'")
    return torch.device(name)


def load_data(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """(full dataset, dataset capped to the run's samples per class)."""
    from fcl_bench.datasets import load_dataset

    ds = load_dataset(cfg.dataset, root=cfg.data_root, download=cfg.download, seed=0)
    return ds, cap_per_class(ds, cfg.train_per_class, cfg.test_per_class, seed=cfg.seed)


def make_scenario(cfg: RunConfig, ds: Dataset) -> Scenario:
    spec = ScenarioSpec(clients=cfg.clients, private=cfg.private, public=cfg.public, tasks=cfg.tasks,
                        classes_per_task=cfg.classes_per_task, alpha=cfg.alpha, seed=cfg.seed)
    return build_scenario(spec, ds.train.labels, ds.test.labels, num_classes=ds.num_classes)


@dataclass
class Workspace:
    """Shared by all methods of a run with the same data, protocol, foundation model and seed."""

    cfg: RunConfig
    dataset: Dataset
    scenario: Scenario
    device: torch.device
    full_dataset: Dataset | None = None
    foundation: FoundationModel | None = None
    features: FeatureCache | None = None

    @classmethod
    def create(cls, cfg: RunConfig, progress: bool = True) -> Workspace:
        full, ds = load_data(cfg)
        scenario = make_scenario(cfg, ds)
        return cls(cfg=cfg, dataset=ds, scenario=scenario, device=resolve_device(cfg.device), full_dataset=full)

    def ensure_foundation(self, progress: bool = True) -> FoundationModel:
        if self.foundation is None:
            # the offline model is pretrained (and probed) on the full dataset, whatever the run's caps
            self.foundation = load_foundation(self.cfg.foundation, self.full_dataset or self.dataset, self.device,
                                              weights=self.cfg.foundation_weights,
                                              pretrained=self.cfg.foundation_pretrained, seed=self.cfg.seed,
                                              progress=progress)
            self.features = FeatureCache(self.foundation, {"train": self.dataset.train, "test": self.dataset.test},
                                         self.dataset.fingerprint, batch_size=self.cfg.eval_batch_size)
        return self.foundation

    @staticmethod
    def key_of(c: RunConfig) -> tuple:
        """Runs with equal keys share data, scenario, foundation model and feature cache."""
        return (c.dataset, c.data_root, c.download, c.foundation, c.foundation_weights, c.foundation_pretrained,
                c.train_per_class, c.test_per_class, c.seed, c.clients, c.private, c.public, c.tasks,
                c.classes_per_task, c.alpha, c.device, c.eval_batch_size)


@dataclass
class RunResult:
    metrics: dict
    rounds: pd.DataFrame
    seconds: float
    method_config: Any = None  # as the method resolved it (e.g. named defaults filled in)


@dataclass
class _Tally:
    rows: list[dict] = field(default_factory=list)
    manifest: dict[int, dict[str, Any]] = field(default_factory=dict)


def _scenario_info(cfg: RunConfig, sc: Scenario) -> ScenarioInfo:
    return ScenarioInfo(num_classes=sc.num_classes, num_clients=sc.num_clients, num_tasks=sc.num_tasks,
                        rounds_per_task=cfg.rounds_per_task,
                        client_tasks=[[list(t) for t in ct] for ct in sc.client_tasks],
                        train_sizes=[[len(ix) for ix in ci] for ci in sc.train_indices])


def _restricted_correct(logits: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> int:
    mask = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
    mask[allowed] = 0.0
    return int(((logits.float() + mask).argmax(1) == y).sum())


def build_env(ws: Workspace, method_cls: type[Method], log: Callable[[str], None], progress: bool) -> Env:
    cfg = ws.cfg
    if method_cls.uses_foundation or cfg.foundation == "tiny":
        # the tiny model also fixes the input pipeline of the offline presets
        ws.ensure_foundation(progress)
    archs = list(cfg.small_models)
    if not archs:
        raise ValueError("small_models is empty; give at least one timm CNN name")

    def make_small(client: int) -> torch.nn.Module:
        return build_small_model(archs[client % len(archs)], cfg.small_width).to(ws.device)

    amp = torch.bfloat16 if (cfg.amp and ws.device.type == "cuda") else None
    return Env(scenario=_scenario_info(cfg, ws.scenario), device=ws.device, amp_dtype=amp,
               foundation=ws.foundation, features=ws.features, make_small_model=make_small,
               small_width=cfg.small_width, small_archs=archs, seed=cfg.seed, batch_size=cfg.batch_size,
               epochs=cfg.epochs, eval_batch_size=cfg.eval_batch_size, log=log)


def _send(payload: Payload, who: str, device: torch.device) -> tuple[Payload, wire.Message]:
    for name, t in payload.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            check_finite(t, f"{who} '{name}'")
    return wire.transmit(payload, device, who)


def run_method(method_cls: type[Method], method_cfg: Any, ws: Workspace, log: Callable[[str], None] = print,
               progress: bool = True, flops: str = "sampled") -> RunResult:
    """Run one method through all tasks and rounds of the workspace's scenario."""
    cfg, sc = ws.cfg, ws.scenario
    env = build_env(ws, method_cls, log, progress)  # may pretrain the offline foundation model: not the method's time
    # seeded after the foundation model is ready, so a cached or freshly trained model gives the same run
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    t_start = time.perf_counter()
    pre = ws.foundation.preprocess if ws.foundation is not None else None
    if pre is None:
        raise RuntimeError("no input pipeline: the foundation model was not loaded")
    method = method_cls(method_cfg, env)
    K, T, R = sc.num_clients, sc.num_tasks, cfg.rounds_per_task
    clients = {c: method.client(c) for c in range(K)}
    server = method.server()
    acct = Accountant(ws.device, flops)
    tally = _Tally()
    C = sc.num_classes
    correct = {s: np.full((K, T, T), np.nan) for s in ("client", "global")}
    total = np.zeros((K, T))
    bar = tqdm(total=T * R * K, disable=None if progress else True, desc=method_cls.name, unit="step", leave=False)
    for t in range(T):
        for c in range(K):
            data = ClientData(ws.dataset.train, sc.train_indices[c][t], "train", pre, ws.device)
            clients[c].start_task(Task(index=t, classes=list(sc.client_tasks[c][t]),
                                       seen_classes=sc.seen_classes(c, t), train=data))
        for r in range(R):
            uploads: dict[int, Payload] = {}
            round_rows = {}
            for c in range(K):
                bar.set_postfix_str(f"task {t + 1}/{T} round {r + 1}/{R} client {c + 1}/{K}")
                with acct.measure(c, t, first_round=(r == 0)) as m:
                    up = clients[c].train_round()
                uploads[c], msg = _send(up, f"client {c} upload", ws.device)
                tally.manifest[c] = tally.manifest.get(c, {}) | {  # latest shape of every name ever sent
                    name: {"shape": list(shape), "dtype": dt, "bytes": nb} for name, shape, dt, nb in msg.manifest}
                round_rows[c] = dict(task=t, round=r, client=c, phase="round", bytes_up=msg.nbytes, bytes_down=0,
                                     train_seconds=m.seconds, flops=m.flops, flops_measured=m.flops_measured,
                                     peak_memory_bytes=m.peak_memory_bytes, memory_kind=m.memory_kind,
                                     trainable_params=clients[c].trainable_parameters(), train_samples=len(
                                         sc.train_indices[c][t]), server_seconds=0.0)
                bar.update(1)
            with timer() as st:
                downloads = server.aggregate(uploads)
            for c, payload in downloads.items():
                recv, msg = _send(payload, f"server download to client {c}", ws.device)
                clients[c].receive(recv)
                round_rows[c]["bytes_down"] = msg.nbytes
            for c in range(K):
                round_rows[c]["server_seconds"] = st[0] / K
            tally.rows.extend(round_rows.values())
        with timer() as st:
            extra = server.end_task(t)
        for c in range(K):  # one row per client, so end-of-task server time and bytes are never lost
            payload = extra.get(c)
            nbytes = 0
            if payload is not None:
                recv, msg = _send(payload, f"server end-of-task download to client {c}", ws.device)
                clients[c].receive(recv)
                nbytes = msg.nbytes
            tally.rows.append(dict(task=t, round=R, client=c, phase="end_task", bytes_up=0, bytes_down=nbytes,
                                   train_seconds=0.0, flops=0, flops_measured=True, server_seconds=st[0] / K))
        for c in range(K):
            clients[c].end_task()
        _evaluate(ws, clients, t, pre, correct, total)
        accs = [np.nansum(correct["client"][c, t, : t + 1]) / total[c, : t + 1].sum() for c in range(K)]
        log(f"[{method_cls.name}] task {t + 1}/{T}: acc (client space) = {np.mean(accs):.4f}")
    bar.close()
    rounds = pd.DataFrame(tally.rows)
    seconds = time.perf_counter() - t_start
    spaces = {s: summarise(np.nan_to_num(correct[s], nan=0.0), total) for s in correct}
    flops_col = rounds.loc[rounds.phase == "round", "flops"]
    metrics = {
        **{k: spaces["client"][k] for k in ("acc", "task_mean_acc", "avg_incremental_acc", "final_acc",
                                            "forgetting", "bwt", "accuracy_matrix")},
        "space": "client",
        "global_space_applicable": bool(method_cls.global_space),
        "spaces": spaces,
        "bytes_up": int(rounds.bytes_up.sum()),
        "bytes_down": int(rounds.bytes_down.sum()),
        "bytes_up_per_client_round": float(rounds.loc[rounds.phase == "round"].bytes_up.mean()),
        "bytes_down_per_client_round": float(rounds.loc[rounds.phase == "round"].bytes_down.mean()),
        "client_flops": None if flops_col.isna().any() else float(flops_col.sum()),
        "flops_mode": flops,
        "client_train_seconds": float(rounds.train_seconds.sum()),
        "server_seconds": float(rounds.server_seconds.fillna(0).sum()),
        "wall_seconds": seconds,
        "trainable_params": int(rounds.trainable_params.max()) if "trainable_params" in rounds else None,
        "num_classes": C,
        "wire": {"client_uploads": {str(c): v for c, v in tally.manifest.items()}},
    }
    return RunResult(metrics=metrics, rounds=rounds, seconds=seconds, method_config=method.config)


@torch.no_grad()
def _evaluate(ws: Workspace, clients: dict, t: int, pre, correct: dict, total: np.ndarray) -> None:
    sc = ws.scenario
    glob = torch.as_tensor(sc.all_seen_classes(t), device=ws.device)
    amp = ws.cfg.amp and ws.device.type == "cuda"
    for c, client in clients.items():
        own = torch.as_tensor(sc.seen_classes(c, t), device=ws.device)
        for i in range(t + 1):
            data = ClientData(ws.dataset.test, sc.test_indices[c][i], "test", pre, ws.device)
            n_c = n_g = 0
            for batch in data.batches(ws.cfg.eval_batch_size):
                with torch.autocast(ws.device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = client.predict(batch)
                if logits.shape != (len(batch), sc.num_classes):
                    raise ValueError(f"predict must return (batch, {sc.num_classes}) logits over all classes; "
                                     f"got {tuple(logits.shape)}")
                n_c += _restricted_correct(logits, batch.y, own)
                n_g += _restricted_correct(logits, batch.y, glob)
            correct["client"][c, t, i] = n_c
            correct["global"][c, t, i] = n_g
            total[c, i] = len(data)


def describe(ws: Workspace) -> dict:
    """What a run records about its data and models."""
    fm = ws.foundation
    return {
        "dataset": {"name": ws.dataset.name, "fingerprint": ws.dataset.fingerprint, "classes": ws.dataset.num_classes,
                    "train": len(ws.dataset.train), "test": len(ws.dataset.test), **{
                        k: v for k, v in ws.dataset.info.items() if isinstance(v, (int, float, str, type(None)))}},
        "foundation": None if fm is None else {"name": fm.name, "key": fm.key, "depth": fm.depth,
                                               "embed_dim": fm.embed_dim,
                                               "source": fm.info.get("source")},
        "preprocess": None if fm is None else dataclasses.asdict(fm.preprocess),
        "scenario_hash": ws.scenario.hash,
    }

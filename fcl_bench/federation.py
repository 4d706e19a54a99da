"""The schedule: tasks x rounds, the wire, participation, checkpoints, accounting, progress.

:class:`Federation` runs one method in a :class:`~fcl_bench.workspace.Workspace`, following the order the
contract (:mod:`fcl_bench.api`) states: per task, the server's task-start downloads, every client's
``start_task``; per round, the participants' uploads, ``aggregate``, its downloads; the server's end-of-task
downloads, every client's ``end_task``, evaluation (:mod:`fcl_bench.evaluation`) and a checkpoint of every
client's and the server's state. Every payload crosses the wire (:mod:`fcl_bench.wire`) and is counted.

A checkpoint (one safetensors file, written atomically) holds the states, the RNG states and the tallies
so far; :meth:`Federation.restore` continues from it, and with the same seed the final metrics equal an
uninterrupted run's (timings aside).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fcl_bench import state as S
from fcl_bench import wire
from fcl_bench.accounting import Accountant, Measurement
from fcl_bench.api import (
    Client,
    ClientEnv,
    DownloadKind,
    Method,
    MethodEnv,
    Payload,
    RoundInfo,
    ScenarioInfo,
    Server,
    ServerEnv,
    Task,
)
from fcl_bench.checks import check_payload
from fcl_bench.config import RunConfig
from fcl_bench.evaluation import SPACES, accuracy_after, evaluate_client, new_tallies
from fcl_bench.metrics import summarise
from fcl_bench.nn.cache import FeatureView
from fcl_bench.nn.small import small_model_factory
from fcl_bench.workspace import Workspace

__all__ = ["Federation", "PhaseClock", "RngStreams", "RunResult", "participants"]

#: metrics and rounds.csv columns that hold timings or memory, which differ between otherwise identical runs,
#: and the FLOP counter's own cost (``flops_steps``, ``flops_counted_ops``), which depends on what the process
#: had counted before (a resumed run, or a Flower client rebuilt for each message, counts afresh); the
#: FLOP totals themselves do not.
TIMING_KEYS = ("wall_seconds", "client_train_seconds", "server_seconds", "seconds", "peak_memory_bytes",
               "server_peak_memory_bytes", "cache_fill", "phase_seconds", "flops_steps", "flops_counted_ops")


@dataclass
class RunResult:
    metrics: dict
    rounds: pd.DataFrame
    seconds: float
    method_config: Any = None  # as the method resolved it (e.g. named defaults filled in)


def participants(num_clients: int, fraction: float, seed: int, task: int, rnd: int) -> tuple[int, ...]:
    """The clients that train in round ``rnd`` of ``task``: all of them for ``fraction == 1``, else a seeded
    sample of ``max(1, round(fraction * num_clients))``, drawn afresh each round."""
    if fraction >= 1.0:
        return tuple(range(num_clients))
    n = max(1, int(round(fraction * num_clients)))
    rng = np.random.default_rng([seed, task, rnd, 0x5A])
    return tuple(sorted(int(c) for c in rng.choice(num_clients, size=n, replace=False)))


def stream_seed(seed: int, party: int) -> int:
    """The seed of party ``party``'s global RNG stream (client id, or -1 for the server)."""
    return int(np.random.SeedSequence([seed, 0x5EED, party + 1]).generate_state(1, np.uint64)[0] % 2**63)


class RngStreams:
    """Every party's own global RNG (torch CPU and CUDA, numpy): what a client or the server draws from
    ``torch.rand*``, ``torch.nn.init``, dropout or ``np.random`` never depends on another party's calls, as
    in a real federation where each runs in its own process. :meth:`party` swaps a party's stream in for a
    call and saves it afterwards; the caller's own RNG state is restored. ``states`` (party -> the
    :func:`fcl_bench.state.rng_state` of its stream) is checkpointed, and a Flower client keeps its own
    stream in its Flower context."""

    def __init__(self, seed: int):
        self.seed = seed
        self.states: dict[int, S.State] = {}

    def fresh(self, party: int) -> S.State:
        """The stream of ``party`` before its first draw."""
        outer = S.rng_state()
        try:
            torch.manual_seed(stream_seed(self.seed, party))
            np.random.seed(stream_seed(self.seed, party) % 2**32)
            return S.rng_state()
        finally:
            S.set_rng_state(outer)

    @contextmanager
    def party(self, party: int) -> Iterator[None]:
        outer = S.rng_state()
        S.set_rng_state(self.states[party] if party in self.states else self.fresh(party))
        try:
            yield
        finally:
            self.states[party] = S.rng_state()
            S.set_rng_state(outer)


def scenario_info(ws: Workspace, rounds_per_task: int) -> ScenarioInfo:
    sc = ws.scenario
    return ScenarioInfo(num_classes=sc.num_classes, num_clients=sc.num_clients, num_tasks=sc.num_tasks,
                        rounds_per_task=rounds_per_task,
                        client_tasks=[[list(t) for t in ct] for ct in sc.client_tasks],
                        train_sizes=[[len(ix) for ix in ci] for ci in sc.train_indices],
                        public_classes=list(sc.public_classes), server_samples=int(len(sc.server_indices)))


def env_fields(ws: Workspace, run: RunConfig, fm: Any, amp: torch.dtype | None,
               log: Callable[[str], None], progress: bool = True, uses_foundation: bool = True) -> dict:
    """The fields every environment of a run shares (:class:`~fcl_bench.api.MethodEnv`'s); small models
    come from :func:`~fcl_bench.nn.small.small_model_factory` (``run.small_pretrained``); ``epochs`` is
    :meth:`RunConfig.local_epochs` of a method with ``uses_foundation``."""
    make_small = small_model_factory(run.small_pretrained, ws.full_dataset or ws.dataset, ws.preprocess,
                                     ws.device, log=log, progress=progress, channels_last=run.channels_last)
    return dict(scenario=scenario_info(ws, run.rounds_per_task), device=ws.device, amp_dtype=amp,
                foundation=fm, small_archs=list(run.small_models), small_width=run.small_width,
                seed=run.seed, batch_size=run.batch_size, epochs=run.local_epochs(uses_foundation),
                eval_batch_size=run.eval_batch_size, participation=run.participation, log=log,
                preprocess=ws.preprocess, image_size=ws.dataset.native_size, _make_small=make_small)


def client_env(ws: Workspace, c: int, common: dict) -> ClientEnv:
    """Client ``c``'s environment: its own data (of the tasks started so far) and nothing else."""
    view = FeatureView(ws.features, f"client {c}") if common["foundation"] is not None else None
    env = ClientEnv(**common, client_id=c, features=view)

    def task_of(t: int, _c=c) -> Task:
        return Task(index=t, classes=list(ws.scenario.client_tasks[_c][t]),
                    seen_classes=ws.scenario.seen_classes(_c, t), train=ws.train_view(_c, t))

    def own(_env=env, _c=c) -> np.ndarray:
        return np.concatenate([ws.scenario.train_indices[_c][t] for t in range(_env._tasks_started)] or
                              [np.empty(0, np.int64)])

    env._task_of, env._own_train, env._make_view = task_of, own, ws.view
    return env


def open_task(ws: Workspace, env: ClientEnv, t: int) -> Task:
    """Make task ``t`` visible to ``env``'s client (its data, its features) and return it."""
    env._tasks_started = max(env._tasks_started, t + 1)
    if env.features is not None:
        env.features.allow("train", ws.scenario.train_indices[env.client_id][t])
    return env.task(t)


class PhaseClock:
    """Wall seconds per phase of a run (``phase_seconds`` in ``metrics.json``), for profiling where a run's
    time goes: ``with clock("eval"): ...``. Phases nest, and each counts its own time only: a phase opened
    inside another is taken out of the outer one. Seconds that ``aside()`` (a running total, here the
    feature cache's fill seconds) gains while a phase is open are the shared cache fill, counted under
    ``cache_fill`` instead of the phase. A phase costs two ``perf_counter`` calls; on CUDA, work still queued
    when a phase ends is counted in whichever phase next waits for it."""

    def __init__(self, aside: Callable[[], float] | None = None, now: Callable[[], float] = time.perf_counter):
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._aside = aside or (lambda: 0.0)
        self._now = now
        self._open: list[list[float]] = []  # per open phase: [seconds of phases inside, aside inside them]

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0, a0 = self._now(), self._aside()
        self._open.append([0.0, 0.0])
        try:
            yield
        finally:
            total, aside = self._now() - t0, self._aside() - a0
            inner, inner_aside = self._open.pop()
            own_aside = aside - inner_aside
            self.seconds[name] += total - inner - own_aside
            self.seconds["cache_fill"] += own_aside
            if self._open:
                self._open[-1][0] += total
                self._open[-1][1] += aside


def train_client(client: Client, info: RoundInfo, acct: Accountant, c: int, declared: tuple[str, ...],
                 method: str, clock: PhaseClock | None = None) -> tuple[wire.Message, Measurement, int]:
    """Client ``c``'s round: ``train_round`` measured, its upload checked and serialised (the bytes that
    travel), and its trainable parameter count. ``clock`` (optional) times the phases ``client_train`` and
    ``wire``."""
    phase = clock or (lambda name: nullcontext())
    with phase("client_train"), acct.measure(c, info.task) as m:
        up = client.train_round(info)
    who = f"client {c} upload"
    with phase("wire"):
        check_payload(up, f"{method}: {who}", declared)
        msg = wire.encode(up, who)
    return msg, m, client.trainable_parameters()


@dataclass
class _Tally:
    rows: list[dict] = field(default_factory=list)
    manifest: dict[str, dict[str, Any]] = field(default_factory=dict)


class Federation:
    """One method's run through all tasks and rounds of a workspace's scenario.

    Build it, then :meth:`run` (or drive it with :meth:`start_task`, :meth:`run_round`, :meth:`end_task`).
    ``clients``, ``client_envs``, ``server`` and ``server_env`` are open for tests and engines.
    """

    def __init__(self, method_cls: type[Method], method_cfg: Any, ws: Workspace, run: RunConfig,
                 log: Callable[[str], None] = print, progress: bool = True, flops: str = "sampled"):
        self.method_cls, self.ws, self.run_cfg, self.log, self.progress = method_cls, ws, run, log, progress
        self.name = method_cls.name
        if method_cls.uses_foundation:
            ws.ensure_foundation(progress)  # may pretrain the offline model: not the method's time
        fm = ws.foundation if method_cls.uses_foundation else None
        # seeded after the foundation model is ready, so a cached or freshly trained model gives the same run
        torch.manual_seed(run.seed)
        np.random.seed(run.seed % 2**32)
        self.t_start = time.perf_counter()
        self.clock = PhaseClock(aside=(lambda: ws.features.fill_seconds) if ws.features is not None else None)
        self.amp = torch.bfloat16 if (run.amp and ws.device.type == "cuda") else None
        common = env_fields(ws, run, fm, self.amp, log, progress, method_cls.uses_foundation)
        self.common = common
        self.method_env = MethodEnv(**common)
        self.method = method_cls(method_cfg, self.method_env)
        sc = ws.scenario
        self.K, self.T, self.R = sc.num_clients, sc.num_tasks, run.rounds_per_task
        self.streams = RngStreams(run.seed)
        self.client_envs: dict[int, ClientEnv] = {}
        self.clients: dict[int, Client] = {}
        self._build_clients()
        server_data = ws.server_view()
        view = None
        if fm is not None and server_data is not None:
            view = FeatureView(ws.features, "server")
            view.allow("train", server_data.indices)
        self.server_env = ServerEnv(**common, server_data=server_data, features=view)
        with self.streams.party(-1):
            self.server: Server = self.method.server(self.server_env)
        self.acct = Accountant(ws.device, flops)
        self.flops_mode = flops
        self.tally = _Tally()
        self.correct, self.total = new_tallies(self.K, self.T)
        self.next_task = 0
        self.fingerprint: str | None = None  # what a checkpoint must match to be resumed (set by the executor)
        self._checkpoints_off = False
        self._fill0 = ws.features.fill_totals() if ws.features is not None else None
        self.clock.add("setup", time.perf_counter() - self.t_start)  # the method, its clients and server built

    # -- environments ------------------------------------------------------------------------------
    def _build_clients(self) -> None:
        """Every client, each built on its own RNG stream (an engine whose clients live elsewhere overrides
        this and the ``_deliver``/``_start_clients``/``_train_clients``/``_end_clients`` steps)."""
        for c in range(self.K):
            self.client_envs[c] = client_env(self.ws, c, self.common)
            with self.streams.party(c):
                self.clients[c] = self.method.client(c, self.client_envs[c])

    def open_task(self, c: int, t: int) -> Task:
        """Make task ``t`` visible to client ``c`` (its data, its features) and return it."""
        return open_task(self.ws, self.client_envs[c], t)

    # -- the wire ----------------------------------------------------------------------------------
    def _encode_downloads(self, downloads: Any, what: str) -> dict[int, wire.Message]:
        """A server step's downloads, checked and serialised: client id -> the bytes that travel."""
        if not isinstance(downloads, Mapping):
            raise TypeError(f"{self.name}: Server.{what} must return a dict client id -> payload, "
                            f"got {type(downloads).__name__}")
        msgs: dict[int, wire.Message] = {}
        # one payload object sent to many clients (a global model, a synthetic pool) is checked and encoded
        # once; every client still decodes its own copy and is counted the full bytes
        encoded: dict[int, wire.Message] = {}
        for c, payload in downloads.items():
            if not (isinstance(c, int) and 0 <= c < self.K):
                raise KeyError(f"{self.name}: Server.{what} addressed client {c!r}; clients are 0..{self.K - 1}")
            msg = encoded.get(id(payload))
            if msg is None:
                who = f"server {what} download to client {c}"
                check_payload(payload, f"{self.name}: {who}")
                msg = encoded[id(payload)] = wire.encode(payload, who)
            msgs[c] = msg
        return msgs

    def _server_row(self, t: int, r: int, step: str, m: Measurement, bytes_down: int) -> None:
        # the bytes this step sent are the clients' bytes_down: counted there, shown here, never summed twice
        self.tally.rows.append(dict(task=t, round=r, client=-1, phase=f"server_{step}", bytes_up=0,
                                    bytes_down=0, server_bytes_sent=bytes_down, train_seconds=0.0, flops=None,
                                    flops_measured=True,
                                    server_seconds=m.seconds, server_flops=m.flops,
                                    server_flops_measured=m.flops_measured,
                                    server_peak_memory_bytes=m.peak_memory_bytes, memory_kind=m.memory_kind))

    # -- the client side: what an engine whose clients live elsewhere replaces ----------------------
    def _deliver(self, msgs: Mapping[int, wire.Message], kind: DownloadKind) -> None:
        """Hand each addressed client its download."""
        for c, msg in msgs.items():
            with self.clock("wire"):
                download = wire.decode(msg, self.ws.device)
            with self.streams.party(c), self.clock("client_other"):
                self.clients[c].receive(download, kind)

    def _start_clients(self, t: int, msgs: Mapping[int, wire.Message]) -> None:
        """The task-start downloads, then every client's ``start_task``."""
        self._deliver(msgs, "start")
        for c in range(self.K):
            task = self.open_task(c, t)
            with self.streams.party(c), self.clock("client_other"):
                self.clients[c].start_task(task)

    def _train_clients(self, info: RoundInfo, bar=None) -> dict[int, tuple[wire.Message, Measurement, int]]:
        """The participants' rounds: client id -> (upload message, measurement, trainable parameters)."""
        out = {}
        for c in info.participants:
            if bar is not None:
                bar.set_postfix_str(f"task {info.task + 1}/{self.T} round {info.round + 1}/{self.R} "
                                    f"client {c + 1}/{self.K}")
            with self.streams.party(c):
                out[c] = train_client(self.clients[c], info, self.acct, c, tuple(self.method.uploads), self.name,
                                      self.clock)
            if bar is not None:
                bar.update(1)
        return out

    def _end_clients(self, t: int, msgs: Mapping[int, wire.Message]) -> None:
        """The end-of-task downloads, every client's ``end_task``, then every client's evaluation (fills
        ``self.correct`` and ``self.total``)."""
        self._deliver(msgs, "end")
        for c in range(self.K):
            with self.streams.party(c), self.clock("client_other"):
                self.clients[c].end_task()
        for c in range(self.K):
            with self.streams.party(c), self.clock("eval"):
                counts = evaluate_client(self.ws, c, self.clients[c], self.client_envs[c], t, self.name,
                                         amp=self.amp is not None)
            self.record_counts(c, t, counts)

    def record_counts(self, c: int, t: int, counts: dict[str, list[int]]) -> None:
        for s in SPACES:
            self.correct[s][c, t, : t + 1] = counts[s]
        self.total[c, : t + 1] = counts["total"]

    # -- the schedule ------------------------------------------------------------------------------
    def start_task(self, t: int) -> None:
        with self.clock("server"), self.acct.measure("server:start", t) as m, self.streams.party(-1):
            downloads = self.server.start_task(t)
        with self.clock("wire"):
            msgs = self._encode_downloads(downloads, "start_task")
        self._server_row(t, 0, "start", m, sum(msg.nbytes for msg in msgs.values()))
        for c in range(self.K):
            if c in msgs:
                self.tally.rows.append(dict(task=t, round=0, client=c, phase="start", bytes_up=0,
                                            bytes_down=msgs[c].nbytes, train_seconds=0.0, flops=0,
                                            flops_measured=True))
        self._start_clients(t, msgs)

    def run_round(self, t: int, r: int, bar=None) -> None:
        info = RoundInfo(task=t, round=r, rounds_per_task=self.R,
                         participants=participants(self.K, self.run_cfg.participation, self.run_cfg.seed, t, r))
        uploads: dict[int, Payload] = {}
        rows: dict[int, dict] = {}
        for c, (msg, m, trainable) in sorted(self._train_clients(info, bar).items()):
            with self.clock("wire"):
                uploads[c] = wire.decode(msg, self.ws.device)
            self.tally.manifest[str(c)] = self.tally.manifest.get(str(c), {}) | {  # latest shape of every name
                name: {"shape": list(shape), "dtype": dt, "bytes": nb} for name, shape, dt, nb in msg.manifest}
            rows[c] = dict(task=t, round=r, client=c, phase="round", bytes_up=msg.nbytes, bytes_down=0,
                           train_seconds=m.seconds, flops=m.flops, flops_measured=m.flops_measured,
                           peak_memory_bytes=m.peak_memory_bytes, memory_kind=m.memory_kind,
                           trainable_params=trainable,
                           train_samples=len(self.ws.scenario.train_indices[c][t]))
        with self.clock("server"), self.acct.measure("server:round", t) as sm, self.streams.party(-1):
            downloads = self.server.aggregate(uploads, info)
        with self.clock("wire"):
            msgs = self._encode_downloads(downloads, "aggregate")
        self._deliver(msgs, "round")
        for c, msg in msgs.items():
            if c in rows:
                rows[c]["bytes_down"] = msg.nbytes
            else:  # a client that sat the round out but was sent the new model
                rows[c] = dict(task=t, round=r, client=c, phase="round_idle", bytes_up=0, bytes_down=msg.nbytes,
                               train_seconds=0.0, flops=0, flops_measured=True)
        self.tally.rows.extend(rows[c] for c in sorted(rows))
        self._server_row(t, r, "round", sm, sum(msg.nbytes for msg in msgs.values()))

    def end_task(self, t: int) -> float:
        with self.clock("server"), self.acct.measure("server:end", t) as m, self.streams.party(-1):
            extra = self.server.end_task(t)
        with self.clock("wire"):
            msgs = self._encode_downloads(extra, "end_task")
        for c in range(self.K):  # one row per client, so end-of-task bytes are never lost
            self.tally.rows.append(dict(task=t, round=self.R, client=c, phase="end_task", bytes_up=0,
                                        bytes_down=msgs[c].nbytes if c in msgs else 0, train_seconds=0.0,
                                        flops=0, flops_measured=True))
        self._server_row(t, self.R, "end", m, sum(msg.nbytes for msg in msgs.values()))
        self._end_clients(t, msgs)
        acc = accuracy_after(self.correct["client"], self.total, t)
        self.log(f"[{self.name}] task {t + 1}/{self.T}: acc (client space) = {acc:.4f}")
        self.next_task = t + 1
        return acc

    def run(self, checkpoint: Path | None = None, keep_final: bool = False) -> RunResult:
        """All remaining tasks; after each but the last (and the last too with ``keep_final``), a checkpoint
        at ``checkpoint`` (if given)."""
        remaining = (self.T - self.next_task) * self.R * max(1, len(participants(
            self.K, self.run_cfg.participation, self.run_cfg.seed, 0, 0)))
        bar = tqdm(total=remaining, disable=None if self.progress else True, desc=self.name, unit="step",
                   leave=False)
        try:
            for t in range(self.next_task, self.T):
                self.start_task(t)
                for r in range(self.R):
                    self.run_round(t, r, bar)
                self.end_task(t)
                if checkpoint is not None and (t < self.T - 1 or keep_final):
                    with self.clock("checkpoint"):
                        self.save_checkpoint(checkpoint)
        finally:
            bar.close()
        return self.result()

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> S.State:
        """The run's whole state at a task boundary."""
        gens = {c: e.generator for c, e in self.client_envs.items()} | {-1: self.server_env.generator}
        return {"next_task": self.next_task, "fingerprint": self.fingerprint,
                "clients": {c: self.clients[c].state_dict() for c in range(self.K)},
                "server": self.server.state_dict(),
                "rng": S.rng_state(gens), "streams": dict(self.streams.states),
                "correct": {s: self.correct[s] for s in SPACES}, "total": self.total,
                "rows": self.tally.rows, "manifest": self.tally.manifest,
                "elapsed": time.perf_counter() - self.t_start, "phase_seconds": dict(self.clock.seconds)}

    def save_checkpoint(self, path: Path) -> int:
        """Write :meth:`state` atomically to ``path``; a method without ``state_dict`` runs on, uncheckpointed."""
        if self._checkpoints_off:
            return 0
        try:
            st = self.state()
        except NotImplementedError as e:
            self._checkpoints_off = True
            self.log(f"[{self.name}] no checkpoints for this run: {e}")
            return 0
        nbytes = S.save(st, path)
        self.log(f"[{self.name}] checkpoint after task {self.next_task}/{self.T}: {path.name} "
                 f"({nbytes / 1e6:.1f} MB)")
        return nbytes

    def restore(self, st: S.State) -> None:
        """Continue from :meth:`state`'s output (fresh clients and server are loaded in place)."""
        t = int(st["next_task"])
        for c in range(self.K):
            for i in range(t):
                self.open_task(c, i)
            with self.streams.party(c):
                self.clients[c].load_state_dict(st["clients"][c])
        with self.streams.party(-1):
            self.server.load_state_dict(st["server"])
        gens = {c: e.generator for c, e in self.client_envs.items()} | {-1: self.server_env.generator}
        S.set_rng_state(st["rng"], gens)
        self.streams.states = {int(k): v for k, v in st.get("streams", {}).items()}
        self.correct = {s: np.array(st["correct"][s], dtype=float) for s in SPACES}
        self.total = np.array(st["total"], dtype=float)
        self.tally = _Tally(rows=list(st["rows"]), manifest=dict(st["manifest"]))
        self.t_start = time.perf_counter() - float(st.get("elapsed", 0.0))
        for name, sec in st.get("phase_seconds", {}).items():
            self.clock.add(name, float(sec))
        self.next_task = t

    # -- results -----------------------------------------------------------------------------------
    def result(self) -> RunResult:
        rounds = pd.DataFrame(self.tally.rows)
        seconds = time.perf_counter() - self.t_start
        spaces = {s: summarise(np.nan_to_num(self.correct[s], nan=0.0), self.total) for s in SPACES}
        client_rounds = rounds[rounds.phase == "round"]
        server = rounds[rounds.phase.str.startswith("server_")]
        flops_col = client_rounds["flops"]
        server_flops = server["server_flops"]
        fill = None
        if self._fill0 is not None and self.ws.features is not None:
            now = self.ws.features.fill_totals()
            fill = {k: now[k] - self._fill0[k] for k in now}
        metrics = {
            **{k: spaces["client"][k] for k in ("acc", "task_mean_acc", "avg_incremental_acc", "final_acc",
                                                "forgetting", "bwt", "accuracy_matrix")},
            "space": "client",
            "spaces": spaces,
            "global_space_applicable": bool(self.method_cls.global_space),
            "bytes_up": int(rounds.bytes_up.sum()),
            "bytes_down": int(rounds.bytes_down.sum()),
            "bytes_up_per_client_round": float(client_rounds.bytes_up.mean()),
            "bytes_down_per_client_round": float(client_rounds.bytes_down.mean()),
            "client_flops": None if flops_col.isna().any() else float(flops_col.sum()),
            "server_flops": None if server_flops.isna().any() else float(server_flops.sum()),
            "flops_mode": self.flops_mode,
            "flops_inexact_steps": self.acct.inexact,
            "flops_steps": dict(self.acct.steps),
            "flops_counted_ops": self.acct.ops,
            "client_train_seconds": float(rounds.train_seconds.sum()),
            "server_seconds": float(server.server_seconds.sum()),
            "server_peak_memory_bytes": int(server.server_peak_memory_bytes.max()),
            "wall_seconds": seconds,
            "trainable_params": int(client_rounds.trainable_params.max()),
            "num_classes": self.ws.scenario.num_classes,
            "participation": self.run_cfg.participation,
            "server_samples": int(len(self.ws.scenario.server_indices)),
            "cache_fill": fill,
            "phase_seconds": dict(sorted(self.clock.seconds.items())),
            "wire": {"client_uploads": self.tally.manifest},
        }
        return RunResult(metrics=metrics, rounds=rounds, seconds=seconds, method_config=self.method.config)


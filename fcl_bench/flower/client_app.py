"""The generic ClientApp: runs any registered method's ``Client`` (built-ins and plugins) unchanged.

Flower builds a ClientApp for every message, so nothing lives in Python objects between messages: each
handler rebuilds the method and its ``Client`` from the state this node keeps in ``Context.state`` (the
run's description, and the client's ``state_dict`` with its RNG stream, generator, tasks started and
FLOP samples, as :func:`fcl_bench.state.encode` bytes), handles one message and stores the state back.
The process keeps only what every run of a workspace shares and no client owns: the dataset files, the
frozen foundation model and its feature cache (:func:`client_workspace`).

A node is told its client id by its ``partition-id`` node config (``flower-supernode --node-config
"partition-id=3"``; the simulation runtime sets it). From the run's ``scenario.json`` (sent in the setup
message) a client reads only its own partition: its training and test indices, its tasks' classes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fcl_bench import state as S
from fcl_bench import wire
from fcl_bench.accounting import Accountant
from fcl_bench.api import Client, ClientEnv, MethodEnv, RoundInfo
from fcl_bench.flower import protocol as P

app = ClientApp()

_WORKSPACES: dict[Any, Any] = {}


def client_workspace(run, scenario_json: str, uses_foundation: bool):
    """This process's workspace for a run: the dataset (capped as the run says), the run's scenario as
    saved in its ``scenario.json``, and, when the method reads it, the frozen foundation model."""
    from fcl_bench.nn.foundation import foundation_preprocess
    from fcl_bench.scenario import Scenario
    from fcl_bench.workspace import Workspace, load_data, resolve_device

    scenario = Scenario.from_json(scenario_json)
    key = (run.workspace(), scenario.hash)
    if key not in _WORKSPACES:
        _WORKSPACES.clear()
        cfg = run.workspace()
        pre = foundation_preprocess(cfg.foundation)
        full, ds = load_data(cfg)
        _WORKSPACES[key] = Workspace(cfg=cfg, dataset=ds, scenario=scenario, device=resolve_device(cfg.device),
                                     preprocess=pre, full_dataset=full)
    ws = _WORKSPACES[key]
    if uses_foundation:
        ws.ensure_foundation(progress=False)
    return ws


class Session:
    """One message's life: the method and client rebuilt from the node's context, saved back at the end."""

    def __init__(self, context: Context, setup: dict | None = None, scenario_json: str | None = None):
        from fcl_bench import config as C
        from fcl_bench import registry
        from fcl_bench.federation import RngStreams, client_env, env_fields, open_task

        self.context = context
        if setup is None:
            if "fcl.setup" not in context.state.config_records:
                raise RuntimeError("this node has not been set up for the run (no query.setup message yet)")
            rec = context.state.config_records["fcl.setup"]
            setup, scenario_json = json.loads(str(rec["setup"])), str(rec["scenario"])
        self.setup, self.scenario_json = setup, scenario_json
        self.c = client_id(context)
        for p in setup["plugins"]:
            registry.load_plugin_file(p)
        cls = registry.get_method(setup["method"])
        mcfg = C.apply_overrides(cls.Config(), setup["overrides"], cls.name)
        run = C.RunConfig(**setup["run"])
        ws = client_workspace(run, scenario_json, cls.uses_foundation)
        if not 0 <= self.c < ws.scenario.num_clients:
            raise ValueError(f"this node is client {self.c}, but the run's scenario has clients "
                             f"0..{ws.scenario.num_clients - 1}")
        self.ws, self.run, self.name = ws, run, cls.name
        self.uploads = tuple(cls.uploads)
        amp = torch.bfloat16 if (run.amp and ws.device.type == "cuda") else None
        self.amp = amp is not None
        common = env_fields(ws, run, ws.foundation if cls.uses_foundation else None, amp, _log,
                            uses_foundation=cls.uses_foundation)
        self.streams = RngStreams(run.seed)
        outer = S.rng_state()
        try:  # the method as Federation builds it: after seeding the run's seed
            torch.manual_seed(run.seed)
            np.random.seed(run.seed % 2**32)
            method = cls(mcfg, MethodEnv(**common))
        finally:
            S.set_rng_state(outer)
        self.env: ClientEnv = client_env(ws, self.c, common)
        saved = None
        if "fcl.client" in context.state.array_records:
            saved = S.decode(P.record_bytes(context.state.array_records["fcl.client"]))
        if saved is None:  # first build: on the client's fresh stream, as in process
            with self.streams.party(self.c):
                self.client: Client = method.client(self.c, self.env)
            flops: dict = {}
        else:
            outer = S.rng_state()
            try:  # a rebuild draws nothing from the client's stream: its state is then loaded
                self.client = method.client(self.c, self.env)
            finally:
                S.set_rng_state(outer)
            for i in range(int(saved["tasks_started"])):
                open_task(ws, self.env, i)
            self.env.generator.set_state(saved["generator"])
            self.streams.states[self.c] = saved["stream"]
            with self.streams.party(self.c):
                self.client.load_state_dict(saved["client"])
            flops = saved["flops"]
        self.acct = Accountant(ws.device, setup["flops"])
        self.acct._flops = {(self.c, int(t)): int(v) for t, v in flops.items()}

    def party(self):
        return self.streams.party(self.c)

    def save(self) -> None:
        """Store the client's state back in the node's context."""
        if "fcl.setup" not in self.context.state.config_records:
            self.context.state["fcl.setup"] = ConfigRecord({"setup": json.dumps(self.setup),
                                                            "scenario": self.scenario_json})
        st = {"client": self.client.state_dict(), "stream": self.streams.states[self.c],
              "generator": self.env.generator.get_state(), "tasks_started": self.env._tasks_started,
              "flops": {str(t): v for (_, t), v in self.acct._flops.items()}}
        self.context.state["fcl.client"] = P.bytes_record(S.encode(st))

    def receive(self, content: RecordDict, kind: str) -> None:
        msg = P.read_payload(content)
        if msg is not None:
            with self.party():
                self.client.receive(wire.decode(msg, self.ws.device), kind)


def _log(line: str) -> None:
    print(line, flush=True)


def client_id(context: Context) -> int:
    v = context.node_config.get(P.CLIENT_ID_KEY)
    if v is None:
        raise ValueError("this SuperNode was not told its client id: start it with "
                         "--node-config \"partition-id=<client id>\"")
    return int(v)


def _reply(message: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=message)


@app.query("setup")
def setup(message: Message, context: Context) -> Message:
    cfg = P.config(message.content)
    for key in list(context.state.keys()):  # a new run on this node starts from nothing
        del context.state[key]
    s = Session(context, json.loads(str(cfg["setup"])), str(cfg["scenario"]))
    s.save()
    return _reply(message, RecordDict({"config": ConfigRecord({"client": s.c})}))


@app.train("start")
def start(message: Message, context: Context) -> Message:
    from fcl_bench.federation import open_task

    s = Session(context)
    s.receive(message.content, "start")
    t = int(P.config(message.content)["task"])
    with s.party():
        s.client.start_task(open_task(s.ws, s.env, t))
    s.save()
    return _reply(message, RecordDict({"config": ConfigRecord({"client": s.c})}))


@app.train()
def train(message: Message, context: Context) -> Message:
    from fcl_bench.federation import train_client

    s = Session(context)
    cfg = P.config(message.content)
    info = RoundInfo(task=int(cfg["task"]), round=int(cfg["round"]), rounds_per_task=int(cfg["rounds_per_task"]),
                     participants=tuple(int(c) for c in cfg["participants"]))
    with s.party():
        msg, m, trainable = train_client(s.client, info, s.acct, s.c, s.uploads, s.name)
    s.save()
    rd = P.payload_record(msg)
    rd["config"] = ConfigRecord({"client": s.c, "seconds": m.seconds, "flops": -1 if m.flops is None else m.flops,
                                 "flops_measured": m.flops_measured, "peak_memory_bytes": m.peak_memory_bytes,
                                 "memory_kind": m.memory_kind, "trainable": trainable})
    return _reply(message, rd)


@app.train("receive")
def receive(message: Message, context: Context) -> Message:
    s = Session(context)
    s.receive(message.content, str(P.config(message.content)["kind"]))
    s.save()
    return _reply(message, RecordDict({"config": ConfigRecord({"client": s.c})}))


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    from fcl_bench.evaluation import evaluate_client

    s = Session(context)
    s.receive(message.content, "end")
    t = int(P.config(message.content)["task"])
    with s.party():
        s.client.end_task()
    with s.party():
        counts = evaluate_client(s.ws, s.c, s.client, s.env, t, s.name, amp=s.amp)
    s.save()
    return _reply(message, RecordDict({"config": ConfigRecord({"client": s.c, **counts})}))

"""The generic ServerApp: the in-process schedule (:class:`fcl_bench.federation.Federation`), with every
client step sent to a Flower node as a message (:mod:`fcl_bench.flower.protocol`).

:class:`FlowerFederation` keeps the server, the accounting, the tallies and the results of a
``Federation``; only the four client steps (deliver downloads, start a task, train a round, end a task
and evaluate) go over Flower's ``Grid``: ``send_and_receive`` to the nodes concerned, with a timeout. A
node that does not answer in time, or answers with an error (Flower's own "node unavailable" when a
SuperNode died, or the client's exception), fails the run with the client named; nothing is written but
the failure (the executor records it), so no result is corrupted.

:func:`server_app` builds the ServerApp for one run spec (deployment: ``fcl_bench.flower.app``);
:func:`run_simulation` runs a spec on Flower's simulation runtime (``--executor flower-sim``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fcl_bench import wire
from fcl_bench.accounting import Measurement
from fcl_bench.api import RoundInfo
from fcl_bench.federation import Federation, RunResult
from fcl_bench.flower import protocol as P

#: seconds a client may take to answer one message (a round's training included) before the run fails
DEFAULT_TIMEOUT = 600.0


class ClientLost(RuntimeError):
    """A client did not answer, or answered with an error: the run fails, naming it."""


class FlowerFederation(Federation):
    """A :class:`Federation` whose clients are Flower nodes. Call :meth:`connect` with the ServerApp's
    ``Grid`` before :meth:`run`."""

    def __init__(self, *args, setup: dict, timeout: float = DEFAULT_TIMEOUT, **kw):
        self.setup, self.timeout = setup, float(timeout)
        self.grid = None
        self.nodes: dict[int, int] = {}
        self.flower = {"messages": 0, "message_bytes_down": 0, "message_bytes_up": 0, "payload_bytes_down": 0,
                       "payload_bytes_up": 0, "setup_bytes": 0}
        super().__init__(*args, **kw)

    def _build_clients(self) -> None:  # the clients live on the nodes
        return None

    # -- connecting --------------------------------------------------------------------------------
    def connect(self, grid, scenario_json: str, wait: float = 120.0) -> None:
        """Wait for the nodes (at most ``wait`` s), send each the run's description, and learn which
        client each node is."""
        self.grid = grid
        t0 = time.monotonic()
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= self.K or time.monotonic() - t0 > wait:
                break
            time.sleep(0.5)
        if len(node_ids) < self.K:
            raise ClientLost(f"the scenario has {self.K} clients but only {len(node_ids)} Flower node(s) "
                             f"connected within {wait:.0f} s; start one SuperNode per client")
        cfg = ConfigRecord({"setup": json.dumps(self.setup), "scenario": scenario_json})
        msgs = [Message(RecordDict({"config": cfg}), dst_node_id=n, message_type=P.SETUP, group_id="setup")
                for n in node_ids]
        self.flower["setup_bytes"] += sum(P.flower_nbytes(m) for m in msgs)
        replies = self._exchange(msgs, {n: f"node {n}" for n in node_ids}, "setup")
        seen: dict[int, int] = {}
        for n, rep in replies.items():
            c = int(P.config(rep.content)["client"])
            if c in seen:
                raise ClientLost(f"Flower nodes {seen[c]} and {n} both say they are client {c}; give each "
                                 "SuperNode its own --node-config \"partition-id=...\"")
            seen[c] = n
        missing = [c for c in range(self.K) if c not in seen]
        if missing:
            raise ClientLost(f"no Flower node is client {missing[0]} (nodes are clients {sorted(seen)})")
        self.nodes = seen
        self.log(f"[{self.name}] Flower: {self.K} clients on nodes " +
                 ", ".join(f"{c}->{n}" for c, n in sorted(seen.items())))

    def _exchange(self, messages: list[Message], names: dict[int, str], what: str) -> dict[int, Message]:
        """Send, wait for every reply (at most ``timeout`` s); node id -> reply. Raises :class:`ClientLost`."""
        t0 = time.monotonic()
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        got = {r.metadata.src_node_id: r for r in replies}
        for m in messages:
            n = m.metadata.dst_node_id
            if n not in got:
                raise ClientLost(f"{names[n]} (Flower node {n}) sent no reply to '{what}' within "
                                 f"{time.monotonic() - t0:.0f} s (timeout {self.timeout:.0f} s): the client "
                                 "process is gone or stuck")
            if got[n].has_error():
                err = got[n].error
                raise ClientLost(f"{names[n]} (Flower node {n}) failed in '{what}': {err.reason} (code {err.code})")
        return got

    def _send(self, contents: Mapping[int, RecordDict], mtype: str, what: str,
              payloads: Mapping[int, wire.Message] | None = None) -> dict[int, Message]:
        """One message to each client in ``contents``; client id -> reply, with Flower's bytes counted."""
        msgs = [Message(rd, dst_node_id=self.nodes[c], message_type=mtype, group_id=what) for c, rd in contents.items()]
        self.flower["messages"] += len(msgs)
        self.flower["message_bytes_down"] += sum(P.flower_nbytes(m) for m in msgs)
        self.flower["payload_bytes_down"] += sum(m.nbytes for m in (payloads or {}).values())
        node_client = {n: c for c, n in self.nodes.items()}
        got = self._exchange(msgs, {n: f"client {c}" for n, c in node_client.items()}, what)
        self.flower["messages"] += len(got)
        self.flower["message_bytes_up"] += sum(P.flower_nbytes(r) for r in got.values())
        return {node_client[n]: r for n, r in got.items()}

    @staticmethod
    def _with(msg: wire.Message | None, **config: Any) -> RecordDict:
        rd = P.payload_record(msg)
        rd["config"] = ConfigRecord(config)
        return rd

    # -- the client steps, over Flower ---------------------------------------------------------------
    def _deliver(self, msgs: Mapping[int, wire.Message], kind) -> None:
        if msgs:
            self._send({c: self._with(m, kind=kind) for c, m in msgs.items()}, P.RECEIVE, f"receive {kind}", msgs)

    def _start_clients(self, t: int, msgs: Mapping[int, wire.Message]) -> None:
        self._send({c: self._with(msgs.get(c), task=t) for c in range(self.K)}, P.START, f"start task {t}", msgs)

    def _train_clients(self, info: RoundInfo, bar=None) -> dict[int, tuple[wire.Message, Measurement, int]]:
        cfg = dict(task=info.task, round=info.round, rounds_per_task=info.rounds_per_task,
                   participants=list(info.participants))
        replies = self._send({c: self._with(None, **cfg) for c in info.participants}, P.ROUND,
                             f"round {info.round} of task {info.task}")
        out = {}
        for c, rep in replies.items():
            msg = P.read_payload(rep.content)
            self.flower["payload_bytes_up"] += msg.nbytes
            r = P.config(rep.content)
            m = Measurement(seconds=float(r["seconds"]), flops=None if int(r["flops"]) < 0 else int(r["flops"]),
                            flops_measured=bool(r["flops_measured"]), peak_memory_bytes=int(r["peak_memory_bytes"]),
                            memory_kind=str(r["memory_kind"]))
            out[c] = (msg, m, int(r["trainable"]))
        if bar is not None:
            bar.update(len(out))
        return out

    def _end_clients(self, t: int, msgs: Mapping[int, wire.Message]) -> None:
        replies = self._send({c: self._with(msgs.get(c), task=t) for c in range(self.K)}, P.EVALUATE,
                             f"end of task {t}", msgs)
        for c, rep in replies.items():
            r = P.config(rep.content)
            self.record_counts(c, t, {k: [int(v) for v in r[k]] for k in ("client", "global", "total")})

    def save_checkpoint(self, path: Path) -> int:
        if not self._checkpoints_off:
            self._checkpoints_off = True
            self.log(f"[{self.name}] no checkpoints under Flower: the clients' states stay on their nodes")
        return 0

    def result(self) -> RunResult:
        res = super().result()
        f = dict(self.flower)
        f["framing_bytes_down"] = f["message_bytes_down"] - f["payload_bytes_down"]
        f["framing_bytes_up"] = f["message_bytes_up"] - f["payload_bytes_up"]
        payload = f["payload_bytes_down"] + f["payload_bytes_up"]
        f["framing_overhead"] = (f["framing_bytes_down"] + f["framing_bytes_up"]) / payload if payload else None
        res.metrics["flower"] = f
        return res


def describe_spec(spec) -> dict:
    """What a client needs to rebuild the run's method and its own client (sent in the setup message)."""
    return {"method": spec.method, "label": spec.label, "overrides": dict(spec.method_overrides),
            "plugins": [str(Path(p).resolve()) for p in spec.plugins], "run": spec.run.to_dict(),
            "flops": spec.flops}


def server_app(fed: FlowerFederation, scenario_json: str, outcome: dict):
    """A ServerApp that connects ``fed`` to the grid and runs it; ``outcome`` gets ``result`` or ``error``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        try:
            fed.connect(grid, scenario_json)
            outcome["result"] = fed.run()
        except BaseException as e:  # handed to the caller, which records the run as failed
            outcome["error"] = e

    return app


def run_simulation(fed: FlowerFederation, scenario_json: str) -> RunResult:
    """Run ``fed`` on Flower's simulation runtime: one virtual SuperNode per client (Ray actors run the
    ClientApp, each node told its client id as ``partition-id``)."""
    import logging
    import os

    from flwr.simulation import run_simulation as flwr_run_simulation

    from fcl_bench.flower.client_app import app as client_app

    outcome: dict[str, Any] = {}
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cpus = max(1, min(fed.K, os.cpu_count() or 1))
    gpus = 1.0 / fed.K if fed.ws.device.type == "cuda" else 0.0  # the clients share the run's GPU
    # Flower keeps its files under $FLWR_HOME (default ~/.flwr): a temporary folder, removed afterwards,
    # so a run writes nothing outside its output folder and the cache
    old_home = os.environ.get("FLWR_HOME")
    with tempfile.TemporaryDirectory(prefix="fcl-flwr-sim-") as home:
        os.environ["FLWR_HOME"] = home
        try:
            flwr_run_simulation(server_app=server_app(fed, scenario_json, outcome), client_app=client_app,
                                num_supernodes=fed.K,
                                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                                                "init_args": {"num_cpus": cpus, "log_to_driver": True}})
        finally:
            if old_home is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = old_home
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RuntimeError("the Flower simulation ended without running the ServerApp")
    return outcome["result"]


def deployment_server_app():
    """The ServerApp `flwr run` starts on a SuperLink: its run config ``spec`` names a JSON file (written
    by :func:`fcl_bench.flower.deploy.submit`) holding the run spec; the result (or the failure) is written
    next to it for the submitting ``fcl-bench run`` to record in the store."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        from fcl_bench.flower.deploy import serve_spec

        serve_spec(grid, Path(str(context.run_config["spec"])))

    return app

"""What travels between the generic ServerApp and ClientApp, and how it is measured.

Message types (Flower's ``<category>.<action>``; every reply carries the client's answer or a Flower error):

* ``query.setup``: the run's description (method, method overrides, plugin files, run config, FLOP mode)
  and the run's saved ``scenario.json``; the client builds its ``Client`` (on its own RNG stream) and
  replies with its client id (its ``partition-id`` node config).
* ``train.start``: task ``t`` begins; an optional ``Server.start_task`` download; the client receives it,
  then runs ``start_task``.
* ``train`` (default action): one round (``RoundInfo``); the reply holds the upload and its measurement.
* ``train.receive``: a round's download (``kind = "round"``).
* ``evaluate``: the task's end: an optional ``Server.end_task`` download, ``end_task``, then evaluation
  on the client's own test sets through ``predict``; the reply holds the correct-prediction counts.

A payload travels as the exact safetensors bytes of :func:`fcl_bench.wire.encode` (one ``uint8``
:class:`flwr.app.Array` in an :class:`flwr.app.ArrayRecord` named ``payload``), so the bytes counted on
the wire are those of the in-process run. :func:`flower_nbytes` measures the Flower message around them
(the serialised object tree Flower ships: message metadata, records, array headers, chunks).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fcl_bench import wire

SETUP, START, ROUND, RECEIVE, EVALUATE = "query.setup", "train.start", "train", "train.receive", "evaluate"
PAYLOAD = "payload"
CLIENT_ID_KEY = "partition-id"


def payload_record(msg: wire.Message | None) -> RecordDict:
    """A RecordDict holding a wire message's bytes (nothing for an empty or absent payload)."""
    rd = RecordDict()
    if msg is not None:
        meta = {"manifest": json.dumps([list(m[:1]) + [list(m[1])] + list(m[2:]) for m in msg.manifest]),
                "nbytes": msg.nbytes}
        rd["payload_meta"] = ConfigRecord(meta)
        if msg.data:
            rd[PAYLOAD] = ArrayRecord({"data": Array(np.frombuffer(msg.data, dtype=np.uint8))})
    return rd


def read_payload(rd: RecordDict) -> wire.Message | None:
    """The wire message a :func:`payload_record` holds (``None`` when it holds none)."""
    if "payload_meta" not in rd.config_records:
        return None
    meta = rd.config_records["payload_meta"]
    data = rd.array_records[PAYLOAD]["data"].numpy().tobytes() if PAYLOAD in rd.array_records else b""
    if len(data) != int(meta["nbytes"]):
        raise ValueError(f"payload of {len(data)} bytes, announced {meta['nbytes']}")
    manifest = [(n, tuple(shape), dt, int(nb)) for n, shape, dt, nb in json.loads(str(meta["manifest"]))]
    return wire.Message(data=data, manifest=manifest)


def config(rd: RecordDict, name: str = "config") -> dict[str, Any]:
    return dict(rd.config_records[name]) if name in rd.config_records else {}


def bytes_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({"data": Array(np.frombuffer(data, dtype=np.uint8))})


def record_bytes(rec: ArrayRecord) -> bytes:
    return rec["data"].numpy().tobytes()


def flower_nbytes(obj: Any) -> int:
    """Bytes of Flower's serialised form of a message (or record): the object and all its descendants, as
    Flower deflates them to ship (gRPC's own few bytes of framing per call excluded)."""
    n = len(obj.deflate())
    for child in (obj.children or {}).values():
        n += flower_nbytes(child)
    return n

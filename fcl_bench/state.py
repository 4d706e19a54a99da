"""Serialisable state: what ``Client.state_dict()`` / ``Server.state_dict()`` return, stored with safetensors.

A :data:`State` is a nested structure of dicts (string or integer keys), lists and tuples whose leaves are
tensors, numpy arrays or JSON scalars (``None``, bool, int, float, str) -- enough for model and optimiser
state dicts (``torch.optim.Optimizer.state_dict()`` has integer keys), RNG states and index arrays. No
Python object other than these can be stored, so nothing is pickled and a state can leave the process
(a checkpoint file, Flower's ``Context.state``).

:func:`encode` turns a state into safetensors bytes: every tensor leaf is a safetensors entry, the rest of
the structure is JSON in the safetensors metadata with a placeholder per tensor. :func:`decode` inverts
it exactly (dtypes, shapes, dict key types, list vs tuple).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

State = dict[str, Any]
"""A nested structure of dicts, lists and tuples with tensors, numpy arrays and JSON scalars as leaves."""

_META_KEY = "fcl_bench_state"


class StateError(TypeError):
    """A state holds something that cannot be stored (the message names where)."""


def _pack(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise StateError(f"{where}: numpy arrays of Python objects cannot be stored")
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return _pack(obj.item(), tensors, where)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _pack(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise StateError(f"{where}: dict keys must be str or int, got {k!r}")
            items.append([k, _pack(v, tensors, f"{where}[{k!r}]")])
        return {"__items__": items}
    if isinstance(obj, (list, tuple)):
        packed = [_pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {"__tuple__": packed} if isinstance(obj, tuple) else packed
    raise StateError(f"{where}: a {type(obj).__name__} cannot be stored in a state; use tensors, numpy "
                     "arrays, JSON scalars, and dicts/lists of them")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _unpack(v, tensors) for k, v in obj["__items__"]}
    return {k: _unpack(v, tensors) for k, v in obj.items()}


def encode(state: State) -> bytes:
    """Safetensors bytes holding ``state`` (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, tensors, "state")
    return st_save(tensors, metadata={_META_KEY: json.dumps(skeleton, allow_nan=False)})


def decode(data: bytes) -> State:
    """The state :func:`encode` stored, with fresh CPU tensors."""
    # the metadata lives in the safetensors header: 8 bytes of length, then JSON
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    meta = (header.get("__metadata__") or {}).get(_META_KEY)
    if meta is None:
        raise StateError("not an fcl-bench state: the safetensors metadata has no state skeleton")
    return _unpack(json.loads(meta), st_load(data))


def save(state: State, path: str | Path) -> int:
    """Write ``state`` to ``path`` atomically; returns the bytes written."""
    from fcl_bench.store import atomic_write

    data = encode(state)
    atomic_write(Path(path), data)
    return len(data)


def load(path: str | Path) -> State:
    """Read a state written by :func:`save`."""
    return decode(Path(path).read_bytes())


def rng_state(generators: dict[int, torch.Generator] | None = None) -> State:
    """The global torch (CPU and CUDA) and numpy RNG states, plus ``generators``' states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: State = {"torch": torch.get_rng_state(),
                  "numpy": {"kind": kind, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss),
                            "cached": float(cached)},
                  "generators": {int(k): g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: State, generators: dict[int, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` returned (generators in ``generators`` are set in place)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    for k, s in state.get("generators", {}).items():
        if generators is not None and int(k) in generators:
            generators[int(k)].set_state(s)


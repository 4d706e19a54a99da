"""The wire between clients and server: payloads are serialised with safetensors and deserialised on the
other side, so byte counts are exact, no Python object is shared, and only tensors can cross."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class WireError(TypeError):
    """A payload that cannot cross the wire."""


@dataclass
class Message:
    """A serialised payload: the exact bytes that travel and a manifest of what they hold."""

    data: bytes
    manifest: list[tuple[str, tuple[int, ...], str, int]]  # name, shape, dtype, bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


def encode(payload: Mapping[str, torch.Tensor], who: str = "payload") -> Message:
    """Serialise ``payload`` (name -> tensor). Anything but a flat dict of tensors is an error."""
    if not isinstance(payload, Mapping):
        raise WireError(f"{who}: a payload must be a dict of tensors, got {type(payload).__name__}")
    clean: dict[str, torch.Tensor] = {}
    manifest = []
    storages: set[int] = set()
    for name, t in payload.items():
        if not isinstance(name, str):
            raise WireError(f"{who}: payload keys must be strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise WireError(f"{who}: '{name}' is a {type(t).__name__}; only tensors can cross the wire")
        if t.layout != torch.strided or t.is_meta:
            raise WireError(f"{who}: '{name}' is a {'meta' if t.is_meta else t.layout} tensor; only dense tensors "
                            "with data can cross the wire (send .to_dense() or its indices and values)")
        # the bytes are a copy, so the receiver never shares storage with the sender
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (a tensor sent under two names, a view of another):
        # each name travels as its own copy, as it would over a network
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        clean[name] = t
        manifest.append((name, tuple(t.shape), str(t.dtype).replace("torch.", ""), t.numel() * t.element_size()))
    data = st_save(clean) if clean else b""
    return Message(data=data, manifest=manifest)


def decode(message: Message, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Deserialise a message into fresh tensors on ``device``."""
    if not message.data:
        return {}
    return {k: v.to(device) for k, v in st_load(message.data).items()}


def transmit(payload: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
             who: str = "payload") -> tuple[dict[str, torch.Tensor], Message]:
    """Send ``payload`` across the wire: returns what the receiver gets and the message (bytes, manifest)."""
    msg = encode(payload, who)
    return decode(msg, device), msg

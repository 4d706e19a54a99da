"""The wire: exact byte counts, no shared storage, only flat dicts of tensors, dtypes preserved."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from fcl_bench.wire import WireError, decode, encode, transmit


def _payload() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g, dtype=torch.float64),
            "n": torch.tensor([37], dtype=torch.int64)}


def test_byte_count_is_the_safetensors_size_and_close_to_the_tensor_bytes():
    payload = _payload()
    msg = encode(payload)
    assert msg.nbytes == len(msg.data) == len(st_save(payload))
    tensor_bytes = 16 * 8 * 4 + 8 * 8 + 8
    (header_len,) = struct.unpack("<Q", msg.data[:8])
    assert msg.nbytes == 8 + header_len + tensor_bytes
    assert header_len < 100 * len(payload)  # the JSON header: names, dtypes, shapes, offsets
    assert sum(nb for *_, nb in msg.manifest) == tensor_bytes
    header = json.loads(msg.data[8:8 + header_len])
    assert {k: header[k]["shape"] for k in payload} == {"w": [16, 8], "b": [8], "n": [1]}


def test_received_tensors_do_not_share_storage_with_sent_ones():
    payload = _payload()
    received, _ = transmit(payload)
    for k in payload:
        assert torch.equal(received[k], payload[k])
    before = payload["w"].clone()
    received["w"].add_(1.0)
    assert torch.equal(payload["w"], before)  # the sender's tensor is untouched
    payload["b"].zero_()
    assert not torch.equal(received["b"], payload["b"])  # and the receiver's copy does not follow the sender


def test_one_tensor_sent_under_two_names_and_views_arrive_as_independent_copies():
    w = torch.arange(12.0).reshape(4, 3)
    received, msg = transmit({"a": w, "tied": w, "row": w[1], "col": w[:, 2]})
    assert torch.equal(received["tied"], w) and torch.equal(received["row"], w[1])
    assert torch.equal(received["col"], w[:, 2])
    received["a"].zero_()
    assert torch.equal(received["tied"], w)
    assert msg.nbytes > (12 + 12 + 3 + 4) * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                   torch.uint8, torch.int32, torch.int64, torch.bool])
def test_dtypes_and_shapes_are_preserved(dtype):
    x = (torch.arange(24).reshape(2, 3, 4) % 3).to(dtype)
    received, msg = transmit({"x": x, "scalar": torch.tensor(2, dtype=dtype)})
    assert received["x"].dtype == dtype and received["x"].shape == (2, 3, 4)
    assert torch.equal(received["x"], x) and received["scalar"].shape == ()
    assert dict((name, nb) for name, _, _, nb in msg.manifest)["x"] == 24 * x.element_size()


def test_non_contiguous_and_grad_tensors_cross():
    p = torch.nn.Parameter(torch.randn(5, 7))
    received, _ = transmit({"t": p.T, "p": p})
    assert torch.equal(received["t"], p.detach().T) and not received["p"].requires_grad


def test_empty_payload_is_an_empty_message():
    received, msg = transmit({})
    assert received == {} and msg.nbytes == 0 and msg.manifest == []
    assert decode(encode({})) == {}


@pytest.mark.parametrize("payload, problem", [
    ({"x": 1.5}, "only tensors"),
    ({"x": [torch.zeros(2)]}, "only tensors"),
    ({"nested": {"w": torch.zeros(2)}}, "only tensors"),
    ({"x": torch.zeros(2).numpy()}, "only tensors"),
    ({3: torch.zeros(2)}, "keys must be strings"),
    ({("a", "b"): torch.zeros(2)}, "keys must be strings"),
    ({"s": torch.eye(3).to_sparse()}, "dense"),
    ([("w", torch.zeros(2))], "must be a dict"),
])
def test_what_cannot_cross_is_a_wire_error(payload, problem):
    with pytest.raises(WireError, match=problem):
        encode(payload, who="client 0 upload")
    with pytest.raises(WireError, match="client 0 upload"):
        encode(payload, who="client 0 upload")

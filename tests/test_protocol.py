"""The decoder cannot be crashed: whatever the bytes, decode() returns a valid message or raises
ProtocolError (property-based, with hypothesis), and the attacks that worked before are refused."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemoe.cluster import protocol as P

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

from tests.fuzzing import TENSOR_SHAPE, TYPES, legal, valid_fields, values


def decode_or_refuse(frames: list) -> P.Message | None:
    """decode() may only return a message that passes validation again, or raise ProtocolError."""
    try:
        msg = P.decode(frames)
    except P.ProtocolError:
        return None
    P._validate({"v": P.PROTOCOL_VERSION, "t": msg.type, **msg.fields})  # what reached a handler is valid
    if msg.tensor is not None:
        assert msg.tensor.nbytes <= P.MAX_TENSOR_BYTES and list(msg.tensor.shape) == msg.fields["shape"]
    return msg


@pytest.mark.parametrize("t", TYPES)
def test_every_type_round_trips(t: str) -> None:
    frames = legal(t)
    msg = P.decode([bytes(f) for f in frames])
    assert msg.type == t
    for k, v in valid_fields(t).items():
        assert msg[k] == v
    if t in TENSOR_SHAPE:
        assert msg.tensor.shape == TENSOR_SHAPE[t]
        assert np.array_equal(msg.tensor.reshape(-1), np.arange(msg.tensor.size, dtype=np.float32))


@SETTINGS
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_random_bytes_never_crash(frames: list[bytes]) -> None:
    decode_or_refuse(frames)


@SETTINGS
@given(st.sampled_from(TYPES), st.data())
def test_every_field_of_every_type_replaced_by_anything(t: str, data: st.DataObject) -> None:
    header = {"v": P.PROTOCOL_VERSION, "t": t, **valid_fields(t)}
    if t in TENSOR_SHAPE:
        header |= {"dtype": "f32", "shape": list(TENSOR_SHAPE[t])}
    name = data.draw(st.sampled_from(sorted(header)), label="field")
    header[name] = data.draw(values, label="value")
    if data.draw(st.booleans(), label="drop another field"):
        header.pop(data.draw(st.sampled_from(sorted(header))), None)
    tail = [data.draw(st.binary(max_size=400), label="tensor frame")] if data.draw(st.booleans()) else []
    if t in TENSOR_SHAPE and data.draw(st.booleans(), label="exact frame"):
        tail = [bytes(legal(t)[1])]
    decode_or_refuse([msgpack.packb(header, use_bin_type=True), *tail])


@SETTINGS
@given(st.dictionaries(st.text(max_size=10), values, max_size=8))
def test_arbitrary_maps_never_crash(header: dict) -> None:
    decode_or_refuse([msgpack.packb(header, use_bin_type=True)])


def test_the_overflowing_shape_is_refused() -> None:
    """The 129-byte message that killed every process: a shape whose np.prod overflows int64 to a small number."""
    shape = [1 << 32, 1 << 32, 2, 1]  # np.prod(...) * 4 wraps to 0 in int64
    header = msgpack.packb({"v": P.PROTOCOL_VERSION, "t": "compute", "req": 1, "layer": 0, "experts": [0], "rows": [1 << 32],
                            "dtype": "f32", "shape": shape})
    with pytest.raises(P.ProtocolError, match="shape"):
        P.decode([header, b""])
    with pytest.raises(P.ProtocolError):  # under the per-dimension cap, still over the size cap
        P.decode([msgpack.packb({"v": P.PROTOCOL_VERSION, "t": "compute", "req": 1, "layer": 0, "experts": [0],
                                 "rows": [P.MAX_DIM], "dtype": "f32", "shape": [P.MAX_DIM, P.MAX_DIM]}), b""])


@pytest.mark.parametrize("v", [True, float(P.PROTOCOL_VERSION), str(P.PROTOCOL_VERSION), P.PROTOCOL_VERSION + 1, 0,
                               None, [P.PROTOCOL_VERSION]])
def test_versions_are_exact_integers(v: object) -> None:
    with pytest.raises(P.ProtocolError, match="version"):
        P.decode([msgpack.packb({"v": v, "t": "bye"})])
    frames = [msgpack.packb({"v": v, "t": "hello", "name": "x"})]
    assert P.is_foreign_hello(frames)


@pytest.mark.parametrize("field,value", [
    ("heartbeat_s", float("nan")), ("heartbeat_s", float("inf")), ("heartbeat_s", -1.0), ("heartbeat_s", True),
    ("worker_id", True), ("worker_id", -1), ("worker_id", 1.0), ("pub", "x" * (P.MAX_TEXT + 1)), ("pub", b"bytes")])
def test_welcome_fields_are_checked_for_type_and_range(field: str, value: object) -> None:
    header = {"v": P.PROTOCOL_VERSION, "t": "welcome", **valid_fields(P.WELCOME), field: value}
    with pytest.raises(P.ProtocolError, match=field):
        P.decode([msgpack.packb(header, use_bin_type=True)])


def test_dtype_allow_list_and_extra_frames() -> None:
    header = {"v": P.PROTOCOL_VERSION, "t": "compute", "req": 1, "layer": 0, "experts": [0], "rows": [1], "dtype": "f64",
              "shape": [1, 2]}
    with pytest.raises(P.ProtocolError, match="dtype"):
        P.decode([msgpack.packb(header), b"\0" * 16])
    frames = legal(P.COMPUTE)
    with pytest.raises(P.ProtocolError, match="frames"):
        P.decode([*frames, b"extra"])
    with pytest.raises(P.ProtocolError, match="bytes"):
        P.decode([frames[0], bytes(frames[1])[:-1]])


def test_only_schema_fields_reach_handlers() -> None:
    header = {"v": P.PROTOCOL_VERSION, "t": "heartbeat", "rss": 1, "peak_rss": 2, "__class__": "x", "extra": [1]}
    assert P.decode([msgpack.packb(header)]).fields == {"rss": 1, "peak_rss": 2}


def test_long_reasons_are_shortened_not_refused() -> None:
    frames = P.encode(P.FAIL, req=1, reason="x" * 10_000)
    assert len(P.decode(frames)["reason"]) == P.MAX_TEXT


def test_frame_limits_come_from_the_model() -> None:
    assert P.frame_limit() == P.MAX_HEADER_BYTES
    assert P.frame_limit(P.rows_bytes(2048)) == P.MAX_ROWS * 2048 * 4
    assert P.frame_limit(1 << 40) == P.MAX_TENSOR_BYTES
    assert P.all_finite(np.zeros(3, np.float32)) and not P.all_finite(np.array([0, np.nan], np.float32))

"""Hostile messages for the socket fuzz tests: every message type, legal and with any field replaced by
anything, random frames, and the attacks that once worked (an int64-overflowing shape, oversized
frames, versions `true` and `1.0`, NaN fields, extra frames)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
from hypothesis import strategies as st

from edgemoe.cluster import protocol as P

TYPES = sorted(P._SCHEMA)
V = P.PROTOCOL_VERSION
TENSOR_SHAPE = {P.COMPUTE: (2, 8), P.RESULT: (2, 8), P.KV_ROWS: (2, 2, 3, 4)}

leaf = (st.none() | st.booleans() | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.binary(max_size=40))
values = st.recursive(leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=12)


def valid_fields(t: str) -> dict:
    """One legal header per type; the model hash is no model's, so a hello is refused, never admitted."""
    return {
        P.HELLO: dict(name="fuzz", model="ab" * 32, budget=1 << 29, threads=1, pid=4, baseline_rss=1 << 20,
                      resident_room=1 << 20, jit_slots=1),
        P.WELCOME: dict(worker_id=0, pub="tcp://127.0.0.1:5", heartbeat_s=1.0),
        P.REJECT: dict(reason="no"),
        P.COMPUTE: dict(req=1, layer=0, experts=[3, 5], rows=[1, 1]),
        P.RESULT: dict(req=1, layer=0, experts=[3, 5], rows=[1, 1], load_s=0.0, wait_s=0.0, compute_s=0.001, hits=1),
        P.RESIDENT: dict(plan=1, experts=[[0, 1], [2, 3]]),
        P.FAIL: dict(req=1, reason="x"),
        P.PREFETCH: dict(step=0, loads=[[0, 1, 2]]),
        P.HEARTBEAT: dict(rss=1, peak_rss=2),
        P.BYE: {},
        P.UNKNOWN_PEER: {},
        P.SHADOW_HELLO: dict(name="fuzz", model="ab" * 32, pid=3, shadow_type="q4_k"),
        P.SHADOW_WELCOME: dict(heartbeat_s=1.0, n_ctx=64),
        P.SHADOW_READY: dict(n_ctx=64),
        P.KV_ROWS: dict(lo=0),
        P.JOB: dict(gen=1, pos=0, tokens=[1, 2]),
        P.ROUTES: dict(gen=1, layer=0, experts=[1, 2]),
    }[t]


def legal(t: str) -> list[bytes]:
    shape = TENSOR_SHAPE.get(t)
    tensor = np.arange(math.prod(shape), dtype=np.float32).reshape(shape) if shape else None
    return [bytes(f) for f in P.encode(t, tensor, **valid_fields(t))]


def special_cases(oversized: int) -> list[list[bytes]]:
    """The attacks of issue 13 (oversized: a frame just over the receiving socket's limit)."""
    compute = {"v": V, "t": "compute", "req": 1, "layer": 0, "experts": [0], "rows": [1], "dtype": "f32"}
    return [
        [msgpack.packb({**compute, "shape": [1 << 32, 1 << 32, 2, 1]}), b"x" * 60],  # np.prod wraps to 0
        [msgpack.packb({**compute, "shape": [1 << 62, 4]}), b""],
        [msgpack.packb({"v": True, "t": "heartbeat", "rss": 1, "peak_rss": 1})],
        [msgpack.packb({"v": float(V), "t": "heartbeat", "rss": 1, "peak_rss": 1})],
        [msgpack.packb({"v": V, "t": "welcome", "worker_id": 0, "pub": "tcp://127.0.0.1:5", "heartbeat_s": float("nan")})],
        [msgpack.packb({"v": V, "t": "result", "req": 1, "layer": 0, "experts": [0], "rows": [1], "dtype": "f32",
                        "shape": [1, 2], "load_s": float("nan"), "wait_s": 0, "compute_s": 0, "hits": True}), b"\0" * 8],
        [*legal(P.HEARTBEAT), b"extra"],
        [b"\0" * oversized],  # over MAXMSGSIZE: ZeroMQ drops the link, nothing is buffered
        [msgpack.packb({"v": V, "t": "heartbeat", "rss": 1, "peak_rss": 1, "pad": "x" * (oversized + 16)})],
    ]


@st.composite
def message(draw: st.DrawFn, oversized: int) -> list[bytes]:
    kind = draw(st.sampled_from(["legal", "mutated", "mutated", "bytes", "special"]))
    if kind == "bytes":
        return draw(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
    if kind == "special":
        return draw(st.sampled_from(special_cases(oversized)))
    t = draw(st.sampled_from(TYPES))
    if kind == "legal":
        return legal(t)
    header = {"v": V, "t": t, **valid_fields(t)}
    if t in TENSOR_SHAPE:
        header |= {"dtype": "f32", "shape": list(TENSOR_SHAPE[t])}
    name = draw(st.sampled_from(sorted(header)))
    header[name] = draw(values)
    tail = [draw(st.binary(max_size=300))] if draw(st.booleans()) else []
    return [msgpack.packb(header, use_bin_type=True), *tail]


def batches(oversized: int, excluded: frozenset[str] = frozenset()) -> st.SearchStrategy[list[list[bytes]]]:
    """Lists of hostile messages; legal messages of the excluded types (instructions the receiver must
    obey when its authenticated peer sends them, such as a reject) are left out."""
    def allowed(frames: list[bytes]) -> bool:
        try:
            return P.decode(frames).type not in excluded
        except P.ProtocolError:
            return True

    return st.lists(message(oversized).filter(allowed), min_size=1, max_size=6)

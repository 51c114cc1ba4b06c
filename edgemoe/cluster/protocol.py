"""The wire protocol between coordinator and workers (docs/PROTOCOL.md).

Every message is a ZeroMQ multipart message: one msgpack header (a map with the protocol version
"v", the message type "t" and typed fields), then zero or more raw tensor frames (little-endian,
C order, dtype and shape given in the header). Nothing is pickled. This module does not import
any compute code: it only encodes, decodes and validates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 2
MAX_HEADER_BYTES = 64 << 10
MAX_TENSOR_BYTES = 256 << 20  # a prefill mini-batch of a large model stays far below this
MAX_EXPERTS_PER_COMPUTE = 256  # experts one COMPUTE may carry (a layer's routed experts on one worker)
MAX_RESIDENT = 1 << 16  # experts one RESIDENT may name

# message types ---------------------------------------------------------------------------------
HELLO = "hello"  # worker -> coordinator (DEALER -> ROUTER): who I am, what I can do
WELCOME = "welcome"  # coordinator -> worker: accepted; where predictions are published
REJECT = "reject"  # coordinator -> worker: refused (e.g. another model); the worker exits
COMPUTE = "compute"  # coordinator -> worker: run experts of one layer, each on its own rows of the attached hidden states
RESULT = "result"  # worker -> coordinator: the experts' outputs (same rows), with timings
RESIDENT = "resident"  # coordinator -> worker: the experts to keep resident (the whole set; replaces the last one)
FAIL = "fail"  # worker -> coordinator: a request could not be served (message says why)
PREFETCH = "prefetch"  # coordinator -> all workers (PUB): load these experts now, compute follows
HEARTBEAT = "heartbeat"  # both ways: liveness, with the worker's memory use
BYE = "bye"  # worker -> coordinator: shutting down cleanly
UNKNOWN_PEER = "unknown"  # coordinator -> worker: I do not know you (I restarted): say hello again
# the shadow node (its own socket pair: the coordinator's shadow ROUTER, the node's DEALER)
SHADOW_HELLO = "shadow_hello"  # shadow node -> coordinator: who I am
SHADOW_WELCOME = "shadow_welcome"  # coordinator -> shadow node: accepted
KV_ROWS = "kv_rows"  # coordinator -> shadow node: the main model's K/V rows [lo, lo + n) of every layer
JOB = "job"  # coordinator -> shadow node: the main model started evaluating these tokens at pos
ROUTES = "routes"  # shadow node -> coordinator: the shadow's router choice for one layer of job gen

# fields each message type must carry, with their Python types
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    HELLO: {"name": str, "model": str, "budget": int, "threads": int, "pid": int, "baseline_rss": int,
            "resident_room": int, "jit_slots": int},
    WELCOME: {"worker_id": int, "pub": str, "heartbeat_s": (int, float)},
    REJECT: {"reason": str},
    COMPUTE: {"req": int, "layer": int, "experts": list, "rows": list, "dtype": str, "shape": list},
    RESULT: {"req": int, "layer": int, "experts": list, "rows": list, "dtype": str, "shape": list,
             "load_s": (int, float), "wait_s": (int, float), "compute_s": (int, float), "hits": int},
    RESIDENT: {"plan": int, "experts": list},
    FAIL: {"req": int, "reason": str},
    PREFETCH: {"step": int, "loads": list},
    HEARTBEAT: {"rss": int, "peak_rss": int},
    BYE: {},
    UNKNOWN_PEER: {},
    SHADOW_HELLO: {"name": str, "model": str, "pid": int, "shadow_type": str},
    SHADOW_WELCOME: {"heartbeat_s": (int, float), "n_ctx": int},
    KV_ROWS: {"lo": int, "dtype": str, "shape": list},
    JOB: {"gen": int, "pos": int, "tokens": list},
    ROUTES: {"gen": int, "layer": int, "experts": list},
}
_TENSOR_TYPES = {COMPUTE, RESULT, KV_ROWS}
_DTYPES = {"f32": np.float32}


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the receiver logs it and drops it."""


@dataclass
class Message:
    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensor: np.ndarray | None = None

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def encode(msg_type: str, tensor: np.ndarray | None = None, **fields: Any) -> list[bytes | memoryview]:
    """Frames for one message. The tensor frame is the array's own buffer (no copy)."""
    if msg_type not in _SCHEMA:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    header = {"v": PROTOCOL_VERSION, "t": msg_type, **fields}
    frames: list[bytes | memoryview] = []
    if msg_type in _TENSOR_TYPES:
        if tensor is None:
            raise ProtocolError(f"{msg_type} needs a tensor")
        arr = np.ascontiguousarray(tensor, dtype=np.float32)
        header["dtype"], header["shape"] = "f32", list(arr.shape)
        frames.append(memoryview(arr).cast("B"))
    _validate(header)
    return [msgpack.packb(header, use_bin_type=True), *frames]


def decode(frames: list[bytes | memoryview | Any]) -> Message:
    """Parse and validate a received message (frames after any ROUTER identity). Raises ProtocolError."""
    if not frames:
        raise ProtocolError("empty message")
    raw = _bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several exception types on garbage
        raise ProtocolError(f"header is not msgpack ({type(e).__name__})") from None
    _validate(header)
    t = header["t"]
    tensor = None
    if t in _TENSOR_TYPES:
        if len(frames) != 2:
            raise ProtocolError(f"{t} must have exactly one tensor frame, got {len(frames) - 1}")
        shape = header["shape"]
        if not (1 <= len(shape) <= 4) or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ProtocolError(f"bad tensor shape {shape!r}")
        dtype = _DTYPES.get(header["dtype"])
        if dtype is None:
            raise ProtocolError(f"unsupported dtype {header['dtype']!r}")
        payload = _buffer(frames[1])
        expected = math.prod(shape) * np.dtype(dtype).itemsize  # (np.prod costs ~5 us a message)
        if expected > MAX_TENSOR_BYTES:
            raise ProtocolError(f"tensor of {expected} bytes exceeds {MAX_TENSOR_BYTES}")
        if len(payload) != expected:
            raise ProtocolError(f"tensor frame has {len(payload)} bytes, shape {shape} needs {expected}")
        tensor = np.frombuffer(payload, dtype=dtype).reshape(shape)
    elif len(frames) != 1:
        raise ProtocolError(f"{t} takes no tensor frames, got {len(frames) - 1}")
    fields = {k: v for k, v in header.items() if k not in ("v", "t")}
    return Message(t, fields, tensor)


def is_foreign_hello(frames: list[Any]) -> bool:
    """A hello of another protocol version (answered with a reject rather than silence)."""
    try:
        header = msgpack.unpackb(_bytes(frames[0])[:MAX_HEADER_BYTES], raw=False)
    except Exception:
        return False
    return isinstance(header, dict) and header.get("t") == HELLO and header.get("v") != PROTOCOL_VERSION


def _validate(header: Any) -> None:
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    v = header.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {v!r}, this side speaks {PROTOCOL_VERSION}")
    t = header.get("t")
    schema = _SCHEMA.get(t) if isinstance(t, str) else None
    if schema is None:
        raise ProtocolError(f"unknown message type {t!r}")
    for name, typ in schema.items():
        if name not in header:
            raise ProtocolError(f"{t} lacks field {name!r}")
        value = header[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ProtocolError(f"{t}.{name} has type {type(value).__name__}")
    for name in ("tokens", "experts", "rows"):
        if name in schema and t != RESIDENT and not all(_uint(x) for x in header[name]):
            raise ProtocolError(f"{t}.{name} must be a list of non-negative integers")
    if t in (COMPUTE, RESULT):
        _validate_rows(t, header)
    if t == RESIDENT:
        experts = header["experts"]
        if len(experts) > MAX_RESIDENT:
            raise ProtocolError(f"resident names {len(experts)} experts, at most {MAX_RESIDENT}")
        if not all(isinstance(x, list) and len(x) == 2 and _uint(x[0]) and _uint(x[1]) for x in experts):
            raise ProtocolError("resident experts must be [layer, expert] pairs of non-negative integers")
        if len({tuple(x) for x in experts}) != len(experts):
            raise ProtocolError("resident names an expert twice")
    if t == JOB and not header["tokens"]:
        raise ProtocolError("a job needs at least one token")
    if t == PREFETCH:
        for item in header["loads"]:
            if not (isinstance(item, list) and len(item) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
                raise ProtocolError("prefetch loads must be [worker_id, layer, expert] integer triples")


def _uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _validate_rows(t: str, header: dict) -> None:
    """experts[i] runs on the next rows[i] rows of the tensor: one entry each, no expert twice,
    every row covered (the shape itself is checked with the tensor frame)."""
    experts, rows, shape = header["experts"], header["rows"], header["shape"]
    if not 1 <= len(experts) <= MAX_EXPERTS_PER_COMPUTE:
        raise ProtocolError(f"{t} carries {len(experts)} experts, 1 to {MAX_EXPERTS_PER_COMPUTE} allowed")
    if len(rows) != len(experts):
        raise ProtocolError(f"{t} has {len(experts)} experts but {len(rows)} row counts")
    if len(set(experts)) != len(experts):
        raise ProtocolError(f"{t} names an expert twice")
    if not all(n > 0 for n in rows):
        raise ProtocolError(f"{t}.rows must be positive")
    if shape and isinstance(shape[0], int) and sum(rows) != shape[0]:
        raise ProtocolError(f"{t}.rows add up to {sum(rows)}, the tensor has {shape[0]} rows")


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _buffer(frame: Any) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)

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

PROTOCOL_VERSION = 3  # 3: shadow_ready (a shadow node heartbeats while it builds its shadow)
MAX_HEADER_BYTES = 64 << 10
MAX_TENSOR_BYTES = 256 << 20  # the decoder's absolute cap; sockets are capped lower, from the model (frame_limit)
MAX_DIM = 1 << 24  # per tensor dimension: no legal shape comes near it, and products stay far from int64
MAX_ROWS = 64  # token rows per compute/result message (the coordinator's prefill mini-batch)
KV_CHUNK_BYTES = 32 << 20  # K/V rows per kv_rows message (one row of every layer may exceed it)
MAX_NAME = 64  # names of workers and shadow nodes
MAX_TEXT = 4096  # reasons, endpoints, hashes
MAX_LIST = 1 << 16  # prefetch loads, job tokens, routed experts
MAX_INT = (1 << 63) - 1  # every integer field fits int64
MAX_SECONDS = 1e9  # timings and intervals: finite, non-negative, below this
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
SHADOW_READY = "shadow_ready"  # shadow node -> coordinator: its shadow is built, send K/V rows and jobs
KV_ROWS = "kv_rows"  # coordinator -> shadow node: the main model's K/V rows [lo, lo + n) of every layer
JOB = "job"  # coordinator -> shadow node: the main model started evaluating these tokens at pos
ROUTES = "routes"  # shadow node -> coordinator: the shadow's router choice for one layer of job gen

# field kinds: each checks type and range (ints are never bools, floats are finite)
_INT, _NUM, _BOOL, _NAME, _TEXT, _INTS, _LOADS, _PAIRS, _SHAPE, _DTYPE = (
    "int", "num", "bool", "name", "text", "ints", "loads", "pairs", "shape", "dtype")

# fields each message type must carry, with their kinds
_SCHEMA: dict[str, dict[str, str]] = {
    HELLO: {"name": _NAME, "model": _TEXT, "budget": _INT, "threads": _INT, "pid": _INT, "baseline_rss": _INT,
            "resident_room": _INT, "jit_slots": _INT},
    WELCOME: {"worker_id": _INT, "pub": _TEXT, "heartbeat_s": _NUM},
    REJECT: {"reason": _TEXT},
    COMPUTE: {"req": _INT, "layer": _INT, "experts": _INTS, "rows": _INTS, "dtype": _DTYPE, "shape": _SHAPE},
    RESULT: {"req": _INT, "layer": _INT, "experts": _INTS, "rows": _INTS, "dtype": _DTYPE, "shape": _SHAPE,
             "load_s": _NUM, "wait_s": _NUM, "compute_s": _NUM, "hits": _INT},
    RESIDENT: {"plan": _INT, "experts": _PAIRS},
    FAIL: {"req": _INT, "reason": _TEXT},
    PREFETCH: {"step": _INT, "loads": _LOADS},
    HEARTBEAT: {"rss": _INT, "peak_rss": _INT},
    BYE: {},
    UNKNOWN_PEER: {},
    SHADOW_HELLO: {"name": _NAME, "model": _TEXT, "pid": _INT, "shadow_type": _TEXT},
    SHADOW_WELCOME: {"heartbeat_s": _NUM, "n_ctx": _INT},
    SHADOW_READY: {"n_ctx": _INT},
    KV_ROWS: {"lo": _INT, "dtype": _DTYPE, "shape": _SHAPE},
    JOB: {"gen": _INT, "pos": _INT, "tokens": _INTS},
    ROUTES: {"gen": _INT, "layer": _INT, "experts": _INTS},
}
_TENSOR_TYPES = {COMPUTE, RESULT, KV_ROWS}
_DTYPES = {"f32": np.float32}  # the allow-list


def frame_limit(tensor_bytes: int = 0) -> int:
    """zmq.MAXMSGSIZE for a socket whose largest legal frame is a tensor of tensor_bytes (or a header):
    a peer that sends a bigger frame is disconnected by ZeroMQ before the bytes are buffered."""
    return max(MAX_HEADER_BYTES, min(int(tensor_bytes), MAX_TENSOR_BYTES))


def rows_bytes(n_embd: int, rows: int = MAX_ROWS) -> int:
    """The largest compute/result tensor frame of a model with this embedding width."""
    return rows * n_embd * np.dtype(np.float32).itemsize


def all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity (results are checked before they are used)."""
    return bool(np.isfinite(a).all())


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
    if isinstance(fields.get("reason"), str) and len(fields["reason"]) > MAX_TEXT:
        fields["reason"] = fields["reason"][:MAX_TEXT - 3] + "..."  # a long error must not stop its report
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
    """Parse and validate a received message (frames after any ROUTER identity). Raises ProtocolError
    and nothing else, whatever the bytes: every field is checked for type and range before use."""
    try:
        return _decode(frames)
    except ProtocolError:
        raise
    except Exception as e:  # a case the checks above missed must still only drop the message
        raise ProtocolError(f"undecodable message ({type(e).__name__}: {str(e)[:200]})") from None


def _decode(frames: list[Any]) -> Message:
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > 2:
        raise ProtocolError(f"{len(frames)} frames; a message has a header and at most one tensor")
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
        dtype = np.dtype(_DTYPES[header["dtype"]])
        expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow (dims are capped anyway)
        if expected > MAX_TENSOR_BYTES:
            raise ProtocolError(f"tensor of {expected} bytes exceeds {MAX_TENSOR_BYTES}")
        payload = _buffer(frames[1])
        if payload.nbytes != expected:
            raise ProtocolError(f"tensor frame has {payload.nbytes} bytes, shape {shape} needs {expected}")
        tensor = np.frombuffer(payload, dtype=dtype).reshape(shape)
    elif len(frames) != 1:
        raise ProtocolError(f"{t} takes no tensor frames, got {len(frames) - 1}")
    fields = {k: header[k] for k in _SCHEMA[t]}  # only the schema's fields reach the handlers
    return Message(t, fields, tensor)


def is_foreign_hello(frames: list[Any]) -> bool:
    """A hello of another protocol version (answered with a reject rather than silence)."""
    try:
        header = msgpack.unpackb(_bytes(frames[0])[:MAX_HEADER_BYTES], raw=False)
        return isinstance(header, dict) and header.get("t") == HELLO and not _is_version(header.get("v"))
    except Exception:
        return False


def _is_version(v: Any) -> bool:
    return type(v) is int and v == PROTOCOL_VERSION  # exact: True and 1.0 are not 1


def _is_int(x: Any, lo: int = 0, hi: int = MAX_INT) -> bool:
    return type(x) is int and lo <= x <= hi


def _check(t: str, name: str, kind: str, value: Any) -> None:
    ok: bool
    if kind == _INT:
        ok = _is_int(value)
    elif kind == _NUM:
        ok = type(value) in (int, float) and math.isfinite(value) and 0 <= value <= MAX_SECONDS
    elif kind == _BOOL:
        ok = type(value) is bool
    elif kind == _NAME:
        ok = type(value) is str and 0 < len(value) <= MAX_NAME
    elif kind == _TEXT:
        ok = type(value) is str and len(value) <= MAX_TEXT
    elif kind == _INTS:
        ok = type(value) is list and len(value) <= MAX_LIST and all(_is_int(x) for x in value)
    elif kind == _LOADS:
        ok = type(value) is list and len(value) <= MAX_LIST and all(
            type(item) is list and len(item) == 3 and all(_is_int(x) for x in item) for item in value)
    elif kind == _PAIRS:
        ok = type(value) is list and len(value) <= MAX_RESIDENT and all(
            type(item) is list and len(item) == 2 and all(_is_int(x) for x in item) for item in value)
    elif kind == _SHAPE:
        ok = type(value) is list and 1 <= len(value) <= 4 and all(_is_int(n, 1, MAX_DIM) for n in value)
    elif kind == _DTYPE:
        ok = type(value) is str and value in _DTYPES
    else:  # pragma: no cover - a schema typo
        raise AssertionError(kind)
    if not ok:
        shown = repr(value)
        raise ProtocolError(f"{t}.{name} is not a valid {kind}: {shown[:80]}{'...' if len(shown) > 80 else ''}")


def _validate(header: Any) -> None:
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    v = header.get("v")
    if not _is_version(v):
        raise ProtocolError(f"protocol version {v!r:.40}, this side speaks {PROTOCOL_VERSION}")
    t = header.get("t")
    schema = _SCHEMA.get(t) if type(t) is str else None
    if schema is None:
        raise ProtocolError(f"unknown message type {t!r:.40}")
    for name, kind in schema.items():
        if name not in header:
            raise ProtocolError(f"{t} lacks field {name!r}")
        _check(t, name, kind, header[name])
    if t in (COMPUTE, RESULT):
        _validate_rows(t, header)
    if t == RESIDENT and len({tuple(x) for x in header["experts"]}) != len(header["experts"]):
        raise ProtocolError("resident names an expert twice")
    if t == JOB and not header["tokens"]:
        raise ProtocolError("a job needs at least one token")


def _validate_rows(t: str, header: dict) -> None:
    """experts[i] runs on the next rows[i] rows of the tensor: one entry each, no expert twice,
    every row covered (the shape itself was checked above; its byte size with the tensor frame)."""
    experts, rows, shape = header["experts"], header["rows"], header["shape"]
    if not 1 <= len(experts) <= MAX_EXPERTS_PER_COMPUTE:
        raise ProtocolError(f"{t} carries {len(experts)} experts, 1 to {MAX_EXPERTS_PER_COMPUTE} allowed")
    if len(rows) != len(experts):
        raise ProtocolError(f"{t} has {len(experts)} experts but {len(rows)} row counts")
    if len(set(experts)) != len(experts):
        raise ProtocolError(f"{t} names an expert twice")
    if not all(n > 0 for n in rows):
        raise ProtocolError(f"{t}.rows must be positive")
    if sum(rows) != shape[0]:
        raise ProtocolError(f"{t}.rows add up to {sum(rows)}, the tensor has {shape[0]} rows")


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _buffer(frame: Any) -> memoryview:
    view = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view

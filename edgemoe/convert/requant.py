"""Requantize tensors for the shadow model: dequantize the source (gguf-py), quantize to a lower type.

Q4_0/Q8_0/F16 are quantized by gguf-py in numpy (bytes identical to ggml's); K-quants, which gguf-py
cannot produce, by ggml's own `ggml_quantize_chunk` (no importance matrix). Work goes in chunks of
rows so that a large tensor never has to be dequantized whole.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize, quantize

from edgemoe.errors import UserError
from edgemoe.format.schema import GGMLQuantizationType, block_size, row_nbytes

Q = GGMLQuantizationType

# name (as on the command line and in file names) -> type; the order is best-to-smallest
SHADOW_TYPES: dict[str, GGMLQuantizationType] = {
    "f16": Q.F16,
    "q8_0": Q.Q8_0,
    "q6_k": Q.Q6_K,
    "q5_k": Q.Q5_K,
    "q5_0": Q.Q5_0,
    "q4_k": Q.Q4_K,
    "iq4_nl": Q.IQ4_NL,
    "q4_0": Q.Q4_0,
    "q3_k": Q.Q3_K,
    "q2_k": Q.Q2_K,
}
# a type of blocks of 32 with about the bits per weight of each K-quant (rows need only be a
# multiple of 32): what rows a K-quant cannot take fall back to with --shadow-fallback-type
SAME_SIZE_FALLBACK = {"q6_k": "q8_0", "q5_k": "q5_0", "q4_k": "iq4_nl", "q3_k": "iq4_nl", "q2_k": "q4_0"}
_NUMPY_TYPES = (Q.F16, Q.Q8_0, Q.Q4_0)
_CHUNK_FLOATS = 4 << 20  # rows per chunk: at most 16 MiB of float32 at a time


def type_name(t: GGMLQuantizationType) -> str:
    return t.name.lower()


def parse_shadow_type(name: str, option: str = "--shadow-type") -> GGMLQuantizationType:
    t = SHADOW_TYPES.get(name.strip().lower())
    if t is None:
        raise UserError(f"{option} {name}: unknown type (available: {', '.join(SHADOW_TYPES)})")
    return t


def types_for_rows(row_lengths: list[int]) -> list[str]:
    """Shadow types every one of these row lengths can be quantized to."""
    return [n for n, t in SHADOW_TYPES.items() if all(r % block_size(t) == 0 for r in row_lengths)]


def fits(n_per_row: int, t: GGMLQuantizationType) -> bool:
    return n_per_row % block_size(t) == 0


def check_rows(src: str, tensor: str, n_per_row: int, t: GGMLQuantizationType, all_rows: list[int], option: str,
               fallback_hint: bool = False) -> None:
    """A UserError naming the tensor and the types that work when rows of n_per_row can't become t."""
    if fits(n_per_row, t):
        return
    ok = types_for_rows(all_rows)
    hint = f"types that work for this model: {', '.join(ok)}" if ok else "no shadow type fits this model's row lengths"
    alt = SAME_SIZE_FALLBACK.get(type_name(t))
    if fallback_hint and alt is not None and fits(n_per_row, SHADOW_TYPES[alt]):
        hint += f"; or keep {type_name(t)} where it fits with --shadow-fallback-type {alt}"
    raise UserError(f"{src}: {option} {type_name(t)} needs rows of a multiple of {block_size(t)} values, but "
                    f"{tensor} has rows of {n_per_row}; {hint}")


def requantize_rows(rows: np.ndarray, t: GGMLQuantizationType, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 [n_rows, n_per_row] -> uint8 [n_rows, row bytes] of type t. importance [n_per_row]
    (an imatrix's mean squared activations) weighs each column's rounding error; it takes ggml's
    quantizer, which uses it for the 4- and 5-bit and K-quant types and ignores it for q8_0/f16."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (n_per_row,):
            raise ValueError(f"importance of shape {importance.shape} for rows of {n_per_row}")
    if t in _NUMPY_TYPES and importance is None:
        out = quantize(rows, t)
        return np.ascontiguousarray(out).view(np.uint8).reshape(n_rows, row_nbytes(t, n_per_row))
    from edgemoe.ggml.lib import lib  # ggml only where gguf-py can't quantize

    out = np.empty((n_rows, row_nbytes(t, n_per_row)), dtype=np.uint8)
    lib.ggml_quantize_init(int(t))
    imatrix = importance.ctypes.data_as(ctypes.c_void_p) if importance is not None else None
    written = lib.ggml_quantize_chunk(int(t), rows.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
                                      0, n_rows, n_per_row, imatrix)
    if written != out.nbytes:
        raise AssertionError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def dequantize_rows(raw: np.ndarray, src_type: GGMLQuantizationType, n_per_row: int) -> np.ndarray:
    """uint8 bytes of whole rows of src_type -> float32 [n_rows, n_per_row]."""
    rb = row_nbytes(src_type, n_per_row)
    data = np.asarray(raw, dtype=np.uint8).reshape(-1, rb)
    return np.asarray(dequantize(data, src_type), dtype=np.float32).reshape(-1, n_per_row)


def requantized_nbytes(tensor: ReaderTensor, t: GGMLQuantizationType) -> int:
    ne = [int(x) for x in tensor.shape]
    return row_nbytes(t, ne[0]) * int(np.prod(ne[1:], dtype=np.int64))


def requantized_chunks(raw: np.ndarray, src_type: GGMLQuantizationType, ne: tuple[int, ...],
                       t: GGMLQuantizationType, importance: list[np.ndarray | None] | None = None) -> Iterator[np.ndarray]:
    """A tensor's bytes (raw, type src_type, shape ne) as type t, a chunk of rows at a time.

    importance: for a stacked expert tensor, one column weighting per expert (None for an expert the
    imatrix never saw); a chunk never spans two experts. An expert whose bytes and weighting equal an
    earlier one's (an upcycled model's copies) is quantized once: rows quantize independently, so the
    copy is byte for byte what quantizing it again would give."""
    n_per_row = ne[0]
    n_rows = int(np.prod(ne[1:], dtype=np.int64))
    rb = row_nbytes(src_type, n_per_row)
    step = max(1, _CHUNK_FLOATS // n_per_row)
    n_mat = len(importance) if importance else (int(ne[2]) if len(ne) == 3 else 1)
    per_mat = n_rows // n_mat
    weights = importance or [None] * n_mat
    first: dict[bytes, int] = {}  # digest of (expert bytes, weighting) -> the first expert with it
    same_as: list[int] = []
    for m in range(n_mat):
        h = hashlib.blake2b(memoryview(raw[m * per_mat * rb:(m + 1) * per_mat * rb]), digest_size=16)
        if weights[m] is not None:
            h.update(np.ascontiguousarray(weights[m], dtype=np.float32).tobytes())
        same_as.append(first.setdefault(h.digest() + bytes([weights[m] is None]), m))
    keep = {same_as[m] for m in range(n_mat) if same_as[m] != m}  # originals whose chunks are reused later
    tasks = [(r0, min((m + 1) * per_mat, r0 + step), weights[m])
             for m in range(n_mat) if same_as[m] == m for r0 in range(m * per_mat, (m + 1) * per_mat, step)]

    def one(task: tuple[int, int, np.ndarray | None]) -> np.ndarray:
        r0, r1, w = task
        return requantize_rows(dequantize_rows(raw[r0 * rb:r1 * rb], src_type, n_per_row), t, w)

    results = ordered_parallel(one, tasks)
    kept: dict[int, list[np.ndarray]] = {}
    for m in range(n_mat):
        if same_as[m] != m:
            yield from kept[same_as[m]]
            continue
        for _ in range(m * per_mat, (m + 1) * per_mat, step):
            chunk = next(results)
            if m in keep:
                kept.setdefault(m, []).append(chunk)
            yield chunk


def ordered_parallel(fn, tasks: list, n_threads: int | None = None) -> Iterator:
    """fn(task) for every task, computed on n_threads threads (default: every core this process may
    use), yielded in task order with a bounded window in flight. ggml's quantizer runs in C without
    the GIL and every chunk is independent, so the bytes are those of the serial loop."""
    n = n_threads or len(os.sched_getaffinity(0))
    if n <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield fn(task)
        return
    with ThreadPoolExecutor(max_workers=n) as pool:
        window: deque = deque()
        it = iter(tasks)
        for task in it:
            window.append(pool.submit(fn, task))
            if len(window) >= 2 * n:
                break
        for task in it:
            yield window.popleft().result()
            window.append(pool.submit(fn, task))
        while window:
            yield window.popleft().result()

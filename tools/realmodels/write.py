"""Streaming, atomic GGUF writer: metadata copied key by key, tensors produced one at a time.

Every tensor's info is declared first (name, type, shape); the data of a large tensor can be a
function called only when the writer reaches it, so a model of several hundred MB is written
with one layer in memory. The file appears under its name only once complete (temp + rename).
Same inputs give the same bytes: gguf-py's writer adds nothing variable (no time, no paths).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quant_shape_to_byte_shape

from edgemoe.util.files import atomic_path

Q = GGMLQuantizationType


@dataclass(frozen=True)
class MetaKV:
    """One metadata key with its exact GGUF value type (and element type for arrays)."""

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None


@dataclass
class _Tensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy-order element shape
    data: np.ndarray | Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        if self.qtype in (Q.F32, Q.F16):
            return int(np.prod(self.shape)) * (4 if self.qtype == Q.F32 else 2)
        return int(np.prod(quant_shape_to_byte_shape(self.shape, self.qtype)))


def _np_dtype(qtype: GGMLQuantizationType) -> Any:
    return {Q.F32: np.float32, Q.F16: np.float16}.get(qtype, np.uint8)


class GGUFOut:
    """Collect metadata and tensors, then write() them to path in one pass."""

    def __init__(
        self,
        path: str | Path,
        metadata: list[MetaKV],
        overrides: dict[str, tuple[Any, GGUFValueType]] | None = None,
    ) -> None:
        self.path = Path(path)
        kv = [(m.key, m.value, m.vtype, m.sub_type) for m in metadata]
        for key, (value, vtype) in (overrides or {}).items():
            idx = next((i for i, e in enumerate(kv) if e[0] == key), None)
            if idx is not None:
                kv[idx] = (key, value, vtype, None)
                continue
            # a new key goes after the last key of its namespace (llama.*), else at the end
            ns = key.split(".", 1)[0] + "."
            last = max((i for i, e in enumerate(kv) if e[0].startswith(ns)), default=len(kv) - 1)
            kv.insert(last + 1, (key, value, vtype, None))
        self.kv = kv
        arch = next((e[1] for e in kv if e[0] == "general.architecture"), None)
        if not arch:
            raise ValueError("metadata lacks general.architecture")
        self.arch = arch
        self.tensors: list[_Tensor] = []

    def add(self, name: str, data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...] | None = None) -> None:
        """A tensor given by its stored data (bytes for quantized types); shape: numpy-order
        element shape (required when data is raw bytes of another shape)."""
        if shape is None:
            if qtype in (Q.F32, Q.F16):
                shape = tuple(data.shape)
            else:
                block, tsize = GGML_QUANT_SIZES[qtype]
                shape = (*data.shape[:-1], data.shape[-1] // tsize * block)
        self._append(_Tensor(name, qtype, tuple(shape), data))

    def add_lazy(self, name: str, qtype: GGMLQuantizationType, shape: tuple[int, ...], fn: Callable[[], np.ndarray]) -> None:
        """A tensor whose data fn() returns when the writer reaches it."""
        self._append(_Tensor(name, qtype, tuple(shape), fn))

    def _append(self, t: _Tensor) -> None:
        if any(o.name == t.name for o in self.tensors):
            raise ValueError(f"duplicate tensor {t.name}")
        self.tensors.append(t)

    def write(self) -> Path:
        with atomic_path(self.path) as tmp:
            w = GGUFWriter(tmp, self.arch)  # writes general.architecture first
            for key, value, vtype, sub in self.kv:
                if key == "general.architecture":
                    continue
                w.add_key_value(key, value, vtype, sub_type=sub)
            for t in self.tensors:
                dt = _np_dtype(t.qtype)
                shape = t.shape if dt is not np.uint8 else quant_shape_to_byte_shape(t.shape, t.qtype)
                w.add_tensor_info(t.name, shape, np.dtype(dt), t.nbytes, raw_dtype=t.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in self.tensors:
                a = t.data() if callable(t.data) else t.data
                a = np.ascontiguousarray(a)
                if a.nbytes != t.nbytes or a.dtype != _np_dtype(t.qtype):
                    raise ValueError(f"{t.name}: got {a.dtype} {a.nbytes} bytes, declared {t.qtype.name} {t.nbytes}")
                w.write_tensor_data(a)
            w.close()
        return self.path




# (name, type, numpy-order shape, data or data function) of one tensor
TensorSpec = tuple[str, GGMLQuantizationType, tuple[int, ...], "np.ndarray | Callable[[], np.ndarray]"]


__all__ = ["GGUFOut", "MetaKV", "TensorSpec"]

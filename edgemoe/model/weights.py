"""GGUF tensors as ggml tensors over the file's memory map: weights are never copied."""

from __future__ import annotations

import os
from typing import Any

from edgemoe.errors import UserError
from edgemoe.format.gguf_io import metadata, open_gguf, tensor_ne
from edgemoe.ggml import Context, TensorPtr


class GGUFTensors:
    """Every tensor of one GGUF file, mapped read-only; `get(name)` gives a ggml tensor."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._reader = open_gguf(path, skim=True)  # the tokenizer's arrays are llama.cpp's business
        self.meta: dict[str, Any] = metadata(self._reader)
        self._reader.fields.clear()  # parsed into meta; the reader's per-field views are not needed again
        self._ctx = Context(Context.overhead(len(self._reader.tensors) + 1), alloc=False)
        base = self._reader.data.ctypes.data
        self._tensors: dict[str, TensorPtr] = {}
        for t in self._reader.tensors:
            self._tensors[t.name] = self._ctx.external(base + int(t.data_offset), int(t.tensor_type), *tensor_ne(t), name=t.name)

    def get(self, name: str) -> TensorPtr | None:
        return self._tensors.get(name)

    def require(self, name: str) -> TensorPtr:
        t = self._tensors.get(name)
        if t is None:
            raise UserError(f"{self.path}: tensor {name} is missing")
        return t

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def close(self) -> None:
        self._ctx.close()
        self._tensors.clear()

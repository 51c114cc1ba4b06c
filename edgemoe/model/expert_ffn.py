"""Routed experts' SwiGLU FFNs, computed by ggml straight from memory-mapped shards.

Experts run through ggml_mul_mat_id, the kernel llama.cpp uses for its stacked expert tensors, so
results match llama.cpp bit for bit. Two ways in:

- ExpertFFN: one expert at a time, over a single-expert view of one mapped shard;
- LayerExperts + MoEGraph: a layer's shards mapped side by side at one fixed stride, so that each part
  (gate, up, down) is one 3-D tensor [ne0, ne1, n_expert] like llama.cpp's `ffn_*_exps`, and one
  graph with one ggml_mul_mat_id per part computes any set of experts for any rows (the expert
  nodes themselves are edgemoe.model.moe's, as in every other graph that computes experts).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Callable

import numpy as np

from edgemoe.format.shard import ShardLayout, ShardTensor  # (re-exported: the shard layout is format/shard.py's)
from edgemoe.ggml import Compute, Context, TensorPtr
from edgemoe.model.moe import ExpertGraph, ExpertGraphs


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


class ExpertFFN:
    """Runs expert FFNs: out = down(silu(gate(x)) * up(x)) for a batch of token rows.

    Graphs are built once per (tensor layout, n_tokens) and reused: a call only points the
    weight tensors at the shard's bytes and copies the input rows in.
    """

    def __init__(self, compute: Compute) -> None:
        self.compute = compute
        self._graphs = ExpertGraphs()

    def run(self, shard: MappedShard, x: np.ndarray) -> np.ndarray:
        """x: float32 [n_tokens, n_embd] -> float32 [n_tokens, n_embd]."""
        layout = shard.layout
        n_tok, n_embd = x.shape
        key = (tuple(sorted((p, t.ggml_type, t.ne) for p, t in layout.tensors.items())), n_tok)
        # one expert: its tensors' data pointers are set to each shard's bytes (32: a placeholder)
        build = lambda: ExpertGraph.build(  # noqa: E731
            lambda ctx: {part: stacked_view(ctx, 32, t, 0, 1) for part, t in layout.tensors.items()},
            n_tok, 1, n_embd, layout.n_ff, layout.act)
        with self._graphs.use(key, n_tok, build) as g:
            for part, t in layout.tensors.items():
                g.parts[part].contents.data = shard.address + t.offset
            return g.run(self.compute, x, np.zeros((n_tok, 1), dtype=np.int32)).reshape(n_tok, n_embd)

    def close(self) -> None:
        self._graphs.close()


def stacked_view(ctx: Context, address: int, t: ShardTensor, stride: int, n_expert: int) -> TensorPtr:
    """One shard tensor as llama.cpp's stacked layout over n_expert slots `stride` bytes apart: a
    weight [ne0, ne1, n_expert], a bias [ne0, n_expert]."""
    if t.part.endswith("_b"):
        v = ctx.external(address, t.ggml_type, t.ne[0], n_expert)
        c = v.contents
        c.nb[1] = stride or c.nb[1]
        c.nb[2] = c.nb[3] = c.nb[1] * n_expert
        return v
    v = ctx.external(address, t.ggml_type, t.ne[0], t.ne[1], n_expert)
    c = v.contents
    if stride:
        c.nb[2] = stride
        c.nb[3] = stride * n_expert
    return v


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", 0x20)
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int) -> int:
    p = _libc.mmap(addr, length, prot, flags, fd, 0)
    if p in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    return int(p)


class LayerExperts:
    """One layer's expert shards, each mapped (or not) at base + expert * stride of one reserved range.

    Every shard of a layer has the same layout (they are byte slices of one stacked tensor), so each
    part is one strided 3-D tensor over the range: ggml_mul_mat_id reads only the experts its ids
    name, and unmapped slots are never touched. Mapping an expert is mmap(MAP_FIXED) of its file at
    its slot; unmapping puts an inaccessible anonymous page range back.
    """

    def __init__(self, layouts: dict[int, ShardLayout], n_expert: int) -> None:
        if not layouts:
            raise ValueError("no expert shards")
        first = next(iter(layouts.values()))
        if any(lay.tensors != first.tensors for lay in layouts.values()):
            raise ValueError("the layer's shards do not share one tensor layout")
        self.layouts = layouts
        self.n_expert = n_expert
        self.tensors = first.tensors
        self.act = first.act
        page = mmap.PAGESIZE
        self.stride = -(-max(lay.size for lay in layouts.values()) // page) * page
        self._length = self.stride * n_expert
        self.base = _mmap(None, self._length, _PROT_NONE, mmap.MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1)
        self.mapped: set[int] = set()

    def map(self, expert: int, populate: bool = False) -> None:
        """Map the expert's shard into its slot (populate: fault every page in now, one sequential read)."""
        if expert in self.mapped:
            return
        lay = self.layouts[expert]
        fd = os.open(lay.path, os.O_RDONLY)
        try:
            flags = mmap.MAP_SHARED | _MAP_FIXED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            _mmap(self.base + expert * self.stride, lay.size, mmap.PROT_READ, flags, fd)
        finally:
            os.close(fd)
        self.mapped.add(expert)

    def unmap(self, expert: int) -> None:
        """Drop the expert's mapping (its pages stay in the OS page cache unless the caller drops them)."""
        if expert not in self.mapped:
            return
        _mmap(self.base + expert * self.stride, self.stride, _PROT_NONE,
              mmap.MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED, -1)
        self.mapped.discard(expert)

    def parts(self, ctx: Context) -> dict[str, TensorPtr]:
        """The stacked tensors [ne0, ne1, n_expert] over every slot, as edgemoe.model.moe.experts takes them."""
        return {part: stacked_view(ctx, self.base + t.offset, t, self.stride, self.n_expert)
                for part, t in self.tensors.items()}

    def close(self) -> None:
        if self.base:
            _libc.munmap(self.base, self._length)
            self.base = 0
            self.mapped.clear()

    def __enter__(self) -> "LayerExperts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MoEGraph:
    """Computes any experts of one LayerExperts for a batch of rows in one graph (one mul_mat_id per part).

    Graphs are kept per (T, k) for small batches (decode); larger ones are built per call.
    """

    def __init__(self, layer: LayerExperts, compute: Compute, n_embd: int,
                 replace: "Callable[[], dict[str, TensorPtr]] | None" = None) -> None:
        """replace: parts to use instead of the layer's views (e.g. repacked copies), asked per graph built."""
        self.replace = replace
        self.layer = layer
        self.compute = compute
        self.n_embd = n_embd
        self._graphs = ExpertGraphs()

    def _parts(self, ctx: Context) -> dict[str, TensorPtr]:
        parts = self.layer.parts(ctx)
        if self.replace is not None:
            parts.update(self.replace())
        return parts

    def run(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """x float32 [T, n_embd], ids int32 [T, k] (mapped experts only) -> float32 [T, k, n_embd], unweighted."""
        n_tok, k = ids.shape
        missing = set(np.unique(ids).tolist()) - self.layer.mapped
        if missing:
            raise ValueError(f"experts {sorted(missing)} are not mapped")
        build = lambda: ExpertGraph.build(self._parts, n_tok, k, self.n_embd, self.layer.tensors["down"].ne[0],  # noqa: E731
                                          self.layer.act)
        with self._graphs.use((n_tok, k), n_tok, build) as g:
            return g.run(self.compute, x, ids)

    def close(self) -> None:
        self._graphs.close()

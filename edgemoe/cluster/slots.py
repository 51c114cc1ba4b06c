"""A worker's experts in one strided address range, so several are computed in one ggml_mul_mat_id.

llama.cpp computes a layer's routed experts with one ggml_mul_mat_id over the stacked expert tensor
(expert e at data + e * nb2). A worker's shards are separate files; here they are mapped into
equal slots of one reserved virtual range (mmap MAP_FIXED over a PROT_NONE reservation), so the
slots form one 3-D tensor with nb2 = the slot size, and the experts of one request run in one
graph: ids name each row's slot. Only the slots the ids name are touched; the reservation costs
address space, not memory.

The engine's ExpertFFN runs one expert per graph; this module is the worker's own multi-expert
variant (same kernel, same bytes: the results are identical).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import numpy as np

from edgemoe.ggml import Compute
from edgemoe.model.expert_ffn import ShardLayout, stacked_view
from edgemoe.model.moe import ExpertGraph, ExpertGraphs

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED, _MAP_NORESERVE, _PROT_NONE = 0x10, 0x4000, 0
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)


def _mmap(addr: int | None, size: int, prot: int, flags: int, fd: int) -> int:
    r = _libc.mmap(addr, size, prot, flags, fd, 0)
    if r is None or r == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


class SlotArena:
    """n_slots slots of `stride` bytes (a multiple of the page size) in one reserved range."""

    def __init__(self, n_slots: int, stride: int) -> None:
        self.n_slots, self.stride = n_slots, stride
        self.base = _mmap(None, n_slots * stride, _PROT_NONE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1)
        self._free = list(range(n_slots - 1, -1, -1))
        self._lock = threading.Lock()

    def map(self, layout: ShardLayout, populate: bool = True) -> "SlotShard":
        """Map a shard read-only into a free slot (MAP_POPULATE: one sequential read)."""
        if layout.size > self.stride:
            raise ValueError(f"{layout.path}: {layout.size} bytes do not fit a slot of {self.stride}")
        with self._lock:
            if not self._free:
                raise MemoryError("no free expert slot")
            slot = self._free.pop()
        addr = self.base + slot * self.stride
        try:
            fd = os.open(layout.path, os.O_RDONLY)
            try:
                _mmap(addr, layout.size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED | (_MAP_POPULATE if populate else 0), fd)
            finally:
                os.close(fd)
        except BaseException:
            self._release(slot)
            raise
        return SlotShard(self, slot, layout, addr)

    def _release(self, slot: int) -> None:
        # back to a reserved, inaccessible slot (a plain munmap would leave a hole other mappings could take)
        _mmap(self.base + slot * self.stride, self.stride, _PROT_NONE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE, -1)
        with self._lock:
            self._free.append(slot)

    def close(self) -> None:
        _libc.munmap(self.base, self.n_slots * self.stride)


class SlotShard:
    """A shard mapped in a slot; the interface of expert_ffn.MappedShard (layout, address, close)."""

    def __init__(self, arena: SlotArena, slot: int, layout: ShardLayout, address: int) -> None:
        self.arena, self.slot, self.layout, self.address = arena, slot, layout, address
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self.arena._release(self.slot)


def same_layout(shards: list[SlotShard]) -> bool:
    """Whether the shards' tensors have the same types, shapes and offsets (one layer's experts do)."""
    first = shards[0].layout.tensors
    return all(s.layout.tensors == first for s in shards[1:])


class SlotFFN:
    """out = down(act(gate(x)) * up(x)) for rows of x, each row through the expert in its slot, in one
    graph of ggml_mul_mat_id over the whole arena (as llama.cpp's build_moe_ffn: edgemoe.model.moe.experts)."""

    def __init__(self, compute: Compute, arena: SlotArena) -> None:
        self.compute, self.arena = compute, arena
        self._graphs = ExpertGraphs()

    def _build(self, layout: ShardLayout, n_rows: int, n_embd: int) -> ExpertGraph:
        a = self.arena
        # expert (slot) s at base + offset + s * stride
        return ExpertGraph.build(lambda ctx: {part: stacked_view(ctx, a.base + t.offset, t, a.stride, a.n_slots)
                                              for part, t in layout.tensors.items()}, n_rows, 1, n_embd, layout.n_ff, layout.act)

    def run(self, shards: list[SlotShard], rows: list[int], x: np.ndarray) -> np.ndarray:
        """x [sum(rows), n_embd]: rows[i] consecutive rows for shards[i] (same layout) -> [sum(rows), n_embd]."""
        layout = shards[0].layout
        n_rows, n_embd = x.shape
        key = (tuple(sorted((p, t.ggml_type, t.ne, t.offset) for p, t in layout.tensors.items())), n_rows)
        with self._graphs.use(key, n_rows, lambda: self._build(layout, n_rows, n_embd)) as g:
            ids = np.repeat([s.slot for s in shards], rows).astype(np.int32).reshape(n_rows, 1)
            return g.run(self.compute, x, ids).reshape(n_rows, n_embd)

    def close(self) -> None:
        self._graphs.close()

"""A ggml context: creates tensors (allocated in an arena, or viewing outside memory) and graph ops.

`ctx.mul_mat(a, b)` calls `ggml_mul_mat(ctx, a, b)`: every ggml function whose first argument is
the context is available this way, so graph code reads like llama.cpp's C++.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

from edgemoe.ggml.lib import GGMLType, ggml_init_params, ggml_tensor, lib

TensorPtr = ctypes._Pointer  # POINTER(ggml_tensor); kept opaque for callers

_CTX_FUNCTIONS = {
    name[len("ggml_"):]
    for name, fn in vars(lib).items()
    if name.startswith("ggml_") and getattr(fn, "argtypes", None) and fn.argtypes[0] is ctypes.c_void_p
    and not name.startswith("ggml_gallocr_")
    and name not in ("ggml_free", "ggml_build_forward_expand", "ggml_graph_n_nodes", "ggml_graph_node", "ggml_threadpool_free",
                     "ggml_graph_plan", "ggml_graph_compute")
}

_NP_DTYPES = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.I32: np.int32, GGMLType.I64: np.int64}
_GGML_TYPES = {np.dtype(v): k for k, v in _NP_DTYPES.items()}
GRAPH_SIZE = 8192
_VIEW_TENSORS = 256  # outside-memory tensors per compute context (weights are viewed by the weights context)


class Context:
    """Owns one ggml_context. alloc=False: tensors get no memory (set their data pointer yourself)."""

    def __init__(self, mem_size: int, *, alloc: bool = True, arena: np.ndarray | None = None,
                 views: int = _VIEW_TENSORS) -> None:
        """views: how many tensors over outside memory (external, from_numpy) the context can hold."""
        if arena is not None and arena.nbytes < mem_size:
            raise ValueError("arena smaller than mem_size")
        self._arena = arena  # keep the buffer alive as long as the context
        buf = arena.ctypes.data if arena is not None else None
        self.ptr = lib.ggml_init(ggml_init_params(mem_size, buf, not alloc))
        if not self.ptr:
            raise MemoryError(f"ggml_init failed for {mem_size} bytes")
        self._keep: list[Any] = []  # Python objects whose memory tensors point into
        self._alloc = alloc
        self._views: int | None = None  # no-alloc companion context for tensors over outside memory
        self._n_views = views

    @staticmethod
    def overhead(n_tensors: int, graph_size: int = GRAPH_SIZE) -> int:
        """Bytes of context memory for n_tensors tensor headers plus one graph."""
        graph = lib.ggml_graph_overhead_custom(graph_size, False) if graph_size else 0
        return n_tensors * lib.ggml_tensor_overhead() + graph + 1024

    def close(self) -> None:
        if self.ptr:
            lib.ggml_free(self.ptr)
            self.ptr = None
        if self._views:
            lib.ggml_free(self._views)
            self._views = None
        self._keep.clear()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in _CTX_FUNCTIONS:
            fn = getattr(lib, "ggml_" + name)
            ptr = self.ptr
            return lambda *args: fn(ptr, *args)
        raise AttributeError(name)

    # tensors ---------------------------------------------------------------------------------
    def new(self, ggml_type: int, *ne: int, name: str | None = None) -> TensorPtr:
        arr = (ctypes.c_int64 * len(ne))(*ne)
        t = lib.ggml_new_tensor(self.ptr, int(ggml_type), len(ne), arr)
        if not t:
            raise MemoryError("ggml context out of memory")
        if name:
            lib.ggml_set_name(t, name.encode())
        return t

    def external(self, address: int, ggml_type: int, *ne: int, name: str | None = None, owner: Any = None) -> TensorPtr:
        """A tensor over memory that ggml does not own (an mmapped GGUF, a numpy array)."""
        if address % 32:
            raise ValueError(f"tensor {name or ''} data is not 32-byte aligned")
        ctx = self.ptr
        if self._alloc:  # headers only: the data lives elsewhere
            if self._views is None:
                self._views = lib.ggml_init(ggml_init_params(Context.overhead(self._n_views, 0), None, True))
            ctx = self._views
        arr = (ctypes.c_int64 * len(ne))(*ne)
        t = lib.ggml_new_tensor(ctx, int(ggml_type), len(ne), arr)
        if not t:
            raise MemoryError("ggml context out of memory")
        if name:
            lib.ggml_set_name(t, name.encode())
        t.contents.data = address
        if owner is not None:
            self._keep.append(owner)
        return t

    def from_numpy(self, arr: np.ndarray, name: str | None = None) -> TensorPtr:
        """A tensor viewing a C-contiguous numpy array (shape reversed into ggml's ne)."""
        if not arr.flags.c_contiguous:
            raise ValueError("array must be C-contiguous")
        ggml_type = _GGML_TYPES[arr.dtype]
        return self.external(arr.ctypes.data, ggml_type, *reversed(arr.shape), name=name, owner=arr)

    def graph(self, size: int = GRAPH_SIZE) -> ctypes.c_void_p:
        return lib.ggml_new_graph_custom(self.ptr, size, False)


def ne(t: TensorPtr) -> tuple[int, ...]:
    return tuple(t.contents.ne)


def to_numpy(t: TensorPtr) -> np.ndarray:
    """A view of a contiguous F32/F16/I32 tensor's data, shaped like numpy (ne reversed)."""
    c: ggml_tensor = t.contents
    dtype = _NP_DTYPES[GGMLType(c.type)]
    n_dims = max([i + 1 for i in range(4) if c.ne[i] != 1] or [1])  # ggml_n_dims: trailing 1s dropped
    shape = tuple(reversed(tuple(c.ne)[:n_dims]))
    itemsize = np.dtype(dtype).itemsize
    strides = tuple(reversed(tuple(c.nb)[:n_dims]))
    if c.nb[0] != itemsize:
        raise ValueError("tensor rows are not contiguous")
    n_bytes = sum((n - 1) * s for n, s in zip(c.ne, c.nb)) + itemsize
    buf = (ctypes.c_uint8 * n_bytes).from_address(c.data)
    return np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)


def aligned_empty(shape: tuple[int, ...] | int, dtype: type = np.float32, align: int = 64, zero: bool = False) -> np.ndarray:
    """An uninitialised (or, with zero, zero-filled) C-contiguous array whose data address is a multiple of align.

    zero=True uses calloc'd memory: pages cost RSS only once written.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (np.zeros if zero else np.empty)(n + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + n].view(dtype).reshape(shape)


def aligned_copy(arr: np.ndarray, align: int = 64) -> np.ndarray:
    out = aligned_empty(arr.shape, arr.dtype.type, align)
    out[...] = arr
    return out

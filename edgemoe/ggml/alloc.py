"""ggml's graph allocator: memory for a graph's intermediate tensors, reused as llama.cpp reuses it.

A context made with `Context(..., alloc=False)` holds tensor headers only; `GraphAllocator.allocate`
places every tensor of a graph that has no data yet in one CPU buffer, letting a tensor take the
memory of one whose last reader has run (ggml_gallocr, what llama.cpp's scheduler uses). A prefill
graph then touches a few MB instead of tens: the activations stay in cache. Tensors read after the
run must be marked with `ggml_set_output` before allocating, or their memory may be reused.
"""

from __future__ import annotations

import ctypes

from edgemoe.ggml.lib import lib


class GraphAllocator:
    """One ggml_gallocr over the CPU buffer type; its buffer grows to the largest graph it placed."""

    def __init__(self) -> None:
        self._galloc = lib.ggml_gallocr_new(lib.ggml_backend_cpu_buffer_type())
        if not self._galloc:
            raise MemoryError("ggml_gallocr_new failed")

    def allocate(self, graph: ctypes.c_void_p) -> None:
        """Give every tensor of graph without data its place (valid until the next allocate)."""
        if not lib.ggml_gallocr_alloc_graph(self._galloc, graph):
            raise MemoryError("ggml_gallocr_alloc_graph failed: out of memory for the graph's activations")

    @property
    def nbytes(self) -> int:
        """Size of the buffer the graphs' activations share."""
        return int(lib.ggml_gallocr_get_buffer_size(self._galloc, 0)) if self._galloc else 0

    def close(self) -> None:
        if self._galloc:
            lib.ggml_gallocr_free(self._galloc)
            self._galloc = None

    def __del__(self) -> None:
        self.close()

"""Run ggml graphs on the CPU with a persistent thread pool and a reused work buffer."""

from __future__ import annotations

import ctypes

import numpy as np

from edgemoe.ggml.lib import lib


class GGMLComputeError(RuntimeError):
    pass


class Compute:
    """One thread pool for all graphs of an engine (thread start-up per graph would dominate decode)."""

    def __init__(self, n_threads: int, *, poll: int = 0) -> None:
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        self.n_threads = n_threads
        params = lib.ggml_threadpool_params_default(n_threads)
        params.poll = poll  # 0: sleep between graphs; other processes (workers) share these cores
        self._pool = lib.ggml_threadpool_new(ctypes.byref(params))
        if not self._pool:
            raise GGMLComputeError("ggml_threadpool_new failed")
        self._work = np.empty(0, dtype=np.uint8)
        self._work_ptr = self._work.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))

    def run(self, graph: ctypes.c_void_p) -> None:
        plan = lib.ggml_graph_plan(graph, self.n_threads, self._pool)
        if plan.work_size > self._work.nbytes:
            self._work = np.empty(max(plan.work_size, 2 * self._work.nbytes), dtype=np.uint8)
            self._work_ptr = self._work.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))  # made once per buffer
        if plan.work_size:
            plan.work_data = self._work_ptr
        status = lib.ggml_graph_compute(graph, ctypes.byref(plan))
        if status != 0:
            raise GGMLComputeError(f"ggml_graph_compute failed with status {status}")

    def close(self) -> None:
        if self._pool:
            lib.ggml_threadpool_free(self._pool)
            self._pool = None

    def __del__(self) -> None:
        self.close()

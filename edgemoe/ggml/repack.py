"""llama.cpp's repacked weights: copies of quantized weights in ggml's CPU_REPACK buffer type.

llama.cpp loads the weights of matrix products whose type has an interleaved CPU layout (Q4_0,
Q4_K, IQ4_NL, ... on x86 with AVX2) into the CPU_REPACK extra buffer type instead of mapping them:
ggml rearranges the blocks when the tensor's bytes are set, and any mul_mat / mul_mat_id over such
a tensor runs the repacked kernels (ggml_compute_forward asks the source's buffer type first).
This module does the same for edgemoe's graphs: `Repacker.supports` asks ggml's CPU device, as
llama.cpp's weight_buft_supported does, and `Repacker.repack` makes the copy.

Whether the extra buffer types can run on this CPU at all is decided elsewhere
(edgemoe.util.extra_bufts: a child-process probe, since some VMs advertise AMX and die with SIGILL).
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, c_char_p, c_size_t, c_void_p

import llama_cpp

from edgemoe.ggml.context import Context, TensorPtr
from edgemoe.ggml.lib import GGMLType, ggml_tensor, lib

REPACK_BUFT = b"CPU_REPACK"


def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    d = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = ctypes.CDLL(os.path.join(d, "libggml-base.so"))
    cpu = ctypes.CDLL(os.path.join(d, "libggml-cpu.so"))
    sig = {
        "ggml_backend_reg_get_proc_address": (c_void_p, [c_void_p, c_char_p]),
        "ggml_backend_reg_dev_get": (c_void_p, [c_void_p, c_size_t]),
        "ggml_backend_buft_name": (c_char_p, [c_void_p]),
        "ggml_backend_buft_alloc_buffer": (c_void_p, [c_void_p, c_size_t]),
        "ggml_backend_buft_get_alloc_size": (c_size_t, [c_void_p, POINTER(ggml_tensor)]),
        "ggml_backend_buffer_get_base": (c_void_p, [c_void_p]),
        "ggml_backend_buffer_free": (None, [c_void_p]),
        "ggml_backend_tensor_alloc": (ctypes.c_int, [c_void_p, POINTER(ggml_tensor), c_void_p]),
        "ggml_backend_tensor_set": (None, [POINTER(ggml_tensor), c_void_p, c_size_t, c_size_t]),
        "ggml_backend_dev_supports_op": (ctypes.c_bool, [c_void_p, POINTER(ggml_tensor)]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(base, name)
        fn.restype, fn.argtypes = res, args
    cpu.ggml_backend_cpu_reg.restype = c_void_p
    cpu.ggml_backend_cpu_reg.argtypes = []
    return base, cpu


class Repacker:
    """Makes CPU_REPACK copies of weights; holds their buffers until close()."""

    def __init__(self) -> None:
        self._base, cpu = _libs()
        b = self._base
        reg = cpu.ggml_backend_cpu_reg()
        self._dev = b.ggml_backend_reg_dev_get(reg, 0)
        self.buft: int | None = None
        fp = b.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if fp:
            bufts = ctypes.CFUNCTYPE(POINTER(c_void_p), c_void_p)(fp)(self._dev)
            i = 0
            while bufts and bufts[i]:
                if b.ggml_backend_buft_name(bufts[i]) == REPACK_BUFT:
                    self.buft = bufts[i]
                i += 1
        self._probe_buf = b.ggml_backend_buft_alloc_buffer(self.buft, 0) if self.buft else None
        self._buffers: list[int] = []
        self.nbytes = 0  # bytes of repacked copies held
        self._ctx = Context(Context.overhead(4096, 0), alloc=False)  # headers of the repacked tensors
        self._supported: dict[tuple, bool] = {}

    @property
    def available(self) -> bool:
        return self.buft is not None

    def supports(self, ggml_type: int, ne: tuple[int, ...]) -> bool:
        """Whether ggml would run mul_mat (2-D weight) or mul_mat_id (3-D, stacked experts) on a
        repacked weight of this type and shape (llama.cpp's weight_buft_supported test)."""
        if not self.available:
            return False
        key = (int(ggml_type), tuple(ne))
        if key not in self._supported:
            with Context(Context.overhead(8, 0), alloc=False) as ctx:
                w = ctx.new(ggml_type, *ne)
                w.contents.buffer = self._probe_buf
                x = ctx.new(GGMLType.F32, ne[0], 1, 1) if len(ne) == 3 else ctx.new(GGMLType.F32, ne[0], 1)
                if len(ne) == 3:
                    op = ctx.mul_mat_id(w, x, ctx.new(GGMLType.I32, 1, 1))
                else:
                    op = ctx.mul_mat(w, x)
                self._supported[key] = bool(self._base.ggml_backend_dev_supports_op(self._dev, op))
        return self._supported[key]

    def repack(self, ggml_type: int, ne: tuple[int, ...], data: int) -> TensorPtr:
        """A repacked copy of the contiguous weight bytes at address data (type/shape as given)."""
        b = self._base
        t = self._ctx.new(ggml_type, *ne)
        size = b.ggml_backend_buft_get_alloc_size(self.buft, t)
        buf = b.ggml_backend_buft_alloc_buffer(self.buft, size)
        if not buf:
            raise MemoryError(f"cannot allocate {size} bytes of repacked weights")
        self._buffers.append(buf)
        self.nbytes += int(size)
        if b.ggml_backend_tensor_alloc(buf, t, b.ggml_backend_buffer_get_base(buf)) != 0:
            raise RuntimeError("ggml_backend_tensor_alloc failed")
        b.ggml_backend_tensor_set(t, data, 0, lib.ggml_nbytes(t))
        return t

    def close(self) -> None:
        for buf in self._buffers:
            self._base.ggml_backend_buffer_free(buf)
        self._buffers.clear()
        if self._probe_buf:
            self._base.ggml_backend_buffer_free(self._probe_buf)
            self._probe_buf = None
        self._ctx.close()
        self.buft = None

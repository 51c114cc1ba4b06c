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
        # ggml's extra buffer types in the CPU device's order (AMX where built, then CPU_REPACK, ...):
        # llama.cpp gives a weight the first of them whose kernels take its matrix product
        self._bufts: list[tuple[int, int]] = []  # (buffer type, a zero-size buffer of it for the op test)
        fp = b.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if fp:
            bufts = ctypes.CFUNCTYPE(POINTER(c_void_p), c_void_p)(fp)(self._dev)
            i = 0
            while bufts and bufts[i]:
                probe = b.ggml_backend_buft_alloc_buffer(bufts[i], 0)
                if probe:
                    self._bufts.append((bufts[i], probe))
                i += 1
        self._buffers: list[int] = []
        self.nbytes = 0  # bytes of repacked copies held
        self._ctx = Context(Context.overhead(4096, 0), alloc=False)  # headers of the repacked tensors
        self._chosen: dict[tuple, int | None] = {}

    @property
    def available(self) -> bool:
        return bool(self._bufts)

    @property
    def names(self) -> list[str]:
        """The extra buffer types this ggml offers, in the order llama.cpp tries them."""
        return [self._base.ggml_backend_buft_name(buft).decode() for buft, _ in self._bufts]

    def _buft_for(self, ggml_type: int, ne: tuple[int, ...]) -> int | None:
        """The first extra buffer type whose kernels run mul_mat (2-D weight) or mul_mat_id (3-D,
        stacked experts) on a weight of this type and shape (llama.cpp's weight_buft_supported)."""
        key = (int(ggml_type), tuple(ne))
        if key not in self._chosen:
            self._chosen[key] = None
            for buft, probe in self._bufts:
                with Context(Context.overhead(8, 0), alloc=False) as ctx:
                    w = ctx.new(ggml_type, *ne)
                    w.contents.buffer = probe
                    x = ctx.new(GGMLType.F32, ne[0], 1, 1) if len(ne) == 3 else ctx.new(GGMLType.F32, ne[0], 1)
                    if len(ne) == 3:
                        op = ctx.mul_mat_id(w, x, ctx.new(GGMLType.I32, 1, 1))
                    else:
                        op = ctx.mul_mat(w, x)
                    if self._base.ggml_backend_dev_supports_op(self._dev, op):
                        self._chosen[key] = buft
                        break
        return self._chosen[key]

    def supports(self, ggml_type: int, ne: tuple[int, ...]) -> bool:
        """Whether llama.cpp would place this weight in an extra buffer type (and so would we)."""
        return self._buft_for(ggml_type, ne) is not None

    def repack(self, ggml_type: int, ne: tuple[int, ...], data: int) -> TensorPtr:
        """A repacked copy of the contiguous weight bytes at address data (type/shape as given)."""
        b = self._base
        buft = self._buft_for(ggml_type, ne)
        if buft is None:
            raise ValueError(f"no extra buffer type takes a weight of type {ggml_type} and shape {ne}")
        t = self._ctx.new(ggml_type, *ne)
        size = b.ggml_backend_buft_get_alloc_size(buft, t)
        buf = b.ggml_backend_buft_alloc_buffer(buft, size)
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
        for _, probe in self._bufts:
            self._base.ggml_backend_buffer_free(probe)
        self._bufts.clear()
        self._ctx.close()

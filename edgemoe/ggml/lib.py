"""Load libggml-base / libggml-cpu from llama_cpp/lib and declare the functions edgemoe calls.

The struct layouts below are those of ggml 0.25.3 (llama-cpp-python 0.3.36). A different library
is refused at import with a clear error, since a layout mismatch would corrupt memory silently.
"""

from __future__ import annotations

import ctypes
import enum
import os
from ctypes import POINTER, c_bool, c_char, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_uint8, c_void_p

import llama_cpp
from gguf import GGMLQuantizationType

# A failed ggml assert aborts the process; without this it first attaches gdb to print a backtrace.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

EXPECTED_GGML_VERSION = "0.25.3"
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_MAX_N_THREADS = 512
_GGML_OBJECT_SIZE = 32


# ggml's type enum is gguf-py's (the same numbers as ggml.h's enum ggml_type, which gguf-py mirrors).
GGMLType = GGMLQuantizationType


class GGMLPrec(enum.IntEnum):
    UNDEFINED = 0
    F32 = 10


class ggml_tensor(ctypes.Structure):
    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * GGML_MAX_DIMS),
        ("nb", c_size_t * GGML_MAX_DIMS),
        ("op", c_int),
        ("op_params", c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", c_int32),
        ("src", c_void_p * GGML_MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", c_char * GGML_MAX_NAME),
        ("extra", c_void_p),
        ("padding", c_char * 8),
    ]


class ggml_init_params(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


class ggml_cplan(ctypes.Structure):
    _fields_ = [
        ("work_size", c_size_t),
        ("work_data", POINTER(c_uint8)),
        ("n_threads", c_int),
        ("threadpool", c_void_p),
        ("abort_callback", c_void_p),
        ("abort_callback_data", c_void_p),
        ("use_ref", c_bool),
    ]


class ggml_threadpool_params(ctypes.Structure):
    _fields_ = [
        ("cpumask", c_bool * GGML_MAX_N_THREADS),
        ("n_threads", c_int),
        ("prio", c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", c_bool),
        ("paused", c_bool),
    ]


T = POINTER(ggml_tensor)  # struct ggml_tensor *
CTX = c_void_p  # struct ggml_context *
GRAPH = c_void_p  # struct ggml_cgraph *
I64 = c_int64

# name: (restype, argtypes)
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    # context and tensors
    "ggml_version": (c_char_p, []),
    "ggml_tensor_overhead": (c_size_t, []),
    "ggml_graph_overhead_custom": (c_size_t, [c_size_t, c_bool]),
    "ggml_init": (CTX, [ggml_init_params]),
    "ggml_free": (None, [CTX]),
    "ggml_new_tensor": (T, [CTX, c_int, c_int, POINTER(c_int64)]),
    "ggml_set_name": (T, [T, c_char_p]),
    "ggml_nbytes": (c_size_t, [T]),
    "ggml_row_size": (c_size_t, [c_int, c_int64]),
    "ggml_type_size": (c_size_t, [c_int]),
    "ggml_blck_size": (c_int64, [c_int]),
    "ggml_is_contiguous": (c_bool, [T]),
    # views and shapes
    "ggml_view_1d": (T, [CTX, T, I64, c_size_t]),
    "ggml_concat": (T, [CTX, T, T, c_int]),
    "ggml_view_2d": (T, [CTX, T, I64, I64, c_size_t, c_size_t]),
    "ggml_view_3d": (T, [CTX, T, I64, I64, I64, c_size_t, c_size_t, c_size_t]),
    "ggml_view_4d": (T, [CTX, T, I64, I64, I64, I64, c_size_t, c_size_t, c_size_t, c_size_t]),
    "ggml_reshape_2d": (T, [CTX, T, I64, I64]),
    "ggml_reshape_3d": (T, [CTX, T, I64, I64, I64]),
    "ggml_reshape_4d": (T, [CTX, T, I64, I64, I64, I64]),
    "ggml_permute": (T, [CTX, T, c_int, c_int, c_int, c_int]),
    "ggml_cont": (T, [CTX, T]),
    "ggml_cont_2d": (T, [CTX, T, I64, I64]),
    "ggml_cast": (T, [CTX, T, c_int]),
    "ggml_cpy": (T, [CTX, T, T]),
    # element-wise and reductions
    "ggml_add": (T, [CTX, T, T]),
    "ggml_mul": (T, [CTX, T, T]),
    "ggml_div": (T, [CTX, T, T]),
    "ggml_scale": (T, [CTX, T, c_float]),
    "ggml_clamp": (T, [CTX, T, c_float, c_float]),
    "ggml_silu": (T, [CTX, T]),
    "ggml_sigmoid": (T, [CTX, T]),
    "ggml_fill": (T, [CTX, T, c_float]),
    "ggml_repeat_4d": (T, [CTX, T, I64, I64, I64, I64]),
    "ggml_transpose": (T, [CTX, T]),
    "ggml_add_id": (T, [CTX, T, T, T]),
    "ggml_swiglu_oai": (T, [CTX, T, T, c_float, c_float]),
    "ggml_soft_max_add_sinks": (None, [T, T]),
    "ggml_flash_attn_ext_add_sinks": (None, [T, T]),
    "ggml_sum_rows": (T, [CTX, T]),
    "ggml_rms_norm": (T, [CTX, T, c_float]),
    "ggml_soft_max": (T, [CTX, T]),
    "ggml_soft_max_ext": (T, [CTX, T, T, c_float, c_float]),
    "ggml_swiglu_split": (T, [CTX, T, T]),
    "ggml_argsort_top_k": (T, [CTX, T, c_int]),
    # matrix products, rows, attention
    "ggml_mul_mat": (T, [CTX, T, T]),
    "ggml_mul_mat_id": (T, [CTX, T, T, T]),
    "ggml_get_rows": (T, [CTX, T, T]),
    "ggml_set_rows": (T, [CTX, T, T, T]),
    "ggml_rope_ext": (T, [CTX, T, T, T, c_int, c_int, c_int, c_float, c_float, c_float, c_float, c_float, c_float]),
    "ggml_rope_set_offset": (T, [T, c_int]),  # rotate dims [n_offs, n_offs + n_dims) (deepseek2's legacy q)
    "ggml_flash_attn_ext": (T, [CTX, T, T, T, T, c_float, c_float, c_float]),
    "ggml_flash_attn_ext_set_n_kv_max": (None, [T, c_int32]),
    "ggml_prec_set_acc": (c_bool, [T, c_int]),
    "ggml_mul_mat_set_hint": (None, [T, c_int]),
    # graphs
    "ggml_new_graph_custom": (GRAPH, [CTX, c_size_t, c_bool]),
    "ggml_build_forward_expand": (None, [GRAPH, T]),
    "ggml_set_output": (None, [T]),
    # graph allocator (ggml-alloc): intermediate tensors share memory once their readers have run
    "ggml_gallocr_new": (c_void_p, [c_void_p]),
    "ggml_gallocr_free": (None, [c_void_p]),
    "ggml_gallocr_alloc_graph": (c_bool, [c_void_p, GRAPH]),
    "ggml_gallocr_get_buffer_size": (c_size_t, [c_void_p, c_int]),
    "ggml_graph_n_nodes": (c_int, [GRAPH]),
    "ggml_graph_node": (T, [GRAPH, c_int]),  # node i (negative: from the end); tests walk a graph by name
    # quantization (K-quants are not in gguf-py); ggml_quantize_chunk calls ggml_quantize_init itself
    "ggml_quantize_init": (None, [c_int]),
    "ggml_quantize_requires_imatrix": (c_bool, [c_int]),
    "ggml_quantize_chunk": (c_size_t, [c_int, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p]),
}

_CPU_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "ggml_cpu_init": (None, []),
    "ggml_backend_cpu_buffer_type": (c_void_p, []),
    "ggml_graph_plan": (ggml_cplan, [GRAPH, c_int, c_void_p]),
    "ggml_graph_compute": (c_int, [GRAPH, POINTER(ggml_cplan)]),
    "ggml_threadpool_params_default": (ggml_threadpool_params, [c_int]),
    "ggml_threadpool_new": (c_void_p, [POINTER(ggml_threadpool_params)]),
    "ggml_threadpool_free": (None, [c_void_p]),
}


class GGMLLibraryError(RuntimeError):
    """The ggml shipped with llama-cpp-python is not the one this binding was written for."""


class _Lib:
    """The two shared libraries with typed functions as attributes: lib.ggml_mul_mat(ctx, a, b)."""

    def __init__(self) -> None:
        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        try:
            base = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
            cpu = ctypes.CDLL(os.path.join(libdir, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise GGMLLibraryError(f"cannot load ggml from {libdir}: {e}") from None
        for table, dll in ((_SIGNATURES, base), (_CPU_SIGNATURES, cpu)):
            for name, (restype, argtypes) in table.items():
                try:
                    fn = getattr(dll, name)
                except AttributeError:
                    raise GGMLLibraryError(f"{dll._name} lacks {name}: llama-cpp-python must be 0.3.36") from None
                fn.restype = restype
                fn.argtypes = argtypes
                setattr(self, name, fn)
        version = self.ggml_version().decode()
        if version != EXPECTED_GGML_VERSION:
            raise GGMLLibraryError(
                f"ggml {version} found in {libdir}; edgemoe's binding is for ggml {EXPECTED_GGML_VERSION} "
                "(llama-cpp-python==0.3.36)"
            )
        overhead = self.ggml_tensor_overhead()
        if overhead != _GGML_OBJECT_SIZE + ctypes.sizeof(ggml_tensor):
            raise GGMLLibraryError(f"struct ggml_tensor layout mismatch (library overhead {overhead})")
        self.ggml_cpu_init()  # fills the fp16 lookup tables the CPU kernels use


lib = _Lib()

"""A llama.cpp model and context on CPU with a graph callback: the runner under the oracle, the imatrix and the real-model builder.

Uses llama-cpp-python's low-level ctypes API, configured so that llama.cpp runs the same ggml CPU
kernels that edgemoe calls itself (no weight repacking unless asked, the KV cache types and
flash-attention mode given, an F32 cache with flash attention otherwise; a whole batch in one
ubatch). What a caller does with each graph node (copy the router's top-k, sum expert inputs,
capture named tensors) is its own: `edgemoe.oracle` (the numeric reference), `edgemoe.convert.imatrix`
(`edgemoe imatrix`) and `tools.realmodels.llama` build on `LlamaCpp`.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable

import llama_cpp
import numpy as np

from edgemoe.format.schema import GGMLQuantizationType, Keys
from edgemoe.ggml.lib import ggml_tensor
from edgemoe.model.kvcache import CACHE_TYPES, AttentionOptions
from edgemoe.util.llamacpp import init_llama, load_model, meta_str, model_params, tokenize
from edgemoe.util.resource import Owned

GGML_TYPE_F32 = int(GGMLQuantizationType.F32)
GGML_TYPE_I32 = int(GGMLQuantizationType.I32)
# An F32 KV cache with flash attention unless asked otherwise: what the oracle has always measured
# with (tools/realmodels, the imatrix). Its tokens and logits equal llama.cpp's default F16 cache,
# since flash attention rounds K and V to F16 either way (tests/test_engine.py checks it).
DEFAULT_ATTENTION = AttentionOptions("f32", "f32", "on")


# `struct ggml_tensor`, declared once in the ggml binding (its layout is checked there at import).
GgmlTensor = ggml_tensor


def copy_2d(t: GgmlTensor) -> np.ndarray:
    """A copy of a (possibly strided) 2-D F32 or I32 ggml tensor as numpy [ne1, ne0]."""
    if int(t.ne[2]) != 1 or int(t.ne[3]) != 1:
        raise RuntimeError(f"tensor {t.name!r} is not 2-D")
    return copy_3d(t)[0]


def copy_3d(t: GgmlTensor) -> np.ndarray:
    """A copy of a (possibly strided) 3-D F32 or I32 ggml tensor as numpy [ne2, ne1, ne0]."""
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_I32: np.int32}.get(t.type)
    if dtype is None or not t.data:
        raise RuntimeError(f"tensor {t.name!r} has type {t.type} or no data")
    ne = [int(x) for x in t.ne[:3]]
    nb = [int(x) for x in t.nb[:3]]
    if int(t.ne[3]) != 1:
        raise RuntimeError(f"tensor {t.name!r} has more than 3 dimensions")
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + np.dtype(dtype).itemsize if min(ne) > 0 else 0
    raw = (ctypes.c_char * span).from_address(t.data)
    return np.ndarray((ne[2], ne[1], ne[0]), dtype=dtype, buffer=raw, strides=(nb[2], nb[1], nb[0])).copy()


class LlamaCpp(Owned):
    """A llama.cpp model + context on CPU, set up to run the ggml kernels edgemoe calls itself:
    no weight repacking (unless extra_bufts: True asks for it, None takes llama.cpp's default; either
    is granted only where this machine can run it), the KV cache types and flash-attention mode of
    attention (DEFAULT_ATTENTION if None: F32, flash attention on), one ubatch per batch. A combination llama.cpp refuses
    raises RuntimeError: llama.cpp itself decides.

    cb_eval(tensor, ask) -> bool, when given, is llama.cpp's graph callback (ggml_backend_sched_eval_callback):
    asked for every node (ask=True: does the caller want this one?), then called with each wanted node
    computed; returning False aborts the rest of the graph.
    """

    def __init__(self, model_path: str | os.PathLike[str], *, n_ctx: int = 512, n_threads: int = 2,
                 attention: AttentionOptions | None = None, extra_bufts: bool | None = False,
                 cb_eval: "Callable[[GgmlTensor, bool], bool] | None" = None) -> None:
        init_llama()
        self._model: int | None = None
        self._ctx: int | None = None
        self._batch: llama_cpp.llama_batch | None = None

        # Repacked (extra buffer type) weights run different kernels than edgemoe's ggml calls.
        mp = model_params(extra_bufts=extra_bufts)
        self.extra_bufts: bool = bool(mp.use_extra_bufts)  # what llama.cpp was given, not what was asked
        self._model = load_model(model_path, mp)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_layer: int = llama_cpp.llama_model_n_layer(self._model)
        self.arch: str = meta_str(self._model, Keys.General.ARCHITECTURE) or ""
        self.n_expert: int = int(meta_str(self._model, Keys.LLM.EXPERT_COUNT.format(arch=self.arch)) or 0)
        self.n_expert_used: int = int(meta_str(self._model, Keys.LLM.EXPERT_USED_COUNT.format(arch=self.arch)) or 0)
        self.n_ctx = n_ctx

        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx  # the whole prompt in one ubatch: one graph, like edgemoe's prefill
        cp.n_seq_max = 1
        # the library default, pinned: sliding-window layers (gpt-oss) keep every cell in position order,
        # as edgemoe's cache does (a smaller SWA ring reorders cells once it wraps)
        cp.swa_full = True
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        att = attention or DEFAULT_ATTENTION
        self.attention = att
        cp.type_k = int(CACHE_TYPES[att.cache_type_k])
        cp.type_v = int(CACHE_TYPES[att.cache_type_v])
        cp.flash_attn_type = {"on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                              "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}[att.flash_attn]
        cp.no_perf = False
        cp.offload_kqv = False
        cp.op_offload = False
        if cb_eval is not None:
            def raw_cb(t_ptr: int, ask: bool, user_data: int) -> bool:
                return cb_eval(GgmlTensor.from_address(t_ptr), ask)

            # Kept on self: llama.cpp holds only the raw function pointer.
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(raw_cb)
            cp.cb_eval = self._cb
            cp.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not ctx:
            self.close()
            raise RuntimeError(f"llama_init_from_model failed for {model_path} (n_ctx={n_ctx}, {att})")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama_tokenize with this model's vocabulary."""
        return tokenize(self._vocab, text, add_special, parse_special)

    def clear(self) -> None:
        """Empty the KV cache."""
        llama_cpp.llama_memory_clear(self._mem, True)

    def decode(self, tokens: list[int], pos0: int, logits_all: bool) -> None:
        """One llama_decode of tokens at positions pos0.. (logits for every row, or the last only)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("decode needs at least one token")
        if pos0 + n > self.n_ctx:
            raise ValueError(f"context full: {pos0} + {n} tokens > n_ctx={self.n_ctx}")
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise ValueError(f"token id out of range [0, {self.n_vocab})")
        b = self._batch
        assert b is not None and self._ctx
        b.n_tokens = n
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = logits_all or i == n - 1
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def all_logits(self, n: int) -> np.ndarray:
        """float32 [n, n_vocab] logits of the last decode (which asked for every row)."""
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).astype(np.float32, copy=True)


__all__ = ["DEFAULT_ATTENTION", "GGML_TYPE_F32", "GGML_TYPE_I32", "GgmlTensor", "LlamaCpp", "copy_2d", "copy_3d"]

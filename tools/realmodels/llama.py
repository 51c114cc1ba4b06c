"""llama.cpp as the measuring instrument: logits of every position, and named graph tensors.

One 512-token chunk is one ``llama_decode`` (one ubatch, logits for every row, so llama.cpp does
not drop rows before the last layer's FFN). ``capture`` names graph tensors to copy out through
``cb_eval`` (llama.cpp's per-layer names: ``ffn_norm-<il>``, ``ffn_moe_logits-<il>``,
``ffn_moe_topk-<il>``, ...), with the ``GgmlTensor`` struct of :mod:`edgemoe.oracle`.

The context is set up like the oracle's (F32 KV cache, flash attention, no weight repacking), so
the numbers are those of the kernels edgemoe itself calls.
"""

from __future__ import annotations

import ctypes
import os
import re

import llama_cpp
import numpy as np

from edgemoe.oracle import GGML_TYPE_F32, GGML_TYPE_I32, GgmlTensor
from edgemoe.util.llamacpp import init_llama, load_model

_NAME = re.compile(rb"^([a-z_]+)-(\d+)$")


class LlamaRunner:
    """A llama.cpp model + context on CPU that evaluates independent chunks of tokens."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 512,
        n_threads: int = 2,
        capture: tuple[str, ...] = (),
        layers: tuple[int, ...] | None = None,
        stop_when_captured: bool = False,
    ) -> None:
        init_llama()
        self._model = None
        self._ctx = None
        self._batch = None
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        mp.use_extra_bufts = False
        self._model = load_model(model_path, mp)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.n_layer = llama_cpp.llama_model_n_layer(self._model)
        self.n_ctx = n_ctx
        self._want = {c.encode() for c in capture}
        self._layers = None if layers is None else set(layers)
        self.captured: dict[tuple[str, int], np.ndarray] = {}
        # with every wanted tensor in hand, abort the rest of the graph (the logits are then junk)
        self._stop_at = None
        if stop_when_captured:
            if not capture:
                raise ValueError("stop_when_captured needs tensors to capture")
            lay = range(self.n_layer) if layers is None else layers
            self._stop_at = {(c, il) for c in capture for il in lay}

        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_seq_max = 1
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.type_k = GGML_TYPE_F32
        cp.type_v = GGML_TYPE_F32
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.offload_kqv = False
        cp.op_offload = False
        if self._want:
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._eval_cb)  # kept alive on self
            cp.cb_eval = self._cb
            cp.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not ctx:
            self.close()
            raise RuntimeError(f"llama_init_from_model failed for {model_path}")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _match(self, name: bytes) -> tuple[str, int] | None:
        m = _NAME.match(name)
        if m is None or m.group(1) not in self._want:
            return None
        il = int(m.group(2))
        if self._layers is not None and il not in self._layers:
            return None
        return m.group(1).decode(), il

    def _eval_cb(self, t_ptr: int, ask: bool, user_data: int) -> bool:
        t = GgmlTensor.from_address(t_ptr)
        key = self._match(t.name)
        if ask:
            return key is not None
        if key is None or not t.data or t.type not in (GGML_TYPE_F32, GGML_TYPE_I32):
            return True
        ne0, ne1 = int(t.ne[0]), int(t.ne[1])
        nb0, nb1 = int(t.nb[0]), int(t.nb[1])
        if int(t.ne[2]) != 1 or int(t.ne[3]) != 1:
            raise RuntimeError(f"captured tensor {t.name!r} is not 2-D")
        span = (ne1 - 1) * nb1 + ne0 * nb0 if ne1 > 0 else 0
        raw = (ctypes.c_char * span).from_address(t.data)
        dtype = np.float32 if t.type == GGML_TYPE_F32 else np.int32
        self.captured[key] = np.ndarray((ne1, ne0), dtype=dtype, buffer=raw, strides=(nb1, nb0)).copy()
        return self._stop_at is None or not self._stop_at <= self.captured.keys()

    def run(self, tokens: list[int]) -> np.ndarray:
        """Evaluate one chunk from position 0 (fresh KV cache); float32 logits [n_tokens, n_vocab].

        Captured tensors of this chunk are in ``self.captured[(name, layer)]``, [n_tokens, ne0].
        With stop_when_captured the graph stops early and the returned logits are meaningless.
        """
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"chunk of {n} tokens does not fit n_ctx={self.n_ctx}")
        llama_cpp.llama_memory_clear(self._mem, True)
        b = self._batch
        b.n_tokens = n
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = True
        self.captured = {}
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).astype(np.float32, copy=True)


def chunk_nll(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Negative log-likelihood of tokens[1:] under logits[:-1] (float64, one per prediction)."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    tgt = np.asarray(tokens[1:])
    return lse - z[np.arange(len(tgt)), tgt]


__all__ = ["LlamaRunner", "chunk_nll"]

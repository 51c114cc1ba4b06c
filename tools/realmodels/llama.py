"""llama.cpp as the measuring instrument: logits of every position, and named graph tensors.

One 512-token chunk is one ``llama_decode`` (one ubatch, logits for every row, so llama.cpp does
not drop rows before the last layer's FFN). ``capture`` names graph tensors to copy out through
``cb_eval`` (llama.cpp's per-layer names: ``ffn_norm-<il>``, ``ffn_moe_logits-<il>``,
``ffn_moe_topk-<il>``, ...), with the ``GgmlTensor`` struct of :mod:`edgemoe.llama_runner`.

The context is the runner's under the oracle (`edgemoe.llama_runner.LlamaCpp`: F32 KV cache, flash attention, no weight
repacking), so the numbers are those of the kernels edgemoe itself calls.
"""

from __future__ import annotations

import os
import re

import numpy as np

from edgemoe.llama_runner import GGML_TYPE_F32, GGML_TYPE_I32, GgmlTensor, LlamaCpp, copy_2d

_NAME = re.compile(rb"^([a-z_]+)-(\d+)$")


class LlamaRunner(LlamaCpp):
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
        self._want = {c.encode() for c in capture}
        self._layers = None if layers is None else set(layers)
        self.captured: dict[tuple[str, int], np.ndarray] = {}
        # with every wanted tensor in hand, abort the rest of the graph (the logits are then junk)
        self._stop_at: set[tuple[str, int]] | None = None
        if stop_when_captured and not capture:
            raise ValueError("stop_when_captured needs tensors to capture")
        super().__init__(model_path, n_ctx=n_ctx, n_threads=n_threads, cb_eval=self._eval_cb if capture else None)
        if stop_when_captured:
            lay = range(self.n_layer) if layers is None else layers
            self._stop_at = {(c, il) for c in capture for il in lay}

    def __enter__(self) -> LlamaRunner:
        return self

    def _match(self, name: bytes) -> tuple[str, int] | None:
        m = _NAME.match(name)
        if m is None or m.group(1) not in self._want:
            return None
        il = int(m.group(2))
        if self._layers is not None and il not in self._layers:
            return None
        return m.group(1).decode(), il

    def _eval_cb(self, t: GgmlTensor, ask: bool) -> bool:
        key = self._match(t.name)
        if ask:
            return key is not None
        if key is None or not t.data or t.type not in (GGML_TYPE_F32, GGML_TYPE_I32):
            return True
        self.captured[key] = copy_2d(t)
        return self._stop_at is None or not self._stop_at <= self.captured.keys()

    def run(self, tokens: list[int]) -> np.ndarray:
        """Evaluate one chunk from position 0 (fresh KV cache); float32 logits [n_tokens, n_vocab].

        Captured tensors of this chunk are in ``self.captured[(name, layer)]``, [n_tokens, ne0].
        With stop_when_captured the graph stops early and the returned logits are meaningless.
        """
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"chunk of {n} tokens does not fit n_ctx={self.n_ctx}")
        self.clear()
        self.captured = {}
        self.decode(tokens, 0, logits_all=True)
        return self.all_logits(n)


def chunk_nll(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    """Negative log-likelihood of tokens[1:] under logits[:-1] (float64, one per prediction)."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    tgt = np.asarray(tokens[1:])
    return lse - z[np.arange(len(tgt)), tgt]


__all__ = ["LlamaRunner", "chunk_nll"]

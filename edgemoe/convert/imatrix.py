"""Collect an importance matrix for the routed experts by running llama.cpp on calibration text.

As llama.cpp's `llama-imatrix` does: the text is cut into chunks (each starting with BOS where the
model adds one), every chunk is one llama_decode from position 0, and the graph callback sees each
expert matmul (GGML_OP_MUL_MAT_ID on a `blk.L.ffn_*_exps.weight`) with its activations and the
router's expert ids; the squares of the activations are summed per expert and input column. Only
routed experts are collected: they are what the shadow requantizes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import llama_cpp
import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.imatrix import Imatrix
from edgemoe.format.schema import expert_tensor_name, parse_expert_tensor
from edgemoe.llama_runner import GGML_TYPE_F32, GGML_TYPE_I32, GgmlTensor, LlamaCpp, copy_2d, copy_3d
from edgemoe.util.files import read_user_text



def read_text(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    text = read_user_text(p, "calibration text")
    if not text.strip():
        raise UserError(f"{p}: the calibration text is empty")
    return text


class _Collector(LlamaCpp):
    """llama.cpp with a graph callback that accumulates squared expert inputs."""

    def __init__(self, model_path: str | os.PathLike[str], n_ctx: int, n_threads: int) -> None:
        self.sums: dict[str, np.ndarray] = {}  # float64 [n_expert, n_per_row]
        self.counts: dict[str, np.ndarray] = {}  # float64 [n_expert]
        super().__init__(model_path, n_ctx=n_ctx, n_threads=n_threads, cb_eval=self._eval_cb)
        # the graph is aborted after the last layer's down experts: the output head (a matmul of
        # every row with the whole vocabulary) would add nothing to the sums
        self._last = expert_tensor_name(self.n_layer - 1, "down").encode()

    @staticmethod
    def _weight(t: GgmlTensor) -> GgmlTensor | None:
        """The stacked expert weight of a MUL_MAT_ID node (src[0]), if t is one (it has ids in src[2])."""
        if not t.src[0] or not t.src[1] or not t.src[2]:
            return None
        w = GgmlTensor.from_address(t.src[0])
        e = parse_expert_tensor(w.name.decode(errors="replace"))
        return w if e is not None and e[2] == "weight" else None

    def _eval_cb(self, t: GgmlTensor, ask: bool) -> bool:
        w = self._weight(t)
        if ask or w is None:
            return w is not None
        x_t, ids_t = GgmlTensor.from_address(t.src[1]), GgmlTensor.from_address(t.src[2])
        if x_t.type != GGML_TYPE_F32 or ids_t.type != GGML_TYPE_I32:
            raise RuntimeError(f"{t.name!r}: expert activations of type {x_t.type}, ids of type {ids_t.type}")
        x = copy_3d(x_t)  # [n_tokens, 1 or k, n_per_row]
        ids = copy_2d(ids_t)  # [n_tokens, k]
        name = w.name.decode()
        n_expert, n_per_row = int(w.ne[2]), int(w.ne[0])
        if name not in self.sums:
            self.sums[name] = np.zeros((n_expert, n_per_row))
            self.counts[name] = np.zeros(n_expert)
        sq = np.square(x, dtype=np.float64)  # [n_tokens, 1 or k, n_per_row]
        for e in np.unique(ids):
            hit = ids == e  # [n_tokens, k]: where expert e was chosen
            if sq.shape[1] == 1:  # gate/up: every selected expert sees the token's one row
                self.sums[name][e] += sq[hit.any(axis=1), 0].sum(axis=0)
            else:  # down: slot j's row went to expert ids[t, j]
                self.sums[name][e] += sq[hit].sum(axis=0)
            self.counts[name][e] += hit.sum()
        return w.name != self._last

    def bos(self) -> int | None:
        """The token each chunk starts with, or None where the model adds none."""
        if not llama_cpp.llama_vocab_get_add_bos(self._vocab):
            return None
        tok = llama_cpp.llama_vocab_bos(self._vocab)
        return None if tok < 0 else int(tok)


def collect_imatrix(model_path: str | os.PathLike[str], text: str, *, dataset: str, chunk_size: int = 512,
                    max_chunks: int | None = None, n_threads: int = 2,
                    progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """The routed experts' importance matrix of the model at model_path over text."""
    if chunk_size < 2:
        raise UserError("--chunk-size must be at least 2")
    with _Collector(model_path, chunk_size, n_threads) as c:
        if not c.n_expert:
            raise UserError(f"{model_path}: not a MoE model (no {c.arch}.expert_count); nothing to collect")
        tokens = c.tokenize(text, add_special=False)
        bos = c.bos()
        body = chunk_size - (bos is not None)
        chunks = [tokens[i:i + body] for i in range(0, len(tokens) - body + 1, body)] or [tokens[:body]]
        if max_chunks is not None:
            chunks = chunks[:max_chunks]
        if not chunks[0]:
            raise UserError(f"{dataset}: the calibration text has no tokens")
        for i, chunk in enumerate(chunks):
            c.clear()
            # logits for every row: otherwise llama.cpp drops all but the last row before the last layer's FFN
            c.decode(([bos] if bos is not None else []) + chunk, 0, logits_all=True)
            if progress is not None:
                progress(i + 1, len(chunks))
        if not c.sums:
            raise RuntimeError(f"{model_path}: llama.cpp ran no expert matmul that could be collected")
        im = Imatrix(datasets=[dataset], chunk_count=len(chunks), chunk_size=chunk_size)
        for name in c.sums:
            im.add(name, c.sums[name].astype(np.float32), c.counts[name].astype(np.float32))
        return im


__all__ = ["collect_imatrix", "read_text"]

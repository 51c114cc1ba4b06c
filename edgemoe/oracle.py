"""llama.cpp as the numeric reference: logits, greedy traces and expert routing for tests/benchmarks.

Runs on `edgemoe.llama_runner.LlamaCpp` (llama.cpp set up to run the ggml CPU kernels edgemoe calls
itself); this module adds what the reference measures: greedy traces with their logits and
timings, and each layer's router choices read from llama.cpp's `ffn_moe_topk-<il>` graph nodes.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from edgemoe.llama_runner import GGML_TYPE_I32, GgmlTensor, LlamaCpp, copy_2d
from edgemoe.model.kvcache import AttentionOptions
from edgemoe.util import proc

_TOPK_NAME = re.compile(rb"^ffn_moe_topk-(\d+)$")


@dataclass
class Trace:
    """One greedy generation: chosen tokens, the logits they came from, routing and timings."""

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)  # generated
    logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [n_steps, n_vocab]
    routing: list[np.ndarray] = field(default_factory=list)  # per eval: [n_layer, n_tokens, k]
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def n_decode_steps(self) -> int:
        """Single-token decode calls (the first generated token comes from the prompt batch)."""
        return max(len(self.tokens) - 1, 0)

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of the prompt batch."""
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second over the single-token decode steps."""
        return self.n_decode_steps / self.decode_s if self.decode_s > 0 else 0.0



class LlamaCppReference(LlamaCpp):
    """The reference: greedy traces, logits and (capture_routing) each layer's top-k experts."""

    def __init__(self, model_path: str | os.PathLike[str], *, n_ctx: int = 512, n_threads: int = 2,
                 attention: AttentionOptions | None = None, extra_bufts: bool | None = False,
                 capture_routing: bool = False) -> None:
        self._capture = capture_routing
        self._seen: dict[int, np.ndarray] = {}  # layer -> [n_rows, k] of the current decode
        super().__init__(model_path, n_ctx=n_ctx, n_threads=n_threads, attention=attention,
                         extra_bufts=extra_bufts, cb_eval=self._eval_cb if capture_routing else None)
        self.n_past = 0
        self.routing: list[np.ndarray] = []  # one entry per eval() when capture_routing

    # -- routing capture -------------------------------------------------------------------------

    def _eval_cb(self, t: GgmlTensor, ask: bool) -> bool:
        """Ask for and copy every `ffn_moe_topk-<il>` tensor."""
        m = _TOPK_NAME.match(t.name)
        if ask:
            return m is not None
        if m is None or t.type != GGML_TYPE_I32 or not t.data:
            return True
        # A strided view of the argsort result: ne = [k, n_rows], nb[1] = n_expert * 4.
        self._seen[int(m.group(1))] = copy_2d(t)
        return True  # keep computing

    def _collect_routing(self, n_tokens: int, out_rows: list[int]) -> np.ndarray:
        """[n_layer, n_tokens, k] from the tensors seen in the last decode (-1 where none)."""
        k = self.n_expert_used or max((a.shape[1] for a in self._seen.values()), default=0)
        r = np.full((self.n_layer, n_tokens, k), -1, dtype=np.int32)
        for il, arr in self._seen.items():
            if arr.shape[0] == n_tokens:
                r[il] = arr
            elif arr.shape[0] == len(out_rows):
                # llama.cpp drops non-output rows before the last layer's FFN (inp_out_ids), so
                # that layer only routes the tokens whose logits were requested.
                r[il, out_rows] = arr
        self._seen = {}
        return r

    # -- evaluation ------------------------------------------------------------------------------

    def is_eog(self, tok: int) -> bool:
        """Whether tok ends generation for this model's vocabulary."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, tok))

    def reset(self) -> None:
        """Clear the KV cache; the next eval starts at position 0."""
        self.clear()
        self.n_past = 0

    def _decode(self, tokens: list[int]) -> float:
        """Decode tokens at the next positions, logits for the last only; returns seconds spent."""
        self._seen = {}
        t0 = time.perf_counter()
        self.decode(tokens, self.n_past, logits_all=False)
        dt = time.perf_counter() - t0
        n = len(tokens)
        self.n_past += n
        if self._capture:
            self.routing.append(self._collect_routing(n, [n - 1]))
        return dt

    def _last_logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise RuntimeError("llama_get_logits_ith returned NULL")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def eval(self, tokens: list[int]) -> np.ndarray:
        """Decode tokens as one batch at the next positions; float32 logits [n_vocab] of the last."""
        self._decode(list(tokens))
        return self._last_logits()

    def greedy(self, prompt_tokens: list[int], n_predict: int, stop_at_eos: bool = False) -> Trace:
        """Reset the KV cache, prefill the prompt in one batch, then generate by argmax."""
        if n_predict < 1:
            raise ValueError("n_predict must be >= 1")
        self.reset()
        self.routing = []
        tr = Trace(prompt_tokens=list(prompt_tokens))
        rows: list[np.ndarray] = []
        tr.prefill_s = self._decode(tr.prompt_tokens)
        while True:
            logits = self._last_logits()
            rows.append(logits)
            tok = int(np.argmax(logits))
            tr.tokens.append(tok)
            if len(tr.tokens) >= n_predict:
                break
            if stop_at_eos and self.is_eog(tok):
                break
            tr.decode_s += self._decode([tok])
        tr.logits = np.stack(rows).astype(np.float32, copy=False)
        tr.routing = list(self.routing) if self._capture else []
        return tr

    @staticmethod
    def rss_bytes() -> int:
        """Current resident set size of this process, in bytes."""
        return proc.rss_bytes()


__all__ = ["LlamaCppReference", "Trace"]

"""The token loop: prefill the prompt in one batch, then sample and decode one token at a time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgemoe.errors import UserError
from edgemoe.model.engine import Engine
from edgemoe.model.sampling import Sampler, SamplingParams
from edgemoe.model.tokenizer import Tokenizer


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stop: str = ""  # "eos", "length" or "context"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    seed: int | None = None

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Decode steps (tokens after the first, which comes from the prefill) per second."""
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def generate(
    engine: Engine,
    tokenizer: Tokenizer,
    prompt_tokens: list[int],
    *,
    n_predict: int,
    sampling: SamplingParams,
    ignore_eos: bool = False,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Continue prompt_tokens from the engine's current state (call engine.reset() for a fresh run)."""
    if not prompt_tokens:
        raise UserError("the prompt is empty (no tokens)")
    if engine.n_past + len(prompt_tokens) > engine.n_ctx:
        raise UserError(f"the prompt is {len(prompt_tokens)} tokens; the context holds {engine.n_ctx - engine.n_past} more")
    gen = Generation(list(prompt_tokens))
    detok = tokenizer.detokenizer()
    pieces: list[str] = []
    with Sampler(sampling) as sampler:
        gen.seed = sampler.seed
        t0 = time.perf_counter()
        logits = engine.eval(prompt_tokens)[0]
        gen.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            tok = sampler.sample(logits)
            sampler.accept(tok)
            if tokenizer.is_eog(tok) and not ignore_eos:
                gen.stop = "eos"
                break
            gen.tokens.append(tok)
            piece = detok.push(tok)
            if piece:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
            if len(gen.tokens) >= n_predict:
                gen.stop = "length"
                break
            if engine.n_past >= engine.n_ctx:
                gen.stop = "context"
                break
            logits = engine.eval([tok])[0]
        gen.decode_s = time.perf_counter() - t0
    tail = detok.flush()
    if tail:
        pieces.append(tail)
        if on_text is not None:
            on_text(tail)
    gen.text = "".join(pieces)
    return gen


def greedy_tokens(engine: Engine, prompt_tokens: list[int], n_predict: int) -> tuple[list[int], np.ndarray]:
    """argmax decoding without stopping at EOS: (tokens, logits [n_predict, n_vocab]); for tests and benchmarks."""
    engine.reset()
    logits = engine.eval(prompt_tokens)[0]
    tokens, rows = [], []
    for i in range(n_predict):
        rows.append(logits)
        tok = int(np.argmax(logits))
        tokens.append(tok)
        if i + 1 < n_predict:
            logits = engine.eval([tok])[0]
    return tokens, np.array(rows)

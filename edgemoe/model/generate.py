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


class Decoder:
    """One sequence's token loop, a step at a time: feed() the logits of its last evaluated token and
    get the next token to evaluate, or None when it has ended (gen.stop says why). generate() drives
    one; the server drives several whose tokens share each engine step."""

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: list[int], *, n_predict: int, n_ctx: int,
                 sampling: SamplingParams, ignore_eos: bool = False,
                 on_text: Callable[[str], None] | None = None) -> None:
        self.gen = Generation(list(prompt_tokens))
        self.tokenizer, self.n_predict, self.n_ctx = tokenizer, n_predict, n_ctx
        self.ignore_eos, self.on_text = ignore_eos, on_text
        self.detok = tokenizer.detokenizer()
        self.pieces: list[str] = []
        self.sampler = Sampler(sampling)
        self.gen.seed = self.sampler.seed

    def feed(self, logits: np.ndarray, n_past: int) -> int | None:
        """logits [n_vocab] of the last token evaluated, the sequence then holding n_past positions."""
        gen = self.gen
        tok = self.sampler.sample(logits)
        self.sampler.accept(tok)
        if self.tokenizer.is_eog(tok) and not self.ignore_eos:
            gen.stop = "eos"
            return None
        gen.tokens.append(tok)
        piece = self.detok.push(tok)
        if piece:
            self.pieces.append(piece)
            if self.on_text is not None:
                self.on_text(piece)
        if len(gen.tokens) >= self.n_predict:
            gen.stop = "length"
            return None
        if n_past >= self.n_ctx:
            gen.stop = "context"
            return None
        return tok

    def finish(self) -> Generation:
        """The detokenizer's tail, the whole text; the sampler is released."""
        self.close()
        tail = self.detok.flush()
        if tail:
            self.pieces.append(tail)
            if self.on_text is not None:
                self.on_text(tail)
        self.gen.text = "".join(self.pieces)
        return self.gen

    def close(self) -> None:
        self.sampler.close()


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
    dec = Decoder(tokenizer, prompt_tokens, n_predict=n_predict, n_ctx=engine.n_ctx, sampling=sampling,
                  ignore_eos=ignore_eos, on_text=on_text)
    try:
        gen = dec.gen
        t0 = time.perf_counter()
        logits = engine.eval(prompt_tokens)[0]
        gen.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tok = dec.feed(logits, engine.n_past)
        while tok is not None:
            tok = dec.feed(engine.eval([tok])[0], engine.n_past)
        gen.decode_s = time.perf_counter() - t0
    finally:
        dec.close()
    return dec.finish()


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

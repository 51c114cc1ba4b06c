"""Prefill and decode speed of the in-process engine against llama.cpp, same model, same threads.

Runs alternate (edgemoe, llama.cpp, edgemoe, ...) so that drift in machine load hits both;
medians over the repeats are reported with their ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.model.engine import Engine
from edgemoe.model.kvcache import AttentionOptions
from edgemoe.oracle import LlamaCppReference
from edgemoe.util.extra_bufts import extra_bufts_result


@dataclass
class RunTiming:
    prefill_tok_s: float
    decode_tok_s: float


@dataclass
class EngineBench:
    model: str
    reference: str
    threads: int
    prompt_tokens: int
    n_predict: int
    repeats: int
    edgemoe: list[RunTiming] = field(default_factory=list)
    llama_cpp: list[RunTiming] = field(default_factory=list)
    tokens_match: bool = True
    resident_experts: bool = True
    reference_repack: bool = False  # whether llama.cpp really ran repacked weights
    repack: bool = False  # whether edgemoe did
    repacked_bytes: int = 0  # how much of the model edgemoe repacked (0: no tensor of a repackable type)
    reference_repack_note: str = ""  # why repacking was asked for and not used
    attention: str = ""  # KV cache types and flash attention, the same on both sides

    def median(self, runs: list[RunTiming], key: str) -> float:
        return statistics.median(getattr(r, key) for r in runs)

    def summary(self) -> dict[str, float]:
        out = {}
        for key in ("prefill_tok_s", "decode_tok_s"):
            ours, theirs = self.median(self.edgemoe, key), self.median(self.llama_cpp, key)
            out[f"edgemoe_{key}"] = ours
            out[f"llama_cpp_{key}"] = theirs
            out[f"ratio_{key.removesuffix('_tok_s')}"] = ours / theirs if theirs else 0.0
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


def _edgemoe_run(engine: Engine, prompt: list[int], n_predict: int) -> tuple[RunTiming, list[int]]:
    engine.reset()
    t0 = time.perf_counter()
    logits = engine.eval(prompt)[0]
    t1 = time.perf_counter()
    tokens = [int(np.argmax(logits))]
    for _ in range(n_predict - 1):
        tokens.append(int(np.argmax(engine.eval([tokens[-1]])[0])))
    t2 = time.perf_counter()
    return RunTiming(len(prompt) / (t1 - t0), (n_predict - 1) / (t2 - t1)), tokens


def bench_engine(model: str | Path, reference: str | Path, *, threads: int, prompt_tokens: int = 64,
                 n_predict: int = 64, repeats: int = 3, n_ctx: int = 1024, resident_experts: bool = True,
                 repack: bool = False, attention: AttentionOptions | None = None) -> EngineBench:
    """Greedy decoding of a fixed synthetic prompt (token ids 100..) on both engines.

    repack: both sides with llama.cpp's repacked weights (CPU_REPACK: Q4_0, Q4_K, IQ4_NL... on x86), as
    llama.cpp runs by default; attention: the KV cache types and flash attention of both.
    """
    prompt = [100 + i for i in range(prompt_tokens)]
    result = EngineBench(str(model), str(reference), threads, prompt_tokens, n_predict, repeats,
                         resident_experts=resident_experts)
    attention = attention or AttentionOptions()
    with Engine(model, n_ctx=n_ctx, n_threads=threads, resident_experts=resident_experts, attention=attention,
                repack=repack) as engine, \
            LlamaCppReference(reference, n_ctx=n_ctx, n_threads=threads, extra_bufts=repack,
                              attention=attention) as ref:
        result.attention = engine.kv.attn.describe()
        result.reference_repack = ref.extra_bufts
        result.repack = engine.repacker is not None
        if repack and not ref.extra_bufts:
            result.reference_repack_note = (
                "llama.cpp's weight repacking is unavailable on this machine "
                f"({extra_bufts_result().reason}); llama.cpp ran without it")
        _edgemoe_run(engine, prompt, 4)  # warm-up: page cache, graph cache
        ref.greedy(prompt, 4)
        for _ in range(repeats):
            timing, ours = _edgemoe_run(engine, prompt, n_predict)
            result.edgemoe.append(timing)
            trace = ref.greedy(prompt, n_predict)
            result.llama_cpp.append(RunTiming(trace.prefill_tok_s, trace.decode_tok_s))
            result.tokens_match &= ours == trace.tokens
        result.repacked_bytes = engine.repacker.nbytes if engine.repacker is not None else 0
    return result

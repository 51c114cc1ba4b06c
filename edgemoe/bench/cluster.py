"""Decode speed of a local cluster (budget-limited workers) against llama.cpp with the whole model cached.

Same prompt, same greedy tokens, measured in one run, repeated; medians and their ratio. Also the
share of decode time stalled on expert loads, each worker's peak RSS (read from outside the
process) and llama.cpp's RSS, and the ceiling this machine's storage puts on a cluster that drops
every expert after use (see bench/storage.py).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.bench.storage import expert_bytes_per_token, shard_read_rate
from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.format.manifest import load_manifest
from edgemoe.oracle import LlamaCppReference
from edgemoe.util.proc import peak_rss_bytes, rss_bytes


@dataclass
class ClusterBench:
    model: str
    reference: str
    workers: int
    memory_budget: str | None
    predictor: str
    shadow_node: str | None
    threads: int
    prompt_tokens: int
    n_predict: int
    repeats: int
    cluster_decode_tok_s: list[float] = field(default_factory=list)
    llama_cpp_decode_tok_s: list[float] = field(default_factory=list)
    stall_share: list[float] = field(default_factory=list)
    recall: float = 0.0
    worker_peak_rss: list[int] = field(default_factory=list)
    coordinator_peak_rss: int = 0
    llama_cpp_rss: int = 0
    model_bytes: int = 0
    tokens_match: bool = True
    expert_bytes_per_token: float = 0.0  # what one decode token reads from storage when nothing is kept
    shard_read_cold_bytes_per_s: float = 0.0  # expert shards mapped as workers map them, page cache dropped
    shard_read_warm_bytes_per_s: float = 0.0  # ... and from the page cache
    shard_read_streams: int = 0
    storage_bytes_per_token: list[float] = field(default_factory=list)  # what the workers really read, per decode token

    @property
    def storage_bound_tok_s(self) -> float:
        """Decode can go no faster than the workers' storage reads per token allow at the cold rate."""
        per_token = statistics.median(self.storage_bytes_per_token) if self.storage_bytes_per_token else 0.0
        return self.shard_read_cold_bytes_per_s / per_token if per_token else float("inf")

    def summary(self) -> dict[str, float]:
        ours = statistics.median(self.cluster_decode_tok_s)
        theirs = statistics.median(self.llama_cpp_decode_tok_s)
        return {"cluster_decode_tok_s": ours, "llama_cpp_decode_tok_s": theirs, "ratio": ours / theirs,
                "stall_share": statistics.median(self.stall_share), "recall": self.recall,
                "max_worker_peak_rss": max(self.worker_peak_rss, default=0), "llama_cpp_rss": self.llama_cpp_rss,
                "storage_bytes_per_token": statistics.median(self.storage_bytes_per_token) if self.storage_bytes_per_token else 0.0,
                "storage_bound_tok_s": self.storage_bound_tok_s, "storage_bound_ratio": self.storage_bound_tok_s / theirs}

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def bench_cluster(model: str | Path, reference: str | Path, *, workers: int = 4, memory_budget: str | None = None,
                  predictor: str = "lookahead", threads: int = 1, prompt_tokens: int = 16, n_predict: int = 64,
                  repeats: int = 3, shadow_node: str | None = None) -> ClusterBench:
    prompt = [100 + i for i in range(prompt_tokens)]
    n_ctx = max(256, prompt_tokens + n_predict + 8)
    r = ClusterBench(str(model), str(reference), workers, memory_budget, predictor, shadow_node, threads, prompt_tokens,
                     n_predict, repeats)
    r.model_bytes = Path(reference).stat().st_size
    r.expert_bytes_per_token = expert_bytes_per_token(load_manifest(model))
    cold = shard_read_rate(model, streams=workers or 1)
    warm = shard_read_rate(model, streams=workers or 1, cold=False)
    r.shard_read_cold_bytes_per_s, r.shard_read_warm_bytes_per_s = cold.bytes_per_s, warm.bytes_per_s
    r.shard_read_streams = cold.streams
    opts = ClusterOptions(workers=workers, predictor=predictor, memory_budget=memory_budget, shadow_node=shadow_node)
    with LlamaCppReference(reference, n_ctx=n_ctx, n_threads=threads) as ref:
        ref.greedy(prompt, 4)  # warm-up
        r.llama_cpp_rss = rss_bytes()  # this process holds llama.cpp's whole model (and nothing of the cluster yet)
        expected = None
        with open_engine(model, opts, n_ctx=n_ctx, n_threads=threads) as engine:
            cluster, workers_ = engine.experts, engine.local_workers
            for i in range(repeats + 1):  # the first run warms the page cache and graphs
                engine.reset()
                stall0, wall0 = cluster.stats.stall_s, time.perf_counter()
                logits = engine.eval(prompt)[0]
                tokens = [int(np.argmax(logits))]
                stall0, read0 = cluster.stats.stall_s, workers_.storage_read_bytes()
                t0 = time.perf_counter()
                for _ in range(n_predict - 1):
                    tokens.append(int(np.argmax(engine.eval([tokens[-1]])[0])))
                dt = time.perf_counter() - t0
                read = workers_.storage_read_bytes() - read0
                trace = ref.greedy(prompt, n_predict)
                if i == 0:
                    continue
                r.cluster_decode_tok_s.append((n_predict - 1) / dt)
                r.stall_share.append((cluster.stats.stall_s - stall0) / dt)
                r.storage_bytes_per_token.append(read / (n_predict - 1))
                r.llama_cpp_decode_tok_s.append(trace.decode_tok_s)
                r.tokens_match &= tokens == trace.tokens
            r.recall = cluster.recall.recall
            r.worker_peak_rss = sorted(engine.local_workers.peak_rss().values())
        r.coordinator_peak_rss = peak_rss_bytes()
    return r

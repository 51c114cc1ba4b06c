"""The comparison a user makes: a local cluster of budget-limited workers against llama.cpp, same run.

1. The cluster against llama.cpp with the whole model cached, runs alternating (repeats, medians).
   llama.cpp runs in a child process, so the bench process's own peak memory is the coordinator's
   (with an in-process shadow); each worker's peak RSS (VmHWM, from outside) and its memory
   cgroup's peak (page cache included) are reported, and what the workers read from storage.
2. llama.cpp confined to a memory cgroup (page cache counted) of one worker's budget and of the
   workers' total budget: what the same memory buys without the cluster. Skipped, with a note,
   where no cgroup can be made.
3. The ceiling this machine's storage puts on a cluster that drops every expert after use
   (bench/storage.py), and a PNG of decode tok/s against memory.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.bench.confined import LlamaCppChild
from edgemoe.bench.storage import expert_bytes_per_token, page_cache_kept, shard_read_rate
from edgemoe.cluster.budget import parse_size
from edgemoe.cluster.cgroup import CgroupUnavailable, MemoryCgroup
from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.format.manifest import load_manifest
from edgemoe.util.files import drop_page_cache
from edgemoe.util.proc import peak_rss_bytes, reset_peak_rss


@dataclass
class ConfinedRun:
    """llama.cpp in a memory cgroup of `limit` bytes."""

    limit: int
    decode_tok_s: list[float] = field(default_factory=list)
    storage_bytes_per_token: list[float] = field(default_factory=list)
    cgroup_peak: int = 0
    peak_rss: int = 0
    tokens_match: bool = True

    @property
    def median_tok_s(self) -> float:
        return statistics.median(self.decode_tok_s) if self.decode_tok_s else 0.0


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
    residency: str = "auto"
    cluster_decode_tok_s: list[float] = field(default_factory=list)
    llama_cpp_decode_tok_s: list[float] = field(default_factory=list)
    stall_share: list[float] = field(default_factory=list)
    recall: float = 0.0
    resident_experts: int = 0
    n_experts: int = 0
    worker_peak_rss: list[int] = field(default_factory=list)
    worker_cgroup_peak: list[int] = field(default_factory=list)  # empty where no cgroup could be made
    coordinator_peak_rss: int = 0  # the bench process: the coordinator (and an in-process shadow)
    shadow_node_peak_rss: int = 0  # --shadow-node local
    llama_cpp_peak_rss: int = 0  # the fully cached llama.cpp child
    llama_cpp_storage_bytes_per_token: list[float] = field(default_factory=list)
    model_bytes: int = 0
    tokens_match: bool = True
    expert_bytes_per_token: float = 0.0  # what one decode token reads from storage when nothing is kept
    shard_read_cold_bytes_per_s: float = 0.0  # expert shards mapped as workers map them, page cache dropped
    shard_read_warm_bytes_per_s: float = 0.0  # ... and from the page cache
    shard_read_streams: int = 0
    shard_read_cold_cached_share: float | None = None  # of the shards still cached after the drop (None: unknown)
    storage_bytes_per_token: list[float] = field(default_factory=list)  # what the workers really read, per decode token
    predicted_tok_s: float = 0.0  # edgemoe plan's model of this cluster (plan/local.py), for validation
    predicted_bottleneck: str = ""
    prediction: dict = field(default_factory=dict)  # the model's terms and the machine speeds it used
    confined: list[ConfinedRun] = field(default_factory=list)
    confined_n_predict: int = 0
    confined_note: str = ""  # why the confined runs were skipped

    @property
    def cold_read_from_page_cache(self) -> bool:
        """The kernel ignored the bench's page-cache drop: its cold rate (and the ceilings from it) are the
        page cache's."""
        return page_cache_kept(self.shard_read_cold_cached_share)

    @property
    def storage_bound_tok_s(self) -> float:
        """Decode can go no faster than the workers' storage reads per token allow at the cold rate."""
        per_token = statistics.median(self.storage_bytes_per_token) if self.storage_bytes_per_token else 0.0
        return self.shard_read_cold_bytes_per_s / per_token if per_token else float("inf")

    @property
    def dropping_storage_bound_tok_s(self) -> float:
        """The ceiling of a cluster that drops every expert (reads all routed experts every token)."""
        return self.shard_read_cold_bytes_per_s / self.expert_bytes_per_token if self.expert_bytes_per_token else 0.0

    def summary(self) -> dict[str, float]:
        ours = statistics.median(self.cluster_decode_tok_s)
        theirs = statistics.median(self.llama_cpp_decode_tok_s)
        read = statistics.median(self.storage_bytes_per_token) if self.storage_bytes_per_token else 0.0
        out = {"cluster_decode_tok_s": ours, "llama_cpp_decode_tok_s": theirs, "ratio": ours / theirs,
               "stall_share": statistics.median(self.stall_share), "recall": self.recall,
               "max_worker_peak_rss": max(self.worker_peak_rss, default=0),
               "max_worker_cgroup_peak": max(self.worker_cgroup_peak, default=0),
               "coordinator_peak_rss": self.coordinator_peak_rss, "llama_cpp_peak_rss": self.llama_cpp_peak_rss,
               "coordinator_to_llama_cpp_memory": self.coordinator_peak_rss / self.llama_cpp_peak_rss
               if self.llama_cpp_peak_rss else 0.0,
               "storage_bytes_per_token": read, "storage_share_of_routed": read / self.expert_bytes_per_token
               if self.expert_bytes_per_token else 0.0,
               "storage_bound_tok_s": self.storage_bound_tok_s, "storage_bound_ratio": self.storage_bound_tok_s / theirs,
               "dropping_storage_bound_tok_s": self.dropping_storage_bound_tok_s,
               "cluster_to_dropping_storage_bound": ours / self.dropping_storage_bound_tok_s
               if self.dropping_storage_bound_tok_s else 0.0,
               "predicted_tok_s": self.predicted_tok_s,
               "predicted_over_measured": self.predicted_tok_s / ours if ours else 0.0}
        for c in self.confined:
            mib = c.limit >> 20
            out[f"llama_cpp_confined_{mib}MiB_tok_s"] = c.median_tok_s
            out[f"cluster_vs_confined_{mib}MiB"] = ours / c.median_tok_s if c.median_tok_s else float("inf")
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def bench_cluster(model: str | Path, reference: str | Path, *, workers: int = 4, memory_budget: str | None = None,
                  predictor: str = "lookahead", threads: int = 1, prompt_tokens: int = 16, n_predict: int = 64,
                  repeats: int = 3, shadow_node: str | None = None, residency: str = "auto",
                  confined: bool = True, confined_n_predict: int = 8, board_profile: str | None = None) -> ClusterBench:
    prompt = [100 + i for i in range(prompt_tokens)]
    n_ctx = max(256, prompt_tokens + n_predict + 8)
    r = ClusterBench(str(model), str(reference), workers, memory_budget, predictor, shadow_node, threads, prompt_tokens,
                     n_predict, repeats, residency=residency, confined_n_predict=confined_n_predict)
    r.model_bytes = Path(reference).stat().st_size
    manifest = load_manifest(model)
    r.n_experts = len(manifest.expert_files())
    r.expert_bytes_per_token = expert_bytes_per_token(manifest)
    cold = shard_read_rate(model, streams=workers or 1)
    warm = shard_read_rate(model, streams=workers or 1, cold=False)
    r.shard_read_cold_bytes_per_s, r.shard_read_warm_bytes_per_s = cold.bytes_per_s, warm.bytes_per_s
    r.shard_read_cold_cached_share = cold.cached_share
    r.shard_read_streams = cold.streams
    opts = ClusterOptions(workers=workers, predictor=predictor, memory_budget=memory_budget, shadow_node=shadow_node,
                          residency=residency)
    with LlamaCppChild(reference, threads=threads, n_ctx=n_ctx) as ref:
        ref.run(prompt, 4)  # warm-up: page cache, graphs
        reset_peak_rss()  # from here on this process's peak is the coordinator's, not the storage probe's
        with open_engine(model, opts, n_ctx=n_ctx, n_threads=threads) as engine:
            cluster, local = engine.experts, engine.local_workers
            for i in range(repeats + 1):  # the first run warms the page cache, graphs and resident experts
                engine.reset()
                logits = engine.eval(prompt)[0]
                tokens = [int(np.argmax(logits))]
                stall0, read0 = cluster.stats.stall_s, local.storage_read_bytes()
                t0 = time.perf_counter()
                for _ in range(n_predict - 1):
                    tokens.append(int(np.argmax(engine.eval([tokens[-1]])[0])))
                dt = time.perf_counter() - t0
                read = local.storage_read_bytes() - read0
                theirs = ref.run(prompt, n_predict)
                if i == 0:
                    continue
                r.cluster_decode_tok_s.append((n_predict - 1) / dt)
                r.stall_share.append((cluster.stats.stall_s - stall0) / dt)
                r.storage_bytes_per_token.append(read / (n_predict - 1))
                r.llama_cpp_decode_tok_s.append(theirs.decode_tok_s)
                r.llama_cpp_storage_bytes_per_token.append(theirs.storage_bytes / n_predict)
                r.tokens_match &= tokens == theirs.tokens
            r.recall = cluster.recall.recall
            r.resident_experts = len(cluster.placement)
            local.stop()  # reaped: their peaks are final
            r.worker_peak_rss = sorted(local.peak_rss().values())
            r.worker_cgroup_peak = sorted(local.cgroup_peak().values())
            shadow = getattr(engine, "local_shadow", None)
            if shadow is not None:
                shadow.stop()
                r.shadow_node_peak_rss = max(shadow.peak_rss().values(), default=0)
            r.coordinator_peak_rss = peak_rss_bytes()
        r.llama_cpp_peak_rss = ref.peak_rss
    from edgemoe.bench.board import this_machine
    from edgemoe.plan.local import predict_local_cluster

    machine, baseline = this_machine(model, threads, board_profile)
    pred = predict_local_cluster(model, workers=workers, memory_budget=memory_budget, predictor=predictor, recall=r.recall,
                                 machine=machine, baseline=baseline, storage_bytes_s=planner_cold_rate(r),
                                 shadow_node=shadow_node is not None, residency=residency)
    r.predicted_tok_s, r.predicted_bottleneck = pred.tok_s, pred.bottleneck
    r.prediction = {**pred.to_dict(), "machine": asdict(machine)}
    if confined and memory_budget:
        budget = parse_size(memory_budget, "--memory-budget")
        limits = sorted({budget, budget * workers})
        with tempfile.TemporaryDirectory(prefix="edgemoe-bench-") as tmp:
            try:
                private = _private_copy(reference, Path(tmp))
                for limit in limits:
                    r.confined.append(_confined_run(private, limit, prompt, confined_n_predict, repeats, threads, n_ctx))
            except CgroupUnavailable as e:
                r.confined_note = f"llama.cpp confined runs skipped: {e}"
    elif confined:
        r.confined_note = "llama.cpp confined runs skipped: no --memory-budget to confine it to"
    return r


def planner_cold_rate(r: ClusterBench) -> float | None:
    """The bench's cold shard rate for the planner, unless the kernel kept the pages the drop asked it to
    forget (gVisor did on a lent machine: 18.5 GB/s "cold" once, 1.0-1.7 GB/s other times, same files);
    then the planner takes the single-loader rate it measured itself (edgemoe.bench.board.this_machine)."""
    return None if r.cold_read_from_page_cache else r.shard_read_cold_bytes_per_s


def _private_copy(reference: str | Path, tmp: Path) -> Path:
    """A copy of the GGUF that no other process maps: page cache the kernel can drop and charge to
    the confined child alone (pages another process holds mapped are neither dropped nor charged)."""
    dst = tmp / Path(reference).name
    with open(reference, "rb") as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 16 << 20)
        out.flush()
        os.fsync(out.fileno())
    drop_page_cache(dst)
    return dst


def _confined_run(reference: str | Path, limit: int, prompt: list[int], n_predict: int, repeats: int, threads: int,
                  n_ctx: int) -> ConfinedRun:
    out = ConfinedRun(limit)
    group = MemoryCgroup.create(f"bench-llama-{limit >> 20}MiB", limit)
    try:
        with LlamaCppChild(reference, threads=threads, n_ctx=n_ctx, cgroup=group) as ref:
            want = None
            ref.run(prompt, 2)  # warm-up
            for _ in range(repeats):
                run = ref.run(prompt, n_predict)
                out.decode_tok_s.append(run.decode_tok_s)
                out.storage_bytes_per_token.append(run.storage_bytes / n_predict)
                want = want or run.tokens
                out.tokens_match &= run.tokens == want
            out.peak_rss = ref.peak_rss
        out.cgroup_peak = group.peak() or 0
    finally:
        group.remove()
    return out


def plot(r: ClusterBench, path: str | Path) -> None:
    """Decode tok/s against the memory it ran in: llama.cpp fully cached and confined, and the cluster
    (the workers' total budget; the coordinator's peak is in the label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r.summary()
    mib = 1 << 20
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = sorted([(c.limit / mib, c.median_tok_s) for c in r.confined] + [(r.llama_cpp_peak_rss / mib, s["llama_cpp_decode_tok_s"])])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="llama.cpp (memory cgroup; rightmost: fully cached)")
    if r.memory_budget:
        total = parse_size(r.memory_budget) * r.workers
        ax.plot([total / mib], [s["cluster_decode_tok_s"]], "s", markersize=10,
                label=f"edgemoe, {r.workers} workers x {r.memory_budget} (coordinator {r.coordinator_peak_rss / mib:.0f} MiB)")
    ax.set_xlabel("memory (MiB)")
    ax.set_ylabel("decode tok/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(f"{Path(r.model).name}: predictor {r.predictor}, residency {r.residency}, {r.threads} thread(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Measure this machine as a board for the planner (edgemoe profile-board): the numbers a profile holds.

    cores, memory_total          os.sched_getaffinity, /proc/meminfo
    storage_read_mb_s            expert shards mapped cold as a worker maps them (bench/storage.py)
    compute_mb_s                 expert FFNs of one token row on `threads` ggml threads: shard bytes / time
    round_trip_us, network_mb_s  ZeroMQ DEALER/ROUTER over loopback: a hidden state there and back; 4 MiB frames
    fanout_us, request_us        decode through local clusters of 1 and min(top-k, 4) workers with every
                                 expert resident, less the same decode in one process, per layer: a worker gets one request
                                 per layer for all its experts; fanout_us is a layer's cost with one worker
                                 (messaging at both ends, the round trip), request_us what each further
                                 worker of the layer adds (min(top-k, 4) workers less 1, per further one)
    layer_overhead_us            the in-process engine's decode per layer, less the weight bytes it reads at
                                 compute_mb_s: the fixed cost of the decode path (graphs, Python, copies)
    worker_baseline              a fresh worker process's resident memory with no expert mapped

Every number is a median of repeats; each takes seconds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgemoe.format.manifest import load_manifest
from edgemoe.plan.pipeline import BoardSpeed

if TYPE_CHECKING:
    from edgemoe.bench.storage import StorageRate


@dataclass
class BoardMeasurement:
    cores: int
    memory_total: int
    threads: int
    storage_read_mb_s: float
    compute_mb_s: float
    round_trip_us: float
    network_mb_s: float
    layer_overhead_us: float
    worker_baseline: int
    request_us: float
    fanout_us: float
    storage_from_page_cache: bool = False  # the kernel ignored the drop: storage_read_mb_s is the page cache's


def memory_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemTotal")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def storage_rate(model_dir: Path, n_files: int = 24) -> "StorageRate":
    """Cold shard read, one loader (what one worker's storage gives); its from_page_cache says whether
    the kernel ignored the drop."""
    from edgemoe.bench.storage import shard_read_rate

    return shard_read_rate(model_dir, n_files=n_files, streams=1)


def compute_rate(model_dir: Path, threads: int, n_embd: int, repeats: int = 5, n_shards: int = 32) -> float:
    """Expert FFN compute on one token row: MB of shard weights per second, over n_shards distinct
    shards in turn (more bytes than a CPU cache holds, as in decode, where each expert is read once)."""
    from edgemoe.ggml.compute import Compute
    from edgemoe.model.expert_ffn import ExpertFFN, MappedShard, ShardLayout

    m = load_manifest(model_dir)
    rels = [rel for _, _, rel in m.expert_files()]
    rels = rels[:: max(1, len(rels) // n_shards)][:n_shards]
    compute = Compute(threads)
    ffn = ExpertFFN(compute)
    shards = [MappedShard(ShardLayout.read(model_dir / rel)) for rel in rels]
    x = np.random.default_rng(0).standard_normal((1, n_embd)).astype(np.float32)
    try:
        for sh in shards:
            ffn.run(sh, x)  # warm-up: graphs built, pages touched
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for sh in shards:
                ffn.run(sh, x)
            rates.append(sum(m.files[rel].size for rel in rels) / (time.perf_counter() - t0) / 1e6)
    finally:
        for sh in shards:
            sh.close()
        ffn.close()
    return statistics.median(rates)


def loopback(n_embd: int, repeats: int = 300) -> tuple[float, float]:
    """(round trip in us of 4*n_embd bytes, throughput in MB/s of 4 MiB frames) over ZeroMQ on loopback."""
    import zmq

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def echo() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                router.send_multipart(router.recv_multipart(copy=False), copy=False)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        small = np.zeros(n_embd, np.float32).tobytes()
        rtts = []
        for i in range(repeats + 20):
            t0 = time.perf_counter()
            dealer.send(small)
            dealer.recv()
            if i >= 20:
                rtts.append(time.perf_counter() - t0)
        big = bytes(4 << 20)
        bws = []
        for _ in range(8):
            t0 = time.perf_counter()
            dealer.send(big, copy=False)
            dealer.recv(copy=False)
            bws.append(2 * len(big) / (time.perf_counter() - t0) / 1e6)
    finally:
        stop.set()
        t.join(timeout=5)
        router.close()
        dealer.close()
        ctx.term()
    return statistics.median(rtts) * 1e6, statistics.median(bws)


def layer_overhead(model_dir: Path, threads: int, compute_mb_s: float, n_tokens: int = 24) -> float:
    """us per layer of the in-process decode beyond the weight bytes it reads at compute_mb_s."""
    from edgemoe.model.engine import Engine
    from edgemoe.plan.facts import facts_of_dir

    f = facts_of_dir(model_dir)
    per_token_bytes = f.head_bytes + f.n_layers * f.trunk_layer_bytes + f.routed_bytes_per_token
    with Engine(model_dir, n_ctx=n_tokens + 16, n_threads=threads) as eng:
        logits = eng.eval([1, 2, 3, 4])
        tok = int(np.argmax(logits[-1] if logits.ndim > 1 else logits))
        times = []
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            out = eng.eval([tok])
            times.append(time.perf_counter() - t0)
            tok = int(np.argmax(out[-1] if out.ndim > 1 else out))
    t = statistics.median(times[4:]) - per_token_bytes / (compute_mb_s * 1e6)
    return max(0.0, t / f.n_layers * 1e6)


def _decode_times(engine, n_tokens: int) -> float:
    """Median seconds per greedy decode token of an engine (after 4 warm-up tokens)."""
    logits = engine.eval([1, 2, 3, 4])
    tok = int(np.argmax(logits[-1] if logits.ndim > 1 else logits))
    times = []
    for _ in range(n_tokens + 4):
        t0 = time.perf_counter()
        out = engine.eval([tok])
        times.append(time.perf_counter() - t0)
        tok = int(np.argmax(out[-1] if out.ndim > 1 else out))
    return statistics.median(times[4:])


def _cluster_decode(model_dir: Path, workers: int, budget: int, threads: int, n_tokens: int) -> float:
    """Median seconds per decode token through a local cluster of `workers` workers, after its residents
    have loaded (warm-up: decode until two runs of 4 tokens agree within 10%, at most 3 s)."""
    from edgemoe.cluster.session import ClusterOptions, open_engine

    opts = ClusterOptions(workers=workers, predictor="lookahead", worker_threads=threads,
                          memory_budget=f"{budget >> 20}MiB")
    with open_engine(model_dir, opts, n_ctx=512, n_threads=threads) as eng:
        t0, last = time.perf_counter(), float("inf")
        while time.perf_counter() - t0 < 3.0 and eng.seq_past[0] < 512 - 2 * n_tokens - 16:
            now = _decode_times(eng, 4)
            if abs(now - last) <= 0.1 * last:
                break
            last = now
        eng.reset()
        return _decode_times(eng, n_tokens)


def request_costs(model_dir: Path, threads: int, n_tokens: int = 32, repeats: int = 3) -> tuple[float, float]:
    """(fanout_us, request_us): what a decode layer through a local cluster costs beyond the same layer
    in one process, every expert resident (budgets that hold them all, where this machine's memory
    allows), as the cluster really runs it. A worker gets one request per layer for all of its experts
    (computed in one graph): with 1 worker a layer costs fanout, with n = min(top-k, 4) (at least 2, each
    holding its share of the experts) fanout + (n - 1) * request, each further worker's message at both
    ends. Medians of `repeats` runs each, the two cluster sizes in turn (decode times on a busy 2-core
    host vary by +-15% from second to second)."""
    from edgemoe.model.engine import Engine

    m = load_manifest(model_dir)
    L = len(m.moe_layers)
    experts = sum(m.files[rel].size for _, _, rel in m.expert_files())
    room = memory_total() // 3  # the workers' budgets together stay below a third of the memory
    with Engine(model_dir, n_ctx=n_tokens + 16, n_threads=threads) as eng:
        local = _decode_times(eng, n_tokens)
    wide = max(2, min(m.n_experts_used, 4))  # more further workers, a larger difference to measure
    runs: dict[int, list[float]] = {1: [], wide: []}
    for _ in range(repeats):
        for n in runs:
            budget = min(int(experts * 1.25 / n) + (256 << 20), room // n)
            runs[n].append(_cluster_decode(model_dir, n, budget, threads, n_tokens))
    one, many = (max(0.0, statistics.median(runs[n]) - local) / L for n in (1, wide))
    return one * 1e6, max(0.0, many - one) / (wide - 1) * 1e6


def worker_baseline() -> int:
    """Resident memory of a fresh process that has loaded what a worker loads before any shard."""
    code = ("import edgemoe.cluster.worker, edgemoe.ggml.compute as c, zmq; p = c.Compute(1); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip()) * 1024


def measure_board(model_dir: str | os.PathLike[str], threads: int, log=None) -> BoardMeasurement:
    model_dir = Path(model_dir)
    say = log or (lambda msg: None)
    from edgemoe.plan.facts import facts_of_dir

    n_embd = facts_of_dir(model_dir).n_embd
    say("reading expert shards cold from storage ...")
    read = storage_rate(model_dir)
    storage = read.bytes_per_s / 1e6
    if read.from_page_cache:
        say(f"  warning: the kernel kept {100 * read.cached_share:.0f}% of the shards cached after the drop: "
            "this is the page cache's rate, not the storage's")
    say(f"  {storage:.0f} MB/s; computing experts on {threads} thread(s) ...")
    comp = compute_rate(model_dir, threads, n_embd)
    say(f"  {comp:.0f} MB/s of weights; loopback round trips ...")
    rtt, bw = loopback(n_embd)
    say(f"  {rtt:.0f} us, {bw:.0f} MB/s; decoding in one process for the per-layer overhead ...")
    ovh = layer_overhead(model_dir, threads, comp)
    say(f"  {ovh:.0f} us per layer; expert requests through local clusters of 1 and min(top-k, 4) workers ...")
    fanout, req = request_costs(model_dir, threads)
    say(f"  {fanout:.0f} us per layer's fan-out, {req:.0f} us per further worker of a layer; a worker's "
        "baseline memory ...")
    base = worker_baseline()
    say(f"  {base / 2**20:.0f} MiB")
    return BoardMeasurement(cores(), memory_total(), threads, storage, comp, rtt, bw, ovh, base, req, fanout,
                            read.from_page_cache)


def this_machine(model_dir: str | os.PathLike[str], threads: int, profile: str | None = None) -> tuple[BoardSpeed, int]:
    """(speeds, worker baseline bytes) of this machine: from a measured profile, else measured now."""
    if profile is not None:
        from edgemoe.errors import UserError
        from edgemoe.plan.cluster import board_speed, missing_speeds, resolve_profile

        p = resolve_profile(profile)
        if missing_speeds(p):
            raise UserError(f"{profile}: lacks {', '.join(missing_speeds(p))} (write it with edgemoe profile-board)")
        return replace(board_speed(p), threads=threads), p.worker_baseline or 0
    from edgemoe.plan.facts import facts_of_dir

    model_dir = Path(model_dir)
    n_embd = facts_of_dir(model_dir).n_embd
    comp = compute_rate(model_dir, threads, n_embd)
    rtt, bw = loopback(n_embd)
    storage = storage_rate(model_dir).bytes_per_s / 1e6
    fanout, request = request_costs(model_dir, threads)
    speed = BoardSpeed("this-machine", cores(), threads, comp * 1e6, storage * 1e6, rtt * 1e-6, bw * 1e6,
                       layer_overhead(model_dir, threads, comp) * 1e-6, request * 1e-6, fanout * 1e-6)
    return speed, worker_baseline()


__all__ = ["BoardMeasurement", "compute_rate", "cores", "layer_overhead", "loopback", "measure_board",
           "memory_total", "request_costs", "storage_rate", "this_machine", "worker_baseline"]

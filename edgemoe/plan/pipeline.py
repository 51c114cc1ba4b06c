"""Predicted decode speed of the OD-MoE pipeline on a cluster of profiled boards, and its bottleneck.

A decode token walks the MoE layers one after another (paper section 2). Per layer l:

    t_M  = trunk_layer_bytes / coordinator compute rate + coordinator per-layer overhead
    t_W  = fan-out + (group size - 1) * request cost
           + ceil(k / group size) * (hidden-state bytes / link rate + shard / worker compute rate)
           (each worker of the layer's group gets one request for its experts and computes them in one
           graph; fan-out and request cost are measured on local clusters of 1 and min(k, 4) workers, every
           expert resident)
    stall: an expert the predictor missed (probability 1 - recall) and that is not resident is read on
           demand: shard / storage rate, once per layer that has such a miss

and loads of correctly predicted, non-resident experts overlap the other groups' work (eq. (1): no
stall while t_load <= n_groups * t_M + (n_groups - 1) * t_W). The token's time is the largest of:

    path     = head + sum over layers (t_M + t_W + stall) [+ the shadow's decode when it shares the
               coordinator: it runs between tokens] [+ the streamed reads, on one host with fewer cores
               than processes: there the loaders and the path take turns on the cores (measured)]
    storage  = the streamed shards one worker reads per token / its storage rate (all workers' reads
               together when they share one disk), mispredicted prefetches included
    cpu      = all CPU work of the token / cores, when every process shares one host (the local
               cluster on this machine)
    shadow   = the shadow's own decode, when it runs on a node of its own

The bottleneck named is the largest component of the winning term: storage, network, compute
(the workers' expert work), coordinator (trunk, per-layer overhead, in-process shadow).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from edgemoe.plan.facts import ModelFacts
from edgemoe.plan.memory import MemoryPlan


@dataclass(frozen=True)
class BoardSpeed:
    """Measured speeds of a board (edgemoe profile-board)."""

    name: str
    cores: int
    threads: int
    compute_bytes_s: float  # expert weight bytes per second of a mat-vec on `threads` threads
    storage_bytes_s: float  # cold read rate of shards
    round_trip_s: float  # one small request + reply
    network_bytes_s: float  # link throughput
    layer_overhead_s: float  # fixed decode-path cost per layer (coordinator role)
    request_s: float  # each further worker a layer's requests go to (its message at both ends)
    fanout_s: float = 0.0  # a layer's request to one worker and its answer: the fixed cost per layer


@dataclass
class SpeedPrediction:
    tok_s: float
    token_s: float
    bottleneck: str
    terms: dict[str, float]  # seconds per token of path, storage, cpu, shadow
    components: dict[str, float]  # seconds per token of coordinator, network, compute, stall, shadow
    stall_free: bool  # eq. (1): a predicted load fits the time the other groups take
    load_s: float
    maxload_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def predict_decode(facts: ModelFacts, mem: MemoryPlan, workers: list[BoardSpeed], coordinator: BoardSpeed, *,
                   recall: float = 1.0, predictor: str = "shadow", shadow_node: bool = False,
                   shared_host: bool = False, shared_storage_bytes_s: float | None = None) -> SpeedPrediction:
    """Seconds per decode token of the cluster (see the module docstring). shared_storage_bytes_s: the read
    rate of the one disk every worker of a shared host reads, all loaders together (default: the slowest
    board's single-loader rate); a single load's latency is always the single-loader rate's."""
    L = len(facts.moe_layers)
    k = facts.n_experts_used
    n = len(workers)
    g = min(k, n)
    n_groups = max(1, n // g)
    shard = facts.mean_shard_bytes
    hidden = 4.0 * facts.n_embd
    slow_w = min(workers, key=lambda b: b.compute_bytes_s)
    slow_s = min(workers, key=lambda b: b.storage_bytes_s)
    net = min(b.network_bytes_s for b in [*workers, coordinator])
    rtt = max(b.round_trip_s for b in workers)

    # coordinator: the output head once, then each layer's trunk and fixed overhead
    head = facts.head_bytes / coordinator.compute_bytes_s
    trunk = L * (facts.trunk_layer_bytes / coordinator.compute_bytes_s + coordinator.layer_overhead_s)
    # workers: each layer's experts on its group, ceil(k/g) of them one after another on a worker
    per_worker = math.ceil(k / g)
    compute = L * per_worker * shard / slow_w.compute_bytes_s
    request = max(b.request_s for b in workers)
    fanout = max(coordinator.fanout_s, rtt)  # a real network's round trip can exceed the measured fan-out
    # a worker gets one request per layer for its ceil(k/g) experts (one graph): the layer pays one fan-out,
    # each further worker's message, and the hidden states out and back
    messages = L * (fanout + (g - 1) * request)
    network = messages + L * per_worker * 2 * hidden / net
    # misses: a routed expert neither resident nor predicted is read on demand
    p_stream = 1.0 - mem.resident_hit
    r = recall if predictor != "reactive" else 0.0
    misses_per_layer = k * p_stream * (1.0 - r)
    load = shard / slow_s.storage_bytes_s
    # misses of one layer load in parallel on the group's workers, one after another on each
    stall = L * max(min(1.0, misses_per_layer), misses_per_layer / g) * load
    # the shadow: the same model again with its smaller experts, in-process (mul_mat_id, no network)
    shadow = 0.0
    if predictor == "shadow" and facts.shadow:
        shadow = (facts.head_bytes + L * (facts.trunk_layer_bytes + k * facts.shadow_shard_bytes)) / coordinator.compute_bytes_s \
            + L * coordinator.layer_overhead_s
    path = head + trunk + compute + network + stall + (0.0 if shadow_node else shadow)
    # storage: streamed shards per token (+ mispredicted prefetches that were loaded for nothing)
    reads = L * k * p_stream * (1.0 + (1.0 - r) if predictor != "reactive" else 1.0)
    if shared_host:
        storage = reads * shard / (shared_storage_bytes_s or slow_s.storage_bytes_s)
    else:
        storage = reads * shard / slow_s.storage_bytes_s / n
    # one host with fewer cores than processes on it: the loaders and the decode path take turns on the
    # cores, and the token waits for its streamed reads instead of overlapping them (measured on 2 cores
    # with 4 workers; with a core per process the reads overlap the path, eq. (1))
    exposed = max(0.0, storage - stall) if shared_host and n + 1 > coordinator.cores else 0.0
    path += exposed
    # cpu: everything on one host shares its cores
    cpu = 0.0
    if shared_host:
        # every routed expert is computed once (on `threads` threads); each request and fan-out is CPU at both ends
        work = head + trunk + shadow + L * k * shard / slow_w.compute_bytes_s * slow_w.threads + messages
        cpu = work / max(1, coordinator.cores)
    terms = {"path": path, "storage": storage, "cpu": cpu, "shadow": shadow if shadow_node else 0.0}
    token = max(terms.values())
    components = {"coordinator": head + trunk + (0.0 if shadow_node else shadow), "network": network,
                  "compute": compute, "stall": stall, "exposed_reads": exposed, "shadow": shadow}
    win = max(terms, key=terms.get)
    if win == "storage":
        bottleneck = "storage"
    elif win == "shadow":
        bottleneck = "coordinator (the shadow node)"
    else:
        c = {"coordinator": components["coordinator"], "network": network, "compute": compute, "storage": stall + exposed}
        bottleneck = max(c, key=c.get)
        if win == "cpu":
            bottleneck += " (the host's cores are shared by every process)"
    t_m = (head + trunk) / L
    t_w = (compute + network) / L
    maxload = n_groups * t_m + (n_groups - 1) * t_w
    return SpeedPrediction(1.0 / token, token, bottleneck, terms, components, load <= maxload or p_stream == 0,
                           load, maxload)


__all__ = ["BoardSpeed", "SpeedPrediction", "predict_decode"]

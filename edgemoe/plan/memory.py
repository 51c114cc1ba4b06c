"""The memory plan of a cluster: what each worker keeps resident, what streams, whether it fits.

Follows the cluster's own accounting (edgemoe/cluster/budget.py): a worker's budget bounds its whole
resident memory = baseline + reserve (one request's activations + slack) + the shards it maps. A
worker keeps room for its just-in-time slots (budget.jit_slot_count: top-k + 1, as the worker itself
does); the rest of its budget holds resident experts. Residency (issue 16's design): one placement for
the whole cluster, each expert resident on at most one worker, the most used first (routing counts from an
importance matrix, else all equal); `residency="off"` is the paper's cacheless mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgemoe.cluster.budget import default_reserve, jit_slot_count, page_round
from edgemoe.errors import UserError
from edgemoe.plan.facts import ModelFacts

DEFAULT_WORKER_BASELINE = 96 << 20  # a worker's RSS with nothing mapped, when the profile has no measurement
DEFAULT_COORDINATOR_BASELINE = 160 << 20  # interpreter, numpy, ggml, zmq, graphs of the coordinator
PLAN_CONTEXT = 2048  # context tokens the coordinator's KV cache is sized for


@dataclass(frozen=True)
class WorkerSpec:
    """One worker board's memory (bytes)."""

    name: str
    budget: int
    baseline: int


@dataclass
class WorkerPlan:
    name: str
    budget: int
    baseline: int
    reserve: int
    jit_bytes: int  # room kept for streamed shards
    resident: int  # experts resident on it
    resident_bytes: int

    @property
    def used(self) -> int:
        return self.baseline + self.reserve + self.jit_bytes + self.resident_bytes


@dataclass
class MemoryPlan:
    residency: str
    workers: list[WorkerPlan]
    total_experts: int
    resident_experts: int
    resident_hit: float  # share of routed expert computations that find their expert resident
    streamed_experts: int
    coordinator_bytes: int  # trunk + KV cache + in-process shadow + baseline
    coordinator_budget: int | None
    boards_for_all_resident: int | None  # boards of the first worker's kind that hold every expert
    resident_layers: dict[int, int] = field(default_factory=dict)  # layer -> experts resident

    @property
    def coordinator_fits(self) -> bool:
        return self.coordinator_budget is None or self.coordinator_bytes <= self.coordinator_budget

    @property
    def streams(self) -> bool:
        return self.streamed_experts > 0


def shard_footprint(facts: ModelFacts) -> int:
    """Bytes one mapped shard takes (the largest, page-rounded)."""
    return page_round(max(facts.shard_bytes.values())) if facts.shard_bytes else 0


def worker_room(facts: ModelFacts, w: WorkerSpec) -> int:
    """Budget left for shards once the baseline and the reserve are paid."""
    return w.budget - w.baseline - default_reserve(facts.n_embd, facts.n_ff_exp)


def smallest_budget(facts: ModelFacts, baseline: int) -> int:
    """The smallest budget a worker can serve with: baseline + reserve + one shard."""
    return baseline + default_reserve(facts.n_embd, facts.n_ff_exp) + shard_footprint(facts)


def expert_usage(facts: ModelFacts, counts: dict[int, np.ndarray] | None) -> list[tuple[float, int, int]]:
    """(share of its layer's routings, layer, expert), most used first; equal shares without counts."""
    out = []
    for layer in facts.moe_layers:
        c = None if counts is None else counts.get(layer)
        if c is None or len(c) != facts.n_experts or float(np.sum(c)) <= 0:
            c = np.ones(facts.n_experts)
        share = np.asarray(c, dtype=np.float64) / float(np.sum(c))
        out += [(float(share[e]), layer, e) for e in range(facts.n_experts)]
    out.sort(key=lambda t: (-t[0], t[1], t[2]))  # stable: ties by (layer, expert)
    return out


def plan_memory(facts: ModelFacts, workers: list[WorkerSpec], *, residency: str = "auto",
                counts: dict[int, np.ndarray] | None = None, coordinator_budget: int | None = None,
                shadow_in_process: bool = True) -> MemoryPlan:
    """Place resident experts on workers within their budgets; raises UserError if a worker cannot
    hold even one expert (naming the smallest budget that works)."""
    if not facts.is_moe:
        raise UserError(f"{facts.path}: a dense model has no experts to place on workers (edgemoe run computes it alone)")
    if not workers:
        raise UserError("no worker boards: give at least one --board PROFILE[:COUNT]")
    if residency not in ("auto", "off"):
        raise UserError(f"--residency {residency!r}: choose auto or off")
    shard = shard_footprint(facts)
    total = len(facts.moe_layers) * facts.n_experts
    for w in workers:
        if worker_room(facts, w) < shard:
            need = smallest_budget(facts, w.baseline)
            raise UserError(f"board {w.name}: a budget of {w.budget / 2**20:.0f} MiB cannot hold one expert "
                            f"({shard / 2**20:.1f} MiB) besides the worker's baseline ({w.baseline / 2**20:.0f} MiB) and "
                            f"reserve; a worker needs at least {math.ceil(need / 2**20)} MiB (or a smaller expert type)")
    # capacity: what the worker's own admission leaves for residents (its just-in-time slots kept free)
    rooms = [worker_room(facts, w) for w in workers]
    jit = [jit_slot_count(facts.n_experts_used, room, shard) * shard for room in rooms]
    resident_room = [max(0, room - j) // shard for room, j in zip(rooms, jit)]
    caps = [0] * len(workers) if residency == "off" else resident_room
    usage = expert_usage(facts, counts)
    n_res = min(total, sum(caps))
    chosen = usage[:n_res]
    hit = sum(s for s, _, _ in chosen) / len(facts.moe_layers)
    per_layer: dict[int, int] = {}
    for _, layer, _ in chosen:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    # spread: fill workers in proportion to capacity (round robin over the ones with room)
    held = [0] * len(workers)
    left = n_res
    while left:
        for i in range(len(workers)):
            if left and held[i] < caps[i]:
                held[i] += 1
                left -= 1
    plans = [WorkerPlan(w.name, w.budget, w.baseline, default_reserve(facts.n_embd, facts.n_ff_exp),
                        jit[i] if n_res < total else 0, held[i], held[i] * shard) for i, w in enumerate(workers)]
    coord = DEFAULT_COORDINATOR_BASELINE + facts.trunk_bytes + PLAN_CONTEXT * facts.kv_bytes_per_token
    if shadow_in_process and facts.shadow:
        coord += facts.shadow["bytes"]
    per_board = resident_room[0]  # boards of the first kind
    all_boards = math.ceil(total / per_board) if per_board else None
    return MemoryPlan(residency, plans, total, n_res, hit, total - n_res, coord, coordinator_budget, all_boards,
                      per_layer)


__all__ = ["DEFAULT_WORKER_BASELINE", "MemoryPlan", "WorkerPlan", "WorkerSpec", "expert_usage",
           "plan_memory", "shard_footprint", "smallest_budget", "worker_room"]

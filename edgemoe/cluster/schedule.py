"""OD-MoE's scheduling decisions as pure functions: which worker computes which expert (no sockets, no state).

- The live workers, by id, form groups of top-k (`make_groups`; the last group takes any
  remainder); MoE layer number i (its index among the MoE layers) is served by group
  i mod n_groups (`group_of`), one expert per worker.
- Predicted experts of a coming layer are assigned to that layer's group, earlier assignments kept,
  new ones to the least loaded worker (`prefetch_layer`); the prediction runs n_groups - 1 layers
  ahead (`prefetch_depth`), so that a group loads while the others compute.
- A routed expert goes to the worker keeping it resident, else to the worker it was prefetched to,
  else (a miss) to the least busy worker of the group (`assign_routed`); one decode message per
  worker, split where it has more cold experts than just-in-time slots (`decode_batches`).
- A step of several sequences splits each expert's rows so that every sequence sees the kernel it
  sees alone (`batch_runs`) and packs them into one message per worker where they fit (`pack_batch`).
- Prefill spreads a layer's experts over all live workers by expert id (`assign_prefill`).
- A failed request's experts are re-assigned to live workers it has not failed on (`reassign`).

The coordinator (edgemoe.cluster.coordinator) holds the state (who is live, who holds what, what
was prefetched where) and calls these; a worker is anything with a `worker_id`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

import numpy as np


class HasWorkerId(Protocol):
    worker_id: int


W = TypeVar("W", bound=HasWorkerId)
Holder = Callable[[int], "W | None"]  # expert -> the live worker keeping it resident (one layer's)


def n_groups(n_workers: int, group_size: int) -> int:
    """Groups that n_workers form (groups of group_size, at least one)."""
    size = max(1, min(group_size, n_workers))
    return max(1, n_workers // size)


def prefetch_depth(n_workers: int, group_size: int) -> int:
    """MoE layers ahead a predictor should look: the other groups' layers (at least one)."""
    return max(1, n_groups(n_workers, group_size) - 1)


def make_groups(live: Sequence[W], group_size: int) -> list[list[W]]:
    """The live workers (in id order) in groups of group_size; the remainder goes round robin to the groups."""
    if not live:
        return []
    size = max(1, min(group_size, len(live)))
    count = n_groups(len(live), group_size)
    groups = [list(live[i * size:(i + 1) * size]) for i in range(count)]
    for i, w in enumerate(live[count * size:]):
        groups[i % count].append(w)
    return groups


def group_of(groups: Sequence[Sequence[W]], layer_index: int) -> Sequence[W]:
    """The group serving the MoE layer with this index (its position among the model's MoE layers)."""
    return groups[layer_index % len(groups)]


def least_busy(group: Sequence[W], taken: Sequence[W]) -> W:
    """The worker of the group given the fewest experts so far (lowest id on a tie)."""
    return min(group, key=lambda w: (taken.count(w), w.worker_id))


def prefetch_layer(experts: Sequence[int], group: Sequence[W], assigned: Mapping[int, W]) -> dict[int, W]:
    """expert -> worker for one coming layer's predicted (non-resident) experts: an expert already
    assigned (by an earlier prediction of this token) stays where it is loading; each new one goes to
    the least loaded worker of the group. Experts no longer predicted are left out."""
    out: dict[int, W] = {e: assigned[e] for e in experts if e in assigned}
    used = list(out.values())
    for e in experts:
        if e not in out:
            w = least_busy(group, used)
            used.append(w)
            out[e] = w
    return out


def assign_routed(experts: Sequence[int], group: Sequence[W], holder: Holder,
                  prefetched: Mapping[int, W]) -> list[tuple[int, W]]:
    """(expert, worker) for the distinct experts the router chose at one layer: each to its resident
    holder, else to the (live) worker it was prefetched to; then the misses, in order, to the least busy
    worker of the layer's group (it loads them on demand)."""
    chosen: list[tuple[int, W]] = []
    misses: list[int] = []
    for e in experts:
        w = holder(e)
        if w is None:
            w = prefetched.get(e)
        if w is None:
            misses.append(e)
        else:
            chosen.append((e, w))
    taken = [w for _, w in chosen]
    for e in misses:
        w = least_busy(group, taken)
        taken.append(w)
        chosen.append((e, w))
    return chosen


def decode_batches(chosen: Sequence[tuple[int, int, W]], holder: Holder,
                   jit_slots: Callable[[W], int]) -> list[tuple[W, list[tuple[int, int]]]]:
    """One decode message per worker, in order of first appearance, carrying its (slot, expert)s;
    split where it would hold more cold (not resident there) experts than the worker's jit_slots."""
    by_worker: dict[int, tuple[W, list[tuple[int, int]]]] = {}
    for slot, e, w in chosen:
        by_worker.setdefault(w.worker_id, (w, []))[1].append((slot, e))
    out: list[tuple[W, list[tuple[int, int]]]] = []
    for w, items in by_worker.values():
        batch: list[tuple[int, int]] = []
        cold = 0
        for slot, e in items:
            is_cold = holder(e) is not w
            if batch and is_cold and cold + 1 > jit_slots(w):
                out.append((w, batch))
                batch, cold = [], 0
            batch.append((slot, e))
            cold += int(is_cold)
        out.append((w, batch))
    return out


def batch_runs(seqs: np.ndarray, n_seq: int, limit: int, prefill_batch: int) -> list[np.ndarray]:
    """How one expert's rows in a step of several sequences are split (seqs: the sequence of each of its
    rows; result: runs of indices into them). Where ggml's kernel depends on how many rows an expert
    has (edgemoe.ggml.columns: `limit` rows at most on the one-row kernel), each sequence's rows must
    see the kernel they see alone: a sequence with more than `limit` rows of this expert gets its own
    runs of prefill_batch (as its prefill alone would); the other rows are shared, in runs of `limit`."""
    counts = np.bincount(seqs, minlength=n_seq)
    own = counts[seqs] > limit
    runs = []
    for s in np.unique(seqs[own]):
        mine = np.nonzero(own & (seqs == s))[0]
        runs += [mine[i:i + prefill_batch] for i in range(0, len(mine), prefill_batch)]
    shared = np.nonzero(~own)[0]
    runs += [shared[i:i + limit] for i in range(0, len(shared), limit)]
    return runs


def pack_batch(runs: Sequence[tuple[int, W, bool, list[np.ndarray]]], max_rows: int,
               jit_slots: Callable[[W], int]) -> list[tuple[W, list[tuple[int, np.ndarray]]]]:
    """The messages of a step of several sequences, from (expert, worker, cold, its runs) in order: each
    run joins the worker's first message that has no run of that expert yet, room for its rows
    (max_rows) and, for a cold expert, a just-in-time slot left; else it starts a new message.
    Returns (worker, [(expert, run)]) per message, by worker in order of first appearance."""
    boxes: dict[int, list[dict]] = {}  # worker id -> its messages
    for e, w, cold, expert_runs in runs:
        box = boxes.setdefault(w.worker_id, [])
        for run in expert_runs:
            m = next((m for m in box if all(x != e for x, _ in m["parts"]) and m["rows"] + len(run) <= max_rows
                      and (not cold or m["cold"] < jit_slots(w))), None)
            if m is None:
                m = {"worker": w, "parts": [], "rows": 0, "cold": 0}
                box.append(m)
            m["parts"].append((e, run))
            m["rows"] += len(run)
            m["cold"] += int(cold)
    return [(m["worker"], m["parts"]) for box in boxes.values() for m in box]


def assign_prefill(experts: Sequence[int], live: Sequence[W], holder: Holder) -> dict[int, W]:
    """expert -> worker for a prefill layer: its resident holder, else spread over all live workers by id."""
    return {e: holder(e) or live[e % len(live)] for e in experts}


def reassign(experts: Sequence[int], live: Sequence[W], tried: set[int], holder: Holder) -> list[W] | None:
    """The worker for each expert of a failed request: its holder if that one has not failed it, else
    one of the live workers it has not failed on, spread by expert id. None: every live worker failed it."""
    fresh = [w for w in live if w.worker_id not in tried]
    if not fresh:
        return None
    out = []
    for e in experts:
        h = holder(e)
        out.append(h if h is not None and h.worker_id not in tried else fresh[e % len(fresh)])
    return out


__all__ = ["assign_prefill", "assign_routed", "batch_runs", "decode_batches", "pack_batch", "group_of", "least_busy", "make_groups",
           "n_groups", "prefetch_depth", "prefetch_layer", "reassign"]

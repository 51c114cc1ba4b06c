"""Which worker keeps which experts resident: one placement for the whole cluster (pure functions).

A worker's budget holds its baseline, a reserve for activations, a few just-in-time slots for the
experts it loads on the predictor's word (OD-MoE), and whatever is left: its *resident room*. The
coordinator fills the resident rooms of all live workers with one plan:

- every expert is resident on at most one worker;
- no worker is given more bytes than its room;
- the most used experts go first (routing counts: an importance matrix's per-expert counts, a
  calibration pass, or what the coordinator has seen routed so far);
- each layer's residents are spread over the workers, so that a token's top-k of one layer rarely
  queue on one board: an expert goes to the worker holding the fewest residents of its layer,
  then the one with the most room left.

No sockets, no I/O: the coordinator feeds in rooms, sizes and counts and sends out the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgemoe.format.schema import expert_tensor_name
from edgemoe.format.shard import ExpertId


@dataclass(frozen=True)
class Room:
    """A live worker and the bytes it can keep resident."""

    worker_id: int
    bytes: int


def plan_placement(rooms: Iterable[Room], sizes: Mapping[ExpertId, int],
                   counts: Mapping[ExpertId, float] | None = None) -> dict[ExpertId, int]:
    """(layer, expert) -> worker_id of the experts to keep resident; experts left out are loaded
    just in time. Deterministic: equal counts are broken by spreading expert ids over layers
    (expert (l, e) ranks before (l, e+1) and the order rotates per layer), so that with no counts
    at all every layer still gets its share of residents."""
    rooms = [r for r in rooms if r.bytes > 0]
    if not rooms or not sizes:
        return {}
    counts = counts or {}
    layers = sorted({layer for layer, _ in sizes})
    n_layers = len(layers)
    layer_index = {l: i for i, l in enumerate(layers)}
    n_expert = max(expert for _, expert in sizes) + 1

    def rank(key: ExpertId) -> tuple:
        layer, expert = key.layer, key.expert
        # without counts: round robin over layers (each layer's j-th expert before anyone's (j+1)-th),
        # the expert ids rotated per layer so no id is favoured everywhere
        j = (expert - layer_index[layer]) % n_expert
        return (-float(counts.get(key, 0.0)), j, layer_index[layer] if n_layers else 0, expert)

    free = {r.worker_id: r.bytes for r in rooms}
    per_layer: dict[tuple[int, int], int] = {}  # (worker_id, layer) -> residents so far
    plan: dict[ExpertId, int] = {}
    for key in sorted(map(ExpertId._make, sizes), key=rank):  # (plain (layer, expert) pairs are taken too)
        size = sizes[key]
        fits = [w for w, left in free.items() if left >= size]
        if not fits:
            continue  # a smaller expert further down may still fit somewhere
        layer = key.layer
        w = min(fits, key=lambda w: (per_layer.get((w, layer), 0), -free[w], w))
        plan[key] = w
        free[w] -= size
        per_layer[(w, layer)] = per_layer.get((w, layer), 0) + 1
    return plan


def worker_sets(plan: Mapping[ExpertId, int]) -> dict[int, list[ExpertId]]:
    """worker_id -> its resident experts (sorted), from a plan."""
    out: dict[int, list[ExpertId]] = {}
    for key, w in sorted(plan.items()):
        out.setdefault(w, []).append(key)
    return out


def counts_from_imatrix(counts: Mapping[str, "Iterable[float]"], moe_layers: Iterable[int]) -> dict[ExpertId, float]:
    """Per-expert routing counts from an importance matrix's `blk.N.ffn_down_exps.weight` counts
    (the rows each expert's down projection saw: how often the router picked it)."""
    out: dict[ExpertId, float] = {}
    for layer in moe_layers:
        c = counts.get(expert_tensor_name(layer, "down"))
        if c is None:
            continue
        for e, n in enumerate(c):
            out[ExpertId(layer, e)] = float(n)
    return out


__all__ = ["Room", "counts_from_imatrix", "plan_placement", "worker_sets"]

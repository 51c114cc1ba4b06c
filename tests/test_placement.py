"""The cluster's resident placement: pure functions, no sockets."""

from __future__ import annotations

import random

from edgemoe.cluster.placement import Room, counts_from_imatrix, plan_placement, worker_sets


def _sizes(n_layers: int, n_expert: int, size: int = 10) -> dict[tuple[int, int], int]:
    return {(l, e): size for l in range(n_layers) for e in range(n_expert)}


def test_budgets_respected_each_expert_once_random() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n_layers, n_expert = rng.randint(1, 6), rng.randint(1, 16)
        sizes = {(l, e): rng.randint(1, 50) for l in range(n_layers) for e in range(n_expert)}
        counts = {key: rng.random() for key in sizes if rng.random() < 0.7}
        rooms = [Room(i, rng.randint(0, 400)) for i in range(rng.randint(1, 6))]
        plan = plan_placement(rooms, sizes, counts)
        assert set(plan) <= set(sizes)  # a dict: each expert at most once
        for r in rooms:
            assert sum(sizes[key] for key, w in plan.items() if w == r.worker_id) <= r.bytes
        # nothing left out that would still have fitted somewhere
        free = {r.worker_id: r.bytes - sum(sizes[key] for key, w in plan.items() if w == r.worker_id) for r in rooms}
        assert all(sizes[key] > max(free.values()) for key in sizes if key not in plan)


def test_most_used_first() -> None:
    sizes = _sizes(2, 8)
    counts = {(1, 5): 100.0, (0, 2): 50.0, (0, 7): 20.0}
    plan = plan_placement([Room(0, 20), Room(1, 10)], sizes, counts)
    assert set(plan) == {(1, 5), (0, 2), (0, 7)}


def test_layers_spread_over_workers() -> None:
    """Room for half the experts: every layer gets four residents, one on each board."""
    sizes = _sizes(6, 8)
    plan = plan_placement([Room(i, 60) for i in range(4)], sizes)  # room for half of the 48 experts
    assert len(plan) == 24
    for layer in range(6):
        held = [w for (l, _), w in plan.items() if l == layer]
        assert len(held) == 4 and sorted(held) == [0, 1, 2, 3]  # a layer's residents on four boards
    # and without counts every layer gets its share, with varied expert ids
    assert len({e for (_, e) in plan}) == 8


def test_everything_fits_and_nothing_without_room() -> None:
    sizes = _sizes(3, 4)
    plan = plan_placement([Room(0, 1000), Room(1, 1000)], sizes)
    assert set(plan) == set(sizes)
    sets = worker_sets(plan)
    assert abs(len(sets[0]) - len(sets[1])) <= 1
    assert plan_placement([Room(0, 0)], sizes) == {} and plan_placement([], sizes) == {}


def test_counts_from_imatrix() -> None:
    counts = {"blk.1.ffn_down_exps.weight": [3.0, 0.0, 9.0], "blk.1.ffn_up_exps.weight": [1.0, 1.0, 1.0]}
    assert counts_from_imatrix(counts, [0, 1]) == {(1, 0): 3.0, (1, 1): 0.0, (1, 2): 9.0}

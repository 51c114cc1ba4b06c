"""OD-MoE's scheduling decisions (edgemoe.cluster.schedule) on exact expected assignments."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.cluster import schedule as S


@dataclass(frozen=True)
class W:
    worker_id: int


def workers(*ids: int) -> list[W]:
    return [W(i) for i in ids]


def ids(ws) -> list[int]:
    return [w.worker_id for w in ws]


def no_holder(e: int) -> None:
    return None


def test_groups_of_top_k_and_the_remainder_round_robin() -> None:
    assert [ids(g) for g in S.make_groups(workers(0, 1, 2, 3), 2)] == [[0, 1], [2, 3]]
    assert [ids(g) for g in S.make_groups(workers(0, 1, 2, 3, 4, 5, 6), 2)] == [[0, 1, 6], [2, 3], [4, 5]]
    assert [ids(g) for g in S.make_groups(workers(0, 1, 2, 3, 4), 4)] == [[0, 1, 2, 3, 4]]
    assert [ids(g) for g in S.make_groups(workers(3), 2)] == [[3]]  # fewer workers than top-k: one group
    assert S.make_groups([], 2) == []
    assert [S.n_groups(n, 2) for n in (1, 2, 3, 4, 5, 8)] == [1, 1, 1, 2, 2, 4]
    assert [S.prefetch_depth(n, 2) for n in (1, 2, 4, 6, 8)] == [1, 1, 1, 2, 3]


def test_layer_l_is_served_by_group_l_mod_n_groups() -> None:
    groups = S.make_groups(workers(0, 1, 2, 3, 4, 5), 2)
    assert [ids(S.group_of(groups, i)) for i in range(7)] == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5], [0, 1]]


def test_a_lost_worker_is_regrouped() -> None:
    live = workers(0, 1, 2, 3)
    assert [ids(g) for g in S.make_groups(live, 2)] == [[0, 1], [2, 3]]
    after = [w for w in live if w.worker_id != 2]
    groups = S.make_groups(after, 2)
    assert [ids(g) for g in groups] == [[0, 1, 3]]  # three workers form one group of two plus the remainder
    assert ids(S.group_of(groups, 1)) == [0, 1, 3]  # layer 1 is now the first group's
    assert S.prefetch_depth(len(after), 2) == 1


def test_prefetch_gives_one_expert_per_worker_and_keeps_earlier_assignments() -> None:
    g = workers(4, 5)
    plan = S.prefetch_layer([7, 2], g, {})
    assert {e: w.worker_id for e, w in plan.items()} == {7: 4, 2: 5}
    # a later prediction of the same layer keeps 2 where it loads, drops 7, gives 3 to the free worker
    plan = S.prefetch_layer([2, 3], g, plan)
    assert {e: w.worker_id for e, w in plan.items()} == {2: 5, 3: 4}
    # more experts than workers: spread evenly, lowest id first
    plan = S.prefetch_layer([0, 1, 2, 3], g, {})
    assert [plan[e].worker_id for e in (0, 1, 2, 3)] == [4, 5, 4, 5]


def test_routed_experts_go_to_holder_then_prefetched_worker_then_least_busy() -> None:
    a, b, c = workers(0, 1, 2)
    group = [a, b]
    holder = {9: c}.get  # expert 9 is resident on worker 2 (outside this layer's group)
    got = S.assign_routed([3, 9, 5], group, holder, {5: b})
    assert [(e, w.worker_id) for e, w in got] == [(9, 2), (5, 1), (3, 0)]
    # two misses: one per worker of the group
    got = S.assign_routed([6, 7], group, no_holder, {})
    assert [(e, w.worker_id) for e, w in got] == [(6, 0), (7, 1)]
    # a miss goes to the worker the prefetched experts left free
    got = S.assign_routed([6, 7], group, no_holder, {7: a})
    assert [(e, w.worker_id) for e, w in got] == [(7, 0), (6, 1)]


def test_decode_batches_split_at_the_just_in_time_slots() -> None:
    a, b = workers(0, 1)
    holder = {4: a}.get
    chosen = [(0, 1, a), (1, 2, a), (2, 4, a), (3, 3, a), (4, 5, b)]
    got = S.decode_batches(chosen, holder, lambda w: 2)
    # worker 0: experts 1 and 2 cold (2 slots), resident 4 rides along, cold 3 starts a second message
    assert [(w.worker_id, items) for w, items in got] == [(0, [(0, 1), (1, 2), (2, 4)]), (0, [(3, 3)]), (1, [(4, 5)])]
    got = S.decode_batches(chosen, holder, lambda w: 4)
    assert [(w.worker_id, items) for w, items in got] == [(0, [(0, 1), (1, 2), (2, 4), (3, 3)]), (1, [(4, 5)])]


def test_prefill_spreads_experts_by_id_and_residents_to_their_holder() -> None:
    live = workers(0, 1, 2)
    holder = {4: live[0]}.get
    got = S.assign_prefill([0, 1, 2, 3, 4, 5], live, holder)
    assert {e: w.worker_id for e, w in got.items()} == {0: 0, 1: 1, 2: 2, 3: 0, 4: 0, 5: 2}


def test_retry_reassigns_to_workers_not_tried() -> None:
    live = workers(0, 1, 2, 3)
    holder = {5: live[3], 6: live[1]}.get
    got = S.reassign([4, 5, 6, 7], live, {1}, holder)
    # 5 to its holder; 6's holder failed it: spread over the fresh workers [0, 2, 3] by expert id
    assert ids(got) == [2, 3, 0, 2]
    assert S.reassign([4], live, {0, 1, 2, 3}, holder) is None


def test_batch_runs_keep_each_sequence_on_its_own_kernel() -> None:
    # rows of one expert from 3 sequences: seq 0 has 5 rows (over the limit of 3), seqs 1 and 2 one each
    seqs = np.array([0, 0, 1, 0, 0, 2, 0])
    runs = S.batch_runs(seqs, 3, limit=3, prefill_batch=2)
    # seq 0's rows alone in runs of prefill_batch, as its prefill alone; the others shared within the limit
    assert [r.tolist() for r in runs] == [[0, 1], [3, 4], [6], [2, 5]]
    runs = S.batch_runs(np.array([0, 1, 2, 1]), 3, limit=3, prefill_batch=2)
    assert [r.tolist() for r in runs] == [[0, 1, 2], [3]]


def test_pack_batch_one_message_per_worker_where_rows_and_slots_allow() -> None:
    a, b = workers(0, 1)
    r = np.arange
    runs = [(1, a, True, [r(3)]), (2, a, True, [r(2), r(2)]), (3, a, False, [r(1)]), (4, b, True, [r(4)])]
    got = S.pack_batch(runs, max_rows=6, jit_slots=lambda w: 2)
    assert [(w.worker_id, [(e, len(run)) for e, run in parts]) for w, parts in got] == [
        (0, [(1, 3), (2, 2), (3, 1)]),  # two cold experts fill the 2 slots; the resident 3 rides along
        (0, [(2, 2)]),  # expert 2's second run: never twice in one message
        (1, [(4, 4)]),
    ]
    got = S.pack_batch([(1, a, False, [r(4)]), (2, a, False, [r(4)])], max_rows=6, jit_slots=lambda w: 2)
    assert [[e for e, _ in parts] for _, parts in got] == [[1], [2]]  # rows over max_rows: a new message

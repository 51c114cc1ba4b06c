"""The worker's memory budget: size parsing and the admission state machine (no sockets, no I/O)."""

from __future__ import annotations

import random

import pytest

from edgemoe.cluster.budget import (
    Admission,
    Load,
    Skip,
    Wait,
    activation_bytes,
    default_reserve,
    format_size,
    page_round,
    parse_size,
)
from edgemoe.errors import UserError

MiB = 1 << 20


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, n",
    [
        ("512MiB", 512 * MiB), ("1GiB", 1 << 30), ("800M", 800 * MiB), ("800MB", 800_000_000),
        ("123456", 123456), (" 2 KiB ", 2048), ("512mib", 512 * MiB), ("1.5G", 3 << 29), ("1.5GiB", 3 << 29),
        ("64k", 64 << 10), ("10kb", 10_000), ("1T", 1 << 40), ("7B", 7), (4096, 4096),
    ],
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "abc", "12XB", "-5M", "0", "0MiB", "1.5", "1e9", "MiB", "5 M iB", "1,5G", True, None, 3.5, -1])
def test_parse_size_rejects_garbage(bad: object) -> None:
    with pytest.raises(UserError, match="--memory-budget"):
        parse_size(bad, "--memory-budget")  # type: ignore[arg-type]


def test_format_and_round() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(512 * MiB) == "512.0 MiB"
    assert format_size(3 << 30) == "3.0 GiB"
    assert format_size(-2048) == "-2.0 KiB"
    assert page_round(1) == 4096 and page_round(4096) == 4096 and page_round(4097) == 8192
    assert activation_bytes(2, 256, 512) > activation_bytes(1, 256, 512) > 0
    assert default_reserve(4096, 14336) > activation_bytes(64, 4096, 14336)


# -- admission -----------------------------------------------------------------------------------

S = 10 * MiB  # one shard


def adm(n_shards: float = 2, **kw: int) -> Admission:
    """Room for n_shards shards: budget 100 MiB + room, baseline 90 MiB, reserve 10 MiB."""
    return Admission(int(100 * MiB + n_shards * S), 90 * MiB, 10 * MiB, **kw)


def k(e: int, layer: int = 0) -> tuple[int, int]:
    return (layer, e)


def load_next(a: Admission) -> Load:
    d = a.next_load()
    assert isinstance(d, Load), d
    assert a.loaded(d.key)
    return d


def test_capacity_and_never_fits() -> None:
    a = adm(2)
    assert a.capacity == 2 * S and a.used == 0 and a.free == 2 * S
    assert a.never_fits(2 * S) is None
    why = a.never_fits(2 * S + 1)
    assert why is not None and why.startswith("expert needs 20.0 MiB, budget leaves 20.0 MiB")
    assert "baseline 90.0 MiB" in why and "reserve 10.0 MiB" in why
    r = a.request(k(0), 3 * S)
    assert r.refused and "expert needs 30.0 MiB" in r.refused and not a.entries  # nothing recorded
    tiny = Admission(50 * MiB, 60 * MiB, 0)
    assert tiny.capacity < 0 and "budget leaves 0 B" in tiny.never_fits(1)


def test_prefetches_load_in_order_and_wait_for_room() -> None:
    a = adm(2)
    assert a.next_load() is None
    assert a.prefetch(1, [(k(e), S) for e in range(4)]) == []
    assert [load_next(a).key for _ in range(2)] == [k(0), k(1)]
    d = a.next_load()
    assert isinstance(d, Wait) and d.key == k(2) and d.free == 0  # prefetches never evict
    assert a.used == 2 * S
    # computes of loaded shards: hits, dropped after use (nothing schedules them again)
    r = a.request(k(0), S)
    assert r.hit and r.ready
    assert a.computed(k(0)) is True
    assert load_next(a).key == k(2)
    assert a.state(k(0)) is None and a.used == 2 * S


def test_request_while_loading_is_a_hit_not_ready() -> None:
    a = adm(2)
    a.prefetch(1, [(k(0), S)])
    d = a.next_load()
    assert isinstance(d, Load) and a.state(k(0)) == "loading"
    r = a.request(k(0), S)
    assert r.hit and not r.ready
    assert a.loaded(k(0))
    assert a.computed(k(0)) is True


def test_demand_jumps_the_queue_fifo_among_demands() -> None:
    a = adm(1)
    a.prefetch(1, [(k(e), S) for e in range(3)])
    r = a.request(k(9), S)  # unknown: a demand
    assert not r.hit and not r.ready and not r.refused
    r = a.request(k(2), S)  # queued prefetch: still a miss, promoted behind the first demand
    assert not r.hit
    assert list(a.queue) == [k(9), k(2), k(0), k(1)]
    a.request(k(9), S)  # a second request for a queued demand keeps its place
    assert list(a.queue) == [k(9), k(2), k(0), k(1)] and a.entries[k(9)].pins == 2
    assert load_next(a).key == k(9)
    assert a.computed(k(9)) is False
    assert a.computed(k(9)) is True
    assert load_next(a).key == k(2)
    assert a.computed(k(2)) is True  # consumed its prefetch: dropped
    assert load_next(a).key == k(0)


def test_kept_while_scheduled_again_or_requested_again() -> None:
    a = adm(2)
    a.prefetch(5, [(k(0), S)])
    a.prefetch(6, [(k(0), S)])  # predicted again for the next step: one load, two uses
    load_next(a)
    assert a.next_load() is None
    a.request(k(0), S)
    assert a.computed(k(0)) is False
    assert a.entries[k(0)].steps == [6]
    a.request(k(0), S)
    assert a.computed(k(0)) is True
    # two requests pending for the same shard: kept until both are served
    a.request(k(1), S)
    load_next(a)
    assert a.request(k(1), S).ready
    assert a.computed(k(1)) is False
    assert a.computed(k(1)) is True


def test_duplicates_in_one_prefetch_count_once() -> None:
    a = adm(2)
    a.prefetch(1, [(k(0), S), (k(0), S), (k(1), S)])
    assert list(a.queue) == [k(0), k(1)] and a.entries[k(0)].steps == [1]


def test_demand_evicts_idle_prefetched_shards() -> None:
    a = adm(2)
    a.prefetch(3, [(k(0), S), (k(1), S), (k(2), S)])
    load_next(a), load_next(a)
    assert isinstance(a.next_load(), Wait)
    a.request(k(7), S)  # not predicted, nowhere to put it
    d = a.next_load()
    assert isinstance(d, Load) and d.key == k(7) and d.evict == [k(1)]  # prefetched last: needed last
    assert list(a.queue) == [k(1), k(2)]  # still scheduled for the newest step: back in the queue
    assert a.loaded(k(7))
    assert a.used == 2 * S
    assert a.computed(k(7)) is True
    assert load_next(a).key == k(1)


def test_demand_evicts_stale_steps_first_and_forgets_them() -> None:
    a = adm(2, horizon=3)
    a.prefetch(1, [(k(0), S)])
    a.prefetch(2, [(k(1), S)])
    load_next(a), load_next(a)
    a.request(k(5), S)
    d = a.next_load()
    assert isinstance(d, Load) and d.evict == [k(0)]  # step 1 is older than step 2
    assert a.state(k(0)) is None and k(0) not in a.queue  # an older step is not queued again


def test_demand_cannot_evict_pinned_or_loading_shards() -> None:
    a = adm(2)
    a.prefetch(1, [(k(0), S), (k(1), S)])
    load_next(a)
    d = a.next_load()
    assert isinstance(d, Load) and d.key == k(1)  # loading
    a.request(k(0), S)  # pinned: a compute is about to run on it
    a.request(k(2), S)
    w = a.next_load()
    assert isinstance(w, Wait) and w.key == k(2)
    assert a.loaded(k(1))  # now idle: evictable
    d = a.next_load()
    assert isinstance(d, Load) and d.key == k(2) and d.evict == [k(1)]


def test_prefetch_that_can_never_fit_is_skipped() -> None:
    a = adm(1)
    a.prefetch(1, [(k(0), 2 * S), (k(1), S)])
    d = a.next_load()
    assert isinstance(d, Skip) and d.key == k(0) and d.pins == 0 and "expert needs 20.0 MiB" in d.reason
    assert load_next(a).key == k(1)


def test_mispredictions_expire_after_horizon_steps() -> None:
    a = adm(3, horizon=2)
    a.prefetch(10, [(k(0), S), (k(1), S)])
    load_next(a)
    d = a.next_load()
    assert isinstance(d, Load) and d.key == k(1)  # still loading when it expires
    assert a.prefetch(11, [(k(2), S)]) == []  # step 10 is still within the horizon
    a.prefetch(11, [(k(3), S)])
    assert a.prefetch(12, [(k(4), S)]) == [k(0)]  # loaded, idle, expired: drop now
    assert a.entries[k(1)].cancelled
    assert a.loaded(k(1)) is False  # dropped as soon as its load finishes
    assert list(a.queue) == [k(2), k(3), k(4)]
    a.prefetch(14, [(k(5), S)])
    assert list(a.queue) == [k(5)]  # queued ones of step 11 and 12 expired unloaded
    # a pinned shard does not expire; a late prefetch of an old step expires at once
    a.request(k(5), S)
    a.prefetch(30, [])
    assert a.state(k(5)) == "queued"
    assert a.prefetch(2, [(k(6), S)]) == [] and a.state(k(6)) is None


def test_expired_prediction_revived_while_loading() -> None:
    a = adm(2, horizon=1)
    a.prefetch(1, [(k(0), S)])
    a.next_load()
    a.prefetch(2, [])
    assert a.entries[k(0)].cancelled
    assert a.request(k(0), S).hit  # requested after all: no longer cancelled
    assert a.loaded(k(0)) is True


def test_reset_forgets_schedules_but_not_pending_requests() -> None:
    a = adm(3)
    a.prefetch(1, [(k(0), S), (k(1), S), (k(2), S)])
    load_next(a), load_next(a)
    a.request(k(1), S)
    assert a.reset() == [k(0)]
    assert a.state(k(1)) == "loaded" and not a.queue
    assert a.computed(k(1)) is True
    assert not a.entries


def test_load_failure_reports_waiting_requests() -> None:
    a = adm(2)
    a.request(k(0), S)
    a.request(k(0), S)
    d = a.next_load()
    assert isinstance(d, Load)
    assert a.load_failed(k(0)) == 2
    assert not a.entries and a.used == 0


def test_activation_reserve() -> None:
    a = adm(2)
    assert a.check_activations(10 * MiB, 64) is None
    why = a.check_activations(10 * MiB + 1, 65)
    assert why and "65 tokens" in why and "send fewer tokens" in why


def test_observe_rss_moves_the_baseline() -> None:
    a = Admission(200 * MiB, 90 * MiB, 10 * MiB, slack=4 * MiB)
    a.prefetch(1, [(k(0), S)])
    load_next(a)
    assert a.observe_rss(90 * MiB + S + 3 * MiB) and a.baseline == 90 * MiB  # within the slack
    assert a.observe_rss(90 * MiB + S + 9 * MiB) and a.baseline == 95 * MiB  # 5 MiB beyond it
    assert a.capacity == 95 * MiB
    assert a.observe_rss(80 * MiB) and a.baseline == 90 * MiB  # never below the start-up value
    a.prefetch(1, [(k(1), S)])
    a.next_load()
    assert not a.observe_rss(500 * MiB)  # a load in progress: not exact, ignored
    assert a.baseline == 90 * MiB


def test_queued_shard_skipped_when_the_baseline_grew() -> None:
    a = Admission(100 * MiB + S, 90 * MiB, 10 * MiB)
    a.request(k(0), S)
    a.observe_rss(91 * MiB)
    d = a.next_load()
    assert isinstance(d, Skip) and d.pins == 1


def test_random_schedules_stay_within_budget_and_serve_everything() -> None:
    """A simulated worker: random prefetches (some wrong), computes in random orders, loads that
    finish at random times. The budget is never exceeded and every request is served."""
    rng = random.Random(1234)
    for trial in range(60):
        room = rng.choice([1, 1.5, 2, 3, 5])
        a = adm(room, horizon=rng.choice([1, 2, 3]))
        sizes = {k(e, layer): rng.choice([S // 2, S, S]) for layer in range(4) for e in range(8)}
        loading: list[tuple[int, int]] = []
        pending: list[tuple[int, int]] = []
        served = refused = 0
        step = 0

        def pump() -> None:
            while True:
                d = a.next_load()
                if isinstance(d, Load):
                    loading.append(d.key)
                    assert a.used <= a.capacity, (trial, a.used, a.capacity)
                elif isinstance(d, Skip):
                    for _ in range(d.pins):
                        pending.remove(d.key)
                else:
                    return

        for _ in range(200):
            ev = rng.random()
            if ev < 0.2:
                step += rng.choice([0, 1, 1, 2])
                keys = rng.sample(sorted(sizes), rng.randint(0, 4))
                for key in a.prefetch(step, [(x, sizes[x]) for x in keys]):
                    pass  # dropped (unmapped) now
            elif ev < 0.5:
                key = rng.choice(sorted(sizes))
                r = a.request(key, sizes[key])
                if r.refused:
                    refused += 1
                else:
                    pending.append(key)
            elif ev < 0.8 and loading:
                key = loading.pop(rng.randrange(len(loading)))
                a.loaded(key)
            elif pending:
                ready = [x for x in pending if a.state(x) == "loaded"]
                if ready:
                    key = rng.choice(ready)
                    pending.remove(key)
                    a.computed(key)
                    served += 1
            pump()
            assert a.used <= a.capacity
        # drain: every pending request gets its shard
        for _ in range(1000):
            if not pending:
                break
            pump()
            if loading:
                a.loaded(loading.pop(0))
            ready = [x for x in pending if a.state(x) == "loaded"]
            for key in ready[:1]:
                pending.remove(key)
                a.computed(key)
                served += 1
            assert a.used <= a.capacity
        assert not pending, (trial, pending, a.entries, list(a.queue))
        assert served > 0
        assert refused == 0 or room < 1


# -- residents -----------------------------------------------------------------------------------


def test_residents_stay_after_compute_and_within_their_room() -> None:
    a = adm(5, jit_room=2 * S)
    assert a.resident_room == 3 * S
    drops, refused = a.set_resident([(k(0), S), (k(1), S), (k(2), S), (k(3), S)])
    assert drops == [] and refused == [k(3)]  # three fit the resident room, the fourth loads just in time
    assert sorted(a.resident_keys()) == [k(0), k(1), k(2)]
    for _ in range(3):
        load_next(a)
    assert a.next_load() is None
    for _ in range(3):  # computed again and again: hits, never dropped
        r = a.request(k(1), S)
        assert r.hit and r.ready
        assert a.computed(k(1)) is False
    # predictions expire, residents do not
    a.prefetch(1, [(k(0), S)])
    a.prefetch(9, [])
    assert a.state(k(0)) == "loaded"
    # the just-in-time room still serves others: a demand loads into it, and is dropped after use
    r = a.request(k(5), S)
    assert not r.hit and load_next(a).key == k(5)
    assert a.computed(k(5)) is True and a.state(k(5)) is None


def test_a_new_resident_set_drops_the_old_ones_not_in_it() -> None:
    a = adm(5, jit_room=2 * S)
    a.set_resident([(k(0), S), (k(1), S)])
    load_next(a)
    load_next(a)
    a.request(k(0), S)  # pinned by a request in flight: stays until computed
    drops, _ = a.set_resident([(k(2), S)])
    assert drops == [k(1)]
    assert a.state(k(0)) == "loaded" and not a.entries[k(0)].resident
    assert a.computed(k(0)) is True  # no longer resident: dropped after its compute
    assert load_next(a).key == k(2)
    assert a.set_resident([])[0] == [k(2)] and not a.entries


def test_demands_evict_others_before_residents() -> None:
    a = adm(3, jit_room=S)
    a.set_resident([(k(0), S), (k(1), S)])
    load_next(a)
    load_next(a)
    a.prefetch(1, [(k(2), S)])
    load_next(a)
    assert a.free == 0
    a.request(k(3), S)  # a demand: evicts the idle prefetched shard, not a resident
    d = a.next_load()
    assert isinstance(d, Load) and d.key == k(3) and d.evict == [k(2)]
    # when the baseline grew and only residents are idle, a demand evicts one (it stops being resident)
    a.loaded(k(3))
    a.computed(k(3))
    a.baseline += S
    a.request(k(4), S)
    d = a.next_load()
    assert isinstance(d, Load) and len(d.evict) == 1 and d.evict[0] in (k(0), k(1))
    assert d.evict[0] not in a.resident_keys()


def test_reset_forgets_residents() -> None:
    a = adm(3, jit_room=S)
    a.set_resident([(k(0), S)])
    load_next(a)
    assert a.reset() == [k(0)] and not a.entries

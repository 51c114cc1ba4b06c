"""A worker's memory budget: size parsing, and its admission decisions as a pure state machine.

No sockets, no threads, no I/O here: the worker feeds events in (prefetch, request, loaded,
computed, ...) and carries out the decisions that come back (load this, drop that, wait, fail).

Accounting. The budget bounds the worker process's whole resident memory:

    budget >= baseline + reserve + sum(size of every shard mapped or being mapped)

- baseline: the process's own resident memory with no shard mapped (interpreter, numpy, ggml,
  thread pool, sockets). Measured at start-up (VmHWM) and re-observed while serving: growth
  beyond the slack raises it; it never goes below the start-up value.
- reserve: room kept free for one request's activations (input frame, ggml arena and work
  buffer, output; see `activation_bytes`) plus RUNTIME_SLACK for the baseline's growth.
- shard sizes are rounded up to whole pages: a mapped, populated shard is resident page by page.

Policy.
- Prefetches are loaded one at a time, in the order they arrived; when the next one does not fit
  the loader waits (prefetches never evict anything).
- A compute request for a shard that is neither loaded nor loading is a *demand*: it jumps ahead
  of queued prefetches, and when it does not fit it evicts idle shards (loaded, no request
  pending) — stalest prefetch step first, then the one prefetched last (needed last). An evicted
  shard that is still scheduled for the newest step goes back into the queue.
- After a compute the shard is dropped unless the same (layer, expert) is scheduled again (a
  later prefetch not yet consumed) or another request for it is pending.
- `step` in PREFETCH is the decode step (token index). A prefetch that no compute consumed
  expires once a prefetch `horizon` steps newer arrives: a mispredicted shard does not stay
  resident, and a queued one is not loaded any more.
- Residents: the coordinator names the experts this worker keeps (`set_resident`, the whole set
  each time). They are loaded after demands and prefetches already queued, stay mapped after a
  compute, never expire and are not evicted for other loads while any other shard could make
  room (only a demand that cannot fit otherwise evicts an idle resident, which then stops being
  one). They are held within `resident_room`: the capacity minus `jit_room`, the room kept for
  just-in-time loads.
- A shard (plus nothing else) that can never fit — size > budget - baseline - reserve — is
  refused at once with "expert needs X, budget leaves Y"; so is a request whose activations
  exceed the reserve.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Union

from edgemoe.errors import UserError
from edgemoe.format.shard import ExpertId


PAGE_SIZE = 4096
RUNTIME_SLACK = 2 << 20  # Python/zmq/logging allocations while serving, beyond the start-up baseline
DEFAULT_MAX_TOKENS = 64  # rows of one COMPUTE the default reserve is sized for
DEFAULT_BUDGET = "512MiB"  # a worker's budget when neither --memory-budget nor its profile gives one

# ------------------------------------------------------------------------------------------------
# sizes

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int, what: str = "size") -> int:
    """'512MiB', '1GiB', '1.5G', '800M', '800MB', '123456' -> bytes (int, > 0).

    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024 (as in systemd's MemoryMax=); KB/MB/GB/TB are
    powers of 1000. Raises UserError naming `what` on anything else.
    """
    if isinstance(value, bool):
        raise UserError(f"{what}: expected a size like 512MiB, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = _UNITS.get(m.group(2).lower()) if m else None
        if m is None or unit is None:
            raise UserError(f"{what}: {value!r} is not a size (examples: 512MiB, 1GiB, 800M, 1000000)")
        number = m.group(1)
        if "." in number and unit == 1:
            raise UserError(f"{what}: {value!r}: a size in bytes must be a whole number")
        n = int(round(float(number) * unit)) if "." in number else int(number) * unit
    else:
        raise UserError(f"{what}: expected a size like 512MiB, got {type(value).__name__}")
    if n <= 0:
        raise UserError(f"{what}: {value!r} must be more than 0 bytes")
    return n


def format_size(n: int | float) -> str:
    """Bytes for humans: '1.5 MiB', '512.0 MiB', '-3.0 KiB'."""
    sign, n = ("-" if n < 0 else ""), abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} B" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def page_round(n: int, page: int = PAGE_SIZE) -> int:
    """Resident bytes of an n-byte file mapping once every page is faulted in."""
    return -(-n // page) * page


def activation_bytes(n_tokens: int, n_embd: int, n_ff: int) -> int:
    """Upper bound of the memory one COMPUTE of n_tokens rows needs besides the shard.

    Input frame (4*n*n_embd), ggml arena (inputs, gate, up, swiglu, output: see ExpertFFN.run),
    ggml work buffer (activations converted for quantized mat-muls), output copy and its message,
    plus tensor headers and graph.
    """
    return 4 * n_tokens * (4 * n_embd + 6 * n_ff + 8) + (256 << 10)


def default_reserve(n_embd: int, n_ff: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """Activations of one request of max_tokens rows, plus RUNTIME_SLACK."""
    return activation_bytes(max_tokens, n_embd, n_ff) + RUNTIME_SLACK


def jit_slot_count(n_experts_used: int, capacity: int, biggest: int) -> int:
    """Just-in-time slots a worker keeps out of its resident room: a compute of one layer's experts on
    it needs them all mapped at once (up to top-k), plus one so a prefetch can load while they compute."""
    return max(1, min(n_experts_used + 1, capacity // biggest)) if biggest > 0 else 1


# ------------------------------------------------------------------------------------------------
# admission state machine

QUEUED, LOADING, LOADED = "queued", "loading", "loaded"


@dataclass
class Load:
    """Start loading `key` now (after unmapping the shards in `evict`, already forgotten here)."""

    key: ExpertId
    size: int
    evict: list[ExpertId] = field(default_factory=list)


@dataclass
class Wait:
    """The next load does not fit yet: wait until a compute or a drop frees memory."""

    key: ExpertId
    needs: int
    free: int


@dataclass
class Skip:
    """The next queued shard can never fit: forget it (fail its pending requests with `reason`)."""

    key: ExpertId
    reason: str
    pins: int  # requests waiting for it


Decision = Union[Load, Wait, Skip, None]  # None: nothing to load


@dataclass
class Request:
    """The answer to a compute request."""

    hit: bool  # the shard was already loaded or loading when the request came
    ready: bool  # loaded: compute now
    refused: str | None = None  # can never be served (the reason), nothing was recorded


@dataclass
class _Entry:
    size: int
    state: str
    steps: list[int] = field(default_factory=list)  # prefetch steps not yet consumed by a compute
    pins: int = 0  # requests waiting for / about to compute this shard
    seq: int = 0  # order of the latest prefetch (eviction picks the one needed last)
    cancelled: bool = False  # loading, but no longer wanted: drop as soon as it is loaded
    resident: bool = False  # the coordinator's placement keeps it here


class Admission:
    """Which shards a worker loads, keeps and drops, within budget. Not thread-safe: lock around it."""

    def __init__(self, budget: int, baseline: int, reserve: int, *, slack: int = 0, horizon: int = 2,
                 jit_room: int = 0) -> None:
        """slack: the part of `reserve` meant for the baseline's growth while serving (observe_rss
        raises the baseline only by what exceeds it). jit_room: bytes of the capacity residents
        leave to just-in-time loads."""
        if horizon < 1:
            raise ValueError("horizon must be >= 1")
        if not 0 <= slack <= reserve:
            raise ValueError("slack must be part of the reserve")
        self.budget = budget
        self.startup_baseline = baseline
        self.baseline = baseline
        self.reserve = reserve
        self.slack = slack
        self.horizon = horizon
        self.jit_room = jit_room
        self.newest_step: int | None = None
        self.entries: dict[ExpertId, _Entry] = {}
        self.queue: deque[ExpertId] = deque()  # QUEUED keys, load order: demands first
        self._seq = 0

    # -- accounting ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Bytes available for shards: budget - baseline - reserve."""
        return self.budget - self.baseline - self.reserve

    @property
    def used(self) -> int:
        """Bytes of shards mapped or being mapped."""
        return sum(e.size for e in self.entries.values() if e.state != QUEUED)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def resident_room(self) -> int:
        """Bytes residents may take: the capacity less the just-in-time room."""
        return max(0, self.capacity - self.jit_room)

    def resident_keys(self) -> list[ExpertId]:
        return [k for k, e in self.entries.items() if e.resident]

    def state(self, key: ExpertId) -> str | None:
        e = self.entries.get(key)
        return None if e is None else e.state

    def loaded_keys(self) -> list[ExpertId]:
        return [k for k, e in self.entries.items() if e.state == LOADED]

    def observe_rss(self, rss: int) -> bool:
        """Re-estimate the baseline from a measured RSS: growth beyond the slack raises it, and it
        comes back down (never below the start-up value) when the memory is given back. Only
        meaningful when no load is in progress (a half-populated mapping is not accounted exactly);
        returns whether it was used."""
        if any(e.state == LOADING for e in self.entries.values()):
            return False
        mapped = sum(e.size for e in self.entries.values() if e.state == LOADED)
        self.baseline = max(self.startup_baseline, rss - mapped - self.slack)
        return True

    def never_fits(self, size: int) -> str | None:
        """Why a shard of `size` bytes can never be loaded within the budget (None: it can)."""
        if size > self.capacity:
            return (f"expert needs {format_size(size)}, budget leaves {format_size(max(self.capacity, 0))} "
                    f"(budget {format_size(self.budget)} - baseline {format_size(self.baseline)} "
                    f"- reserve {format_size(self.reserve)})")
        return None

    def check_activations(self, act: int, n_tokens: int) -> str | None:
        """Why a request needing `act` bytes of activations cannot be served (None: it can)."""
        if act > self.reserve:
            return (f"a request of {n_tokens} tokens needs {format_size(act)} of activation memory, "
                    f"this worker reserves {format_size(self.reserve)}; send fewer tokens per request")
        return None

    # -- events from the message loop ------------------------------------------------------------
    def prefetch(self, step: int, items: list[tuple[ExpertId, int]]) -> list[ExpertId]:
        """Schedule loads (in order). Returns loaded shards that expired and must be dropped now."""
        if self.newest_step is None or step > self.newest_step:
            self.newest_step = step
        seen: set[ExpertId] = set()
        for key, size in items:
            if key in seen:
                continue
            seen.add(key)
            self._seq += 1
            e = self.entries.get(key)
            if e is None:
                self.entries[key] = _Entry(size, QUEUED, [step], seq=self._seq)
                self.queue.append(key)
            else:
                e.steps.append(step)
                e.steps.sort()
                e.seq = self._seq
                e.cancelled = False
        return self._expire()

    def _expire(self) -> list[ExpertId]:
        if self.newest_step is None:
            return []
        oldest_kept = self.newest_step - self.horizon + 1
        drops: list[ExpertId] = []
        for key, e in list(self.entries.items()):
            if not e.steps or e.steps[0] >= oldest_kept:
                continue
            e.steps = [s for s in e.steps if s >= oldest_kept]
            if e.steps or e.pins or e.resident:
                continue
            drops += self._forget(key)
        return drops

    def _forget(self, key: ExpertId) -> list[ExpertId]:
        """Remove an unwanted entry; returns [key] when its mapping must be dropped now."""
        e = self.entries[key]
        if e.state == LOADING:
            e.cancelled = True
            return []
        del self.entries[key]
        if e.state == QUEUED:
            self.queue.remove(key)
            return []
        return [key]

    def request(self, key: ExpertId, size: int) -> Request:
        """A compute request arrived for `key` (a shard of `size` bytes)."""
        e = self.entries.get(key)
        if e is None or e.state == QUEUED:
            why = self.never_fits(size if e is None else e.size)
            if why is not None:
                return Request(hit=False, ready=False, refused=why)
        if e is None:
            e = self.entries[key] = _Entry(size, QUEUED)
        elif e.state != QUEUED:
            e.pins += 1
            e.cancelled = False
            return Request(hit=True, ready=e.state == LOADED)
        elif e.pins:  # already a queued demand: keep its place
            e.pins += 1
            return Request(hit=False, ready=False)
        else:
            self.queue.remove(key)
        e.pins += 1
        # demands go ahead of prefetches, after earlier demands (FIFO among demands)
        i = 0
        while i < len(self.queue) and self.entries[self.queue[i]].pins:
            i += 1
        self.queue.insert(i, key)
        return Request(hit=False, ready=False)

    def computed(self, key: ExpertId) -> bool:
        """A request for `key` was served (or given up). True: drop the shard now."""
        e = self.entries[key]
        e.pins -= 1
        if e.steps:
            e.steps.pop(0)  # this compute consumed the oldest prefetch of the key
        if e.pins or e.steps or e.resident:
            return False
        return bool(self._forget(key))

    def release(self, key: ExpertId) -> bool:
        """A request pinned `key` but was given up before computing (another of its experts could not
        be served): unpin without consuming a prefetch. True: drop the shard now."""
        e = self.entries[key]
        e.pins -= 1
        if e.pins or e.steps or e.resident:
            return False
        return bool(self._forget(key))

    def set_resident(self, items: list[tuple[ExpertId, int]]) -> tuple[list[ExpertId], list[ExpertId]]:
        """The coordinator's resident set for this worker (replaces the previous one), in its order.
        Returns (loaded shards to drop now, keys refused because resident_room is full)."""
        room = self.resident_room
        wanted: dict[ExpertId, int] = {}
        refused: list[ExpertId] = []
        for key, size in items:
            if key in wanted:
                continue
            if size <= room:
                wanted[key] = size
                room -= size
            else:
                refused.append(key)
        drops: list[ExpertId] = []
        for key, e in list(self.entries.items()):
            if e.resident and key not in wanted:
                e.resident = False
                if not e.pins and not e.steps:
                    drops += self._forget(key)
        for key, size in wanted.items():
            e = self.entries.get(key)
            if e is None:
                self.entries[key] = _Entry(size, QUEUED, resident=True)
                self.queue.append(key)  # after the demands and prefetches already queued
            else:
                e.resident, e.cancelled = True, False
        return drops, refused

    def reset(self) -> list[ExpertId]:
        """Forget every schedule (the coordinator restarted). Returns loaded shards to drop now;
        shards with pending requests stay until those are served."""
        drops: list[ExpertId] = []
        for key, e in list(self.entries.items()):
            e.steps = []
            e.resident = False  # the coordinator sends its own placement
            if not e.pins:
                drops += self._forget(key)
        self.newest_step = None
        return drops

    # -- the loader ------------------------------------------------------------------------------
    def next_load(self) -> Decision:
        """What the loader does next: Load, Wait, Skip or None (queue empty)."""
        if not self.queue:
            return None
        key = self.queue[0]
        e = self.entries[key]
        why = self.never_fits(e.size)
        if why is not None:  # the baseline grew since it was queued
            self.queue.popleft()
            del self.entries[key]
            return Skip(key, why, pins=e.pins)
        free = self.free
        evict: list[ExpertId] = []
        if e.size > free and e.pins:
            # residents last: only when nothing else makes room (the baseline grew)
            idle = [(x.resident, min(x.steps) if x.steps else -1, -x.seq, k) for k, x in self.entries.items()
                    if x.state == LOADED and not x.pins]
            idle.sort()
            room = free
            for _, _, _, k in idle:
                if room >= e.size:
                    break
                evict.append(k)
                room += self.entries[k].size
            if room < e.size:
                evict = []
        if e.size > free and not evict:
            return Wait(key, e.size, free)
        self.queue.popleft()
        e.state = LOADING
        requeue: list[ExpertId] = []
        for k in evict:
            x = self.entries.pop(k)
            x.resident = False
            if x.steps and self.newest_step is not None and max(x.steps) >= self.newest_step:
                x.state, x.steps = QUEUED, [s for s in x.steps if s >= self.newest_step]
                self.entries[k] = x
                requeue.append(k)
        # back into the queue right after the demands still waiting
        i = 0
        while i < len(self.queue) and self.entries[self.queue[i]].pins:
            i += 1
        for k in reversed(requeue):
            self.queue.insert(i, k)
        return Load(key, e.size, evict)

    def loaded(self, key: ExpertId) -> bool:
        """The loader finished mapping `key`. False: nobody wants it any more, drop it now."""
        e = self.entries[key]
        if e.cancelled and not e.pins:
            del self.entries[key]
            return False
        e.state, e.cancelled = LOADED, False
        return True

    def load_failed(self, key: ExpertId) -> int:
        """Loading `key` failed; forget it. Returns how many requests were waiting for it."""
        e = self.entries.pop(key)
        return e.pins

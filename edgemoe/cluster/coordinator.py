"""The coordinator side of the cluster: `Coordinator`, an ExpertBackend that sends expert work to remote workers.

It keeps the state (the workers it admitted, the placement, what it prefetched where, the requests in
flight) and carries out the decisions of edgemoe.cluster.schedule (pure functions) and
edgemoe.cluster.placement over its end of the link (edgemoe.cluster.link.RouterLink).

Decode follows OD-MoE: workers form groups of size top-k; MoE layer l is served by group
l mod n_groups, one expert per worker; predicted experts of the coming layers are broadcast
(PUB) as soon as they are known so their workers load while other groups compute; the trunk's
router decides, and an expert nobody predicted is loaded on demand by a free worker of the group.
Prefill spreads every expert of a layer over all workers, tokens grouped by expert, in
mini-batches that pipeline transfer and compute.

Beyond the paper (`residency="auto"`): what the workers' budgets hold beyond their just-in-time
slots is filled with resident experts under one placement (edgemoe.cluster.placement); a routed
expert goes to the worker holding it, only the others are predicted and loaded just in time. A
worker that leaves takes its residents with it: the placement is re-planned over the others; one
that (re)joins takes its share back. In decode each worker gets one compute message per layer
carrying all of its experts.

Peers are known by their CURVE public key (the ZAP User-Id ZeroMQ attaches to what they send), not by
a name they chose; without keys (loopback, or --insecure) by their connection. A worker silent for
LOST_AFTER heartbeat intervals is lost at once and its requests go elsewhere; a request that fails
goes elsewhere without condemning its worker (STRIKES failures in a row do); a lost worker that
comes back is admitted again after a fresh hello (LOST_AFTER, STRIKES: edgemoe.cluster.link).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zmq

from edgemoe.cluster import protocol as P
from edgemoe.cluster import schedule
from edgemoe.cluster.budget import page_round
from edgemoe.cluster.keys import ServerKeys
from edgemoe.cluster.link import Peer, RouterLink
from edgemoe.cluster.placement import Room, plan_placement, worker_sets
from edgemoe.cluster.sockets import bind_endpoint
from edgemoe.errors import UserError
from edgemoe.format.manifest import load_manifest, manifest_hash
from edgemoe.format.shard import ExpertId, ShardLayout
from edgemoe.ggml.columns import mul_mat_id_limit
from edgemoe.model.experts import ExpertBackend, ExpertStats
from edgemoe.model.hooks import StepHooks
from edgemoe.predict.base import Predictor, RecallMeter
from edgemoe.util.proc import peak_rss_bytes

log = logging.getLogger("edgemoe.coordinator")


@dataclass(kw_only=True, eq=False)
class WorkerInfo(Peer):
    """A worker the coordinator admitted (its link fields: edgemoe.cluster.link.Peer)."""

    worker_id: int
    budget: int
    threads: int
    pid: int
    baseline_rss: int
    resident_room: int = 0
    jit_slots: int = 1
    requests: int = 0
    hits: int = 0
    resident: int = 0  # experts the placement keeps on it
    lost: int = 0  # times it was lost


RESIDENCY_MODES = ("auto", "off")


@dataclass
class ClusterStats(ExpertStats):
    """Wall-clock and worker-reported times, all in seconds, summed over the run."""

    decode_layers: int = 0
    wall_s: float = 0.0  # coordinator waiting on experts
    worker_load_s: float = 0.0  # on-demand loads inside compute requests (a miss)
    worker_wait_s: float = 0.0  # compute requests waiting for a prefetch still loading
    worker_compute_s: float = 0.0
    stall_s: float = 0.0  # per layer: the longest load+wait among its requests
    network_s: float = 0.0  # per layer: wall time not explained by the slowest request's work
    bytes_sent: int = 0
    bytes_received: int = 0
    retries: int = 0
    predicted: int = 0
    hits: int = 0  # experts computed that were already mapped (or loading) when their request came
    resident_routed: int = 0  # routed experts (decode) that a live worker held resident
    prefetch_routed: int = 0  # routed experts (decode) not resident but prefetched to a live worker of this token


@dataclass
class _Request:
    """One compute message: experts of one layer on one worker, each on its own rows of `hidden`."""

    req: int
    layer: int
    experts: list[int]
    counts: list[int]  # rows of hidden per expert, in order
    rows: np.ndarray  # token row (of the layer's input) of each row of hidden
    slots: np.ndarray  # top-k slot of each row
    hidden: np.ndarray
    worker: WorkerInfo
    tried: set[int] = field(default_factory=set)  # workers it failed on (or returned NaN/inf)
    sent_at: float = 0.0
    work_s: float = 0.0  # worker-reported load + wait + compute
    stall_s: float = 0.0  # worker-reported load + wait


class Coordinator(ExpertBackend, StepHooks):
    """Experts computed by workers over ZeroMQ; construct, then wait_for_workers(n)."""

    def __init__(self, model_dir: str | Path, *, n_embd: int, n_expert: int, k: int, moe_layers: list[int],
                 bind: str = "tcp://127.0.0.1:0", predictor: Predictor | None = None, group_size: int | None = None,
                 timeout_s: float = 30.0, prefill_batch: int = 64, heartbeat_s: float = 1.0,
                 residency: str = "auto", routing_counts: dict[ExpertId, float] | None = None,
                 keys: ServerKeys | None = None) -> None:
        """residency: "auto" fills the workers' spare budget with resident experts, "off" is the
        paper's cacheless mode. routing_counts: how often each (layer, expert) is routed (an
        importance matrix's counts); the placement keeps the most used first, and adds what it
        sees routed. keys: CurveZMQ (the coordinator's key pair and the allowed peers); None: no
        authentication (the caller checked that the endpoint allows it)."""
        if residency not in RESIDENCY_MODES:
            raise UserError(f"--residency {residency!r}: choose one of {', '.join(RESIDENCY_MODES)}")
        for what, v in (("request timeout", timeout_s), ("heartbeat interval", heartbeat_s)):
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"{what} {v!r}: must be a finite number of seconds above 0")
        if not 1 <= prefill_batch <= P.MAX_ROWS:
            raise UserError(f"prefill batch {prefill_batch}: must be within 1..{P.MAX_ROWS} rows (a message's limit)")
        self.model_dir = Path(model_dir)
        self.model_hash = manifest_hash(model_dir)
        self.n_embd, self.n_expert, self.k = n_embd, n_expert, k
        self.moe_layers = moe_layers
        self.predictor = predictor
        self.group_size = group_size or k
        self.timeout_s = timeout_s
        self.prefill_batch = prefill_batch
        self.heartbeat_s = heartbeat_s
        self.stats = ClusterStats()
        self.residency = residency
        manifest = load_manifest(model_dir)
        self._sizes: dict[ExpertId, int] = {k: page_round(manifest.files[k.file_name].size)
                                            for k in manifest.expert_ids()}
        self._counts: dict[ExpertId, float] = {ExpertId._make(k): n for k, n in (routing_counts or {}).items()}
        self.placement: dict[ExpertId, WorkerInfo] = {}  # resident expert -> its live holder
        self._planning = False  # set by start_residency(), once the first workers are in
        self._plan_id = 0
        # local workers: () -> [(name, pid, why)] of those that exited (set by the session that spawned
        # them), so that a worker the kernel killed is noticed at once rather than after a timeout
        self.exited: Callable[[], list[tuple[str, int, str]]] | None = None
        self._next_watch = 0.0
        self._groups: tuple[tuple[int, ...], list[list[WorkerInfo]]] | None = None  # (live ids, groups of them)
        self._layer_index = {l: i for i, l in enumerate(moe_layers)}
        self._limits: dict[int, int] = {}  # layer -> rows per expert on the one-row kernel (edgemoe.ggml.columns)
        self.recall = RecallMeter(k)
        self.workers: dict[bytes, WorkerInfo] = {}
        self._next_id = 0
        self._req = 0
        self._step = -1
        self._assigned: dict[ExpertId, WorkerInfo] = {}  # prefetched expert (of this token) -> worker
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted for this token
        self._by_route: dict[bytes, WorkerInfo] = {}  # connection id -> worker
        # the workers' link; the largest legal frame a worker sends is a result
        self.link = RouterLink(bind, keys=keys, max_frame=P.frame_limit(P.rows_bytes(n_embd)), heartbeat_s=heartbeat_s,
                               log=log)
        self.endpoint, self.router, self.auth = self.link.endpoint, self.link.sock, self.link.auth
        self.pub = self.link.zctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.MAXMSGSIZE, P.frame_limit())  # subscriptions only
        if self.auth is not None:
            self.auth.arm(self.pub)  # predictions reach authenticated workers only
        try:
            if bind.startswith("ipc://"):  # a local cluster: Unix sockets next to each other
                self.pub_endpoint = bind_endpoint(self.pub, bind + ".pub")
            else:
                host = bind.rsplit(":", 1)[0]
                self.pub_endpoint = bind_endpoint(self.pub, f"{host}:0")
        except zmq.ZMQError as e:
            self.close()
            raise UserError(f"cannot bind {bind}: {e}") from None
        log.info("listening on %s (predictions on %s), %s", self.endpoint, self.pub_endpoint,
                 f"CurveZMQ, {len(keys.allowed)} listed keys" if keys else "no keys: unauthenticated, unencrypted")

    # workers ------------------------------------------------------------------------------------
    def live_workers(self) -> list[WorkerInfo]:
        return sorted((w for w in self.workers.values() if w.alive), key=lambda w: w.worker_id)

    def wait_for_workers(self, n: int, timeout_s: float, check: "Callable[[], None] | None" = None) -> None:
        """Serve hellos until n workers have joined; check() may raise to give up early."""
        deadline = time.monotonic() + timeout_s
        while len(self.live_workers()) < n:
            if check is not None:
                check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(f"only {len(self.live_workers())} of {n} workers joined within {timeout_s:.0f} s")
            self._poll(min(left, 0.2))
        if not self._planning:
            self.start_residency()

    def poll_idle(self, timeout_s: float) -> None:
        """Between sequences (a server waiting for requests): serve hellos, heartbeats and goodbyes,
        and notice local workers that exited, so liveness and memory figures stay current."""
        self._poll(timeout_s)
        if self.exited is not None:
            self._watch()

    # residency ----------------------------------------------------------------------------------
    def start_residency(self) -> None:
        """Plan the placement over the workers now in, and re-plan whenever one joins or leaves."""
        self._planning = True
        self._replan()

    def _replan(self, joined: WorkerInfo | None = None) -> None:
        """One placement over the live workers (their resident rooms), the most routed experts first.
        Experts already resident on a live worker stay where they are (no reload); the experts of a
        worker that left, and room that appeared, are filled anew. A worker that (re)joins takes the
        share a fresh plan over all live workers would give it, from whoever holds those experts now
        (after a loss the others took its experts over: without this it would get only what they
        had no room for, often nothing). Each worker is sent its set."""
        if not self._planning or self.residency == "off":
            return
        live = self.live_workers()
        keep = {k: w for k, w in self.placement.items() if w.alive and w is not joined}
        if joined is not None and joined.alive:
            fresh = plan_placement([Room(w.worker_id, w.resident_room) for w in live], self._sizes, self._counts)
            share = {k for k, i in fresh.items() if i == joined.worker_id}
            keep = {**{k: w for k, w in keep.items() if k not in share}, **{k: joined for k in share}}
        rooms = []
        for w in live:
            used = sum(self._sizes[k] for k, h in keep.items() if h is w)
            rooms.append(Room(w.worker_id, w.resident_room - used))
        by_id = {w.worker_id: w for w in live}
        rest = {k: v for k, v in self._sizes.items() if k not in keep}
        new = {k: by_id[i] for k, i in plan_placement(rooms, rest, self._counts).items()}
        self.placement = {**keep, **new}
        self._plan_id += 1
        if self.predictor is not None:  # every expert resident: nothing to predict, the shadow may rest
            self.predictor.idle = len(self.placement) == len(self._sizes)
        sets = worker_sets({k: w.worker_id for k, w in self.placement.items()})
        for w in live:
            mine = sets.get(w.worker_id, [])
            w.resident = len(mine)
            self._send(w.identity, P.encode(P.RESIDENT, plan=self._plan_id, experts=[list(k) for k in mine]))
        log.info("placement %d: %d of %d experts resident on %d workers (%s)", self._plan_id, len(self.placement),
                 len(self._sizes), len(live), ", ".join(f"{w.name} {w.resident}" for w in live))

    def holder(self, layer: int, expert: int) -> WorkerInfo | None:
        """The live worker keeping (layer, expert) resident, if any."""
        w = self.placement.get(ExpertId(layer, expert))
        return w if w is not None and w.alive else None

    def _watch(self) -> None:
        for name, pid, why in self.exited():
            for w in self.live_workers():
                if w.name == name and w.pid == pid:
                    self._lost(w, why)

    def _lost(self, w: WorkerInfo, why: str) -> None:
        """A worker is gone: forget its assignments, re-plan its residents over the others."""
        if not w.alive:
            return
        log.warning("worker %s %s; its %d resident experts are re-planned over the others", w.name, why, w.resident)
        w.alive = False
        w.lost += 1
        for key in [k for k, x in self._assigned.items() if x is w]:
            del self._assigned[key]
        self.placement = {k: x for k, x in self.placement.items() if x is not w}
        if self.predictor is not None:
            self.predictor.idle = False
        if self.live_workers():
            self._replan()

    def _strike(self, w: WorkerInfo, why: str) -> None:
        """One failed request; STRIKES in a row and the worker is lost (until its next hello)."""
        if self.link.strike(w):
            self._lost(w, f"failed {w.strikes} requests in a row (last: {why})")

    def _check_liveness(self) -> None:
        """Lose every worker silent for LOST_AFTER heartbeat intervals (called after the socket is drained,
        so that heartbeats which waited in the queue while this process was busy count)."""
        for w in list(self.workers.values()):
            quiet = self.link.silent_for(w)
            if quiet is not None:
                self._lost(w, f"was silent for {quiet:.1f} s (heartbeat every {self.heartbeat_s:g} s)")

    def _live_or_wait(self, why: str) -> list[WorkerInfo]:
        """Live workers; with none, wait up to the request timeout for one to (re)join."""
        live = self.live_workers()
        deadline = time.monotonic() + self.timeout_s
        while not live:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(f"every worker is gone ({why}); none came back within {self.timeout_s:g} s")
            self._poll(min(left, 0.2))
            live = self.live_workers()
        return live

    def groups(self) -> list[list[WorkerInfo]]:
        """The live workers' groups (edgemoe.cluster.schedule.make_groups), recomputed when who is live changes;
        the predictor is told how far ahead the groups let it look."""
        live = self._live_or_wait("no live workers")
        ids = tuple(w.worker_id for w in live)
        if self._groups is None or self._groups[0] != ids:
            self._groups = (ids, schedule.make_groups(live, self.group_size))
            if self.predictor is not None:
                self.predictor.depth = schedule.prefetch_depth(len(live), self.group_size)
        return self._groups[1]

    def group_of(self, layer: int) -> list[WorkerInfo]:
        """The group serving MoE layer `layer` (layer index mod n_groups)."""
        return list(schedule.group_of(self.groups(), self._layer_index[layer]))

    def _holder_in(self, layer: int) -> Callable[[int], WorkerInfo | None]:
        return lambda e: self.holder(layer, e)

    def _prefetched_in(self, layer: int) -> dict[int, WorkerInfo]:
        """expert -> the live worker it was prefetched to, for this token at this layer."""
        return {k.expert: w for k, w in self._assigned.items() if k.layer == layer and w.alive}

    # the ExpertBackend interface -----------------------------------------------------------------
    def compute(self, layer: int, expert: int, hidden: np.ndarray) -> np.ndarray:
        selected = np.full((hidden.shape[0], 1), expert, dtype=np.int32)
        return self.compute_layer(layer, hidden, selected)[:, 0]

    def on_router(self, layer: int, residual: np.ndarray, selected: np.ndarray,
                  groups: list[tuple[int, int]] | None = None) -> None:
        """The engine's hook after a MoE layer's router (edgemoe.model.hooks), before compute_layer: in
        decode, a new token's prediction step starts at its first MoE layer, the recall of what was
        predicted for this layer is counted, and the predictor's after_router is prefetched."""
        n_tok = selected.shape[0]
        if groups and len(groups) > 1:  # one step of several sequences: the predictor and prefetch see all their rows
            predictor = self.predictor if self.predictor is not None and not self.predictor.follows_one_sequence else None
            if layer == self.moe_layers[0]:
                self._begin_token(predictor)
            for row in selected:
                self.recall.record(self._step, self._predicted.get(layer), row)
            if predictor is not None:
                union: dict[int, set[int]] = {}
                for r in range(n_tok):
                    for l, experts in predictor.after_router(layer, residual[r], selected[r]).items():
                        union.setdefault(l, set()).update(experts)
                self._prefetch({l: sorted(e) for l, e in union.items()}, layer)
        elif n_tok == 1:
            if layer == self.moe_layers[0]:
                self._begin_token(self.predictor)
            self.recall.record(self._step, self._predicted.get(layer), selected[0])
            if self.predictor is not None:
                self._prefetch(self.predictor.after_router(layer, residual[0], selected[0]), layer)

    def compute_layer(self, layer: int, hidden: np.ndarray, selected: np.ndarray,
                      groups: list[tuple[int, int]] | None = None) -> np.ndarray:
        n_tok = hidden.shape[0]
        n_seq = len(groups) if groups else 1
        decode = n_tok == 1 or n_seq > 1
        for e in selected.reshape(-1).tolist():  # online routing counts, for the next re-plan
            key = ExpertId(layer, e)
            self._counts[key] = self._counts.get(key, 0.0) + 1.0
        if n_seq > 1:
            requests = self._plan_batch(layer, hidden, selected, groups)
        elif decode:
            requests = self._plan_decode(layer, hidden, selected)
        else:
            requests = self._plan_prefill(layer, hidden, selected)
        out = np.empty((n_tok, selected.shape[1], self.n_embd), dtype=np.float32)
        self._run(requests, out, decode, layer)
        for e in {int(x) for x in selected.reshape(-1)}:
            self._assigned.pop(ExpertId(layer, e), None)
        return out

    def _begin_token(self, predictor: Predictor | None) -> None:
        self._step += 1
        self._assigned.clear()
        self._predicted.clear()
        if predictor is not None:
            self._prefetch(predictor.begin_token(self._step), -1)

    def reset(self) -> None:
        """A new sequence: predictions restart (recall keeps accumulating)."""
        if self.predictor is not None:
            self.predictor.reset()

    # scheduling ---------------------------------------------------------------------------------
    def _prefetch(self, predictions: dict[int, list[int]], current: int) -> None:
        """Assign predicted experts of coming layers to their group's workers and broadcast them."""
        loads = []
        for layer, experts in sorted(predictions.items()):
            if layer <= current or layer not in self.moe_layers:
                continue
            self._predicted[layer] = set(experts)
            experts = [e for e in experts if self.holder(layer, e) is None]  # residents need no load
            before = self._prefetched_in(layer)
            plan = schedule.prefetch_layer(experts, self.group_of(layer), before)
            for key in [key for key in self._assigned if key.layer == layer]:
                del self._assigned[key]
            for e, w in plan.items():
                self._assigned[ExpertId(layer, e)] = w
                if e not in before:
                    loads.append([w.worker_id, layer, e])
        if loads:
            self.stats.predicted += len(loads)
            self._send_pub(P.encode(P.PREFETCH, step=self._step, loads=loads))

    def _plan_decode(self, layer: int, hidden: np.ndarray, selected: np.ndarray) -> list[_Request]:
        """Each routed expert to its holder (resident), else to the worker it was predicted to
        (prefetched), else to the least busy worker of the layer's group (loaded on demand); then
        one request per worker carrying all of its experts (at most its just-in-time slots of
        them not resident)."""
        routed = selected[0].tolist()
        holder, prefetched = self._holder_in(layer), self._prefetched_in(layer)
        self.stats.resident_routed += sum(holder(e) is not None for e in routed)
        self.stats.prefetch_routed += sum(holder(e) is None and e in prefetched for e in routed)
        slot_of = {e: slot for slot, e in enumerate(routed)}  # a row's top-k are distinct experts
        chosen = [(slot_of[e], e, w) for e, w in schedule.assign_routed(routed, self.group_of(layer), holder, prefetched)]
        return [self._decode_request(layer, hidden, items, w)
                for w, items in schedule.decode_batches(chosen, holder, lambda w: w.jit_slots)]

    def _decode_request(self, layer: int, hidden: np.ndarray, items: list[tuple[int, int]], w: WorkerInfo) -> _Request:
        n = len(items)
        return self._request(layer, [e for _, e in items], [1] * n, np.zeros(n, dtype=np.intp),
                             np.array([slot for slot, _ in items]), np.repeat(hidden[:1], n, axis=0), w)

    def _plan_batch(self, layer: int, hidden: np.ndarray, selected: np.ndarray,
                    groups: list[tuple[int, int]]) -> list[_Request]:
        """A step of several sequences: each routed expert to a worker as in decode (holder, else the
        worker it was prefetched to, else the least busy of the layer's group), computed once for all
        rows routed to it; one message per worker carrying all of its experts' rows. Where ggml's
        kernel depends on how many rows an expert has (edgemoe.ggml.columns), an expert's rows are
        split so that each sequence's rows see the kernel they see alone: a sequence with more rows
        than the limit on its own (as its prefill alone would be), the rest in runs within the limit;
        the runs of one expert then go in separate messages."""
        chosen = schedule.assign_routed(np.unique(selected).tolist(), self.group_of(layer), self._holder_in(layer),
                                        self._prefetched_in(layer))
        seq_of = np.concatenate([np.full(n, i) for i, (_, n) in enumerate(groups)])
        limit = min(self._row_limit(layer), P.MAX_ROWS)
        holder = self._holder_in(layer)
        where: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # expert -> (its rows, their top-k slots)
        runs = []
        for e, w in chosen:
            rows, slots = where[e] = np.nonzero(selected == e)
            runs.append((e, w, holder(e) is not w, schedule.batch_runs(seq_of[rows], len(groups), limit,
                                                                       self.prefill_batch)))
        requests = []
        for w, parts in schedule.pack_batch(runs, P.MAX_ROWS, lambda w: w.jit_slots):
            r = np.concatenate([where[e][0][run] for e, run in parts])
            requests.append(self._request(layer, [e for e, _ in parts], [len(run) for _, run in parts], r,
                                          np.concatenate([where[e][1][run] for e, run in parts]),
                                          np.ascontiguousarray(hidden[r]), w))
        return requests

    def _row_limit(self, layer: int) -> int:
        """Rows one expert of this layer may have in a compute with every row on its one-row kernel."""
        if layer not in self._limits:
            layout = ShardLayout.read(self.model_dir / ExpertId(layer, 0).file_name)
            self._limits[layer] = mul_mat_id_limit([t.ggml_type for t in layout.tensors.values()])
        return self._limits[layer]

    def _plan_prefill(self, layer: int, hidden: np.ndarray, selected: np.ndarray) -> list[_Request]:
        live = self._live_or_wait("no live workers")
        requests = []
        for e, w in schedule.assign_prefill(np.unique(selected).tolist(), live, self._holder_in(layer)).items():
            rows, slots = np.nonzero(selected == e)
            for i in range(0, len(rows), self.prefill_batch):  # mini-batches: the first computes while later ones travel
                r, s = rows[i:i + self.prefill_batch], slots[i:i + self.prefill_batch]
                requests.append(self._request(layer, [e], [len(r)], r, s, np.ascontiguousarray(hidden[r]), w))
        return requests

    def _request(self, layer: int, experts: list[int], counts: list[int], rows: np.ndarray, slots: np.ndarray,
                 hidden: np.ndarray, worker: WorkerInfo) -> _Request:
        self._req += 1
        return _Request(self._req, layer, experts, counts, rows, slots, hidden, worker)

    # sending and receiving ----------------------------------------------------------------------
    def _send(self, identity: bytes, frames: list) -> None:
        self.link.send(identity, frames)
        self.stats.bytes_sent += sum(len(f) for f in frames)

    def _send_pub(self, frames: list) -> None:
        self.pub.send_multipart(frames, copy=False)
        self.stats.bytes_sent += sum(len(f) for f in frames)

    def _dispatch(self, r: _Request) -> None:
        r.sent_at = time.monotonic()
        r.worker.requests += 1
        self._send(r.worker.identity, P.encode(P.COMPUTE, r.hidden, req=r.req, layer=r.layer, experts=r.experts,
                                               rows=r.counts))

    def _run(self, requests: list[_Request], out: np.ndarray, decode: bool, layer: int) -> None:
        t0 = time.monotonic()
        pending = {r.req: r for r in requests}
        for r in requests:
            self._dispatch(r)
        while pending:
            self._poll(0.05, pending, out)
            if decode and self.predictor is not None:  # a background predictor may have caught up meanwhile
                self._prefetch(self.predictor.poll(layer), layer)
            now = time.monotonic()
            if self.exited is not None and now >= self._next_watch:
                self._next_watch = now + 0.25
                self._watch()
            for r in list(pending.values()):
                if r.req not in pending:
                    continue
                if not r.worker.alive:
                    self._retry(r, pending, "is lost")
                elif now - r.sent_at > self.timeout_s:
                    self._strike(r.worker, f"request {r.req} timed out")
                    self._retry(r, pending, f"timed out after {self.timeout_s:g} s")
        wall = time.monotonic() - t0
        slowest_work = max(r.work_s for r in requests)
        slowest_stall = max(r.stall_s for r in requests)
        s = self.stats
        s.wall_s += wall
        s.stall_s += slowest_stall
        s.network_s += max(0.0, wall - slowest_work)
        s.decode_layers += int(decode)

    def _retry(self, r: _Request, pending: dict[int, _Request], why: str) -> None:
        """Recompute a request on live workers it has not failed on (one request per expert, each to its
        holder if that one may, else spread by expert id) so the answer is still correct. It does not
        condemn the worker (the callers count strikes). A request every live worker has failed ends
        the run with the reason."""
        del pending[r.req]
        tried = r.tried | {r.worker.worker_id}
        last = f"worker {r.worker.name} {why}"
        live = self._live_or_wait(last)
        targets = schedule.reassign(r.experts, live, tried, self._holder_in(r.layer))
        experts = " ".join(ExpertId(r.layer, e).label for e in r.experts)
        if targets is None:
            raise UserError(f"{experts} could not be computed by any of the {len(live)} live worker(s); last: {last}")
        log.warning("%s on request %d (%s); computing it elsewhere", last, r.req, experts)
        lo = 0
        for e, n, w in zip(r.experts, r.counts, targets):
            part = self._request(r.layer, [e], [n], r.rows[lo:lo + n], r.slots[lo:lo + n], r.hidden[lo:lo + n], w)
            part.tried = set(tried)
            lo += n
            pending[part.req] = part
            self.stats.retries += 1
            self._dispatch(part)

    def _poll(self, timeout_s: float, pending: dict[int, _Request] | None = None, out: np.ndarray | None = None) -> None:
        """Serve what the workers sent (waiting up to timeout_s), then lose those silent too long
        (after the drain, so that heartbeats which waited in the queue while this process was busy count)."""
        self.link.receive(timeout_s, lambda identity, key, frames: self._handle(identity, key, frames, pending, out))
        self._check_liveness()

    def _handle(self, identity: bytes, key: bytes, frames: list, pending: dict[int, _Request] | None,
                out: np.ndarray | None) -> None:
        self.stats.bytes_received += sum(len(f.buffer) for f in frames)
        known = self._by_route.get(identity)
        # a worker of another edgemoe version is told so (a reject), so that it stops trying
        msg = self.link.decode(identity, frames, known.name if known else self.link.peer_label(key), reject_foreign=True)
        if msg is None:
            return
        if msg.type == P.HELLO:
            self._hello(identity, key, msg)
            return
        w = self._by_route.get(identity)
        if w is None or not w.alive or w.identity != identity:
            # a stranger, a lost worker, or a second connection of a key: say hello (again), at most once a second
            self.link.unknown(identity)
            return
        self.link.heard(w, msg)  # liveness; a heartbeat's memory figures
        if msg.type == P.HEARTBEAT:
            pass
        elif msg.type == P.BYE:
            log.info("worker %s left", w.name)
            self._lost(w, "left")
        elif msg.type == P.RESULT:
            r = pending.get(msg["req"]) if pending is not None else None
            if r is None or r.worker is not w:
                log.warning("dropped a result for unknown request %d from %s", msg["req"], w.name)
                return
            if msg.tensor.shape != (len(r.rows), self.n_embd) or msg["experts"] != r.experts or msg["rows"] != r.counts:
                # not the answer to what was asked: computed again elsewhere now, not after the request timeout
                why = (f"returned a result of shape {list(msg.tensor.shape)} for experts {msg['experts']} rows "
                       f"{msg['rows']} (asked: [{len(r.rows)}, {self.n_embd}], {r.experts}, {r.counts})")
                self._strike(w, why)
                self._retry(r, pending, why)
                return
            if not P.all_finite(msg.tensor) and P.all_finite(r.hidden):
                # finite inputs give finite outputs on a sound worker: recompute it elsewhere, unless every
                # live worker said the same (then it is what the model computes)
                if any(x.worker_id not in r.tried | {w.worker_id} for x in self.live_workers()):
                    self._strike(w, "a result with NaN or infinity")
                    self._retry(r, pending, "returned NaN or infinity")
                    return
                log.warning("every live worker returns NaN or infinity for L%d %s: using it", r.layer, r.experts)
            w.strikes = 0
            out[r.rows, r.slots] = msg.tensor
            del pending[r.req]
            s = self.stats
            s.calls += len(r.experts)
            s.tokens += len(r.rows)
            s.worker_load_s += msg["load_s"]
            s.worker_wait_s += msg["wait_s"]
            s.worker_compute_s += msg["compute_s"]
            hits = min(msg["hits"], len(r.experts))
            s.hits += hits
            w.hits += hits
            r.work_s = msg["load_s"] + msg["wait_s"] + msg["compute_s"]
            r.stall_s = msg["load_s"] + msg["wait_s"]
        elif msg.type == P.FAIL:
            r = pending.get(msg["req"]) if pending is not None else None
            log.warning("worker %s failed request %d: %s", w.name, msg["req"], msg["reason"])
            if r is not None and r.worker is w:
                self._strike(w, msg["reason"])
                self._retry(r, pending, f"failed it ({msg['reason']})")
        else:
            log.warning("dropped an unexpected %s message from %s", msg.type, w.name)

    def _hello(self, identity: bytes, key: bytes, msg: P.Message) -> None:
        if self.link.refuse_model(identity, key, "worker", msg["name"], msg["model"], self.model_hash):
            return
        now = time.monotonic()
        w = self.workers.get(key)
        if w is None:
            w = WorkerInfo(worker_id=self._next_id, identity=identity, key=key, name=msg["name"], budget=msg["budget"],
                           threads=msg["threads"], pid=msg["pid"], baseline_rss=msg["baseline_rss"], last_seen=now,
                           resident_room=msg["resident_room"], jit_slots=max(1, msg["jit_slots"]))
            self._next_id += 1
            self.workers[key] = w
            log.info("worker %s joined (id %d, %s, budget %d MiB, baseline %d MiB)", w.name, w.worker_id,
                     self.link.peer_label(key), w.budget >> 20, w.baseline_rss >> 20)
        else:
            if w.identity != identity and w.alive and self.link.silent_for(w) is None:
                # the same key on a second connection while the first still answers: the first stays
                if self.link.once_in_a_while(identity):
                    log.warning("ignored a hello from a second connection of worker %s (%s) while the first answers",
                                w.name, self.link.peer_label(key))
                return
            if w.identity != identity:
                self._by_route.pop(w.identity, None)
                w.identity, w.name, w.pid = identity, msg["name"], msg["pid"]
            w.alive, w.last_seen, w.strikes = True, now, 0
            w.resident_room, w.jit_slots = msg["resident_room"], max(1, msg["jit_slots"])
            self.placement = {k: x for k, x in self.placement.items() if x is not w}  # it forgot them
            log.info("worker %s rejoined (id %d); it is given its share of the residents again", w.name, w.worker_id)
        self._by_route[identity] = w
        self._send(identity, P.encode(P.WELCOME, worker_id=w.worker_id, pub=self.pub_endpoint, heartbeat_s=self.heartbeat_s))
        self._replan(joined=w)

    def summary(self) -> dict:
        s = self.stats
        return {
            "workers": [{"name": w.name, "id": w.worker_id, "pid": w.pid, "budget": w.budget, "peak_rss": w.peak_rss,
                         "requests": w.requests, "hits": w.hits, "resident": w.resident, "alive": w.alive,
                         "lost": w.lost}
                        for w in self.workers.values()],
            "residency": self.residency,
            "resident_experts": len(self.placement),
            "resident_routed": s.resident_routed,
            "recall": self.recall.recall,
            "predicted_loads": s.predicted,
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "retries": s.retries,
            "coordinator_peak_rss": peak_rss_bytes(),
        }

    def close(self) -> None:
        if getattr(self, "pub", None) is not None:
            self.pub.close(0)
        if getattr(self, "link", None) is not None:
            self.link.close()


ClusterExperts = Coordinator  # the name it had: an ExpertBackend whose experts the cluster computes

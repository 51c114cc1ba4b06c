"""The worker daemon: keeps its resident experts mapped, loads the others just in time, computes them.

One process per board. Threads:
- main: the ZeroMQ loop (DEALER to the coordinator's ROUTER, SUB to its PUB), heartbeats, and
  the expert computes (ggml, on its own thread pool);
- loader: maps shards (mmap + MAP_POPULATE) one at a time, in order, within the memory budget; it
  wakes the main loop through a pipe when a shard is ready. A shard's bytes are hashed against the
  manifest on first use; every later map, and every compute, checks that the file is still the one
  verified (inode, size, mtime, ctime), so bytes changed on disk are refused before compute.

The budget holds the baseline, a reserve for activations, `jit_slots` just-in-time slots (OD-MoE:
an expert loaded on the predictor's word, computed, dropped) and the resident room, which the
coordinator's placement fills (`resident` messages): those experts stay mapped. Nothing on the
per-request path reads /proc or logs above DEBUG; the heartbeat carries the memory figures.

What to load, keep and drop is decided by `budget.Admission` (a pure state machine, under one
lock); this module only carries the decisions out. The network carries activations, never weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from edgemoe.cluster import protocol as P
from edgemoe.cluster.keys import ClientKeys, arm_client
from edgemoe.cluster.slots import SlotArena, SlotFFN, SlotShard, same_layout
from edgemoe.cluster.link import HELLO_INTERVAL_S, DealerLink, check_name, parse_endpoint  # noqa: F401 (parse_endpoint: the CLI's)
from edgemoe.cluster.sockets import Relinker
from edgemoe.cluster.budget import (
    Admission,
    RUNTIME_SLACK,
    Load,
    Skip,
    Wait,
    activation_bytes,
    default_reserve,
    format_size,
    jit_slot_count,
    page_round,
)
from edgemoe.errors import UserError
from edgemoe.format.manifest import load_manifest, manifest_hash
from edgemoe.format.shard import ExpertId, ShardLayout, ShardTensor
from edgemoe.ggml import Compute, GGMLType
from edgemoe.ggml.context import aligned_empty
from edgemoe.model.expert_ffn import ExpertFFN
from edgemoe.util.files import drop_page_cache
from edgemoe.util.proc import peak_rss_bytes, rss_bytes

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
def _file_identity(path: Path) -> tuple[int, ...]:
    """What changes when a file's bytes are changed or the file is replaced: inode, size, mtime, ctime.
    (A write within the file system's timestamp granularity after the first hash, or one that also
    forges both timestamps, is not seen: docs/SECURITY.md.)"""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Pending:
    """A COMPUTE waiting for its shards (or about to be computed): experts of one layer, each on
    its own consecutive rows of x."""

    req: int
    layer: int
    keys: list[ExpertId]
    rows: list[int]
    x: np.ndarray  # a view of the received frame
    t0: float
    hits: list[bool]


class _WarmupShard:
    """A tiny F32 expert in memory: the first graph run initialises ggml before the baseline is measured."""

    def __init__(self, n_embd: int = 64, n_ff: int = 64) -> None:
        sizes = {"gate": n_embd * n_ff, "up": n_embd * n_ff, "down": n_ff * n_embd}
        self._buf = aligned_empty(sum(sizes.values()), np.float32, align=64)
        self._buf[...] = 0.01
        self.address = self._buf.ctypes.data
        tensors, off = {}, 0
        for part, n in sizes.items():
            ne = (n_embd, n_ff) if part != "down" else (n_ff, n_embd)
            tensors[part] = ShardTensor(part, int(GGMLType.F32), ne, off)
            off += 4 * n
        self.layout = ShardLayout("<warm-up>", off, tensors)


class Worker:
    """`edgemoe worker`: serve one coordinator until SIGTERM/SIGINT (exit 0) or a REJECT (UserError)."""

    def __init__(
        self,
        connect: str,
        model_dir: str | os.PathLike[str],
        memory_budget: int,
        threads: int,
        name: str,
        *,
        max_tokens: int = 64,
        horizon: int = 2,
        hello_interval: float = HELLO_INTERVAL_S,
        keys: ClientKeys | None = None,
    ) -> None:
        self.host, _ = parse_endpoint(connect)
        self.keys = keys
        self.connect = connect
        self.name = check_name(name)
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        if max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
        self.threads = threads
        self.budget = memory_budget
        self.hello_interval = hello_interval
        self.log = logging.getLogger(f"edgemoe.worker.{name}")

        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir)
        self.model_hash = manifest_hash(self.model_dir)
        self.n_embd, self.n_ff = self._model_dims()
        self.reserve = default_reserve(self.n_embd, self.n_ff, max_tokens)
        self.max_tokens = max_tokens
        self.horizon = horizon

        _tame_malloc()
        self.compute = Compute(threads)
        self.ffn = ExpertFFN(self.compute)
        self.ffn.run(_WarmupShard(), np.ones((1, 64), dtype=np.float32))  # ggml tables, thread pool

        self._layouts: dict[ExpertId, ShardLayout] = {}  # loader thread only
        self._verified: dict[ExpertId, tuple[int, ...]] = {}  # the file identity whose bytes matched the manifest
        self._cond = threading.Condition()
        self._shards: dict[ExpertId, SlotShard] = {}  # loaded, under _cond
        self._loaded_at: dict[ExpertId, float] = {}
        self._errors: dict[ExpertId, list[Any]] = {}  # load failures: [reason, requests still to fail]
        self._pending: list[_Pending] = []
        self._stop_loader = False
        self._worker_id: int | None = None
        self._pub: str | None = None
        self.adm: Admission | None = None

    # -- start-up --------------------------------------------------------------------------------
    def _model_dims(self) -> tuple[int, int]:
        """n_embd, n_ff from the first expert shard present (header only; hashes are checked on use)."""
        for layer, expert, rel in self.manifest.expert_files():
            if (self.model_dir / rel).is_file():
                layout = ShardLayout.read(self.model_dir / rel)
                return layout.tensors["down"].ne[1], layout.n_ff
        raise UserError(f"{self.model_dir}: no expert shard found (expected files like {ExpertId(0, 0).file_name})")

    def _setup(self) -> None:
        # the largest legal compute: MAX_ROWS rows (the coordinator's batches), or more if --max-tokens asks
        self.link = DealerLink(self.connect, max_frame=P.frame_limit(P.rows_bytes(self.n_embd, max(self.max_tokens, P.MAX_ROWS))),
                               keys=self.keys, log=self.log, role="worker", hello=self._hello,
                               hello_interval=self.hello_interval, on_unwelcome=self._unwelcome)
        self.sub = self.link.ctx.socket(zmq.SUB)
        arm_client(self.sub, self.keys)  # predictions come from the authenticated coordinator only
        # ZMTP-level pings on the predictions too: ZeroMQ reconnects (then we say hello again)
        self.sub.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.MAXMSGSIZE, P.frame_limit())  # predictions carry no tensors
        self.sub_monitor = self.sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._sub_link = Relinker(self.sub)
        self._wake = self.link.wake
        for sock in (self.sub, self.sub_monitor):
            self.link.poller.register(sock, zmq.POLLIN)

        # everything this process needs to serve is in place: measure what it costs
        baseline = max(peak_rss_bytes(), rss_bytes())
        if baseline >= self.budget:
            raise UserError(
                f"memory budget {format_size(self.budget)} is below this worker's baseline RSS {format_size(baseline)} "
                f"(interpreter, numpy, ggml, sockets, before any expert); raise --memory-budget"
            )
        self.baseline = baseline
        biggest = max(page_round(e.size) for rel, e in self.manifest.files.items() if rel.startswith("experts/"))
        smallest = self.reserve + baseline + biggest
        if self.budget < smallest:
            raise UserError(
                f"memory budget {format_size(self.budget)} cannot hold this worker's baseline {format_size(baseline)} "
                f"plus its reserve {format_size(self.reserve)} plus one expert ({format_size(biggest)}): the smallest "
                f"budget that works is {_mib_up(smallest)}")
        capacity = self.budget - baseline - self.reserve
        self.jit_slots = jit_slot_count(self.manifest.n_experts_used, capacity, biggest)
        self.adm = Admission(self.budget, baseline, self.reserve, slack=RUNTIME_SLACK, horizon=self.horizon,
                             jit_room=self.jit_slots * biggest)
        self._biggest = biggest
        # every shard is mapped into a slot of one range, so one request's experts run in one mul_mat_id
        smallest_shard = min(page_round(e.size) for rel, e in self.manifest.files.items() if rel.startswith("experts/"))
        self.arena = SlotArena(capacity // smallest_shard + 2, biggest)
        self.slot_ffn = SlotFFN(self.compute, self.arena)
        self.log.info(
            "started: model %s (%s), budget %s, baseline %s, reserve %s (%d tokens), room for experts %s "
            "(largest %s): %d just-in-time slots, %s for residents; %d threads, pid %d",
            self.manifest.name, self.model_hash[:12], format_size(self.budget), format_size(baseline),
            format_size(self.reserve), self.max_tokens, format_size(self.adm.capacity), format_size(biggest),
            self.jit_slots, format_size(self.adm.resident_room), self.threads, os.getpid(),
        )
        self._loader = threading.Thread(target=self._loader_main, name="loader", daemon=True)
        self._loader.start()
        self.link.start()
        self.log.info("connecting to %s as %r (%s)", self.connect, self.name,
                      f"key {self.keys.pair.public.decode()}" if self.keys else "no keys: unauthenticated, unencrypted")

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        self._setup()
        return self.link.run(self._step, self._shutdown)

    def _step(self, events: dict) -> None:
        """One turn of the loop: link events, messages, the computes whose shards are ready, timers."""
        if self.sub_monitor in events:
            while self.sub_monitor.poll(0):
                self._sub_link.event(recv_monitor_message(self.sub_monitor)["event"])
        if self.link.dealer in events:
            self.link.drain(self.link.dealer, self._on_coordinator, "coordinator", self._on_error)
        if self.sub in events:
            self.link.drain(self.sub, self._on_published, "publisher", self._on_error)
        self._serve_ready()
        self._timers()

    def _on_error(self, msg: P.Message) -> None:
        """A bug handled a message: the request it carried (if any) is failed, the worker goes on."""
        if msg.type == P.COMPUTE:
            self._fail(msg["req"], "internal error in the worker (see its log)")

    def _timers(self) -> None:
        if self._sub_link.check():
            self.log.warning("the link to the predictions was dropped (a malformed or oversized frame?); reconnecting")
        self.link.timers(self._heartbeat)

    def _heartbeat(self) -> None:
        rss = rss_bytes()
        self._send(P.HEARTBEAT, rss=rss, peak_rss=peak_rss_bytes())
        with self._cond:  # the baseline's growth, re-observed off the request path
            before = self.adm.baseline
            if self.adm.observe_rss(rss) and abs(self.adm.baseline - before) >= 1 << 20:
                self.log.info("baseline RSS now %s (was %s): room for experts %s", format_size(self.adm.baseline),
                              format_size(before), format_size(self.adm.capacity))

    def _send(self, msg_type: str, tensor: np.ndarray | None = None, **fields: Any) -> bool:
        if self.link.send(msg_type, tensor, **fields):
            return True
        if msg_type not in (P.HELLO, P.HEARTBEAT):  # no link to the coordinator right now, or its queue is full
            self.log.warning("could not send %s: no link to the coordinator", msg_type)
        return False

    def _hello(self) -> tuple[str, dict[str, Any]]:
        return P.HELLO, dict(name=self.name, model=self.model_hash, budget=self.budget, threads=self.threads,
                             pid=os.getpid(), baseline_rss=self.baseline, resident_room=self.adm.resident_room,
                             jit_slots=self.jit_slots)

    def _unwelcome(self) -> None:
        """Forget the coordinator's schedule: a restarted coordinator knows nothing of it."""
        with self._cond:
            drops = self.adm.reset()
            shards = self._unmap_locked(drops)
            self._cond.notify_all()
        for k, s in shards:
            self._drop(k, s, "schedule reset")

    # -- messages from the coordinator -----------------------------------------------------------
    def _on_coordinator(self, msg: P.Message) -> None:
        t = msg.type
        if t == P.COMPUTE:
            self._on_compute(msg)
        elif t == P.RESIDENT:
            self._on_resident(msg)
        elif t == P.WELCOME:
            self._on_welcome(msg)
        elif t == P.HEARTBEAT:
            pass  # (the protocol allows them both ways; the coordinator's liveness is ZeroMQ's own pings)
        elif not self.link.handle_common(msg):  # (a reject, an unknown)
            self.log.warning("dropped an unexpected %s message from the coordinator", t)

    def _on_welcome(self, msg: P.Message) -> None:
        hb = float(msg["heartbeat_s"])
        if not 0.01 <= hb <= 3600:
            self.log.warning("dropped a welcome with heartbeat_s %r", msg["heartbeat_s"])
            return
        pub = msg["pub"]
        try:
            host, port = parse_endpoint(pub, "welcome.pub")
        except UserError as e:
            self.log.warning("dropped a welcome: %s", e)
            return
        # the coordinator publishes where it listens (its host; its socket's folder): never follow it elsewhere
        if pub.startswith("ipc://"):
            if not self.connect.startswith("ipc://") or os.path.dirname(host) != os.path.dirname(self.host):
                self.log.warning("dropped a welcome whose predictions endpoint %s is not next to %s", pub, self.connect)
                return
        elif host in ("*", "0.0.0.0", "[::]"):
            pub = f"tcp://{self.host}:{port}"  # the coordinator told us where it bound, not where it is
        elif host != self.host:
            self.log.warning("dropped a welcome whose predictions endpoint %s is not on %s", pub, self.host)
            return
        if pub != self._pub:
            self._sub_link.connect(pub)
            self._pub = pub
        self._worker_id = msg["worker_id"]
        self.link.welcome(hb)
        self.log.info("welcomed as worker %d (predictions from %s, heartbeat every %.3g s)", self._worker_id, pub, hb)

    def _on_published(self, msg: P.Message) -> None:
        if msg.type != P.PREFETCH:
            self.log.warning("dropped an unexpected %s message from the publisher", msg.type)
            return
        if not self.link.welcomed:
            return
        items, unknown = self._sized(ExpertId(layer, expert) for worker_id, layer, expert in msg["loads"]
                                     if worker_id == self._worker_id)
        if unknown:
            self.log.warning("prefetch step %d: no such expert in this model: %s", msg["step"], ", ".join(unknown))
        with self._cond:  # even with nothing for us: a newer step expires older predictions
            drops = self.adm.prefetch(msg["step"], items)
            shards = self._unmap_locked(drops)
            self._cond.notify_all()
        if items and self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("prefetch step %d: %s", msg["step"], " ".join(k.label for k, _ in items))
        for k, s in shards:
            self._drop(k, s, "prefetch expired")

    def _sized(self, experts: Iterable[Iterable[int]]) -> tuple[list[tuple[ExpertId, int]], list[str]]:
        """(expert, mapped bytes) of each (layer, expert) this model has, and the labels of those it lacks."""
        items, unknown = [], []
        for key in map(ExpertId._make, experts):
            entry = self.manifest.files.get(key.file_name)
            if entry is None:
                unknown.append(key.label)
            else:
                items.append((key, page_round(entry.size)))
        return items, unknown

    def _on_resident(self, msg: P.Message) -> None:
        """The coordinator's placement for this worker: keep these experts mapped (the whole set)."""
        items, unknown = self._sized(msg["experts"])
        if unknown:
            self.log.warning("resident plan %d: no such expert in this model: %s", msg["plan"], ", ".join(unknown))
        with self._cond:
            drops, refused = self.adm.set_resident(items)
            shards = self._unmap_locked(drops)
            self._cond.notify_all()
        if refused:
            self.log.warning("resident plan %d: %d experts do not fit the resident room %s (%s); they load just in time",
                             msg["plan"], len(refused), format_size(self.adm.resident_room), " ".join(k.label for k in refused))
        self.log.info("resident plan %d: %d experts (%s)", msg["plan"], len(items) - len(refused),
                      format_size(sum(size for k, size in items if k not in set(refused))))
        for k, s in shards:
            self._drop(k, s, "no longer resident")

    def _on_compute(self, msg: P.Message) -> None:
        req, layer, x = msg["req"], msg["layer"], msg.tensor
        keys = [ExpertId(layer, e) for e in msg["experts"]]
        entries = [self.manifest.files.get(k.file_name) for k in keys]
        missing = [k.label for k, entry in zip(keys, entries) if entry is None]
        if missing:
            return self._fail(req, f"no expert {', '.join(missing)} in model {self.manifest.name}")
        if x.ndim != 2 or x.shape[1] != self.n_embd:
            return self._fail(req, f"hidden states of shape {list(x.shape)}, this model needs [n, {self.n_embd}]")
        act = activation_bytes(x.shape[0], self.n_embd, self.n_ff)
        hits: list[bool] = []
        with self._cond:
            why = self.adm.check_activations(act, x.shape[0])
            if why is None and len(keys) > 1:
                cold = [k for k in keys if self.adm.state(k) is None or self.adm.state(k) == "queued"]
                if len(cold) > self.jit_slots:
                    why = (f"{len(cold)} experts to load at once, this worker has {self.jit_slots} just-in-time slots; "
                           "send fewer experts per request")
            if why is None:
                for k, entry in zip(keys, entries):
                    r = self.adm.request(k, page_round(entry.size))
                    if r.refused is not None:
                        why = r.refused
                        break
                    hits.append(r.hit)
                if why is not None:  # unpin what this request already pinned
                    drops = [k for k in keys[:len(hits)] if self.adm.release(k)]
                    shards = self._unmap_locked(drops)
                else:
                    shards = []
            else:
                shards = []
            if self.adm.queue or shards:  # the loader has work (a demand) or room; a hit wakes nobody
                self._cond.notify_all()
        for k, s in shards:
            self._drop(k, s, "request refused")
        if why is not None:
            return self._fail(req, why)
        self._pending.append(_Pending(req, layer, keys, list(msg["rows"]), x, time.perf_counter(), hits))

    def _fail(self, req: int, reason: str) -> None:
        self.log.warning("fail req %d: %s", req, reason)
        self._send(P.FAIL, req=req, reason=reason)

    # -- computing -------------------------------------------------------------------------------
    def _serve_ready(self) -> None:
        """Compute (in arrival order among the ready ones) every pending request whose shards are all
        mapped; fail those one of whose shards could not be loaded."""
        while self._pending:
            self._timers()  # a long queue of computes must not silence the heartbeats (liveness)
            with self._cond:
                for i, p in enumerate(self._pending):
                    failed = [k for k in p.keys if k in self._errors]
                    if failed or all(k in self._shards for k in p.keys):
                        break
                else:
                    return
                del self._pending[i]
                reason, shards, drops = None, [], []
                if failed:
                    reason = self._errors[failed[0]][0]
                    for k in p.keys:
                        err = self._errors.get(k)
                        if err is not None:
                            err[1] -= 1
                            if err[1] <= 0:
                                del self._errors[k]
                        elif self.adm.release(k):
                            drops.append(k)
                    dropped = self._unmap_locked(drops)
                else:
                    shards = [self._shards[k] for k in p.keys]
                    ready = max(self._loaded_at[k] for k in p.keys)
            if reason is not None:
                for k, sh in dropped:
                    self._drop(k, sh, "request failed")
                self._fail(p.req, reason)
                continue
            self._compute(p, shards, max(0.0, ready - p.t0))

    def _compute(self, p: _Pending, shards: list[SlotShard], waited: float) -> None:
        y: np.ndarray | None = None
        changed = False
        try:
            changed = not self._all_unchanged(p.keys, shards)  # before: never compute on bytes not verified
            if changed:
                raise ValueError("a shard file changed on disk since its bytes were verified")
            t = time.perf_counter()
            y = self._run_experts(p, shards)
            compute_s = time.perf_counter() - t
            changed = not self._all_unchanged(p.keys, shards)  # after: the mapping shows writes made meanwhile
            if changed:
                raise ValueError("a shard file changed on disk during the compute")
        except Exception as e:  # GGMLComputeError, a bad shape, changed bytes: fail this request, keep serving
            self._fail(p.req, f"compute of {' '.join(k.label for k in p.keys)} {'refused' if changed else 'failed'}: {e}")
            y = None
        finally:
            with self._cond:
                # (a changed shard still pinned by other requests stays mapped: each of them is refused
                # the same way, since it is no longer verified, and the last one drops it)
                drops = [k for k in p.keys if self.adm.computed(k)]
                dropped = self._unmap_locked(drops)
                if self.adm.queue:  # memory freed or shards unpinned: a waiting load may go now
                    self._cond.notify_all()
        if y is not None:
            missed = not all(p.hits)
            load_s, wait_s = (waited, 0.0) if missed else (0.0, waited)
            self._send(P.RESULT, y, req=p.req, layer=p.layer, experts=[k.expert for k in p.keys], rows=p.rows,
                       load_s=load_s, wait_s=wait_s, compute_s=compute_s, hits=sum(p.hits))
            if self.log.isEnabledFor(logging.DEBUG):
                self.log.debug("compute req %d %s: %d rows, %.2f ms (%d/%d hits, waited %.1f ms)", p.req,
                               " ".join(k.label for k in p.keys), p.x.shape[0], compute_s * 1e3, sum(p.hits), len(p.hits),
                               waited * 1e3)
        for k, sh in dropped:
            self._drop(k, sh, "computed")

    def _run_experts(self, p: _Pending, shards: list[SlotShard]) -> np.ndarray:
        """Every expert of the request on its rows; outputs in the same row order."""
        for shard, key in zip(shards, p.keys):
            if shard.layout.tensors["down"].ne[1] != p.x.shape[1]:
                raise ValueError(f"hidden states have {p.x.shape[1]} columns, expert {key.label} takes "
                                 f"{shard.layout.tensors['down'].ne[1]}")
        if len(shards) == 1:
            return self.ffn.run(shards[0], p.x)
        if all(isinstance(s, SlotShard) for s in shards) and same_layout(shards):
            return self.slot_ffn.run(shards, p.rows, p.x)  # one graph, as llama.cpp computes a layer's experts
        out = np.empty(p.x.shape, dtype=np.float32)
        lo = 0
        for shard, n in zip(shards, p.rows):
            out[lo:lo + n] = self.ffn.run(shard, p.x[lo:lo + n])
            lo += n
        return out

    # -- loading and dropping (loader thread, except drops) --------------------------------------
    def _loader_main(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop_loader:
                        return
                    d = self.adm.next_load()
                    if isinstance(d, Load):
                        evicted = self._unmap_locked(d.evict)
                        break
                    if isinstance(d, Skip):
                        self.log.warning("not loading %s: %s", d.key.label, d.reason)
                        if d.pins:
                            self._errors[d.key] = [d.reason, d.pins]
                            self._wake.wake()
                        continue
                    self._cond.wait(1.0 if isinstance(d, Wait) else None)
            for k, s in evicted:
                self._drop(k, s, f"evicted for {d.key.label}")
            t = time.perf_counter()
            try:
                shard = self._map(d.key)
            except Exception as e:  # a missing or damaged shard: fail the requests waiting for it
                reason = str(e) if isinstance(e, UserError) else f"loading {d.key.label} failed: {type(e).__name__}: {e}"
                with self._cond:
                    pins = self.adm.load_failed(d.key)
                    if pins:
                        self._errors[d.key] = [reason, pins]
                    self._cond.notify_all()
                self.log.warning("load %s failed: %s", d.key.label, reason)
                self._wake.wake()
                continue
            dt = time.perf_counter() - t
            with self._cond:
                keep = self.adm.loaded(d.key)
                if keep:
                    self._shards[d.key] = shard
                    self._loaded_at[d.key] = time.perf_counter()
                self._cond.notify_all()
            self.log.debug("load %s: %.2f ms, %d bytes", d.key.label, dt * 1e3, shard.layout.size)
            if keep:
                self._wake.wake()
            else:
                self._drop(d.key, shard, "no longer wanted")

    def _layout(self, key: ExpertId) -> ShardLayout:
        layout = self._layouts.get(key)
        if layout is None:
            rel = key.file_name
            path = self.model_dir / rel
            if not path.is_file():
                raise UserError(f"{self.model_dir}: {rel} is missing")
            layout = ShardLayout.read(path)
            if layout.size != self.manifest.files[rel].size:
                raise UserError(f"{self.model_dir}: {rel} has {layout.size} bytes, the manifest says {self.manifest.files[rel].size}")
        return layout

    def _all_unchanged(self, keys: list[ExpertId], shards: list[SlotShard]) -> bool:
        return all([self._unchanged(k, sh.layout.path) for k, sh in zip(keys, shards)])  # (each logs its own)

    def _unchanged(self, key: ExpertId, path: Path) -> bool:
        """The shard's file is still the one whose bytes were verified (one stat)."""
        try:
            same = _file_identity(path) == self._verified.get(key)
        except OSError:
            same = False
        if not same:
            self._verified.pop(key, None)  # hash it again before any further use
            self.log.warning("%s: %s changed on disk since it was verified; refusing it until its bytes match "
                             "the manifest again", key.label, path)
        return same

    def _map(self, key: ExpertId) -> SlotShard:
        """Map a shard (one sequential read, MAP_POPULATE). The first time, and whenever the file is no
        longer the one verified, the mapped bytes are hashed against the manifest: no read buffer is
        needed, and the bytes checked are the bytes computed on. Otherwise one stat before and one
        after the map show that the file was not changed."""
        rel = key.file_name
        path = self.model_dir / rel
        layout = self._layout(key)  # (a missing file is reported by name here)
        before = _file_identity(path)
        shard = self.arena.map(layout)
        if self._verified.get(key) != before:
            entry = self.manifest.files[rel]
            digest = hashlib.sha256((ctypes.c_char * layout.size).from_address(shard.address)).hexdigest()
            if digest != entry.sha256:
                shard.close()
                drop_page_cache(layout.path)
                raise UserError(f"{self.model_dir}: {rel} does not match the manifest "
                                f"(sha256 {digest[:16]}..., expected {entry.sha256[:16]}...); refused")
            if key in self._layouts:
                self.log.info("%s: %s changed on disk but its bytes match the manifest: verified again", key.label, rel)
            self._layouts[key] = layout
            self._verified[key] = before
        if _file_identity(path) != before:
            shard.close()
            self._verified.pop(key, None)
            raise UserError(f"{self.model_dir}: {rel} changed on disk while it was mapped; refused")
        return shard

    def _unmap_locked(self, keys: list[ExpertId]) -> list[tuple[ExpertId, SlotShard]]:
        """Unmap shards the admission just released, before the lock is let go: the loader may use
        their memory the moment it sees it free. (Page cache and logging follow in _drop.)"""
        out = []
        for k in keys:
            shard = self._shards.pop(k)
            shard.close()
            out.append((k, shard))
        return out

    def _drop(self, key: ExpertId, shard: SlotShard, why: str) -> None:
        shard.close()
        drop_page_cache(shard.layout.path)
        self.log.debug("drop %s (%s)", key.label, why)

    # -- shutdown --------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        self.link.bye()
        with self._cond:
            self._stop_loader = True
            self._cond.notify_all()
        self._loader.join(timeout=10)
        with self._cond:
            shards = list(self._shards.items())
            self._shards.clear()
        for k, s in shards:
            s.close()
            drop_page_cache(s.layout.path)
        self.sub.disable_monitor()
        self.sub_monitor.close(linger=0)
        self.sub.close(linger=0)
        self.link.close()  # (its DEALER lingers long enough for the bye to leave, short enough not to hang)
        self.slot_ffn.close()
        self.arena.close()
        self.compute.close()
        self.log.info("shutdown complete: peak RSS %s of budget %s", format_size(peak_rss_bytes()), format_size(self.budget))


def _mib_up(n: int) -> str:
    """n bytes as a --memory-budget value, rounded up to whole MiB."""
    return f"{-(-n // (1 << 20))}MiB"


def _tame_malloc() -> None:
    """glibc malloc for a process with a hard memory bound: large buffers (received frames, outputs)
    always come from mmap and go back to the OS when freed (no sliding threshold), few arenas."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_mmap_threshold, m_arena_max = -3, -8
    mallopt(m_mmap_threshold, 128 << 10)
    mallopt(m_arena_max, 2)

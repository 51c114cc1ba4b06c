"""`edgemoe shadow`: the shadow predictor (SEP) on its own node, as in the paper's testbed.

The node holds the model directory's trunk and shadow experts. It keeps a mirror of the main
model's K/V cache, fed by the coordinator's `kv_rows`, and for every `job` (the main model started
a token) runs the same ShadowPredictor the coordinator would run in process, with the mirror in
the main model's place: token and KV alignment work unchanged. Each layer's routing is sent back
(`routes`) from the shadow's thread through a queue the moment it exists.

Threads: main (ZeroMQ loop: DEALER to the coordinator's shadow ROUTER, heartbeats), a builder that
makes the mirror and the shadow after a welcome (seconds on a board: the loop keeps heartbeating
meanwhile, so the coordinator can hold the node to the workers' 3-interval liveness rule; the
node says `shadow_ready` when it is done), and the shadow's own decoding thread inside
ShadowPredictor. The node cannot build before its hello: the context size comes in the welcome.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from edgemoe.cluster import protocol as P
from edgemoe.cluster.keys import ClientKeys
from edgemoe.cluster.sockets import Relinker, WakePipe, dealer_socket, handshake_failure, monitor_events
from edgemoe.cluster.worker import HELLO_INTERVAL_S, check_name, parse_endpoint
from edgemoe.errors import UserError
from edgemoe.format.manifest import load_manifest, manifest_hash
from edgemoe.model.engine import Engine
from edgemoe.model.kvcache import AttentionOptions
from edgemoe.model.experts import ExpertBackend, ExpertStats
from edgemoe.predict.base import PredictorOptions
from edgemoe.util.proc import peak_rss_bytes, rss_bytes

DEPTH = 1 << 20  # the node sends every layer's routing; the coordinator decides how far ahead to use it


def _kv_row_bytes(model_dir: Path) -> int:
    """Bytes of one K/V row of every layer: a kv_rows message carries at least one (its frame limit)."""
    from gguf import GGUFReader

    from edgemoe.format.gguf_io import metadata
    from edgemoe.format.manifest import TRUNK_NAME
    from edgemoe.model.config import ModelConfig

    trunk = model_dir / TRUNK_NAME
    cfg = ModelConfig.from_metadata(metadata(GGUFReader(trunk)), str(trunk))
    return cfg.n_layer * 2 * cfg.n_embd_kv * 4


class _NoExperts(ExpertBackend):
    """The mirror engine only holds the main model's K/V cache and trunk; it never evaluates."""

    def __init__(self) -> None:
        self.stats = ExpertStats()

    def compute(self, layer: int, expert: int, hidden: np.ndarray) -> np.ndarray:
        raise RuntimeError("the shadow node's mirror of the main model computes no experts")


class ShadowNode:
    """Serve one coordinator's shadow predictions until SIGTERM/SIGINT (exit 0) or a REJECT (UserError)."""

    def __init__(self, connect: str, model_dir: str | os.PathLike[str], name: str, options: PredictorOptions,
                 *, hello_interval: float = HELLO_INTERVAL_S, keys: ClientKeys | None = None,
                 attention: AttentionOptions | None = None) -> None:
        self.host, _ = parse_endpoint(connect)
        self.keys = keys
        self.attention = attention or AttentionOptions()  # the mirror's KV cache types and flash attention
        self.connect = connect
        self.name = check_name(name)
        if options.shadow_threads < 1:
            raise UserError(f"--threads must be at least 1, got {options.shadow_threads}")
        if options.align_token < 0 or options.align_kv < 0:
            raise UserError("--align-token and --align-kv must be 0 (never) or more")
        self.model_dir = Path(model_dir)
        self.manifest = load_manifest(self.model_dir)
        if self.manifest.shadow is None:
            raise UserError(f"{self.model_dir}: no shadow experts; convert with `edgemoe convert SRC OUT --shadow-type TYPE`")
        self.model_hash = manifest_hash(self.model_dir)
        self.max_frame = P.frame_limit(max(P.KV_CHUNK_BYTES, _kv_row_bytes(self.model_dir)))
        # the shadow is this node's only work: no lowered priority (on a shared host it would starve)
        self.options = dataclasses.replace(options, yield_cpu=False)
        self.hello_interval = hello_interval
        self.log = logging.getLogger(f"edgemoe.shadow.{name}")
        self.mirror: Engine | None = None
        self.predictor = None
        self._want_ctx = 0  # the context the last welcome asked for (0: none to build)
        self._builder_ctx = 0  # ... the one the builder works on, and the one the built shadow was asked for
        self._shadow_ctx = 0
        self._builder: threading.Thread | None = None
        self._built: tuple[Engine, Any] | BaseException | None = None  # the builder's result, for the loop
        self._gens: dict[int, int] = {}  # the predictor's job gen -> the coordinator's
        self._out: queue.SimpleQueue[tuple[int, int, list[int]]] = queue.SimpleQueue()
        self._welcomed = False
        self._stopping = False
        self._reject: str | None = None
        self._heartbeat_s = 1.0
        self._next_hello = self._next_heartbeat = 0.0
        self._wake = WakePipe()

    # -- the shadow ------------------------------------------------------------------------------
    def _want_shadow(self, n_ctx: int) -> None:
        """After a welcome: say ready at once if the shadow for n_ctx exists, else build it on the
        builder thread (one at a time; a welcome for another context while one builds waits for it)."""
        self._want_ctx = n_ctx
        if self.mirror is not None and self._shadow_ctx == n_ctx:
            self._say_ready()
        elif self._builder is None:
            self._stop_shadow()
            self._builder_ctx = n_ctx
            self._builder = threading.Thread(target=self._build, args=(n_ctx,), name="edgemoe-shadow-build", daemon=True)
            self._builder.start()

    def _build(self, n_ctx: int) -> None:
        """On the builder thread: the mirror and the shadow predictor; the loop installs them."""
        from edgemoe.predict.shadow import ShadowPredictor

        mirror = None
        try:
            mirror = Engine(self.model_dir, n_ctx=n_ctx, n_threads=1, experts=_NoExperts(), attention=self.attention)
            predictor = ShadowPredictor(mirror, DEPTH, self.options)
            self._built = (mirror, predictor)
        except BaseException as e:  # the loop reports it: this node cannot predict
            if mirror is not None:
                mirror.close()
            self._built = e
        self._wake.wake()

    def _install_built(self) -> None:
        """In the loop: take what the builder made (or the reason it could not)."""
        if self._builder is None or self._built is None:  # (set as the builder's last step)
            return
        self._builder.join()
        self._builder, built, self._built = None, self._built, None
        if isinstance(built, BaseException):  # e.g. a context too large for this board: the node stays up
            failed = self._builder_ctx
            self.log.error("cannot build the shadow for a context of %d (%s: %s); not ready until a welcome with "
                           "another context", failed, type(built).__name__, built)
            if self._want_ctx == failed:
                self._want_ctx = 0
        else:
            self.mirror, self.predictor = built
            self._shadow_ctx = self._builder_ctx  # (the engine may have clamped it to the model's context)
            self.predictor.on_publish = self._on_publish
            self.log.info("shadow ready: %s experts, context %d, alignment T%dKV%d", self.predictor.files.type,
                          self.mirror.n_ctx, self.options.align_token, self.options.align_kv)
        if self._want_ctx:
            self._want_shadow(self._want_ctx)  # ready, or rebuilt for a context asked for meanwhile

    def _say_ready(self) -> None:
        if self._welcomed:
            self._send(P.SHADOW_READY, n_ctx=self._shadow_ctx)

    def _stop_shadow(self) -> None:
        if self.predictor is not None:
            self.predictor.close()
            self.predictor = None
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None

    def _on_publish(self, gen: int, layer: int, experts: list[int]) -> None:
        """On the shadow's thread: hand the routing to the ZeroMQ loop and wake it."""
        self._out.put((gen, layer, experts))
        self._wake.wake()

    # -- the loop --------------------------------------------------------------------------------
    def _setup(self) -> None:
        self.ctx = zmq.Context(io_threads=1)
        self.dealer = dealer_socket(self.ctx, self.max_frame, self.keys)
        self.monitor = self.dealer.get_monitor_socket(monitor_events())
        self._handshake_warned = False
        self._link_down = False
        self._link = Relinker(self.dealer)
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.poller.register(self._wake.r, zmq.POLLIN)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self._link.connect(self.connect)
        self.log.info("connecting to %s as %r (model %s)", self.connect, self.name, self.model_hash[:12])

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stopping = True
        self._wake.wake()

    def run(self) -> int:
        self._setup()
        try:
            while not self._stopping and self._reject is None:
                now = time.monotonic()
                due = self._next_heartbeat if self._welcomed else self._next_hello
                events = dict(self.poller.poll(max(0, min(1000, int((due - now) * 1000) + 1))))
                if self._wake.r in events:
                    self._wake.clear()
                if self.monitor in events:
                    self._on_monitor()
                if self.dealer in events:
                    self._drain()
                self._install_built()
                self._send_routes()
                self._timers()
        finally:
            self._shutdown()
        if self._reject is not None:
            raise UserError(f"the coordinator rejected this shadow node: {self._reject}")
        return 0

    def _on_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._link.event(ev["event"])
            failure = handshake_failure(ev["event"], self.connect)
            if failure is not None and not self._handshake_warned:
                self.log.warning("%s; retrying", failure)
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_warned = False
                if self._link_down:  # a new connection: the coordinator knows this node by it, say hello again
                    self.log.info("reconnect: link to %s is back; saying hello again", self.connect)
                    self._welcomed, self._next_hello = False, 0.0
                self._link_down = False
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self._link_down = True
            elif failure is not None:
                self._handshake_warned = True

    def _send(self, msg_type: str, tensor: np.ndarray | None = None, **fields: Any) -> bool:
        try:
            self.dealer.send_multipart(P.encode(msg_type, tensor, **fields), zmq.NOBLOCK)
            return True
        except zmq.Again:  # no link right now (IMMEDIATE): a hello is retried, a routing is simply late
            return False

    def _timers(self) -> None:
        if self._link.check():
            self.log.warning("the link to the coordinator was dropped (a malformed or oversized frame?); reconnecting")
        now = time.monotonic()
        if not self._welcomed and now >= self._next_hello:
            sent = self._send(P.SHADOW_HELLO, name=self.name, model=self.model_hash, pid=os.getpid(),
                              shadow_type=str(self.manifest.shadow["type"]))
            self._next_hello = now + (self.hello_interval if sent else 0.1)
        elif self._welcomed and now >= self._next_heartbeat:
            self._send(P.HEARTBEAT, rss=rss_bytes(), peak_rss=peak_rss_bytes())
            self._next_heartbeat = now + self._heartbeat_s

    def _send_routes(self) -> None:
        while True:
            try:
                gen, layer, experts = self._out.get_nowait()
            except queue.Empty:
                return
            remote = self._gens.get(gen)
            if remote is not None and self._welcomed:
                self._send(P.ROUTES, gen=remote, layer=layer, experts=experts)

    def _drain(self) -> None:
        for _ in range(1000):  # bounded: routings and timers get their turn
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = P.decode(frames)
            except P.ProtocolError as e:
                self.log.warning("dropped a malformed message from the coordinator: %s", e)
                continue
            try:
                self._handle(msg)
            except Exception:  # a bug must not take the node down; predictions are only ever late
                self.log.exception("error handling %s", msg.type)

    def _handle(self, msg: P.Message) -> None:
        t = msg.type
        if t == P.SHADOW_WELCOME:
            hb, n_ctx = float(msg["heartbeat_s"]), int(msg["n_ctx"])
            if not (0.01 <= hb <= 3600 and 0 < n_ctx <= 1 << 24):
                self.log.warning("dropped a welcome with heartbeat_s %r, n_ctx %r", msg["heartbeat_s"], msg["n_ctx"])
                return
            # heartbeats from now on, also while the shadow is built (the coordinator's liveness rule)
            self._heartbeat_s, self._welcomed, self._next_heartbeat = hb, True, time.monotonic()
            self._gens.clear()
            self.log.info("welcomed (heartbeat every %.3g s)", hb)
            self._want_shadow(n_ctx)
        elif t == P.REJECT:
            self.log.error("rejected by the coordinator: %s", msg["reason"])
            self._reject = msg["reason"]
        elif t == P.UNKNOWN_PEER:
            self.log.info("reconnect: the coordinator does not know this node (restarted?); saying hello again")
            self._welcomed, self._next_hello = False, 0.0
        elif not self._welcomed or self.mirror is None:
            self.log.warning("dropped a %s message before being welcomed and ready", t)
        elif t == P.KV_ROWS:
            self._kv_rows(msg)
        elif t == P.JOB:
            self._job(msg)
        else:
            self.log.warning("dropped an unexpected %s message from the coordinator", t)

    def _kv_rows(self, msg: P.Message) -> None:
        kv, cfg = self.mirror.kv, self.mirror.cfg
        rows, lo = msg.tensor, msg["lo"]
        n = rows.shape[2] if rows.ndim == 4 else 0
        if rows.shape != (cfg.n_layer, 2, n, cfg.n_embd_kv) or not 0 <= lo <= kv.n_ctx - n:
            self.log.warning("dropped K/V rows of shape %s at %d (the model needs [%d, 2, n, %d] within %d rows)",
                             list(rows.shape), lo, cfg.n_layer, cfg.n_embd_kv, kv.n_ctx)
            return
        for il in range(cfg.n_layer):
            kv.write_f32(il, lo, rows[il, 0], rows[il, 1])
        kv.mark_used(lo + n)

    def _job(self, msg: P.Message) -> None:
        tokens, pos = msg["tokens"], msg["pos"]
        cfg = self.mirror.cfg
        if pos + len(tokens) > self.mirror.n_ctx or any(t >= cfg.n_vocab for t in tokens):
            self.log.warning("dropped a job of %d tokens at %d (context %d, vocabulary %d)", len(tokens), pos,
                             self.mirror.n_ctx, cfg.n_vocab)
            return
        self.mirror.n_past = pos
        gen = self.predictor._on_main_eval(self.mirror, np.array(tokens, dtype=np.int32))
        self._gens = {g: r for g, r in self._gens.items() if g > gen - 8}  # routings of older jobs are stale
        self._gens[gen] = msg["gen"]

    def _shutdown(self) -> None:
        if self._reject is None:
            self.log.info("shutdown: saying bye")
            self._send(P.BYE)
        if self._builder is not None:  # a build cannot be interrupted: let it end, then close what it made
            self._builder.join(timeout=120)
            built = self._built
            if isinstance(built, tuple):
                self.mirror, self.predictor = built
        self._stop_shadow()
        self.dealer.disable_monitor()
        self.monitor.close(linger=0)
        self.dealer.close(linger=200)
        self.ctx.term()
        self._wake.close()
        self.log.info("shutdown complete: peak RSS %.0f MiB", peak_rss_bytes() / 2**20)

"""The shadow predictor (SEP) on its own node, as in the paper's testbed: the coordinator's side.

The coordinator binds a ROUTER for one shadow node (`edgemoe shadow --connect`). When the main model
starts a token it sends the node the K/V rows the main model finished since the last send and the
token (`kv_rows`, `job`); the node decodes it with its shadow experts and sends each layer's router
choice back the moment it exists (`routes`). The coordinator takes whatever has arrived whenever it
asks (begin_token, after_router, poll): a shadow that is slow, gone or never came only means fewer
predictions, never other results. The node is held to the workers' liveness rule: silent for
LOST_AFTER heartbeat intervals, it is dropped (nothing more is sent to it) until it says hello
again; it heartbeats while it builds its shadow and says `shadow_ready` when done. Protocol:
docs/PROTOCOL.md ("The shadow node").
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import zmq

from edgemoe.cluster import protocol as P
from edgemoe.cluster.coordinator import LOST_AFTER
from edgemoe.cluster.keys import Authenticator, ServerKeys, peer_key
from edgemoe.cluster.sockets import bind_endpoint, model_mismatch
from edgemoe.errors import UserError
from edgemoe.format.manifest import manifest_hash
from edgemoe.predict.base import Predictor
from edgemoe.predict.baselines import upcoming

log = logging.getLogger("edgemoe.coordinator.shadow")

class RemoteShadowPredictor(Predictor):
    """Predictions from a shadow node; construct, then wait_for_shadow()."""

    name = "shadow"
    follows_one_sequence = True

    def __init__(self, main, depth: int, bind: str = "tcp://127.0.0.1:0", heartbeat_s: float = 1.0,
                 keys: ServerKeys | None = None) -> None:
        self.main = main
        self.depth = depth
        self.moe_layers: list[int] = list(main.moe_layers)
        self.model_hash = manifest_hash(main.model_dir)
        self.heartbeat_s = heartbeat_s
        self._zctx = zmq.Context()
        self.auth = Authenticator(self._zctx, keys) if keys is not None else None
        self.sock = self._zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.frame_limit())  # a node sends headers only
        if self.auth is not None:
            self.auth.arm(self.sock)
        try:
            self.endpoint = bind_endpoint(self.sock, bind)
        except zmq.ZMQError as e:
            self.close()
            raise UserError(f"cannot bind the shadow endpoint {bind}: {e}") from None
        self._peer: bytes | None = None  # the node's connection
        self._peer_key: bytes | None = None  # ... and who it is (its public key)
        self._node_ready = False  # the node has built its shadow (it said shadow_ready after the welcome)
        self._peer_name = ""
        self._last_seen = 0.0
        self._sent_to = 0  # the node holds the main model's K/V rows [0, sent_to)
        self._gen = 0
        self._routes: dict[int, list[int]] = {}
        self._sent_at = 0.0
        self._first_route_s: list[float] = []  # per job: from sending it to its first route
        self._jobs = self._routes_received = self._dropped = self._lost = 0
        self.lost_at: float | None = None  # when the node was last dropped for silence (time.monotonic())
        self._welcomed_at = 0.0
        self.build_s: float | None = None  # the node's last welcome to its shadow_ready
        main.eval_listeners.append(self._on_main_eval)
        log.info("serving a shadow node on %s", self.endpoint)

    # the node joining ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._peer is not None and self._node_ready

    def wait_for_shadow(self, timeout_s: float, check: "Callable[[], None] | None" = None) -> None:
        """Serve hellos until the shadow node has joined and is ready; check() may raise to give up early."""
        deadline = time.monotonic() + timeout_s
        while not self.connected:
            if check is not None:
                check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(f"no shadow node joined {self.endpoint} within {timeout_s:.0f} s "
                                f"(start one: edgemoe shadow --connect {self.endpoint} --model DIR)")
            self._drain(min(left, 0.2))

    def _silent(self) -> bool:
        return time.monotonic() - self._last_seen > LOST_AFTER * self.heartbeat_s

    def _hello(self, identity: bytes, key: bytes, msg: P.Message) -> None:
        if msg["model"] != self.model_hash:
            reason = model_mismatch("shadow node", msg["name"], msg["model"], self.model_hash if self.auth else None)
            log.warning("refused shadow node %s: %s", msg["name"], reason)
            self._send(identity, P.encode(P.REJECT, reason=reason))
            return
        if self._peer is not None and self._peer != identity:
            if not self._silent():  # another connection while the node still answers: the node stays
                log.warning("ignored a hello from shadow node %s on a second connection while %s answers",
                            msg["name"], self._peer_name)
                return
            log.info("shadow node %s replaces %s", msg["name"], self._peer_name)
        self._peer, self._peer_key, self._peer_name, self._last_seen = identity, key, msg["name"], time.monotonic()
        self._node_ready = False
        self._sent_to = 0  # a (re)joined node holds none of the main model's rows
        log.info("shadow node %s joined (%s shadow, pid %d)", msg["name"], msg["shadow_type"], msg["pid"])
        self._welcomed_at = time.monotonic()
        self._send(identity, P.encode(P.SHADOW_WELCOME, heartbeat_s=self.heartbeat_s, n_ctx=self.main.n_ctx))

    # the main model's side ----------------------------------------------------------------------
    def _on_main_eval(self, engine, tokens: np.ndarray) -> None:
        pos = int(engine.n_past)
        self._gen += 1
        self._routes = {}
        self._drain(0)
        if not self.connected:
            return
        self._sent_to = min(self._sent_to, pos)  # the main model went back: those rows are new
        kv = engine.kv
        rows_per_message = max(1, P.KV_CHUNK_BYTES // (2 * len(kv.k) * kv.n_embd_kv * 4))
        for lo in range(self._sent_to, pos, rows_per_message):
            hi = min(pos, lo + rows_per_message)
            # float32 on the wire whatever the cache types (the shadow node stores them in its own)
            rows = np.stack([np.stack(kv.read_f32(il, lo, hi)) for il in range(len(kv.k))])
            self._send(self._peer, P.encode(P.KV_ROWS, rows, lo=lo))
        self._sent_to = pos
        self._send(self._peer, P.encode(P.JOB, gen=self._gen, pos=pos, tokens=[int(t) for t in tokens]))
        self._sent_at = time.perf_counter()
        self._jobs += 1

    def _ready(self, current: int) -> dict[int, list[int]]:
        self._drain(0)
        return {l: self._routes[l] for l in upcoming(self.moe_layers, current, self.depth) if l in self._routes}

    def begin_token(self, step: int) -> dict[int, list[int]]:
        return self._ready(-1)

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        return self._ready(layer)

    def poll(self, current: int) -> dict[int, list[int]]:
        return self._ready(current)

    # messages -----------------------------------------------------------------------------------
    def _send(self, identity: bytes, frames: list) -> None:
        try:
            self.sock.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the node's queue is full or it is gone: this prediction is lost, nothing else
            self._dropped += 1

    def _drain(self, timeout_s: float) -> None:
        if timeout_s > 0:
            self.sock.poll(int(timeout_s * 1000), zmq.POLLIN)
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            identity = frames[0].bytes
            key = peer_key(frames[-1]) if self.auth is not None else identity
            if key is None:
                log.warning("dropped a message without an authenticated key on the shadow socket")
                continue
            try:
                self._handle(identity, key, frames[1:])
            except Exception:  # a bug in handling one message must not end the run; predictions are optional
                log.exception("error handling a message on the shadow socket; dropped")
        if self._peer is not None and self._silent():
            log.warning("shadow node %s was silent for %.1f s (heartbeat every %g s); predicting without it until "
                        "it is back", self._peer_name, time.monotonic() - self._last_seen, self.heartbeat_s)
            self._peer, self._node_ready = None, False
            self._lost += 1
            self.lost_at = time.monotonic()

    def _handle(self, identity: bytes, key: bytes, frames: list) -> None:
        try:
            msg = P.decode(frames)
        except P.ProtocolError as e:
            log.warning("dropped a malformed message on the shadow socket: %s", e)
            return
        if msg.type == P.SHADOW_HELLO:
            self._hello(identity, key, msg)
            return
        if identity != self._peer or key != self._peer_key:
            self._send(identity, P.encode(P.UNKNOWN_PEER))
            return
        self._last_seen = time.monotonic()
        if msg.type == P.ROUTES:
            if msg["gen"] == self._gen and msg["layer"] in self.moe_layers and len(msg["experts"]) and \
                    all(e < self.main.cfg.n_expert for e in msg["experts"]):
                if not self._routes:
                    self._first_route_s.append(time.perf_counter() - self._sent_at)
                self._routes[msg["layer"]] = list(msg["experts"])
                self._routes_received += 1
        elif msg.type == P.HEARTBEAT:
            pass  # liveness only (it heartbeats while it builds its shadow too)
        elif msg.type == P.SHADOW_READY:
            if msg["n_ctx"] != self.main.n_ctx:  # a build for an earlier welcome's context
                log.warning("dropped a shadow_ready for context %d from %s (this coordinator's is %d)",
                            msg["n_ctx"], self._peer_name, self.main.n_ctx)
            elif not self._node_ready:
                self.build_s = time.monotonic() - self._welcomed_at
                log.info("shadow node %s is ready (%.2f s after its welcome)", self._peer_name, self.build_s)
                self._node_ready = True
        elif msg.type == P.BYE:
            log.info("shadow node %s left", self._peer_name)
            self._peer, self._node_ready = None, False
        else:
            log.warning("dropped an unexpected %s message from the shadow node", msg.type)

    def stats(self) -> dict:
        ms = np.array(self._first_route_s) * 1e3
        return {
            "remote": self.endpoint,
            "node": self._peer_name,
            "connected": self.connected,
            "lost": self._lost,  # times the node went silent
            "jobs": self._jobs,
            "routes": self._routes_received,
            "dropped_sends": self._dropped,
            "first_route_ms": {"n": len(ms), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90))}
            if len(ms) else {"n": 0},
        }

    def close(self) -> None:
        main = getattr(self, "main", None)
        if main is not None and self._on_main_eval in main.eval_listeners:
            main.eval_listeners.remove(self._on_main_eval)
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close(0)
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        self._zctx.term()

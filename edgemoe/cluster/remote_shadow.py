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

from edgemoe.cluster import protocol as P
from edgemoe.cluster.keys import ServerKeys
from edgemoe.cluster.link import Peer, RouterLink
from edgemoe.errors import UserError
from edgemoe.format.manifest import manifest_hash
from edgemoe.model.hooks import StepHooks
from edgemoe.predict.base import Predictor, upcoming

log = logging.getLogger("edgemoe.coordinator.shadow")

class RemoteShadowPredictor(Predictor, StepHooks):
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
        # a node sends headers only; every message of a stranger is answered (one node: no flood to fear)
        self.link = RouterLink(bind, keys=keys, max_frame=P.frame_limit(), heartbeat_s=heartbeat_s, log=log,
                               what="the shadow endpoint ", unknown_every_s=0.0)
        self.endpoint, self.sock, self.auth = self.link.endpoint, self.link.sock, self.link.auth
        self._node: Peer | None = None  # the node: its connection, its key, its heartbeats (None: none or lost)
        self._node_ready = False  # the node has built its shadow (it said shadow_ready after the welcome)
        self._peer_name = ""
        self._peak_rss = 0  # the highest the nodes' heartbeats reported
        self._sent_to = 0  # the node holds the main model's K/V rows [0, sent_to)
        self._gen = 0
        self._routes: dict[int, list[int]] = {}
        self._sent_at = 0.0
        self._first_route_s: list[float] = []  # per job: from sending it to its first route
        self._jobs = self._routes_received = self._dropped = self._lost = 0
        self.lost_at: float | None = None  # when the node was last dropped for silence (time.monotonic())
        self._welcomed_at = 0.0
        self.build_s: float | None = None  # the node's last welcome to its shadow_ready
        main.hooks.append(self)
        log.info("serving a shadow node on %s", self.endpoint)

    # the node joining ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._node is not None and self._node_ready

    @property
    def _peer(self) -> bytes | None:
        """The node's connection (None: no node)."""
        return self._node.identity if self._node is not None else None

    @property
    def _peer_key(self) -> bytes | None:
        """Who the node is: its public key (without keys: its connection)."""
        return self._node.key if self._node is not None else None

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

    def _hello(self, identity: bytes, key: bytes, msg: P.Message) -> None:
        if self.link.refuse_model(identity, key, "shadow node", msg["name"], msg["model"], self.model_hash):
            return
        if self._node is not None and self._node.identity != identity:
            if self.link.silent_for(self._node) is None:  # another connection while the node still answers: it stays
                log.warning("ignored a hello from shadow node %s on a second connection while %s answers",
                            msg["name"], self._peer_name)
                return
            log.info("shadow node %s replaces %s", msg["name"], self._peer_name)
        self._node = Peer(identity, key, msg["name"], time.monotonic())
        self._peer_name = msg["name"]
        self._node_ready = False
        self._sent_to = 0  # a (re)joined node holds none of the main model's rows
        log.info("shadow node %s joined (%s shadow, pid %d)", msg["name"], msg["shadow_type"], msg["pid"])
        self._welcomed_at = time.monotonic()
        self._send(identity, P.encode(P.SHADOW_WELCOME, heartbeat_s=self.heartbeat_s, n_ctx=self.main.n_ctx))

    # the main model's side ----------------------------------------------------------------------
    def on_step(self, engine, tokens: np.ndarray) -> None:
        pos = int(engine.n_past)
        self._gen += 1
        self._routes = {}
        self._drain(0)
        if not self.connected:
            return
        self._sent_to = min(self._sent_to, pos)  # the main model went back: those rows are new
        kv = engine.kv
        rows_per_message = max(1, P.KV_CHUNK_BYTES // (2 * len(kv.k) * kv.row_width * 4))
        for lo in range(self._sent_to, pos, rows_per_message):
            hi = min(pos, lo + rows_per_message)
            # float32 on the wire whatever the cache types (the shadow node stores them in its own)
            rows = np.stack([kv.read_f32_stacked(il, lo, hi) for il in range(len(kv.k))])
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
        if not self.link.send(identity, frames, block=False):
            self._dropped += 1  # the node's queue is full or it is gone: this prediction is lost, nothing else

    def _drain(self, timeout_s: float) -> None:
        """Serve what the node sent (waiting up to timeout_s); drop the node if it was silent too long."""
        self.link.receive(timeout_s, self._handle)
        quiet = self.link.silent_for(self._node) if self._node is not None else None
        if quiet is not None:
            log.warning("shadow node %s was silent for %.1f s (heartbeat every %g s); predicting without it until "
                        "it is back", self._peer_name, quiet, self.heartbeat_s)
            self._node, self._node_ready = None, False
            self._lost += 1
            self.lost_at = time.monotonic()

    def _handle(self, identity: bytes, key: bytes, frames: list) -> None:
        msg = self.link.decode(identity, frames, "the shadow socket")
        if msg is None:
            return
        if msg.type == P.SHADOW_HELLO:
            self._hello(identity, key, msg)
            return
        node = self._node
        if node is None or identity != node.identity or key != node.key:
            self.link.unknown(identity)
            return
        self.link.heard(node, msg)  # liveness (it heartbeats while it builds its shadow too); memory figures
        self._peak_rss = max(self._peak_rss, node.peak_rss)
        if msg.type == P.ROUTES:
            if msg["gen"] == self._gen and msg["layer"] in self.moe_layers and len(msg["experts"]) and \
                    all(e < self.main.cfg.n_expert for e in msg["experts"]):
                if not self._routes:
                    self._first_route_s.append(time.perf_counter() - self._sent_at)
                self._routes[msg["layer"]] = list(msg["experts"])
                self._routes_received += 1
        elif msg.type == P.HEARTBEAT:
            pass  # (heard above)
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
            self._node, self._node_ready = None, False
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
            "node_peak_rss": self._peak_rss,  # from its heartbeats (0: none yet)
            "first_route_ms": {"n": len(ms), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90))}
            if len(ms) else {"n": 0},
        }

    def close(self) -> None:
        main = getattr(self, "main", None)
        if main is not None and self in main.hooks:
            main.hooks.remove(self)
        if getattr(self, "link", None) is not None:
            self.link.close()

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
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.cluster import protocol as P
from edgemoe.cluster.keys import ClientKeys
from edgemoe.cluster.link import HELLO_INTERVAL_S, DealerLink, check_name, parse_endpoint
from edgemoe.cluster.sockets import WakePipe
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
    return cfg.n_layer * 2 * max(cfg.n_embd_kv, cfg.n_embd_v) * 4


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
        self.link: DealerLink | None = None  # made by run()
        self._wake: WakePipe | None = None  # the link's: the builder's and the shadow thread's way to wake the loop

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
        if self.link is not None and self.link.welcomed:
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
        self.link = DealerLink(self.connect, max_frame=self.max_frame, keys=self.keys, log=self.log,
                               role="shadow node", hello=self._hello, hello_interval=self.hello_interval)
        self._wake = self.link.wake
        self.link.start()
        self.log.info("connecting to %s as %r (model %s)", self.connect, self.name, self.model_hash[:12])

    def _hello(self) -> tuple[str, dict[str, Any]]:
        return P.SHADOW_HELLO, dict(name=self.name, model=self.model_hash, pid=os.getpid(),
                                    shadow_type=str(self.manifest.shadow["type"]))

    def run(self) -> int:
        self._setup()
        return self.link.run(self._step, self._shutdown)

    def _step(self, events: dict) -> None:
        """One turn of the loop: messages, a shadow the builder finished, routings to send, timers."""
        if self.link.dealer in events:
            self.link.drain(self.link.dealer, self._handle, "coordinator")
        self._install_built()
        self._send_routes()
        self.link.timers(lambda: self._send(P.HEARTBEAT, rss=rss_bytes(), peak_rss=peak_rss_bytes()))

    def _send(self, msg_type: str, tensor: np.ndarray | None = None, **fields: Any) -> bool:
        # no link right now (IMMEDIATE): a hello is retried, a routing is simply late
        return self.link.send(msg_type, tensor, **fields)

    def _send_routes(self) -> None:
        while True:
            try:
                gen, layer, experts = self._out.get_nowait()
            except queue.Empty:
                return
            remote = self._gens.get(gen)
            if remote is not None and self.link.welcomed:
                self._send(P.ROUTES, gen=remote, layer=layer, experts=experts)

    def _handle(self, msg: P.Message) -> None:
        t = msg.type
        if t == P.SHADOW_WELCOME:
            hb, n_ctx = float(msg["heartbeat_s"]), int(msg["n_ctx"])
            if not (0.01 <= hb <= 3600 and 0 < n_ctx <= 1 << 24):
                self.log.warning("dropped a welcome with heartbeat_s %r, n_ctx %r", msg["heartbeat_s"], msg["n_ctx"])
                return
            # heartbeats from now on, also while the shadow is built (the coordinator's liveness rule)
            self.link.welcome(hb)
            self._gens.clear()
            self.log.info("welcomed (heartbeat every %.3g s)", hb)
            self._want_shadow(n_ctx)
        elif self.link.handle_common(msg):  # a reject, an unknown
            pass
        elif not self.link.welcomed or self.mirror is None:
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
        if rows.shape != (cfg.n_layer, 2, n, kv.row_width) or not 0 <= lo <= kv.n_ctx - n:
            self.log.warning("dropped K/V rows of shape %s at %d (the model needs [%d, 2, n, %d] within %d rows)",
                             list(rows.shape), lo, cfg.n_layer, kv.row_width, kv.n_ctx)
            return
        for il in range(cfg.n_layer):
            kv.write_f32_stacked(il, lo, rows[il])
        kv.mark_used(lo + n)

    def _job(self, msg: P.Message) -> None:
        tokens, pos = msg["tokens"], msg["pos"]
        cfg = self.mirror.cfg
        if pos + len(tokens) > self.mirror.n_ctx or any(t >= cfg.n_vocab for t in tokens):
            self.log.warning("dropped a job of %d tokens at %d (context %d, vocabulary %d)", len(tokens), pos,
                             self.mirror.n_ctx, cfg.n_vocab)
            return
        self.mirror.n_past = pos
        gen = self.predictor.on_step(self.mirror, np.array(tokens, dtype=np.int32))
        self._gens = {g: r for g, r in self._gens.items() if g > gen - 8}  # routings of older jobs are stale
        self._gens[gen] = msg["gen"]

    def _shutdown(self) -> None:
        self.link.bye()
        if self._builder is not None:  # a build cannot be interrupted: let it end, then close what it made
            self._builder.join(timeout=120)
            built = self._built
            if isinstance(built, tuple):
                self.mirror, self.predictor = built
        self._stop_shadow()
        self.link.close()
        self.log.info("shutdown complete: peak RSS %.0f MiB", peak_rss_bytes() / 2**20)

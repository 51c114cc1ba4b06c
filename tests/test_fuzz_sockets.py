"""Fuzz every socket with hostile messages of every type from an authenticated peer (hypothesis):
0 crashes, memory flat, exact results afterwards. Sockets: the coordinator's worker ROUTER, a
worker's DEALER and SUB, the coordinator's shadow ROUTER, the shadow node's DEALER. Real processes
on loopback, bounded in count (max_examples) and time; stopped by pid in finally blocks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings

from edgemoe.cluster import keys as K
from edgemoe.cluster import protocol as P
from edgemoe.cluster.remote_shadow import RemoteShadowPredictor
from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.cluster.sockets import Relinker
from edgemoe.format.manifest import manifest_hash
from edgemoe.model.engine import Engine
from tests.experts_ref import ExpertsReference
from edgemoe.model.generate import greedy_tokens
from edgemoe.util.proc import rss_bytes
from tests.fuzzing import batches
from tests.test_security import PROMPT, Q8, hidden, key_flags, keyfile, spawn_node, spawn_worker, stop

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])
MiB = 1 << 20


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def rogue(ctx: zmq.Context, endpoint: str, pair: K.KeyPair, server: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.sndhwm = 100_000
    K.arm_client(s, K.ClientKeys(pair, server))
    s.connect(endpoint)
    return s


def send_all(sock: zmq.Socket, batch: list[list[bytes]]) -> None:
    for frames in batch:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass


# -- the coordinator's worker socket ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_engine(converted_models: dict[str, Path]) -> Iterator[Engine]:
    with open_engine(converted_models[Q8], ClusterOptions(workers=2, predictor="lookahead"), n_ctx=128, n_threads=1) as e:
        yield e


def test_coordinator_worker_socket(cluster_engine: Engine, converted_models: dict[str, Path]) -> None:
    engine, cluster = cluster_engine, cluster_engine.experts
    with Engine(converted_models[Q8], n_ctx=128, n_threads=1) as ref:
        want = greedy_tokens(ref, PROMPT, 12)[0]
    assert greedy_tokens(engine, PROMPT, 12)[0] == want
    pair = K.KeyPair.generate()
    cluster.auth.allow(pair.public)  # an authenticated peer: the fuzz gets past the handshake
    ctx = zmq.Context()
    sock = rogue(ctx, cluster.endpoint, pair, cluster.auth.keys.pair.public)
    oversized = P.frame_limit(P.rows_bytes(engine.cfg.n_embd)) + 1
    rss: list[int] = []

    @FUZZ
    @given(batches(oversized))
    def fuzz(batch: list[list[bytes]]) -> None:
        send_all(sock, batch)
        for _ in range(3):
            cluster._poll(0.005)
        rss.append(rss_bytes())

    try:
        fuzz()
        for _ in range(20):
            cluster._poll(0.01)
        assert len(cluster.live_workers()) == 2 and all(w.name.startswith("local-") for w in cluster.live_workers())
        assert not any(p.poll() is not None for p in engine.local_workers.procs)
        assert greedy_tokens(engine, PROMPT, 12)[0] == want
        assert max(rss) - rss[0] < 64 * MiB, f"coordinator RSS grew {(max(rss) - rss[0]) / MiB:.0f} MiB"
    finally:
        sock.close(0)
        ctx.term()


# -- a worker's DEALER and SUB ------------------------------------------------------------------------


class SecureFakeCoordinator:
    """A ROUTER + XPUB armed as CURVE servers, admitting one worker key."""

    def __init__(self, worker: bytes) -> None:
        self.pair = K.KeyPair.generate()
        self.ctx = zmq.Context()
        self.auth = K.Authenticator(self.ctx, K.ServerKeys(self.pair, {worker: "w"}))
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.XPUB)
        for s in (self.router, self.pub):
            s.linger = 0
            s.sndhwm = 100_000
            self.auth.arm(s)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.ident: bytes | None = None

    def serve(self, seconds: float) -> list[P.Message]:
        """Answer hellos with a welcome, heartbeats of strangers with nothing; return other messages."""
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.pub.poll(0):
                self.pub.recv()
            if not self.router.poll(int(left * 1000) + 1):
                break
            ident, *frames = self.router.recv_multipart()
            msg = P.decode(frames)
            if msg.type == P.HELLO:
                self.ident = ident
                self.router.send_multipart([ident, *P.encode(P.WELCOME, worker_id=7, pub=f"tcp://127.0.0.1:{self.pub_port}",
                                                             heartbeat_s=0.2)])
            elif msg.type != P.HEARTBEAT:
                out.append(msg)
        return out

    def compute(self, req: int, layer: int, expert: int, x: np.ndarray) -> P.Message:
        self.router.send_multipart([self.ident, *P.encode(P.COMPUTE, x, req=req, layer=layer, experts=[expert],
                                                                   rows=[len(x)])])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for m in self.serve(0.5):
                if m.type in (P.RESULT, P.FAIL) and m["req"] == req:
                    return m
        raise AssertionError(f"no answer to request {req}")

    def close(self) -> None:
        self.router.close(0)
        self.pub.close(0)
        self.auth.stop()
        self.ctx.term()


def test_worker_sockets(converted_models: dict[str, Path], tmp_path: Path) -> None:
    model = converted_models[Q8]
    pair, secret = keyfile(tmp_path, "w")
    coord = SecureFakeCoordinator(pair.public)
    proc = spawn_worker(f"tcp://127.0.0.1:{coord.port}", model, tmp_path / "w.log", *key_flags(secret, coord.pair))
    local = ExpertsReference(model)
    oversized = P.frame_limit(P.rows_bytes(256)) + 1
    rss: list[int] = []

    @FUZZ
    @given(batches(oversized, excluded=frozenset({P.REJECT})), batches(P.frame_limit() + 1, excluded=frozenset({P.REJECT})))
    def fuzz(to_dealer: list[list[bytes]], to_sub: list[list[bytes]]) -> None:
        if coord.ident is not None:
            for frames in to_dealer:
                coord.router.send_multipart([coord.ident, *frames])
        for frames in to_sub:
            coord.pub.send_multipart(frames)
        coord.serve(0.02)
        rss.append(vm_rss(proc.pid))

    try:
        deadline = time.monotonic() + 60
        while coord.ident is None and time.monotonic() < deadline:
            coord.serve(0.5)
        x = hidden(3, 11)
        first = coord.compute(1, 2, 4, x)
        assert first.type == P.RESULT and np.array_equal(first.tensor, local.compute(2, 4, x))
        fuzz()
        coord.router.send_multipart([coord.ident, b"\0" * (128 * MiB)])  # one huge frame: refused unread
        coord.serve(Relinker.AFTER_S + 2)  # an oversized frame drops the link: the worker makes a new one, says hello
        rss.append(vm_rss(proc.pid))
        assert proc.poll() is None, (tmp_path / "w.log").read_text()[-3000:]
        got = coord.compute(2, 3, 1, x)
        assert got.type == P.RESULT and np.array_equal(got.tensor, local.compute(3, 1, x))
        assert max(rss) - rss[0] < 32 * MiB, f"worker RSS grew {(max(rss) - rss[0]) / MiB:.0f} MiB"
    finally:
        stop(proc)
        coord.close()


# -- the shadow sockets ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shadow_model(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgemoe.convert import plan_conversion, write_model

    out = tmp_path_factory.mktemp("shadow") / "model"
    write_model(plan_conversion(fixtures_dir / "olmoe-q8_0.gguf", shadow_type="q4_0"), out, progress=False)
    return out


def test_coordinator_shadow_socket(shadow_model: Path, tmp_path: Path) -> None:
    server = K.KeyPair.generate()
    node_pair, node_secret = keyfile(tmp_path, "node")
    pair = K.KeyPair.generate()
    with Engine(shadow_model, n_ctx=64, n_threads=1) as engine:
        remote = RemoteShadowPredictor(engine, 1, keys=K.ServerKeys(server, {pair.public: "fuzz", node_pair.public: "n"}))
        ctx = zmq.Context()
        sock = rogue(ctx, remote.endpoint, pair, server.public)
        rss: list[int] = []
        proc = None

        @FUZZ
        @given(batches(P.frame_limit() + 1))
        def fuzz(batch: list[list[bytes]]) -> None:
            send_all(sock, batch)
            remote._drain(0.01)
            rss.append(rss_bytes())

        try:
            fuzz()
            assert not remote.connected
            proc = spawn_node(remote.endpoint, shadow_model, tmp_path / "node.log", *key_flags(node_secret, server),
                              name="fuzz-shadow")
            remote.wait_for_shadow(90)
            assert remote.connected and remote.stats()["node"] == "fuzz-shadow"
            assert max(rss) - rss[0] < 64 * MiB
        finally:
            if proc is not None:
                stop(proc)
            sock.close(0)
            ctx.term()
            remote.close()


def test_shadow_node_socket(shadow_model: Path, tmp_path: Path) -> None:
    with Engine(shadow_model, n_ctx=64, n_threads=1) as engine:
        engine.eval(PROMPT)
        kv, cfg = engine.kv, engine.cfg
        rows = np.stack([np.stack(kv.read_f32(il, 0, len(PROMPT))) for il in range(cfg.n_layer)])
        moe_layers = list(engine.moe_layers)
    pair, secret = keyfile(tmp_path, "node")
    server = K.KeyPair.generate()
    ctx = zmq.Context()
    auth = K.Authenticator(ctx, K.ServerKeys(server, {pair.public: "node"}))
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.sndhwm = 100_000
    auth.arm(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc = spawn_node(f"tcp://127.0.0.1:{port}", shadow_model, tmp_path / "node.log", *key_flags(secret, server),
                      name="fuzz-shadow")
    ident: list[bytes] = []
    rss: list[int] = []

    def serve(seconds: float) -> list[P.Message]:
        out = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
            who, *frames = sock.recv_multipart()
            msg = P.decode(frames)
            if msg.type == P.SHADOW_HELLO:
                assert msg["model"] == manifest_hash(shadow_model)
                ident[:] = [who]
                sock.send_multipart([who, *P.encode(P.SHADOW_WELCOME, heartbeat_s=0.2, n_ctx=64)])
            elif msg.type != P.HEARTBEAT:
                out.append(msg)
        return out

    @FUZZ
    @given(batches(P.frame_limit(P.KV_CHUNK_BYTES) + 1, excluded=frozenset({P.REJECT})))
    def fuzz(batch: list[list[bytes]]) -> None:
        for frames in batch:
            sock.send_multipart([ident[0], *frames])
        serve(0.02)
        rss.append(vm_rss(proc.pid))

    try:
        # the node says hello, builds its shadow (heartbeating), then says it is ready: a small model builds
        # fast enough that shadow_ready can come in the same serve() call as the hello, so both wait on one list
        seen: list[P.Message] = []
        deadline = time.monotonic() + 90
        while not any(m.type == P.SHADOW_READY for m in seen):
            assert time.monotonic() < deadline, "no shadow_ready from the node"
            seen += serve(0.5)
        assert ident, "shadow_ready came without a hello"
        fuzz()
        serve(Relinker.AFTER_S + 2)  # after a dropped link the node makes a new one and says hello
        assert proc.poll() is None, (tmp_path / "node.log").read_text()[-3000:]
        sock.send_multipart([ident[0], *P.encode(P.KV_ROWS, rows, lo=0)])
        sock.send_multipart([ident[0], *P.encode(P.JOB, gen=99, pos=len(PROMPT) - 1, tokens=[PROMPT[-1]])])
        routes: set[int] = set()
        deadline = time.monotonic() + 60
        while len(routes) < len(moe_layers) and time.monotonic() < deadline:
            routes |= {m["layer"] for m in serve(0.5) if m.type == P.ROUTES and m["gen"] == 99}
        assert sorted(routes) == moe_layers, "the node stopped predicting after the fuzz"
        assert max(rss) - rss[0] < 64 * MiB, f"node RSS grew {(max(rss) - rss[0]) / MiB:.0f} MiB"
    finally:
        stop(proc)
        sock.close(0)
        auth.stop()
        ctx.term()

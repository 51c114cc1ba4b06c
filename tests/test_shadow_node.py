"""The shadow predictor on its own node (`edgemoe shadow`): real processes over ZeroMQ on loopback.

Predictions only change speed: tokens and logits with a remote shadow equal the in-process
engine's. The node answers jobs with each layer's routing, refuses to serve another model, and
survives malformed messages; so does the coordinator's shadow socket.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from edgemoe.cluster import protocol as P
from edgemoe.cluster.remote_shadow import RemoteShadowPredictor
from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.cluster.sockets import bind_endpoint
from edgemoe.format.manifest import manifest_hash
from edgemoe.model.engine import Engine
from edgemoe.model.generate import greedy_tokens
from tests.cli import edgemoe
from tests.liveness import generate_with, wait_until
from edgemoe.convert import plan_conversion, write_model

PROMPT = [1, 504, 3458, 28, 314, 1110, 253, 2821, 17, 99]
N_PREDICT = 12


@pytest.fixture(scope="module")
def model(shadow_model: Path) -> Path:
    """A Q8_0 test model with a Q4_0 shadow of its experts."""
    return shadow_model


def node(endpoint: str, model: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgemoe", "shadow", "--connect", endpoint, "--model", str(model),
                             "--name", "test-shadow", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return err


def test_remote_shadow_changes_nothing_and_predicts(model: Path) -> None:
    with Engine(model, n_ctx=256, n_threads=1) as engine:
        want_tokens, want_logits = greedy_tokens(engine, PROMPT, N_PREDICT)
    # residency off: with every expert resident the cluster needs (and waits for) no prediction
    opts = ClusterOptions(workers=2, predictor="shadow", shadow_node="local", residency="off")
    with open_engine(model, opts, n_ctx=256, n_threads=1) as engine:
        tokens, logits = greedy_tokens(engine, PROMPT, N_PREDICT)
        cluster = engine.experts
        stats = cluster.predictor.stats()
        recall = cluster.recall.recall
    assert tokens == want_tokens and np.array_equal(logits, want_logits)
    assert stats["connected"] and stats["node"] == "local-shadow"
    assert stats["jobs"] == N_PREDICT  # the prompt, then one per decode step
    assert stats["routes"] > 0 and stats["first_route_ms"]["n"] > 0
    assert recall > 0.5, recall  # a 4-bit shadow of a 4-layer model names most experts in time (random: 0.25)


def test_node_answers_jobs_and_survives_malformed_messages(model: Path) -> None:
    """The test plays the coordinator on a real ROUTER socket, against a real node process."""
    with Engine(model, n_ctx=64, n_threads=1) as engine:
        engine.eval(PROMPT)  # the main model's K/V rows of the prompt
        kv, cfg = engine.kv, engine.cfg
        rows = np.stack([np.stack(kv.read_f32(il, 0, len(PROMPT))) for il in range(cfg.n_layer)])
        routing = [engine.routing[il][-1] for il in engine.moe_layers]
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        endpoint = bind_endpoint(sock, "tcp://127.0.0.1:0")
        proc = node(endpoint, model)
        try:
            assert sock.poll(60000), "no hello from the node"
            ident, *frames = sock.recv_multipart()
            hello = P.decode(frames)
            assert hello.type == P.SHADOW_HELLO and hello["model"] == manifest_hash(model)
            def ready(n_ctx: int) -> list[str]:
                """Welcome the node for n_ctx; what it sent until its shadow_ready."""
                sock.send_multipart([ident, *P.encode(P.SHADOW_WELCOME, heartbeat_s=0.2, n_ctx=n_ctx)])
                seen = []  # heartbeats while it builds its shadow, then shadow_ready
                while not seen or seen[-1] != P.SHADOW_READY:
                    assert sock.poll(60000), f"no shadow_ready from the node (got {seen})"
                    msg = P.decode(sock.recv_multipart()[1:])
                    seen.append(msg.type)
                assert msg["n_ctx"] == n_ctx and set(seen[:-1]) <= {P.HEARTBEAT}, seen
                return seen

            ready(1 << 24)  # more than the model's 512: the engine clamps it, the node builds once
            ready(64)  # another context: built again
            ready(64)  # the same context again (a re-welcome): ready without a build (counted in its log below)
            time.sleep(0.5)
            while sock.poll(0):  # heartbeats only: no rebuild loop, no second ready
                assert P.decode(sock.recv_multipart()[1:]).type == P.HEARTBEAT
            for bad in ([b"\xc1garbage"], [P.msgpack.packb({"v": 1, "t": "job", "gen": 1})],
                        P.encode(P.KV_ROWS, np.zeros((2, 2, 1, 3), np.float32), lo=0),  # not this model's shape
                        P.encode(P.JOB, gen=1, pos=63, tokens=[5, 6])):  # past the context
                sock.send_multipart([ident, *bad])
            sock.send_multipart([ident, *P.encode(P.KV_ROWS, rows, lo=0)])
            # re-evaluate the prompt's last token at its position: the shadow (token- and KV-aligned)
            # routes it with the main model's rows 0..n-2 in its cache
            sock.send_multipart([ident, *P.encode(P.JOB, gen=7, pos=len(PROMPT) - 1, tokens=[PROMPT[-1]])])
            routes: dict[int, list[int]] = {}
            deadline = time.monotonic() + 60
            while len(routes) < len(engine.moe_layers) and time.monotonic() < deadline:
                if sock.poll(1000):
                    msg = P.decode(sock.recv_multipart()[1:])
                    if msg.type == P.ROUTES:
                        assert msg["gen"] == 7
                        routes[msg["layer"]] = msg["experts"]
            assert sorted(routes) == engine.moe_layers and proc.poll() is None
            hits = sum(len(set(routes[l]) & {int(e) for e in r}) for l, r in zip(engine.moe_layers, routing))
            assert hits >= len(routing)  # at least half of the main model's choices, from a 4-bit shadow
        finally:
            err = stop(proc)
            sock.close(0)
            ctx.term()
    assert proc.returncode == 0, err
    assert "dropped a malformed message" in err and "dropped K/V rows of shape" in err and "dropped a job" in err
    assert err.count("shadow ready:") == 2, err  # built for 1 << 24 (clamped) and for 64; the re-welcome built nothing


def test_node_with_another_model_is_refused(model: Path, tmp_path: Path, fixtures_dir: Path) -> None:
    other = tmp_path / "other"
    write_model(plan_conversion(fixtures_dir / "qwen3moe-q8_0.gguf", shadow_type="q8_0"), other, progress=False)
    with Engine(model, n_ctx=64, n_threads=1) as engine:
        remote = RemoteShadowPredictor(engine, 1)
        proc = node(remote.endpoint, other)
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                remote._drain(0.2)
            err = stop(proc)
            assert proc.returncode == 2, err
            # without keys the node is not authenticated: it learns its own hash, not the coordinator's
            assert manifest_hash(other) in err and manifest_hash(model) not in err, err
            assert not remote.connected
        finally:
            stop(proc)
            remote.close()


def test_coordinator_shadow_socket_survives_malformed_messages(model: Path) -> None:
    with Engine(model, n_ctx=64, n_threads=1) as engine:
        remote = RemoteShadowPredictor(engine, 1)
        ctx = zmq.Context()
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.connect(remote.endpoint)
        proc = None
        try:
            for bad in ([b"\xc1garbage"], [P.msgpack.packb({"v": 1, "t": "routes", "gen": 1})],
                        P.encode(P.ROUTES, gen=1, layer=0, experts=[1, 2])):  # well formed, but from a stranger
                peer.send_multipart(bad)
            remote._drain(0.5)
            assert peer.poll(2000) and P.decode(peer.recv_multipart()).type == P.UNKNOWN_PEER
            proc = node(remote.endpoint, model)
            remote.wait_for_shadow(60)
            assert remote.connected and remote.stats()["node"] == "test-shadow"
        finally:
            if proc is not None:
                stop(proc)
            peer.close(0)
            ctx.term()
            remote.close()


def test_shadow_node_cli_errors(model: Path) -> None:
    cases = [
        (["run", str(model), "-p", "hi", "--workers", "1", "--predictor", "lookahead", "--shadow-node", "local"],
         "needs --predictor shadow"),
        (["run", str(model), "-p", "hi", "--predictor", "shadow", "--shadow-node", "local"], "needs a cluster"),
        (["run", str(model), "-p", "hi", "--workers", "1", "--predictor", "shadow", "--shadow-node", "udp://x"],
         "expected local or tcp://HOST:PORT"),
        (["shadow", "--connect", "nowhere", "--model", str(model)], "is not an endpoint"),
    ]
    for args, phrase in cases:
        r = edgemoe(*args, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines and lines[-1].startswith("error:") and phrase in lines[-1], (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_node_rejoins_a_restarted_coordinator(model: Path) -> None:
    """A lost coordinator is a lost peer: the node keeps running and joins the next one on the port."""
    with Engine(model, n_ctx=64, n_threads=1) as engine:
        first = RemoteShadowPredictor(engine, 1)
        endpoint = first.endpoint
        proc = node(endpoint, model)
        try:
            first.wait_for_shadow(60)
            first.close()
            second = RemoteShadowPredictor(engine, 1, bind=endpoint)
            try:
                second.wait_for_shadow(60)
                assert second.connected and proc.poll() is None
            finally:
                second.close()
        finally:
            err = stop(proc)
    assert proc.returncode == 0, err


# SIGKILL is slow-marked: the same silence as SIGSTOP's (which the default run covers, with the return)
@pytest.mark.parametrize("sig", [pytest.param("SIGKILL", marks=pytest.mark.slow), "SIGSTOP"])
def test_silent_shadow_node_costs_at_most_three_heartbeats(model: Path, sig: str) -> None:
    """The node is killed or stopped before token 4: the coordinator drops it within about 3 heartbeat
    intervals, predicts without it, and no token changes; a stopped node that resumes (SIGCONT) is
    welcomed again and its predictions are used again."""
    with Engine(model, n_ctx=256, n_threads=1) as engine:
        want, _ = greedy_tokens(engine, PROMPT, 16)
    opts = ClusterOptions(workers=2, predictor="shadow", shadow_node="local", residency="off")
    with open_engine(model, opts, n_ctx=256, n_threads=1) as engine:
        cluster = engine.experts
        remote: RemoteShadowPredictor = cluster.predictor
        victim = engine.local_shadow.procs[0]
        hb = remote.heartbeat_s
        assert remote.auth is not None and remote._peer_key in remote.auth.keys.allowed  # ephemeral keys
        signalled = []
        try:
            def fault() -> None:
                victim.send_signal(getattr(signal, sig))
                signalled.append(time.monotonic())

            tokens, times = generate_with(engine, PROMPT, 16, 4, fault)
            assert tokens == want
            wait_until(lambda: not remote.connected, 3 * hb + 2, "the silent shadow node was not dropped",
                       lambda: remote._drain(0.1))
            dropped_after = remote.lost_at - signalled[0]
            assert remote.stats()["lost"] == 1 and dropped_after <= 3 * hb + 1, dropped_after
            assert max(times) <= 3 * hb + 1.5, f"stall of {max(times):.2f} s, limit about {3 * hb:g} s"
            if sig == "SIGSTOP":
                victim.send_signal(signal.SIGCONT)
                wait_until(lambda: remote.connected, 15, "the resumed shadow node was not welcomed again",
                           lambda: remote._drain(0.1))
                routes, predicted = remote.stats()["routes"], cluster.stats.predicted
                tokens, _ = generate_with(engine, PROMPT, 16, -1, lambda: None)
                assert tokens == want
                assert remote.stats()["routes"] > routes and cluster.stats.predicted > predicted, \
                    "the resumed shadow node's predictions were not used"
        finally:
            if victim.poll() is None:
                victim.send_signal(signal.SIGCONT)


# the node's entry point with a build that lasts over a second of Python holding the GIL in turns
# (a small model builds in ~0.1 s on an idle machine: too short to tell heartbeats from luck)
_SLOW_BUILD_NODE = """
import sys, time
import edgemoe.cluster.shadow_node as node_module
from edgemoe.cli.main import main

class SlowEngine(node_module.Engine):
    def __init__(self, *args, **kwargs):
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            sum(range(1000))
        super().__init__(*args, **kwargs)

node_module.Engine = SlowEngine
sys.exit(main(sys.argv[1:]))
"""


def test_node_heartbeats_while_it_builds_its_shadow(model: Path) -> None:
    """With heartbeats every 50 ms the node's build (the mirror and the shadow engine, slowed to over
    a second of busy Python) lasts many intervals; it still heartbeats throughout, so it is never
    dropped and joins at the first try."""
    with Engine(model, n_ctx=256, n_threads=1) as engine:
        remote = RemoteShadowPredictor(engine, 1, heartbeat_s=0.05)
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD_NODE, "shadow", "--connect", remote.endpoint,
                                 "--model", str(model), "--name", "test-shadow"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            remote.wait_for_shadow(60)
            assert remote.build_s is not None and remote.build_s > 3 * remote.heartbeat_s, remote.build_s
            t = time.monotonic() + 1.0
            while time.monotonic() < t:
                remote._drain(0.05)
            assert remote.connected and remote.stats()["lost"] == 0
        finally:
            err = stop(proc)
            remote.close()
    assert proc.returncode == 0, err

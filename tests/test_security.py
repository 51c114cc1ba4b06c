"""Trust nothing on the wire (issue 13), with real processes on loopback, bounded in time.

Authentication: an unlisted key cannot join, cannot take over a worker, and learns nothing; a fake
coordinator gets nothing from a worker; a relay on the link sees no activation bytes. Liveness: a
SIGKILLed or SIGSTOPped worker costs at most about 3 heartbeat intervals and no token; SIGCONT brings
it back, under --residency auto with its share of the residents. Integrity: a shard changed on disk
after its first use is refused before compute. A disk that fills during `convert` (a real tmpfs) is
one error line and leaves nothing behind.
Every spawned process is stopped by its pid in a finally block.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq

from edgemoe.cluster import keys as K
from edgemoe.cluster import protocol as P
from edgemoe.cluster.coordinator import ClusterExperts
from edgemoe.cluster.remote_shadow import RemoteShadowPredictor
from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.format.manifest import expert_file_name, manifest_hash
from edgemoe.model.engine import Engine
from tests.experts_ref import ExpertsReference
from edgemoe.model.generate import greedy_tokens
from tests.cli import edgemoe as run_cli
from tests.liveness import generate_with, wait_until

pytestmark = pytest.mark.timeout(180)

PROMPT = [1, 504, 3458, 28, 314, 1110, 253, 2821, 17, 99]
Q8 = "llama-moe-q8_0"  # n_embd 256, 8 experts, top-2, MoE layers 0-3


@pytest.fixture(scope="module")
def q8(converted_models: dict[str, Path]) -> Path:
    return converted_models[Q8]


@pytest.fixture(scope="module")
def reference(q8: Path) -> tuple[list[int], np.ndarray]:
    with Engine(q8, n_ctx=128, n_threads=1) as engine:
        return greedy_tokens(engine, PROMPT, 16)


def spawn_worker(endpoint: str, model: Path, log: Path, *extra: str, name: str = "w") -> subprocess.Popen:
    env = {**os.environ, "GGML_NO_BACKTRACE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "edgemoe", "worker", "--connect", endpoint, "--model", str(model),
                                 "--threads", "1", "--memory-budget", "256MiB", "--name", name, *extra],
                                stdout=f, stderr=subprocess.STDOUT, env=env)


def spawn_node(endpoint: str, model: Path, log: Path, *extra: str, name: str = "test-shadow") -> subprocess.Popen:
    """An `edgemoe shadow` process (the shadow node), its output in log."""
    env = {**os.environ, "GGML_NO_BACKTRACE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "edgemoe", "shadow", "--connect", endpoint, "--model", str(model),
                                 "--name", name, *extra], stdout=f, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def keyfile(tmp: Path, name: str, pair: K.KeyPair | None = None) -> tuple[K.KeyPair, Path]:
    pair = pair or K.KeyPair.generate()
    _, secret = K.write_keypair(tmp, name, pair)
    return pair, secret


def key_flags(secret: Path, server: K.KeyPair) -> list[str]:
    return [f"--key={secret}", f"--coordinator-key={server.public.decode()}"]


def hidden(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 256), dtype=np.float32)


# -- keys ----------------------------------------------------------------------------------------


def test_keygen_writes_a_private_secret_and_refuses_to_overwrite(tmp_path: Path) -> None:
    r = run_cli("keygen", str(tmp_path / "k"), "--name", "pi-01")
    assert r.returncode == 0, r.stderr
    public, secret = tmp_path / "k" / "pi-01.key", tmp_path / "k" / "pi-01.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = K.load_secret(secret)
    assert K.load_public(str(public)) == pair.public and pair.public.decode() in r.stdout
    assert b"secret-key" not in public.read_bytes()
    again = run_cli("keygen", str(tmp_path / "k"), "--name", "pi-01")
    assert again.returncode == 2 and again.stderr.startswith("error:") and "exists" in again.stderr
    os.chmod(secret, 0o644)
    with pytest.raises(Exception, match="chmod 600"):
        K.load_secret(secret)


def test_allow_lists_file_and_folder(tmp_path: Path) -> None:
    a, b = K.KeyPair.generate(), K.KeyPair.generate()
    (tmp_path / "list").write_text(f"# workers\n{a.public.decode()} pi-01\n\n{b.public.decode()}\n")
    assert set(K.load_allow_list(tmp_path / "list")) == {a.public, b.public}
    K.write_keypair(tmp_path / "dir", "x", a)
    assert set(K.load_allow_list(tmp_path / "dir")) == {a.public}
    (tmp_path / "bad").write_text("not-a-key\n")
    with pytest.raises(Exception, match="bad:1"):
        K.load_allow_list(tmp_path / "bad")


def test_off_loopback_without_keys_needs_insecure(q8: Path) -> None:
    r = run_cli("run", str(q8), "-p", "hi", "-n", "1", "--bind", "tcp://0.0.0.0:0", "--wait-workers", "1")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--insecure" in r.stderr, r.stderr
    r = run_cli("worker", "--connect", "tcp://10.255.255.1:5555", "--model", str(q8))
    assert r.returncode == 2 and "--insecure" in r.stderr, r.stderr
    r = run_cli("worker", "--connect", "tcp://127.0.0.1:5555", "--model", str(q8), "--key", "/nonexistent")
    assert r.returncode == 2 and "--coordinator-key" in r.stderr, r.stderr
    # the shadow node's link, from either end
    r = run_cli("shadow", "--connect", "tcp://10.255.255.1:5555", "--model", str(q8))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--insecure" in r.stderr, r.stderr
    r = run_cli("run", str(q8), "-p", "hi", "-n", "1", "--workers", "1", "--predictor", "shadow",
                "--shadow-node", "tcp://0.0.0.0:0")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--insecure" in r.stderr, r.stderr


# -- authentication ------------------------------------------------------------------------------


@pytest.fixture()
def secured(q8: Path, tmp_path: Path) -> Iterator[tuple[ClusterExperts, K.KeyPair, K.KeyPair, Path]]:
    """A coordinator with keys and one listed worker (its key pair and secret file)."""
    server = K.KeyPair.generate()
    listed, secret = keyfile(tmp_path, "listed")
    cluster = ClusterExperts(q8, n_embd=256, n_expert=8, k=2, moe_layers=[0, 1, 2, 3],
                             keys=K.ServerKeys(server, {listed.public: "listed"}))
    try:
        yield cluster, server, listed, secret
    finally:
        cluster.close()


def test_unlisted_key_cannot_join_and_learns_nothing(secured, q8: Path, tmp_path: Path) -> None:
    cluster, server, _, _ = secured
    stranger, secret = keyfile(tmp_path, "stranger")
    log = tmp_path / "stranger.log"
    proc = spawn_worker(cluster.endpoint, q8, log, *key_flags(secret, server), name="stranger")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)  # a hand-made client with an unlisted key, and one without keys at all
    raw.linger = 0
    K.arm_client(raw, K.ClientKeys(K.KeyPair.generate(), server.public))
    null = ctx.socket(zmq.DEALER)
    null.linger = 0
    try:
        for s in (raw, null):
            s.connect(cluster.endpoint)
            s.send_multipart(P.encode(P.HELLO, name="local-0", model="0" * 64, budget=1, threads=1, pid=1, baseline_rss=1,
                                      resident_room=0, jit_slots=1))
        wait_until(lambda: "refused this node's key" in log.read_text(), 30, "the worker did not log its refusal",
                   lambda: cluster._poll(0.1))
        t = time.monotonic() + 1.0
        while time.monotonic() < t:
            cluster._poll(0.1)
        assert not cluster.workers and not cluster.live_workers()
        assert not raw.poll(200) and not null.poll(200), "an unauthenticated peer got an answer"
        assert manifest_hash(q8) not in log.read_text()
    finally:
        stop(proc)
        raw.close(0)
        null.close(0)
        ctx.term()


def test_listed_worker_with_another_model_learns_both_hashes(secured, converted_models, tmp_path: Path) -> None:
    cluster, server, _, secret = secured
    other = converted_models["qwen3moe-q8_0"]
    log = tmp_path / "w.log"
    proc = spawn_worker(cluster.endpoint, other, log, *key_flags(secret, server))
    try:
        wait_until(lambda: proc.poll() is not None, 60, "the worker was not rejected", lambda: cluster._poll(0.1))
        assert proc.returncode == 2
        assert manifest_hash(other) in log.read_text() and manifest_hash(cluster.model_dir) in log.read_text()
    finally:
        stop(proc)


def test_no_takeover_of_a_live_worker(secured, q8: Path, tmp_path: Path) -> None:
    """A second connection with the worker's own key (and name) is ignored while the worker answers."""
    cluster, server, listed, secret = secured
    proc = spawn_worker(cluster.endpoint, q8, tmp_path / "w.log", *key_flags(secret, server), name="local-0")
    ctx = zmq.Context()
    twin = ctx.socket(zmq.DEALER)
    twin.linger = 0
    K.arm_client(twin, K.ClientKeys(listed, server.public))
    try:
        cluster.wait_for_workers(1, 60)
        (w,) = cluster.live_workers()
        identity = w.identity
        twin.connect(cluster.endpoint)
        for _ in range(3):
            twin.send_multipart(P.encode(P.HELLO, name="local-0", model=manifest_hash(q8), budget=1 << 28, threads=1,
                                         pid=1, baseline_rss=1, resident_room=0, jit_slots=1))
            twin.send_multipart(P.encode(P.HEARTBEAT, rss=1, peak_rss=1))
            cluster._poll(0.2)
        assert w.identity == identity and len(cluster.workers) == 1
        local = ExpertsReference(q8)
        x = hidden(3, 1)
        selected = np.array([[1, 5]] * 3, dtype=np.int32)
        got = cluster.compute_layer(0, x, selected)
        assert np.array_equal(got[:, 0], local.compute(0, 1, x)) and np.array_equal(got[:, 1], local.compute(0, 5, x))
        while twin.poll(100):  # the twin got `unknown` at most, never a welcome or a compute
            assert P.decode(twin.recv_multipart()).type == P.UNKNOWN_PEER
        # once the first connection stops answering (its process is gone), the same key may come back
        proc.kill()
        proc.wait(10)
        welcomed = False
        deadline = time.monotonic() + 15
        while not welcomed and time.monotonic() < deadline:
            twin.send_multipart(P.encode(P.HELLO, name="local-0", model=manifest_hash(q8), budget=1 << 28, threads=1,
                                         pid=2, baseline_rss=1, resident_room=0, jit_slots=1))
            cluster._poll(0.5)
            while twin.poll(0):
                welcomed |= P.decode(twin.recv_multipart()).type == P.WELCOME
        assert welcomed and w.identity != identity and w.alive and len(cluster.workers) == 1
    finally:
        stop(proc)
        twin.close(0)
        ctx.term()


@pytest.mark.parametrize("lie", ["nan", "shape"])
def test_bad_results_are_computed_again_elsewhere(q8: Path, tmp_path: Path, lie: str) -> None:
    """A listed peer that joins, heartbeats, and answers every compute with NaN (or with a tensor of
    the wrong shape): each of its results is computed again by the real worker at once (exact, long
    before the request timeout); one bad answer does not condemn it, three in a row do."""
    server = K.KeyPair.generate()
    listed, secret = keyfile(tmp_path, "honest")
    liar_pair = K.KeyPair.generate()
    cluster = ClusterExperts(q8, n_embd=256, n_expert=8, k=2, moe_layers=[0, 1, 2, 3], residency="off",
                             keys=K.ServerKeys(server, {listed.public: "honest", liar_pair.public: "liar"}))
    proc = spawn_worker(cluster.endpoint, q8, tmp_path / "w.log", *key_flags(secret, server), name="honest")
    ctx = zmq.Context()
    liar = ctx.socket(zmq.DEALER)
    liar.linger = 0
    K.arm_client(liar, K.ClientKeys(liar_pair, server.public))
    stop_liar = threading.Event()

    def lie() -> None:
        beat = 0.0
        while not stop_liar.is_set():
            if time.monotonic() >= beat:
                liar.send_multipart(P.encode(P.HEARTBEAT, rss=1, peak_rss=1))
                beat = time.monotonic() + 0.3
            if not liar.poll(50):
                continue
            msg = P.decode(liar.recv_multipart())
            if msg.type == P.COMPUTE:
                n, d = msg.tensor.shape
                bad = np.full((n, d), np.nan, dtype=np.float32) if lie == "nan" else np.zeros((n, d // 2), np.float32)
                liar.send_multipart(P.encode(P.RESULT, bad, req=msg["req"], layer=msg["layer"], experts=msg["experts"],
                                             rows=msg["rows"], load_s=0.0, wait_s=0.0, compute_s=0.0, hits=0))

    try:
        liar.connect(cluster.endpoint)
        liar.send_multipart(P.encode(P.HELLO, name="liar", model=manifest_hash(q8), budget=1 << 28, threads=1, pid=1,
                                     baseline_rss=1, resident_room=0, jit_slots=1))
        threading.Thread(target=lie, daemon=True).start()  # heartbeats from now on; ignores all but computes
        cluster.wait_for_workers(2, 60)
        liar_w = next(w for w in cluster.workers.values() if w.name == "liar")
        local = ExpertsReference(q8)
        lost_after = []
        t0 = time.monotonic()
        for i in range(6):
            x = hidden(2, 20 + i)
            selected = np.array([[e, (e + 1) % 8] for e in range(2)], dtype=np.int32)
            got = cluster.compute_layer(i % 4, x, selected)
            for row in range(2):
                for slot in range(2):
                    assert np.array_equal(got[row, slot], local.compute(i % 4, int(selected[row, slot]), x[row:row + 1])[0])
            lost_after.append((liar_w.strikes, liar_w.alive))
        assert cluster.stats.retries > 0 and time.monotonic() - t0 < cluster.timeout_s  # no request waited it out
        assert any(alive and strikes >= 1 for strikes, alive in lost_after), lost_after  # one strike: still in
        assert not liar_w.alive and liar_w.lost >= 1, lost_after  # three in a row: lost
    finally:
        stop_liar.set()
        time.sleep(0.2)
        stop(proc)
        liar.close(0)
        ctx.term()
        cluster.close()


@pytest.mark.parametrize("role", ["worker", "shadow node"])
def test_fake_coordinator_gets_nothing(q8: Path, shadow_model: Path, tmp_path: Path, role: str) -> None:
    """A worker or shadow node holding the real coordinator's public key never completes a handshake
    with another server: the impostor receives no message (no hello, no model hash)."""
    real = K.KeyPair.generate()
    _, secret = keyfile(tmp_path, "w")
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)  # a CURVE server with its own key pair, admitting anyone
    fake.linger = 0
    impostor = K.KeyPair.generate()
    fake.curve_server, fake.curve_secretkey, fake.curve_publickey = True, impostor.secret, impostor.public
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    log = tmp_path / "w.log"
    spawn = spawn_worker if role == "worker" else spawn_node
    proc = spawn(f"tcp://127.0.0.1:{port}", q8 if role == "worker" else shadow_model, log, *key_flags(secret, real))
    try:
        wait_until(lambda: "handshake with" in log.read_text(), 30, "the worker did not log the failed handshake")
        assert not fake.poll(2000), "the fake coordinator received a message"
        assert proc.poll() is None  # it keeps trying: the real coordinator may come
    finally:
        stop(proc)
        fake.close(0)
        ctx.term()


class Relay:
    """A loopback TCP relay that forwards both ways and keeps every byte it saw."""

    def __init__(self, target_port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = target_port
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._stop = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop:
            try:
                a, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            b = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._stop = True
        for s in [self.server, *self._socks]:
            s.close()


@pytest.mark.parametrize("secure", [True, False])
def test_relay_sees_no_activation_bytes(q8: Path, tmp_path: Path, secure: bool) -> None:
    """With keys, none of the hidden states' or results' bytes cross the wire in clear; without keys
    (the control, proving the check can fail) they do."""
    server = K.KeyPair.generate()
    pair, secret = keyfile(tmp_path, "w")
    cluster = ClusterExperts(q8, n_embd=256, n_expert=8, k=2, moe_layers=[0, 1, 2, 3],
                             keys=K.ServerKeys(server, {pair.public: "w"}) if secure else None)
    relay = Relay(int(cluster.endpoint.rsplit(":", 1)[1]))
    flags = key_flags(secret, server) if secure else []
    proc = spawn_worker(f"tcp://127.0.0.1:{relay.port}", q8, tmp_path / "w.log", *flags)
    try:
        cluster.wait_for_workers(1, 60)
        x = hidden(4, 2)
        got = cluster.compute_layer(1, x, np.array([[2, 6]] * 4, dtype=np.int32))
        local = ExpertsReference(q8)
        assert np.array_equal(got[:, 0], local.compute(1, 2, x))
        seen = bytes(relay.seen)
        chunks = [x.tobytes()[i:i + 32] for i in range(0, x.nbytes, 256)] + \
                 [got[:, 0].tobytes()[i:i + 32] for i in range(0, got[:, 0].nbytes, 256)]
        found = sum(c in seen for c in chunks)
        assert len(seen) > x.nbytes  # the traffic did go through the relay
        assert found == (0 if secure else len(chunks)), (found, len(chunks))
    finally:
        stop(proc)
        relay.close()
        cluster.close()


# the control (no keys: the rows are found) is slow-marked; the worker link's control runs by default
@pytest.mark.parametrize("secure", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_relay_sees_nothing_of_the_shadow_link(shadow_model: Path, tmp_path: Path, secure: bool) -> None:
    """The shadow link carries the main model's K/V rows and every token: with keys none of the rows'
    bytes cross the wire in clear (without keys, the control, they do). With keys, a second connection
    with the node's own key cannot take the node's place while it answers."""
    server = K.KeyPair.generate()
    pair, secret = keyfile(tmp_path, "n")
    with Engine(shadow_model, n_ctx=64, n_threads=1) as engine:
        remote = RemoteShadowPredictor(engine, 1, keys=K.ServerKeys(server, {pair.public: "n"}) if secure else None)
        relay = Relay(int(remote.endpoint.rsplit(":", 1)[1]))
        proc = spawn_node(f"tcp://127.0.0.1:{relay.port}", shadow_model, tmp_path / "n.log",
                          *(key_flags(secret, server) if secure else []))
        ctx = zmq.Context()
        twin = ctx.socket(zmq.DEALER)
        twin.linger = 0
        try:
            remote.wait_for_shadow(60)
            greedy_tokens(engine, PROMPT, 4)  # the second eval sends the prompt's K/V rows
            wait_until(lambda: remote.stats()["routes"] > 0, 30, "no routes came back", lambda: remote._drain(0.1))
            n = len(PROMPT)
            rows = np.concatenate([np.stack(engine.kv.read_f32(il, 0, n)).ravel() for il in range(engine.cfg.n_layer)])
            chunks = [rows.tobytes()[i:i + 32] for i in range(0, rows.nbytes, 512)]
            seen = bytes(relay.seen)
            found = sum(c in seen for c in chunks)
            assert len(seen) > rows.nbytes  # the rows did go through the relay
            assert found == (0 if secure else len(chunks)), (found, len(chunks))
            if secure:
                identity = remote._peer
                K.arm_client(twin, K.ClientKeys(pair, server.public))
                twin.connect(remote.endpoint)
                for _ in range(3):
                    twin.send_multipart(P.encode(P.SHADOW_HELLO, name="twin", model=manifest_hash(shadow_model), pid=1,
                                                 shadow_type="q4_0"))
                    remote._drain(0.2)
                assert remote._peer == identity and remote.connected and remote.stats()["node"] == "test-shadow"
                assert not twin.poll(200), "the twin got an answer while the node answers"
        finally:
            stop(proc)
            relay.close()
            twin.close(0)
            ctx.term()
            remote.close()


def test_insecure_off_loopback_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="edgemoe.keys"):
        K.require_keys_or_insecure("tcp://10.1.2.3:5555", False, True, "--connect")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "INSECURE" in caplog.text


def test_one_log_line_per_refused_key(caplog: pytest.LogCaptureFixture) -> None:
    """ZAP's answer for an unlisted key: refused, logged once a minute per key (not once per attempt)."""
    ctx = zmq.Context()
    listed, a, b = K.KeyPair.generate(), K.KeyPair.generate(), K.KeyPair.generate()
    auth = K.Authenticator(ctx, K.ServerKeys(K.KeyPair.generate(), {listed.public: "w"}))
    try:
        with caplog.at_level("WARNING", logger="edgemoe.keys"):
            assert auth.callback("edgemoe", listed.public)
            assert not any([auth.callback("edgemoe", a.public) for _ in range(5)] + [auth.callback("edgemoe", b.public)])
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 2 and a.public.decode() in refused[0] and b.public.decode() in refused[1], refused
    finally:
        auth.stop()
        ctx.term()


def test_keys_from_the_command_line_end_to_end(q8: Path, reference, tmp_path: Path) -> None:
    """`edgemoe keygen` for both sides, `run --key --allow DIR --bind` and `worker --key --coordinator-key`:
    the listed worker joins over CurveZMQ and the text is the in-process engine's; a worker with a key
    of its own that is not in the folder is refused meanwhile."""
    keys = tmp_path / "keys"
    for name in ("coordinator", "pi-01", "stranger"):
        assert run_cli("keygen", str(keys / name), "--name", name).returncode == 0
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    want = run_cli("run", str(q8), "-p", "Once upon a time", "-n", "4", "--temp", "0")
    assert want.returncode == 0, want.stderr
    coord = subprocess.Popen([sys.executable, "-m", "edgemoe", "run", str(q8), "-p", "Once upon a time", "-n", "4",
                              "--temp", "0", "--bind", f"tcp://127.0.0.1:{port}", "--wait-workers", "1",
                              "--key", str(keys / "coordinator" / "coordinator.key_secret"),
                              "--allow", str(keys / "pi-01")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = spawn_worker(f"tcp://127.0.0.1:{port}", q8, tmp_path / "w.log", "--key",
                        str(keys / "pi-01" / "pi-01.key_secret"), "--coordinator-key",
                        str(keys / "coordinator" / "coordinator.key"), name="pi-01")
    stranger = spawn_worker(f"tcp://127.0.0.1:{port}", q8, tmp_path / "s.log", "--key",
                            str(keys / "stranger" / "stranger.key_secret"), "--coordinator-key",
                            str(keys / "coordinator" / "coordinator.key"), name="pi-02")
    try:
        wait_until(lambda: "refused this node's key" in (tmp_path / "s.log").read_text(), 60,
                   "the unlisted worker was not refused")
        out, err = coord.communicate(timeout=120)
        assert coord.returncode == 0, err
        assert out == want.stdout
        assert "welcomed as worker 0" in (tmp_path / "w.log").read_text()
        assert "welcomed" not in (tmp_path / "s.log").read_text()
    finally:
        if coord.poll() is None:
            coord.kill()
            coord.communicate()
        stop(proc)
        stop(stranger)


# -- liveness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_lost_worker_costs_at_most_three_heartbeats(q8: Path, reference, sig: str) -> None:
    want, _ = reference
    # residency off: the paper's scheduling by groups, so that a returning worker's use is visible (with
    # residency on, the placement keeps experts where they are and gives a returning worker only new room)
    with open_engine(q8, ClusterOptions(workers=3, predictor="reactive", residency="off"), n_ctx=128, n_threads=1) as engine:
        cluster: ClusterExperts = engine.experts
        # the victim: the worker of the lowest id, which the reactive schedule gives the first miss of each layer
        w = min(cluster.live_workers(), key=lambda x: x.worker_id)
        victim = next(p for p in engine.local_workers.procs if p.pid == w.pid)
        try:
            tokens, times = generate_with(engine, PROMPT, 16, 4, lambda: victim.send_signal(getattr(signal, sig)))
            assert tokens == want
            wait_until(lambda: not w.alive, 3 * cluster.heartbeat_s + 2, "the silent worker was not lost",
                       lambda: cluster._poll(0.1))
            assert w.lost == 1
            limit = 3 * cluster.heartbeat_s
            assert max(times) <= limit + 1.5, f"stall of {max(times):.2f} s, limit about {limit:g} s"
            assert max(times) < cluster.timeout_s / 5  # not the request timeout
            if sig == "SIGSTOP":
                victim.send_signal(signal.SIGCONT)
                wait_until(lambda: w.alive, 15, "the worker was not admitted again", lambda: cluster._poll(0.1))
                before = w.requests
                tokens, _ = generate_with(engine, PROMPT, 16, -1, lambda: None)
                assert tokens == want and w.requests > before, "the returning worker was not used again"
        finally:
            victim.send_signal(signal.SIGCONT)


def test_returning_worker_gets_residents_again(q8: Path, reference) -> None:
    """Residency auto, 3 workers (the budget of 2 holds every expert): a worker SIGSTOPped mid-generation
    is lost and the other two take its residents over; after SIGCONT it is admitted again with its share
    of the residents (not only the room nobody needed), and computes them as hits. Then the same
    with a restarted worker process holding the same key. Text exact throughout."""
    want, _ = reference
    with open_engine(q8, ClusterOptions(workers=3, predictor="reactive", residency="auto"), n_ctx=128,
                     n_threads=1) as engine:
        cluster: ClusterExperts = engine.experts
        local = engine.local_workers
        w = min(cluster.live_workers(), key=lambda x: x.worker_id)
        victim = next(p for p in local.procs if p.pid == w.pid)
        share = {k for k, x in cluster.placement.items() if x is w}
        assert share and len(cluster.placement) == len(cluster._sizes)
        # a local cluster is authenticated with no set-up: ephemeral keys, each worker known by its own
        assert cluster.auth is not None and len({x.key for x in cluster.live_workers()}) == 3
        assert all(x.key in cluster.auth.keys.allowed for x in cluster.live_workers())

        try:
            tokens, _ = generate_with(engine, PROMPT, 16, 4, lambda: victim.send_signal(signal.SIGSTOP))
            assert tokens == want
            wait_until(lambda: not w.alive, 3 * cluster.heartbeat_s + 2, "the stopped worker was not lost",
                       lambda: cluster._poll(0.1))
            assert w not in cluster.placement.values() and len(cluster.placement) == len(cluster._sizes)
            for how in ("SIGCONT", "restart"):
                if how == "SIGCONT":
                    victim.send_signal(signal.SIGCONT)
                else:  # a new process with the same key: the coordinator knows it as the same worker
                    victim.kill()
                    victim.wait(10)
                    wait_until(lambda: not w.alive, 3 * cluster.heartbeat_s + 2, "the killed worker was not lost",
                               lambda: cluster._poll(0.1))
                    local.spawn(f"{w.name}-again", list(victim.args[3:]))
                    victim = local.procs[-1]
                wait_until(lambda: w.alive and w.resident > 0, 20, f"the worker was not re-admitted with residents ({how})",
                           lambda: cluster._poll(0.1))
                again = {k for k, x in cluster.placement.items() if x is w}
                assert len(again) == w.resident and len(cluster.placement) == len(cluster._sizes)
                assert len(again) >= len(share) // 2, (len(again), len(share))  # its share, not leftovers
                hits = w.hits
                tokens, _ = generate_with(engine, PROMPT, 16, -1, lambda: None)
                assert tokens == want, how
                assert w.hits > hits, f"the re-admitted worker computed none of its residents as hits ({how})"
        finally:
            victim.send_signal(signal.SIGCONT)


def test_local_daemons_end_with_their_coordinator(shadow_model: Path, tmp_path: Path) -> None:
    """SIGKILL the coordinator process: its spawned workers and shadow node end too (parent-death signal)."""
    script = ("import sys, time\n"
              "from edgemoe.cluster.session import ClusterOptions, open_engine\n"
              f"opts = ClusterOptions(workers=2, predictor='shadow', shadow_node='local')\n"
              f"with open_engine({str(shadow_model)!r}, opts, n_ctx=64, n_threads=1) as e:\n"
              "    procs = e.local_workers.procs + e.local_shadow.procs\n"
              "    print(' '.join(str(p.pid) for p in procs), flush=True)\n"
              "    time.sleep(120)\n")
    coord = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in coord.stdout.readline().split()]
        assert len(pids) == 3
        coord.kill()
        coord.wait(10)
        deadline = time.monotonic() + 15
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()]
        assert not alive, f"workers {alive} outlived their coordinator"
    finally:
        if coord.poll() is None:
            coord.kill()
            coord.wait(10)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_one_failing_worker_is_a_clear_error(q8: Path, tmp_path: Path) -> None:
    """The only worker cannot serve layer 0 (its shards are missing there): one error line, exit 2."""
    model = tmp_path / "model"
    shutil.copytree(q8, model)
    for e in range(8):
        (model / expert_file_name(0, e)).unlink()
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    coord = subprocess.Popen([sys.executable, "-m", "edgemoe", "run", str(q8), "-p", "Once upon a time", "-n", "4",
                              "--temp", "0", "--bind", f"tcp://127.0.0.1:{port}", "--wait-workers", "1",
                              "--request-timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = spawn_worker(f"tcp://127.0.0.1:{port}", model, tmp_path / "w.log")
    try:
        _, err = coord.communicate(timeout=120)
        assert coord.returncode == 2 and "Traceback" not in err, err
        errors = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and "L0.E" in errors[0] and "missing" in errors[0], err
    finally:
        if coord.poll() is None:
            coord.kill()
            coord.communicate()
        stop(proc)


# -- integrity -----------------------------------------------------------------------------------


def test_shard_changed_on_disk_is_refused_and_the_text_stays_exact(q8: Path, reference, tmp_path: Path) -> None:
    """Worker A has its own copy of the model; after A has used its shards, a byte of each of them is
    flipped: A refuses them before compute, B computes them, the tokens stay exact."""
    want, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(q8, copy)
    logs = tmp_path / "a.log"
    cluster: ClusterExperts | None = None
    procs: list[subprocess.Popen] = []

    def backend(engine: Engine) -> ClusterExperts:
        nonlocal cluster
        cluster = ClusterExperts(q8, n_embd=engine.cfg.n_embd, n_expert=engine.cfg.n_expert, k=engine.cfg.n_expert_used,
                                 moe_layers=engine.moe_layers)
        return cluster

    with Engine(q8, n_ctx=128, n_threads=1, experts=backend) as engine:
        try:
            procs.append(spawn_worker(cluster.endpoint, copy, logs, name="a"))
            procs.append(spawn_worker(cluster.endpoint, q8, tmp_path / "b.log", name="b"))
            cluster.wait_for_workers(2, 60)
            assert greedy_tokens(engine, PROMPT, 16)[0] == want
            a = next(w for w in cluster.workers.values() if w.name == "a")
            assert a.requests > 0
            for f in sorted((copy / "experts").iterdir()):
                with open(f, "r+b") as fh:  # in place: same inode and size, new bytes
                    fh.seek(-1, os.SEEK_END)
                    last = fh.read(1)
                    fh.seek(-1, os.SEEK_END)
                    fh.write(bytes([last[0] ^ 0xFF]))
            retries = cluster.stats.retries
            assert greedy_tokens(engine, PROMPT, 16)[0] == want
            assert cluster.stats.retries > retries
            text = logs.read_text()
            assert "changed on disk" in text or "does not match the manifest" in text
            assert all(p.poll() is None for p in procs)
        finally:
            for p in procs:
                stop(p)


# -- small cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--temp", "nan"], "--temp"),
    (["--request-timeout", "nan", "--workers", "1"], "--request-timeout"),
    (["--request-timeout", "inf", "--workers", "1"], "--request-timeout"),
])
def test_non_finite_numbers_are_refused(q8: Path, args: list[str], needle: str) -> None:
    r = run_cli("run", str(q8), "-p", "hi", "-n", "1", *args)
    assert r.returncode == 2 and r.stderr.startswith("error:") and needle in r.stderr, r.stderr


def test_non_utf8_prompt_is_refused(q8: Path) -> None:
    env = {**os.environ, "PYTHONUTF8": "1"}
    r = subprocess.run([sys.executable.encode(), b"-m", b"edgemoe", b"run", str(q8).encode(), b"-p", b"caf\xe9", b"-n", b"1"],
                       capture_output=True, env=env)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and err.startswith("error:") and "UTF-8" in err and "Traceback" not in err, err


def test_non_utf8_chat_line_is_skipped_with_one_error_line(q8: Path) -> None:
    """`chat` reads stdin: a line that is not UTF-8 gets one error line and is skipped; the next is answered."""
    r = subprocess.run([sys.executable, "-m", "edgemoe", "chat", str(q8), "-n", "2", "--temp", "0"],
                       input=b"caf\xe9\nhello\n", capture_output=True, timeout=120)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0 and "Traceback" not in err, err
    assert [l for l in err.splitlines() if l.startswith("error:")] == ["error: a line of input is not valid UTF-8; skipped"]
    assert r.stdout.strip(), "the valid line after it was not answered"


def test_disk_full_during_convert_is_one_error_line(fixtures_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The CLI's ENOSPC handling, in process with a faked error: it runs where no tmpfs can be mounted
    (the real full disk is the next test, skipped there)."""
    import errno

    import edgemoe.convert
    from edgemoe.cli.main import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(edgemoe.convert, "write_model", full)
    assert main(["convert", str(fixtures_dir / f"{Q8}.gguf"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "No space left" in err and err.count("\n") == 1, err


@pytest.fixture()
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs of its own (we are root in the test containers); skipped where mount is not permitted.
    Always unmounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root and mount(8) to make a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(mnt)], capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_disk_filling_during_convert_is_one_error_line(fixtures_dir: Path, small_tmpfs: Path) -> None:
    """A real full disk: `edgemoe convert` into a 64 MiB tmpfs (the free-space check passes: the model
    needs about 27 MiB); the moment its partial output appears, the test fills the file system (another
    writer). One `error:` line, exit 2, no traceback, and nothing of the conversion left: no partial
    folder, no output, not even the parent folders it made."""
    mnt = small_tmpfs
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "convert", str(fixtures_dir / "llama-moe-q4_k_m.gguf"),
                             str(mnt / "new" / "model"), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (mnt / "new").exists() or not any((mnt / "new").iterdir()):  # the check passed: .model.partial-*
            assert proc.poll() is None, f"convert ended before writing: {proc.communicate()}"
            assert time.monotonic() < deadline, "convert wrote nothing within 60 s"
            time.sleep(0.001)
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            st = os.statvfs(mnt)
            os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
            try:  # whatever is left after the reservation (tmpfs rounds in pages)
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (proc.returncode, err)
        assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error:"), err
        assert "No space left" in err and "disk filled" in err, err
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"], list(mnt.rglob("*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

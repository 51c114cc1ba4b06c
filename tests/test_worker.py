"""The worker daemon as a real process, against a minimal fake coordinator on real ZeroMQ sockets.

The fake coordinator (a ROUTER for workers plus an XPUB for predictions, bound to free ports on
127.0.0.1) speaks edgemoe.cluster.protocol. Every worker is started as `python -m edgemoe worker`
and always terminated by its pid in a finally block.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest
import zmq

from edgemoe.cluster import protocol as P
from edgemoe.cluster.budget import default_reserve, page_round
from edgemoe.format.manifest import expert_file_name, manifest_hash
from edgemoe.model.expert_ffn import ShardLayout
from tests.experts_ref import ExpertsReference
from edgemoe.util.proc import peak_rss_bytes

pytestmark = pytest.mark.timeout(60)

HEARTBEAT_S = 0.2


class FakeCoordinator:
    """A ROUTER + XPUB pair speaking protocol.py; answers UNKNOWN_PEER to heartbeats of strangers."""

    def __init__(self, router_port: int | None = None, pub_port: int | None = None) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a worker reconnecting under its name takes over
        self.pub = self.ctx.socket(zmq.XPUB)  # XPUB: we see when a worker's subscription arrives
        self.pub.linger = 0
        if router_port is None:
            self.router_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        else:
            self.router_port = router_port
            self.router.bind(f"tcp://127.0.0.1:{router_port}")
        if pub_port is None:
            self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        else:
            self.pub_port = pub_port
            self.pub.bind(f"tcp://127.0.0.1:{pub_port}")
        self.known: dict[bytes, int] = {}
        self.heartbeats: list[P.Message] = []

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.router_port}"

    def recv(self, timeout: float = 10.0) -> tuple[bytes, P.Message]:
        """The next message other than a heartbeat (heartbeats are recorded, strangers told UNKNOWN_PEER)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.router.poll(int(left * 1000) + 1):
                raise TimeoutError("no message from the worker")
            ident, *frames = self.router.recv_multipart()
            msg = P.decode(frames)
            if msg.type == P.HEARTBEAT:
                self.heartbeats.append(msg)
                if ident not in self.known:
                    self.send(ident, P.UNKNOWN_PEER)
                continue
            return ident, msg

    def expect(self, msg_type: str, timeout: float = 10.0) -> tuple[bytes, P.Message]:
        ident, msg = self.recv(timeout)
        assert msg.type == msg_type, f"expected {msg_type}, got {msg.type} {msg.fields}"
        return ident, msg

    def send(self, ident: bytes, msg_type: str, tensor: np.ndarray | None = None, **fields: Any) -> None:
        self.router.send_multipart([ident, *P.encode(msg_type, tensor, **fields)])

    def send_raw(self, ident: bytes, frames: list[bytes]) -> None:
        self.router.send_multipart([ident, *frames])

    def welcome(self, ident: bytes, worker_id: int = 7) -> None:
        self.known[ident] = worker_id
        self.send(ident, P.WELCOME, worker_id=worker_id, pub=f"tcp://127.0.0.1:{self.pub_port}", heartbeat_s=HEARTBEAT_S)
        assert self.pub.poll(10_000), "the worker did not subscribe to predictions"
        assert self.pub.recv() == b"\x01"  # subscribed to everything

    def publish(self, msg_type: str, **fields: Any) -> None:
        self.pub.send_multipart(P.encode(msg_type, **fields))

    def compute(self, ident: bytes, req: int, layer: int, expert: int | list[int], x: np.ndarray,
                timeout: float = 10.0, rows: list[int] | None = None) -> P.Message:
        experts = [expert] if isinstance(expert, int) else expert
        self.send(ident, P.COMPUTE, x, req=req, layer=layer, experts=experts, rows=rows or [x.shape[0]])
        _, msg = self.recv(timeout)
        assert msg.type in (P.RESULT, P.FAIL), msg
        assert msg["req"] == req
        return msg

    def close(self) -> None:
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()


class WorkerProc:
    """`python -m edgemoe worker` as a subprocess, its log in a file."""

    def __init__(self, coord_endpoint: str, model: Path, log: Path, *, budget: str = "512MiB", name: str = "w1",
                 extra: tuple[str, ...] = ()) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        env = {**os.environ, "GGML_NO_BACKTRACE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgemoe", "worker", "--connect", coord_endpoint, "--model", str(model),
             "--memory-budget", budget, "--threads", "1", "--name", name, "--log-level", "DEBUG", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log())) < count:
            assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {count}x {pattern!r} in the worker's log:\n{self.log()}"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture(scope="module")
def q8_model(converted_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-moe-q8_0 with its manifest, experts linked in, L3.E7 damaged and L3.E6 missing (trunk not needed)."""
    src = converted_models["llama-moe-q8_0"]
    dst = tmp_path_factory.mktemp("q8") / "model"
    (dst / "experts").mkdir(parents=True)
    shutil.copy(src / "manifest.json", dst / "manifest.json")
    for f in sorted((src / "experts").iterdir()):
        if f.name == Path(expert_file_name(3, 6)).name:
            continue
        if f.name == Path(expert_file_name(3, 7)).name:
            data = bytearray(f.read_bytes())
            data[-1] ^= 0xFF
            (dst / "experts" / f.name).write_bytes(bytes(data))
        else:
            (dst / "experts" / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="module")
def local_q8(converted_models: dict[str, Path]) -> ExpertsReference:
    return ExpertsReference(converted_models["llama-moe-q8_0"])


class Served:
    coord: FakeCoordinator
    worker: WorkerProc
    ident: bytes
    hello: P.Message
    worker_id: int = 7


@pytest.fixture(scope="module")
def served(q8_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served()
    s.coord = FakeCoordinator()
    s.worker = WorkerProc(s.coord.endpoint, q8_model, tmp_path_factory.mktemp("log") / "worker.log")
    try:
        s.ident, s.hello = s.coord.expect(P.HELLO)
        s.coord.welcome(s.ident, s.worker_id)
        yield s
    finally:
        s.worker.stop()
        s.coord.close()


def expert_out(local: ExpertsReference, layer: int, expert: int, x: np.ndarray) -> np.ndarray:
    """The in-process expert's output (llama.cpp's kernels on the shard, in this process)."""
    return local.compute(layer, expert, x)


def hidden(n: int, seed: int, n_embd: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n_embd), dtype=np.float32)


def n_embd_of(model: Path) -> int:
    return ShardLayout.read(model / expert_file_name(0, 0)).tensors["down"].ne[1]


# ------------------------------------------------------------------------------------------------


def test_hello_names_the_model(served: Served, q8_model: Path) -> None:
    h = served.hello
    assert served.hello["name"] == "w1"  # a name for the logs; the coordinator knows it by its connection (or key)
    assert h["name"] == "w1"
    assert h["model"] == manifest_hash(q8_model)
    assert h["pid"] == served.worker.pid
    assert h["budget"] == 512 << 20 and h["threads"] == 1
    assert 10 << 20 < h["baseline_rss"] < 512 << 20
    served.worker.wait_log("welcomed as worker 7")


def test_compute_equals_local_experts(served: Served, local_q8: ExpertsReference, q8_model: Path) -> None:
    n_embd = n_embd_of(q8_model)
    for req, (layer, expert, n) in enumerate([(0, 0, 1), (1, 5, 3), (3, 2, 7), (2, 7, 64)], start=100):
        x = hidden(n, req, n_embd)
        msg = served.coord.compute(served.ident, req, layer, expert, x)
        assert msg.type == P.RESULT, msg.fields
        assert (msg["layer"], msg["experts"], msg["rows"]) == (layer, [expert], [n])
        assert msg["hits"] == 0 and msg["wait_s"] == 0 and msg["load_s"] > 0 and msg["compute_s"] > 0
        assert msg.tensor.shape == (n, n_embd)
        assert np.array_equal(msg.tensor, expert_out(local_q8, layer, expert, x)), (layer, expert, n)
    served.worker.wait_log(r"drop L2\.E7 \(computed\)")


def test_heartbeats_while_idle(served: Served) -> None:
    before = len(served.coord.heartbeats)
    time.sleep(4 * HEARTBEAT_S)
    with pytest.raises(TimeoutError):
        served.coord.recv(timeout=0.05)  # collects the heartbeats that arrived
    beats = served.coord.heartbeats[before:]
    assert len(beats) >= 2
    assert all(0 < b["rss"] <= b["peak_rss"] < 512 << 20 for b in beats)


def test_prefetch_then_compute_hits(served: Served, local_q8: ExpertsReference, q8_model: Path) -> None:
    c, w, wid = served.coord, served.worker, served.worker_id
    x = hidden(2, 1, n_embd_of(q8_model))
    c.publish(P.PREFETCH, step=1, loads=[[wid, 2, 4], [wid + 1, 2, 5]])  # (2, 5) is another worker's
    w.wait_log(r"load L2\.E4:")
    msg = c.compute(served.ident, 200, 2, 4, x)
    assert msg.type == P.RESULT and msg["hits"] == 1 and msg["load_s"] == 0
    assert np.array_equal(msg.tensor, expert_out(local_q8, 2, 4, x))
    assert "load L2.E5" not in w.log()
    w.wait_log(r"drop L2\.E4 \(computed\)")

    # scheduled twice (steps 2 and 3): kept after the first compute, dropped after the second
    c.publish(P.PREFETCH, step=2, loads=[[wid, 1, 3]])
    c.publish(P.PREFETCH, step=3, loads=[[wid, 1, 3]])
    w.wait_log(r"prefetch step 3")
    w.wait_log(r"load L1\.E3:")
    assert c.compute(served.ident, 201, 1, 3, x)["hits"] == 1
    assert c.compute(served.ident, 202, 1, 3, x)["hits"] == 1
    w.wait_log(r"drop L1\.E3 \(computed\)")
    assert w.log().count("load L1.E3:") == 1
    assert c.compute(served.ident, 203, 1, 3, x)["hits"] == 0

    # a misprediction expires once a prefetch two steps newer arrives
    c.publish(P.PREFETCH, step=10, loads=[[wid, 0, 6]])
    w.wait_log(r"load L0\.E6:")
    c.publish(P.PREFETCH, step=12, loads=[[wid, 0, 1]])
    w.wait_log(r"drop L0\.E6 \(prefetch expired\)")
    assert c.compute(served.ident, 204, 0, 1, x)["hits"] == 1
    c.publish(P.PREFETCH, step=20, loads=[[wid, 0, 2]])
    w.wait_log(r"load L0\.E2:")
    c.publish(P.PREFETCH, step=22, loads=[[wid + 1, 0, 3]])  # nothing for us, still a newer step
    w.wait_log(r"drop L0\.E2 \(prefetch expired\)")


def test_one_message_many_experts(served: Served, local_q8: ExpertsReference, q8_model: Path) -> None:
    """One compute carries several experts of a layer, each on its own rows; outputs come back in order."""
    c = served.coord
    n_embd = n_embd_of(q8_model)
    x = hidden(4, 77, n_embd)
    msg = c.compute(served.ident, 250, 2, [1, 4, 6], x, rows=[1, 2, 1])
    assert msg.type == P.RESULT, msg.fields
    assert msg["experts"] == [1, 4, 6] and msg["rows"] == [1, 2, 1] and msg["hits"] == 0
    want = np.concatenate([expert_out(local_q8, 2, 1, x[:1]), expert_out(local_q8, 2, 4, x[1:3]), expert_out(local_q8, 2, 6, x[3:])])
    assert np.array_equal(msg.tensor, want)
    # more experts to load at once than the worker has just-in-time slots: refused, nothing stays pinned
    slots = served.hello["jit_slots"]
    many = list(range(slots + 1))
    msg = c.compute(served.ident, 251, 0, many, hidden(len(many), 78, n_embd), rows=[1] * len(many))
    assert msg.type == P.FAIL and "just-in-time slots" in msg["reason"]
    assert c.compute(served.ident, 252, 0, 0, x[:1]).type == P.RESULT


def test_residents_stay_mapped(served: Served, local_q8: ExpertsReference, q8_model: Path) -> None:
    c, w = served.coord, served.worker
    h = served.hello
    assert h["jit_slots"] == 3  # top-2 plus one for a prefetch
    assert 0 < h["resident_room"] < h["budget"] - h["baseline_rss"]
    x = hidden(1, 90, n_embd_of(q8_model))
    c.send(served.ident, P.RESIDENT, plan=1, experts=[[1, 0], [1, 1]])
    w.wait_log(r"resident plan 1: 2 experts")
    w.wait_log(r"load L1\.E0:")
    w.wait_log(r"load L1\.E1:")
    for req in (260, 261, 262):  # hits every time: computed, never dropped
        msg = c.compute(served.ident, req, 1, [0, 1], np.repeat(x, 2, axis=0), rows=[1, 1])
        assert msg.type == P.RESULT and msg["hits"] == 2 and msg["load_s"] == 0, msg.fields
        assert np.array_equal(msg.tensor[1:], expert_out(local_q8, 1, 1, x))
    assert "drop L1.E0" not in w.log() and w.log().count("load L1.E0:") == 1
    # a prediction of a resident loads nothing more
    c.publish(P.PREFETCH, step=50, loads=[[served.worker_id, 1, 0]])
    assert c.compute(served.ident, 263, 1, 0, x)["hits"] == 1
    c.send(served.ident, P.RESIDENT, plan=2, experts=[[1, 1]])
    w.wait_log(r"drop L1\.E0 \(no longer resident\)")
    assert c.compute(served.ident, 264, 1, 1, x)["hits"] == 1
    c.send(served.ident, P.RESIDENT, plan=3, experts=[[1, 1], [9, 0]])  # an expert this model lacks: warned, skipped
    w.wait_log(r"resident plan 3: no such expert in this model: L9\.E0")
    c.send(served.ident, P.RESIDENT, plan=4, experts=[])
    w.wait_log(r"drop L1\.E1 \(no longer resident\)")
    assert w.log().count("load L1.E1:") == 1


def test_bad_messages_are_logged_and_dropped(served: Served, local_q8: ExpertsReference, q8_model: Path) -> None:
    c, w, ident = served.coord, served.worker, served.ident
    n_embd = n_embd_of(q8_model)
    x = hidden(1, 5, n_embd)
    v = P.PROTOCOL_VERSION
    header = {"v": v, "t": "compute", "req": 1, "layer": 0, "experts": [0], "rows": [1], "dtype": "f32", "shape": [1, n_embd]}
    bad = [
        [b"\xc1garbage"],
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({"v": 99, "t": "heartbeat", "rss": 1, "peak_rss": 1})],
        [msgpack.packb({"v": v, "t": "teleport"})],
        [msgpack.packb(header)],  # no tensor frame
        [msgpack.packb(header), x.tobytes()[:-4]],  # short tensor frame
        [msgpack.packb({**header, "shape": [1 << 20, 1 << 10], "rows": [1 << 20]}), b"\0" * 16],  # oversized tensor
        [msgpack.packb({**header, "experts": [0, 0], "rows": [1, 0]}), x.tobytes()],  # an expert twice
        [msgpack.packb({**header, "rows": [2]}), x.tobytes()],  # rows do not add up to the tensor's
        [msgpack.packb({**header, "experts": [], "rows": []}), x.tobytes()],  # no expert
        [msgpack.packb({**header, "experts": list(range(P.MAX_EXPERTS_PER_COMPUTE + 1)),
                        "rows": [1] * (P.MAX_EXPERTS_PER_COMPUTE + 1)}), x.tobytes()],  # too many
        [msgpack.packb({"v": v, "t": "resident", "plan": 1, "experts": [[0, 1], [0, 1]]})],  # an expert twice
        [msgpack.packb({"v": v, "t": "resident", "plan": 1, "experts": [[0, -1]]})],
        [msgpack.packb({"v": True, "t": "heartbeat", "rss": 1, "peak_rss": 1})],  # True is not version 2
        [msgpack.packb({**header, "shape": [1 << 32, 1 << 32, 2, 1], "rows": [1 << 32]}), b""],  # np.prod overflows int64
        [msgpack.packb({"v": v, "t": "prefetch", "step": 1, "loads": []})],  # a publisher-only message
    ]
    for frames in bad:
        c.send_raw(ident, frames)
    c.pub.send_multipart([b"not msgpack"])
    c.pub.send_multipart([msgpack.packb({"v": v, "t": "prefetch", "step": 1, "loads": [[1, 2]]})])
    w.wait_log(r"WARNING dropped a malformed message from the coordinator", count=15)
    w.wait_log(r"WARNING dropped a malformed message from the publisher", count=2)
    w.wait_log(r"WARNING dropped an unexpected prefetch message from the coordinator")

    fails = {
        300: (0, 99, x, "no expert L0.E99"),
        301: (0, 1, hidden(1, 6, n_embd + 32), "this model needs"),
        302: (3, 7, x, "does not match the manifest"),
        303: (3, 6, x, "missing"),
    }
    for req, (layer, expert, xx, why) in fails.items():
        msg = c.compute(ident, req, layer, expert, xx)
        assert msg.type == P.FAIL and why in msg["reason"], msg.fields
    msg = c.compute(ident, 305, 0, 0, x)
    assert msg.type == P.RESULT and np.array_equal(msg.tensor, expert_out(local_q8, 0, 0, x))
    assert w.proc.poll() is None


def test_restarted_coordinator_is_rejoined(served: Served, local_q8: ExpertsReference, q8_model: Path) -> None:
    old = served.coord
    ports = old.router_port, old.pub_port
    old.close()
    time.sleep(2 * HEARTBEAT_S)
    served.coord = new = FakeCoordinator(*ports)
    ident, hello = new.expect(P.HELLO, timeout=10)
    assert hello["name"] == "w1" and hello["model"] == manifest_hash(q8_model)
    new.welcome(ident, worker_id=3)
    served.worker_id = 3
    x = hidden(2, 9, n_embd_of(q8_model))
    msg = new.compute(ident, 400, 1, 1, x)
    assert msg.type == P.RESULT and np.array_equal(msg.tensor, expert_out(local_q8, 1, 1, x))
    new.publish(P.PREFETCH, step=1, loads=[[3, 1, 2]])
    served.worker.wait_log(r"load L1\.E2:")
    assert new.compute(ident, 401, 1, 2, x)["hits"] == 1
    assert "reconnect" in served.worker.log()


# ------------------------------------------------------------------------------------------------
# workers of their own


def test_reject_exits_2(q8_model: Path, tmp_path: Path) -> None:
    coord = FakeCoordinator()
    w = WorkerProc(coord.endpoint, q8_model, tmp_path / "w.log", name="rejected")
    try:
        ident, _ = coord.expect(P.HELLO)
        coord.send(ident, P.REJECT, reason="serving another model")
        assert w.proc.wait(10) == 2
        log = w.log()
        assert "rejected by the coordinator: serving another model" in log
        assert "error: the coordinator rejected this worker: serving another model" in log
    finally:
        w.stop()
        coord.close()


def test_budget_below_baseline_refused(q8_model: Path, tmp_path: Path) -> None:
    w = WorkerProc("tcp://127.0.0.1:9", q8_model, tmp_path / "w.log", budget="8MiB")
    try:
        assert w.proc.wait(20) == 2
        errors = [line for line in w.log().splitlines() if line.startswith("error:")]
        assert len(errors) == 1, w.log()
        assert re.search(r"memory budget 8\.0 MiB is below this worker's baseline RSS \d+\.\d MiB", errors[0])
    finally:
        w.stop()


def test_budget_below_one_expert_names_the_smallest(q8_model: Path, served: Served, tmp_path: Path) -> None:
    """Above the baseline but without room for one expert: one error line naming the smallest budget
    that works; a worker given that budget starts."""
    layout = ShardLayout.read(q8_model / expert_file_name(0, 0))
    budget = served.hello["baseline_rss"] + default_reserve(layout.tensors["down"].ne[1], layout.n_ff) // 2
    w = WorkerProc("tcp://127.0.0.1:9", q8_model, tmp_path / "w.log", budget=str(budget))
    try:
        assert w.proc.wait(20) == 2
        errors = [line for line in w.log().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in w.log(), w.log()
        m = re.search(r"the smallest budget that works is (\d+)MiB$", errors[0])
        assert m, errors[0]
    finally:
        w.stop()
    coord = FakeCoordinator()
    ok = WorkerProc(coord.endpoint, q8_model, tmp_path / "ok.log", budget=f"{m.group(1)}MiB", name="smallest")
    try:
        ident, hello = coord.expect(P.HELLO, timeout=20)
        assert hello["jit_slots"] >= 1
    finally:
        ok.stop()
        coord.close()


def test_bounded_memory_and_sigterm(converted_models: dict[str, Path], served: Served, tmp_path: Path) -> None:
    """Budget = baseline + reserve + two experts: many experts served, peak RSS (seen from outside) within budget."""
    model = converted_models["llama-moe-f32"]
    local = ExpertsReference(model)
    layout = ShardLayout.read(model / expert_file_name(0, 0))
    n_embd, n_ff = layout.tensors["down"].ne[1], layout.n_ff
    shard = page_round(layout.size)
    budget = served.hello["baseline_rss"] + default_reserve(n_embd, n_ff) + 2 * shard + shard // 2
    coord = FakeCoordinator()
    w = WorkerProc(coord.endpoint, model, tmp_path / "w.log", budget=str(budget), name="small")
    try:
        ident, hello = coord.expect(P.HELLO)
        coord.welcome(ident, 1)
        results = []
        req = 0
        # prefetched in order: the loader holds at most what fits, computes drop, loads continue
        coord.publish(P.PREFETCH, step=1, loads=[[1, 0, e] for e in range(8)])
        w.wait_log(r"load L0\.E1:")  # (the rest load as computes free memory, maybe not in time: misses)
        for e in range(8):
            req += 1
            results.append((coord.compute(ident, req, 0, e, x := hidden(2, req, n_embd)), 0, e, x))
        # on demand, no prediction
        for e in range(8):
            req += 1
            results.append((coord.compute(ident, req, 1, e, x := hidden(1, req, n_embd)), 1, e, x))
        # predicted in one order, asked in the reverse one: demands evict idle prefetched shards
        coord.publish(P.PREFETCH, step=2, loads=[[1, 2, e] for e in range(8)])
        w.wait_log(r"load L2\.E1:")
        for e in reversed(range(8)):
            req += 1
            results.append((coord.compute(ident, req, 2, e, x := hidden(3, req, n_embd)), 2, e, x))
        for msg, layer, expert, x in results:
            assert msg.type == P.RESULT, msg.fields
            assert np.array_equal(msg.tensor, expert_out(local, layer, expert, x)), (layer, expert)
        assert all(b["rss"] < budget for b in coord.heartbeats)
        hits = sum(m["hits"] for m, *_ in results)
        assert 2 + 1 <= hits < len(results)  # L0.E0, L0.E1 and the last one asked of layer 2 at least
        assert "evicted for" in w.log()
        peak = peak_rss_bytes(w.pid)
        assert peak < budget, f"peak RSS {peak} above budget {budget} (baseline {hello['baseline_rss']})"

        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(5) == 0
        coord.expect(P.BYE, timeout=2)
        assert "shutdown" in w.log()
    finally:
        w.stop()
        coord.close()

"""The two ends of a cluster link (edgemoe.cluster.link) on loopback, without keys: what every
coordinator-side and daemon-side link does, checked once here (the daemons' own tests cover them
with keys, faults and real processes)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import zmq

from edgemoe.cluster import link as L
from edgemoe.cluster import protocol as P
from edgemoe.errors import UserError

log = logging.getLogger("test.link")


@pytest.fixture
def router():
    r = L.RouterLink("tcp://127.0.0.1:0", keys=None, max_frame=P.frame_limit(), heartbeat_s=0.05, log=log)
    yield r
    r.close()


def receive_all(r: L.RouterLink, want: int, timeout_s: float = 5.0) -> list[tuple[bytes, bytes, list]]:
    got: list[tuple[bytes, bytes, list]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        r.receive(0.05, lambda identity, key, frames: got.append((identity, key, frames)))
    return got


def test_router_knows_peers_by_connection_and_reads_their_heartbeats(router: L.RouterLink) -> None:
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    try:
        d.connect(router.endpoint)
        d.send_multipart(P.encode(P.HEARTBEAT, rss=5 << 20, peak_rss=7 << 20))
        d.send_multipart([b"not json"])
        (identity, key, frames), (_, _, bad) = receive_all(router, 2)
        assert key == identity  # without keys a peer is its connection
        peer = L.Peer(identity, key, "p", last_seen=0.0)
        msg = router.decode(identity, frames, "p")
        assert msg is not None and msg.type == P.HEARTBEAT
        assert router.decode(identity, bad, "p") is None  # dropped, logged
        assert router.silent_for(peer) is not None  # last heard at time 0: long silent
        router.heard(peer, msg)
        assert (peer.rss, peer.peak_rss) == (5 << 20, 7 << 20) and router.silent_for(peer) is None
        time.sleep(L.LOST_AFTER * router.heartbeat_s + 0.05)
        assert router.silent_for(peer) > L.LOST_AFTER * router.heartbeat_s
        peer.alive = False
        assert router.silent_for(peer) is None  # a lost peer is not lost again
        assert [router.strike(peer) for _ in range(L.STRIKES)] == [False] * (L.STRIKES - 1) + [True]
    finally:
        d.close(0)
        ctx.term()


def test_router_answers_strangers_at_most_once_a_second_and_refuses_other_models(router: L.RouterLink) -> None:
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    try:
        d.connect(router.endpoint)
        d.send_multipart(P.encode(P.BYE))
        ((identity, _, _),) = receive_all(router, 1)
        router.unknown(identity)
        router.unknown(identity)  # within a second: not answered
        assert router.refuse_model(identity, identity, "worker", "w", "other-model", "our-model")
        assert not router.refuse_model(identity, identity, "worker", "w", "our-model", "our-model")
        got = []
        while d.poll(500):
            got.append(P.decode(d.recv_multipart()))
        assert [m.type for m in got] == [P.UNKNOWN_PEER, P.REJECT]
        assert "our-model" not in got[1]["reason"]  # an unauthenticated peer does not learn the hash
    finally:
        d.close(0)
        ctx.term()


def test_dealer_says_hello_until_welcomed_then_heartbeats_and_ends_on_a_reject(router: L.RouterLink) -> None:
    hellos = []
    dealer = L.DealerLink(router.endpoint, max_frame=P.frame_limit(), keys=None, log=log, role="test daemon",
                          hello=lambda: (P.BYE, {}), hello_interval=0.05)
    beats = []

    def step(events: dict) -> None:
        if dealer.dealer in events:
            dealer.drain(dealer.dealer, lambda msg: dealer.handle_common(msg) or dealer.welcome(0.05), "coordinator")
        dealer.timers(lambda: (beats.append(time.monotonic()), dealer.send(P.HEARTBEAT, rss=1, peak_rss=1)))

    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("result", _run(dealer, step)))
    dealer.relink.connect(router.endpoint)  # (start() would also catch signals: only the main thread may)
    t.start()
    try:
        got = receive_all(router, 2)  # hellos, every hello_interval until welcomed
        assert len(got) == 2 and all(P.decode(f).type == P.BYE for _, _, f in got)
        identity = got[0][0]
        router.send(identity, P.encode(P.WELCOME, worker_id=0, pub="tcp://127.0.0.1:1", heartbeat_s=0.05))
        deadline = time.monotonic() + 5
        while len(beats) < 3 and time.monotonic() < deadline:
            router.receive(0.05, lambda *a: hellos.append(a))
        assert len(beats) >= 3
        router.send(identity, P.encode(P.REJECT, reason="not today"))
        t.join(10)
        assert not t.is_alive()
        assert isinstance(out["result"], UserError) and "rejected this test daemon: not today" in str(out["result"])
    finally:
        dealer.stopping = True
        t.join(10)


def _run(dealer: L.DealerLink, step) -> object:
    try:
        return dealer.run(step, dealer.close)
    except UserError as e:
        return e


def test_parse_endpoint_and_names() -> None:
    assert L.parse_endpoint("tcp://10.0.0.2:5555") == ("10.0.0.2", 5555)
    assert L.parse_endpoint("ipc:///tmp/x/workers") == ("/tmp/x/workers", 0)
    with pytest.raises(UserError):
        L.parse_endpoint("tcp://host:0")
    assert L.check_name("board-1") == "board-1"
    with pytest.raises(UserError):
        L.check_name("-bad")

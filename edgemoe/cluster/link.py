"""The two ends of a cluster link, written once: the ROUTER that binds (coordinator side) and the DEALER
that connects (daemon side).

`RouterLink` binds a ROUTER (CurveZMQ with the ZAP allow-list when given keys), knows each message's
sender by its public key (the ZAP User-Id ZeroMQ attaches; without keys by its connection), drops
what does not decode, refuses a hello for another model, answers a stranger `unknown` (at most
once a second to one connection), and records each admitted peer's heartbeats: liveness (silent for
LOST_AFTER intervals: lost) and its memory figures. The coordinator (workers) and the remote shadow
(the shadow node) are built on it.

`DealerLink` is a daemon's loop around its DEALER: hello until welcomed, then heartbeats; a bounded
drain so that timers get their turn; reconnects (ZeroMQ's, plus `Relinker` for links dropped on a
protocol error) with a fresh hello; handshake failures logged once; SIGTERM/SIGINT and a wake pipe;
`bye` on the way out. The worker and the shadow node are built on it.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from edgemoe.cluster import protocol as P
from edgemoe.cluster.keys import Authenticator, ClientKeys, ServerKeys, peer_key
from edgemoe.cluster.sockets import (Relinker, WakePipe, bind_endpoint, dealer_socket, handshake_failure,
                                     model_mismatch, monitor_events)
from edgemoe.errors import UserError

LOST_AFTER = 3  # heartbeat intervals of silence after which a peer is lost
STRIKES = 3  # failed or timed-out requests in a row after which a peer is lost
UNKNOWN_EVERY_S = 1.0  # at most this often an `unknown` to the same connection
HELLO_INTERVAL_S = 2.0  # a daemon re-sends its hello this often while not welcomed
HELLO_RETRY_S = 0.1  # ... and this often while the link is not up yet (sends would be refused)
DRAIN_MAX = 1000  # messages a daemon handles before its timers get their turn
_CONNECT_RE = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_IPC_RE = re.compile(r"^ipc://(/[A-Za-z0-9._/-]{1,100})$")  # a local cluster: Unix sockets, no TCP stack
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")


def parse_endpoint(endpoint: str, what: str = "--connect") -> tuple[str, int]:
    """(host, port) of tcp://HOST:PORT; (path, 0) of ipc:///PATH (a coordinator on this host)."""
    m = _IPC_RE.match(endpoint)
    if m is not None:
        return m.group(1), 0
    m = _CONNECT_RE.match(endpoint)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise UserError(f"{what}: {endpoint!r} is not an endpoint of the form tcp://HOST:PORT")
    return m.group(1), int(m.group(2))


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(f"worker name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ : @ - (starting with a letter or digit)")
    return name


@dataclass(eq=False)  # a peer is itself, whatever its fields say
class Peer:
    """A peer a RouterLink admitted: its connection, who it is, and what its heartbeats said."""

    identity: bytes  # the ROUTER's id of its current connection
    key: bytes  # who it is: its public key (without keys: its first connection's id)
    name: str
    last_seen: float  # time.monotonic() of its last message
    alive: bool = True
    rss: int = 0  # from its last heartbeat
    peak_rss: int = 0  # the highest its heartbeats reported
    strikes: int = 0  # requests it failed in a row


class RouterLink:
    """A bound ROUTER and the rules every coordinator-side link follows (see the module docstring)."""

    def __init__(self, bind: str, *, keys: ServerKeys | None, max_frame: int, heartbeat_s: float,
                 log: logging.Logger, what: str = "", unknown_every_s: float = UNKNOWN_EVERY_S) -> None:
        """max_frame: the largest frame a peer may send (a bigger one disconnects it unread). what: how a
        bind failure names the endpoint ("the shadow endpoint "). unknown_every_s: 0 answers every
        message of a stranger."""
        self.heartbeat_s = heartbeat_s
        self.log = log
        self.unknown_every_s = unknown_every_s
        self._unknown_sent: dict[bytes, float] = {}
        self.zctx = zmq.Context()
        self.auth = Authenticator(self.zctx, keys) if keys is not None else None
        self.sock = self.zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # no ROUTER_HANDOVER and no peer-chosen routing ids: a connection cannot take over another's
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        if self.auth is not None:
            self.auth.arm(self.sock)
        try:
            self.endpoint = bind_endpoint(self.sock, bind)
        except zmq.ZMQError as e:
            self.close()
            raise UserError(f"cannot bind {what}{bind}: {e}") from None

    # receiving ----------------------------------------------------------------------------------
    def receive(self, timeout_s: float, handle: Callable[[bytes, bytes, list], None]) -> None:
        """Wait up to timeout_s for a message, then hand every queued one to handle(identity, key, frames).
        A message without an authenticated key is dropped (cannot happen on a CURVE socket: never
        guess); a bug in handling one is logged and the message dropped, but a UserError (the run
        cannot go on) is raised."""
        if timeout_s > 0 and not self.sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            key = peer_key(frames[-1]) if self.auth is not None else identity
            if key is None:
                self.log.warning("dropped a message without an authenticated key from connection %r", identity)
                continue
            try:
                handle(identity, key, frames[1:])
            except UserError:
                raise  # said once, by the CLI
            except Exception:
                self.log.exception("error handling a message from %r; dropped", identity)

    def decode(self, identity: bytes, frames: list, who: str, reject_foreign: bool = False) -> P.Message | None:
        """The message, or None (logged) when it does not decode. reject_foreign: answer a hello of
        another protocol version with a reject, so that the peer stops trying."""
        try:
            return P.decode(frames)
        except P.ProtocolError as e:
            self.log.warning("dropped a malformed message from %s: %s", who, e)
            if reject_foreign and P.is_foreign_hello(frames):
                self.send(identity, P.encode(P.REJECT, reason=f"protocol mismatch: the coordinator speaks version {P.PROTOCOL_VERSION}"))
            return None

    def refuse_model(self, identity: bytes, key: bytes, role: str, name: str, theirs: str, ours: str) -> bool:
        """Reject a hello for another model (True: refused). The manifest hash is what admission checks:
        only an authenticated peer may learn it."""
        if theirs == ours:
            return False
        reason = model_mismatch(role, name, theirs, ours if self.auth else None)
        self.log.warning("refused %s %s (%s): %s", role, name, self.peer_label(key), reason)
        self.send(identity, P.encode(P.REJECT, reason=reason))
        return True

    def unknown(self, identity: bytes) -> None:
        """Tell a connection this side does not know it (say hello again), at most every unknown_every_s."""
        if self.once_in_a_while(identity):
            self.send(identity, P.encode(P.UNKNOWN_PEER))

    def once_in_a_while(self, identity: bytes) -> bool:
        """True at most every unknown_every_s for one connection (answers and warnings to strangers)."""
        now = time.monotonic()
        if now - self._unknown_sent.get(identity, -1e9) < self.unknown_every_s:
            return False
        self._unknown_sent[identity] = now
        return True

    def heard(self, peer: Peer, msg: P.Message) -> None:
        """A message from an admitted peer: it is alive; a heartbeat's memory figures are recorded."""
        peer.last_seen = time.monotonic()
        if msg.type == P.HEARTBEAT:
            peer.rss, peer.peak_rss = msg["rss"], max(peer.peak_rss, msg["peak_rss"])

    def silent_for(self, peer: Peer) -> float | None:
        """Seconds a live peer has been silent, when that is beyond LOST_AFTER heartbeat intervals (it is lost)."""
        quiet = time.monotonic() - peer.last_seen
        return quiet if peer.alive and quiet > LOST_AFTER * self.heartbeat_s else None

    def strike(self, peer: Peer) -> bool:
        """The peer failed a request: True when that makes STRIKES in a row (lose it). A good answer
        resets the count (peer.strikes = 0), and so does a fresh hello."""
        peer.strikes += 1
        return peer.strikes >= STRIKES

    def peer_label(self, key: bytes) -> str:
        return f"key {key.decode(errors='replace')}" if self.auth is not None else f"connection {key!r}"

    # sending ------------------------------------------------------------------------------------
    def send(self, identity: bytes, frames: list, block: bool = True) -> bool:
        """Send to one connection; block=False gives up (False) when its queue is full or it is gone."""
        try:
            self.sock.send_multipart([identity, *frames], 0 if block else zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def close(self) -> None:
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close(0)
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        self.zctx.term()


class DealerLink:
    """A daemon's link to a coordinator's RouterLink: its DEALER, the monitor and the loop's timing.

    The daemon gives: hello() -> the hello's (type, fields); on_unwelcome() when the coordinator may
    have forgotten it (a new connection, `unknown`); on_heartbeat(rss) after each heartbeat. It sets
    `welcomed` and `heartbeat_s` from its welcome and `reject` from a reject."""

    def __init__(self, connect: str, *, max_frame: int, keys: ClientKeys | None, log: logging.Logger, role: str,
                 hello: Callable[[], tuple[str, dict[str, Any]]], hello_interval: float = HELLO_INTERVAL_S,
                 on_unwelcome: Callable[[], None] = lambda: None) -> None:
        """role: how the logs name this daemon ("worker", "shadow node")."""
        self.connect = connect
        self.role = role
        self.log = log
        self.hello_message = hello
        self.hello_interval = hello_interval
        self.on_unwelcome = on_unwelcome
        self.welcomed = False
        self.stopping = False
        self.stop_signal = "stop"
        self.reject: str | None = None
        self.heartbeat_s = 1.0
        self.next_hello = self.next_heartbeat = 0.0
        self._disconnected = False
        self._hello_sent_at = -1.0  # monotonic time of the last hello handed to ZeroMQ
        self._link_lost_at = 0.0  # ... and of the last lost link
        self._handshake_warned = False
        self.ctx = zmq.Context(io_threads=1)
        self.dealer = dealer_socket(self.ctx, max_frame, keys)
        self.monitor = self.dealer.get_monitor_socket(monitor_events())
        self.relink = Relinker(self.dealer)
        self.wake = WakePipe()
        self.poller = zmq.Poller()
        for s in (self.dealer, self.monitor):
            self.poller.register(s, zmq.POLLIN)
        self.poller.register(self.wake.r, zmq.POLLIN)

    def start(self) -> None:
        """Catch SIGTERM/SIGINT (in the main thread) and connect."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self.relink.connect(self.connect)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        self.stop_signal = signal.Signals(signum).name
        self.wake.wake()

    def run(self, step: Callable[[dict], None], shutdown: Callable[[], None]) -> int:
        """The daemon's loop: until SIGTERM/SIGINT (0) or a reject (UserError), poll and hand the events
        to step(events); shutdown() on the way out, whatever ended the loop."""
        try:
            while not self.stopping and self.reject is None:
                step(self.poll())
        finally:
            shutdown()
        if self.reject is not None:
            raise UserError(f"the coordinator rejected this {self.role}: {self.reject}")
        return 0

    def poll(self) -> dict:
        """Wait for a message, a wake-up or the next hello/heartbeat (at most a second); the monitor's
        link events are handled here. Returns the poller's events."""
        due = self.next_heartbeat if self.welcomed else self.next_hello
        events = dict(self.poller.poll(max(0, min(1000, int((due - time.monotonic()) * 1000) + 1))))
        if self.wake.r in events:
            self.wake.clear()
        if self.monitor in events:
            self._on_monitor()
        return events

    def drain(self, sock: zmq.Socket, handle: Callable[[P.Message], None], where: str,
              on_error: Callable[[P.Message], None] = lambda msg: None) -> None:
        """Handle up to DRAIN_MAX queued messages of sock (bounded: timers and ready work get their turn).
        A message that does not decode is dropped; a bug in handling one is logged, on_error(msg) called."""
        for _ in range(DRAIN_MAX):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = P.decode(frames)
            except P.ProtocolError as e:
                self.log.warning("dropped a malformed message from the %s: %s", where, e)
                continue
            try:
                handle(msg)
            except Exception:  # a bug must not take the daemon down
                self.log.exception("error handling %s", msg.type)
                on_error(msg)

    def send(self, msg_type: str, tensor: np.ndarray | None = None, **fields: Any) -> bool:
        """Send to the coordinator; False when there is no link right now (IMMEDIATE) or its queue is full."""
        try:
            self.dealer.send_multipart(P.encode(msg_type, tensor, **fields), zmq.NOBLOCK, copy=tensor is None)
            return True
        except zmq.Again:
            return False

    def hello(self) -> None:
        msg_type, fields = self.hello_message()
        sent = self.send(msg_type, **fields)
        now = time.monotonic()
        self.next_hello = now + (self.hello_interval if sent else HELLO_RETRY_S)
        if sent:
            self._hello_sent_at = now

    def welcome(self, heartbeat_s: float) -> None:
        """The coordinator admitted this daemon: heartbeats every heartbeat_s from now on."""
        self.heartbeat_s, self.welcomed, self.next_heartbeat = heartbeat_s, True, time.monotonic()

    def unwelcome(self) -> None:
        """The coordinator may not know this daemon any more: say hello again (the daemon forgets its schedule)."""
        self.welcomed, self.next_hello = False, 0.0
        self.on_unwelcome()

    def handle_common(self, msg: P.Message) -> bool:
        """A reject or an `unknown`, the same for every daemon (True: it was one of those)."""
        if msg.type == P.REJECT:
            self.log.error("rejected by the coordinator: %s", msg["reason"])
            self.reject = msg["reason"]
        elif msg.type == P.UNKNOWN_PEER:
            self.log.info("reconnect: the coordinator does not know this %s (restarted?); saying hello again", self.role)
            self.unwelcome()
            self.hello()
        else:
            return False
        return True

    def timers(self, heartbeat: Callable[[], None]) -> None:
        """Reconnect a link dropped for good, say hello while not welcomed, else heartbeat() when due."""
        if self.relink.check():
            self.log.warning("the link to the coordinator was dropped (a malformed or oversized frame?); reconnecting")
        now = time.monotonic()
        if not self.welcomed and now >= self.next_hello:
            self.hello()
        elif self.welcomed and now >= self.next_heartbeat:
            heartbeat()
            self.next_heartbeat = now + self.heartbeat_s

    def _on_monitor(self) -> None:
        while True:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.relink.event(ev["event"])
            failure = handshake_failure(ev["event"], self.connect)
            if failure is not None:
                if not self._handshake_warned:  # once until a handshake succeeds: ZeroMQ retries by itself
                    self.log.warning("%s; retrying", failure)
                    self._handshake_warned = True
                continue
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_warned = False
                if self._disconnected:  # a new connection: the coordinator knows a daemon by it
                    self.log.info("reconnect: link to %s is back; saying hello again", self.connect)
                    self.unwelcome()
                else:
                    self.log.info("connected to %s", self.connect)
                self._disconnected = False
                # (a hello the timer managed to send since the link went down already went over this link)
                if not self.welcomed and self._hello_sent_at <= self._link_lost_at:
                    self.hello()
            elif ev["event"] == zmq.EVENT_DISCONNECTED and not self._disconnected:
                self._disconnected = True
                self._link_lost_at = time.monotonic()
                self.log.info("disconnected from %s (ZeroMQ reconnects by itself)", self.connect)

    def bye(self) -> None:
        """On the way out: say bye, unless rejected (the coordinator does not know this daemon)."""
        if self.reject is None:
            self.log.info("shutdown (%s): saying bye", self.stop_signal)
            self.send(P.BYE)

    def close(self) -> None:
        """Close the link's sockets (the daemon's own, made from self.ctx, closed before)."""
        self.dealer.disable_monitor()
        self.monitor.close(linger=0)
        self.dealer.close(linger=200)
        self.ctx.term()
        self.wake.close()


__all__ = ["DRAIN_MAX", "DealerLink", "HELLO_INTERVAL_S", "HELLO_RETRY_S", "LOST_AFTER", "Peer", "RouterLink",
           "STRIKES", "UNKNOWN_EVERY_S", "check_name", "parse_endpoint"]

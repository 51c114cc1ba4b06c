"""ZeroMQ plumbing shared by the coordinator, the workers and the shadow node."""

from __future__ import annotations

import os
import time

import zmq

from edgemoe.cluster.keys import ClientKeys, arm_client


def bind_endpoint(sock: zmq.Socket, endpoint: str) -> str:
    """Bind, resolving port 0 to a free port; returns the endpoint actually bound."""
    host, _, port = endpoint.rpartition(":")
    if port in ("0", "*"):
        return f"{host}:{sock.bind_to_random_port(host)}"
    sock.bind(endpoint)
    return endpoint


def dealer_socket(ctx: zmq.Context, max_frame: int, keys: ClientKeys | None) -> zmq.Socket:
    """A daemon's DEALER to a coordinator: a CURVE client of it (with keys), no backlog while the link
    is down (IMMEDIATE), quick reconnects, frames bounded by max_frame (protocol.frame_limit: a bigger
    one disconnects the sender before it is buffered), and ZMTP pings so that a coordinator that
    vanished without closing its connections (power loss, a cable) is noticed within seconds.
    No routing id is set: the coordinator's ROUTER numbers connections itself, and knows a peer
    by its public key, never by a name the peer chose."""
    s = ctx.socket(zmq.DEALER)
    arm_client(s, keys)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RECONNECT_IVL, 100)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    s.setsockopt(zmq.MAXMSGSIZE, max_frame)
    s.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    return s


class Relinker:
    """Keeps a connecting socket's link up. ZeroMQ reconnects a link that broke, but not one it dropped
    for a protocol error (a frame over MAXMSGSIZE, a malformed ZMTP frame): that link would stay down
    for good. Feed it the socket's monitor events; check() reconnects a link down for AFTER_S."""

    AFTER_S = 3.0

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.endpoint: str | None = None
        self.down_since: float | None = None

    def connect(self, endpoint: str) -> None:
        if self.endpoint is not None:
            try:
                self.sock.disconnect(self.endpoint)
            except zmq.ZMQError:
                pass  # ZeroMQ already gave the link up
        self.endpoint, self.down_since = endpoint, None
        self.sock.connect(endpoint)

    def event(self, event: int) -> None:
        if event == zmq.EVENT_DISCONNECTED:
            self.down_since = self.down_since or time.monotonic()
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.down_since = None

    def check(self) -> bool:
        """Reconnect if the link has been down too long (True: it did)."""
        if self.endpoint is None or self.down_since is None or time.monotonic() - self.down_since < self.AFTER_S:
            return False
        self.connect(self.endpoint)
        self.down_since = time.monotonic()  # until the handshake succeeds, try again every AFTER_S
        return True


class WakePipe:
    """Wakes a ZeroMQ poll loop from another thread or a signal handler (register .r with the poller)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        try:
            os.write(self.w, b"w")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop wakes up anyway

    def clear(self) -> None:
        try:
            os.read(self.r, 4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def model_mismatch(role: str, name: str, theirs: str, ours: str | None) -> str:
    """The reason a peer with another model is refused. The coordinator's manifest hash is named only
    to an authenticated peer (ours=None otherwise): it is what a stranger would need to join."""
    served = f"the coordinator serves {ours}" if ours else "not the coordinator's model"
    return f"model mismatch: {role} {name} has model {theirs}, {served}"


def monitor_events() -> int:
    """Link events a daemon logs: up, down, and handshakes that failed (keys that do not match)."""
    return (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_failure(event: int, endpoint: str) -> str | None:
    """The log line for a monitor event that is a failed handshake (None for other events)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the coordinator at {endpoint} refused this node's key (is its public key in the coordinator's --allow list?)"
    if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return (f"handshake with {endpoint} failed: it is not the coordinator whose public key this node holds "
                "(--coordinator-key), or one side runs without keys")
    return None

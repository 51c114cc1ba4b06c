"""ZeroMQ plumbing shared by the coordinator, the workers and the shadow node."""

from __future__ import annotations

import os

import zmq

from edgemoe.cluster import protocol as P


def bind_endpoint(sock: zmq.Socket, endpoint: str) -> str:
    """Bind, resolving port 0 to a free port; returns the endpoint actually bound."""
    host, _, port = endpoint.rpartition(":")
    if port in ("0", "*"):
        return f"{host}:{sock.bind_to_random_port(host)}"
    sock.bind(endpoint)
    return endpoint


def dealer_socket(ctx: zmq.Context, name: str) -> zmq.Socket:
    """A daemon's DEALER to a coordinator: routing id = its name, no backlog while the link is down
    (IMMEDIATE), quick reconnects, the protocol's size limit, and ZMTP pings so that a coordinator
    that vanished without closing its connections (power loss, a cable) is noticed within seconds."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, name.encode())
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RECONNECT_IVL, 100)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    s.setsockopt(zmq.MAXMSGSIZE, P.MAX_TENSOR_BYTES + P.MAX_HEADER_BYTES)
    s.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    return s


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


def model_mismatch(role: str, name: str, theirs: str, ours: str) -> str:
    """The reason a peer with another model is refused, naming both manifest hashes."""
    return f"model mismatch: {role} {name} has model {theirs}, the coordinator serves {ours}"

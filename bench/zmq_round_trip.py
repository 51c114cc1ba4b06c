"""A ZeroMQ round trip between two processes on one host, as the local cluster makes them: ROUTER to
DEALER over ipc and back, a hidden row's bytes each way, both ends blocking or both spinning, against a
raw Unix socketpair between the same two processes.

    .venv/bin/python bench/zmq_round_trip.py [--n-embd 576] [--repeats 3000]

Prints the median and 90th percentile of each. Where waking a sleeping thread is slow (virtual
machines), the blocking round trip is several times the spinning one.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import zmq


def _recv(sock: zmq.Socket, spin: bool) -> list[bytes]:
    while spin:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
    return sock.recv_multipart()


def zmq_round_trips(payload: bytes, repeats: int, spin: bool) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="edgemoe-rtt-") as tmp:
        addr = f"ipc://{tmp}/rtt"
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(addr)
        pid = os.fork()
        if pid == 0:  # the echoing worker: a fresh context of its own, as a worker process has
            wctx = zmq.Context()
            dealer = wctx.socket(zmq.DEALER)
            dealer.connect(addr)
            dealer.send(b"hello")
            while (frames := _recv(dealer, spin)) != [b"stop"]:
                dealer.send_multipart(frames)
            os._exit(0)
        try:
            identity, _ = router.recv_multipart()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                router.send_multipart([identity, payload])
                _recv(router, spin)
                times.append(time.perf_counter() - t0)
            router.send_multipart([identity, b"stop"])
        finally:
            os.waitpid(pid, 0)
            router.close(0)
            ctx.term()
    return times


def socketpair_round_trips(payload: bytes, repeats: int) -> list[float]:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        while (msg := b.recv(1 << 16)) != b"stop":
            b.sendall(msg)
        os._exit(0)
    b.close()
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            a.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(a.recv(1 << 16))
            times.append(time.perf_counter() - t0)
        a.sendall(b"stop")
    finally:
        os.waitpid(pid, 0)
        a.close()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=576, help="floats per message (default 576: demo-moe's hidden row)")
    p.add_argument("--repeats", type=int, default=3000)
    a = p.parse_args()
    payload = bytes(4 * a.n_embd)
    for name, times in (("zmq ipc, both ends blocking", zmq_round_trips(payload, a.repeats, spin=False)),
                        ("zmq ipc, both ends spinning", zmq_round_trips(payload, a.repeats, spin=True)),
                        ("unix socketpair, blocking", socketpair_round_trips(payload, a.repeats))):
        q = statistics.quantiles(times, n=10)
        print(f"{name}: median {statistics.median(times) * 1e6:.0f} us, p90 {q[-1] * 1e6:.0f} us", flush=True)


if __name__ == "__main__":
    main()

"""Helpers of the liveness tests (tests/test_security.py, tests/test_shadow_node.py): timed greedy
decoding with a fault injected before one token, and bounded waits."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from edgemoe.model.engine import Engine


def generate_with(engine: Engine, prompt: list[int], n: int, at: int,
                  action: Callable[[], None]) -> tuple[list[int], list[float]]:
    """Greedy tokens, calling action() before decoding token `at` (-1: never); per-token wall times."""
    engine.reset()
    logits = engine.eval(prompt)[0]
    tokens, times = [], []
    for i in range(n):
        tok = int(np.argmax(logits))
        tokens.append(tok)
        if i + 1 < n:
            if i == at:
                action()
            t = time.monotonic()
            logits = engine.eval([tok])[0]
            times.append(time.monotonic() - t)
    return tokens, times


def wait_until(cond: Callable[[], bool], timeout: float, what: str, poll: Callable[[], None] | None = None) -> None:
    """Until cond() holds (calling poll() in between, else sleeping 50 ms); fails with `what` after timeout s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        poll() if poll else time.sleep(0.05)

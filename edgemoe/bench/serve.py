"""`edgemoe bench serve`: what several concurrent clients get from `edgemoe serve --parallel N`.

The server runs as a real child process (`edgemoe serve`, in process or with local budget-limited
workers), and the bench is its client over loopback HTTP: for 1, 2, 4, 8 concurrent streaming
completions it measures

- aggregate decode tok/s: tokens after each stream's first, summed over the streams, over the time
  from the first stream's first token to the last stream's last token;
- time to first token (TTFT) of each stream, from sending its request to its first text chunk.

The single-request TTFT is compared with `edgemoe run`'s, measured in this process on its own engine
(the same open_engine + generate path as the `run` command, the same cluster options): from the prompt
string to the first text, runs alternating with the server's. Medians over repeats; the machine's other
load disturbs absolute numbers, so compare the ratios.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.errors import UserError
from edgemoe.model.generate import generate
from edgemoe.model.sampling import SamplingParams
from edgemoe.model.tokenizer import Tokenizer

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "def parse_args(argv):", "import json\n\ndef load(path):",
           "try:\n    import numpy", "def main():\n    parser ="]


@dataclass
class Level:
    """One concurrency level: per repeat, the aggregate decode rate and the streams' median TTFT."""

    streams: int
    aggregate_decode_tok_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # completion tokens summed over the streams

    @property
    def median_tok_s(self) -> float:
        return statistics.median(self.aggregate_decode_tok_s) if self.aggregate_decode_tok_s else 0.0

    @property
    def median_ttft_s(self) -> float:
        return statistics.median(self.ttft_s) if self.ttft_s else 0.0


@dataclass
class ServeBench:
    model: str
    workers: int
    memory_budget: str | None
    predictor: str
    parallel: int
    threads: int
    n_predict: int
    repeats: int
    levels: list[Level] = field(default_factory=list)
    run_ttft_s: list[float] = field(default_factory=list)  # `edgemoe run`'s path, in this process
    serve_ttft_s: list[float] = field(default_factory=list)  # one request alone, alternating with run's

    def summary(self) -> dict[str, float]:
        one = next((lv for lv in self.levels if lv.streams == 1), None)
        out: dict[str, float] = {}
        for lv in self.levels:
            out[f"aggregate_decode_tok_s_{lv.streams}"] = lv.median_tok_s
            out[f"ttft_s_{lv.streams}"] = lv.median_ttft_s
            if one is not None and one.median_tok_s > 0:
                out[f"speedup_{lv.streams}"] = lv.median_tok_s / one.median_tok_s
        run = statistics.median(self.run_ttft_s) if self.run_ttft_s else 0.0
        serve = statistics.median(self.serve_ttft_s) if self.serve_ttft_s else 0.0
        out.update(run_ttft_s=run, serve_ttft_s=serve, ttft_ratio=serve / run if run > 0 else 0.0)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


class _Server:
    """`edgemoe serve` in a child process on a free loopback port, stopped by PID."""

    def __init__(self, args: list[str], log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "serve", *args, "--port", str(self.port),
                                      "--log-level", "WARNING"], stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"the server exited ({self.proc.returncode}): {self.log.read_text()[-1500:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise UserError(f"the server was not ready within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._out.close()


@dataclass
class _Stream:
    sent: float = 0.0
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0
    error: str = ""


def _stream(port: int, prompt: str, n_predict: int, out: _Stream) -> None:
    """One streaming completion at temperature 0: arrival times of its first and last text chunk."""
    body = json.dumps({"prompt": prompt, "max_tokens": n_predict, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        out.sent = time.perf_counter()
        c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            out.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return
        while True:
            line = r.readline()
            if not line:
                break
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            msg = json.loads(line[5:])
            if msg.get("usage"):
                out.tokens = msg["usage"]["completion_tokens"]
            if any(ch.get("text") for ch in msg.get("choices", [])):
                now = time.perf_counter()
                out.first = out.first or now
                out.last = now
        c.close()
    except (OSError, ValueError, http.client.HTTPException) as e:
        out.error = f"{type(e).__name__}: {e}"


def _level(port: int, n: int, n_predict: int) -> tuple[float, float, int]:
    """n concurrent streams: (aggregate decode tok/s, median TTFT s, completion tokens)."""
    streams = [_Stream() for _ in range(n)]
    threads = [threading.Thread(target=_stream, args=(port, PROMPTS[i % len(PROMPTS)], n_predict, s))
               for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [s.error for s in streams if s.error]
    if errors:
        raise UserError(f"a request failed: {errors[0]}")
    span = max(s.last for s in streams) - min(s.first for s in streams)
    decoded = sum(max(s.tokens - 1, 0) for s in streams)
    return (decoded / span if span > 0 else 0.0), statistics.median(s.first - s.sent for s in streams), \
        sum(s.tokens for s in streams)


def _run_ttft(engine, tok: Tokenizer, prompt: str, n_predict: int) -> float:
    """`edgemoe run`'s time to first token: tokenize, prefill, sample, detokenize (its code path)."""
    first: list[float] = []
    t0 = time.perf_counter()
    ids = tok.tokenize(prompt, add_special=True, parse_special=False)
    engine.reset()
    generate(engine, tok, ids, n_predict=n_predict, sampling=SamplingParams(temp=0.0),
             on_text=lambda _t: first.append(time.perf_counter()) if not first else None)
    return first[0] - t0 if first else 0.0


def bench_serve(model: str | Path, *, workers: int = 0, memory_budget: str | None = None, predictor: str = "lookahead",
                streams: tuple[int, ...] = (1, 2, 4, 8), n_predict: int = 32, repeats: int = 3, threads: int = 1,
                ctx_size: int = 512, ready_timeout_s: float = 300.0) -> ServeBench:
    """Start `edgemoe serve --parallel max(streams)` and measure each concurrency level `repeats` times
    (after one warm-up request), interleaved with `edgemoe run`'s TTFT on this process's own engine."""
    if not Path(model).exists():
        raise UserError(f"{model}: no such model directory or file")
    parallel = max(streams)
    r = ServeBench(str(model), workers, memory_budget, predictor, parallel, threads, n_predict, repeats,
                   [Level(n) for n in streams])
    cluster = ["--workers", str(workers), "--predictor", predictor] if workers else []
    if workers and memory_budget:
        cluster += ["--memory-budget", memory_budget]
    opts = ClusterOptions(workers=workers, predictor=predictor, memory_budget=memory_budget)
    with tempfile.TemporaryDirectory(prefix="edgemoe-bench-serve-") as tmp:
        server = _Server([str(model), "--parallel", str(parallel), "--queue-size", str(parallel), "-t", str(threads),
                          "-c", str(ctx_size), *cluster], Path(tmp) / "server.log")
        try:
            server.wait_ready(ready_timeout_s)
            with open_engine(model, opts, n_ctx=ctx_size, n_threads=threads) as engine, \
                    Tokenizer(engine.weights.path) as tok:
                _level(server.port, 1, 4)  # warm-up: graphs built, shards mapped, on both sides
                _run_ttft(engine, tok, PROMPTS[0], 4)
                for _ in range(repeats):
                    r.run_ttft_s.append(_run_ttft(engine, tok, PROMPTS[0], 2))
                    r.serve_ttft_s.append(_level(server.port, 1, 2)[1])
                    for lv in r.levels:
                        rate, ttft, n_tok = _level(server.port, lv.streams, n_predict)
                        lv.aggregate_decode_tok_s.append(rate)
                        lv.ttft_s.append(ttft)
                        lv.tokens.append(n_tok)
        finally:
            server.stop()
    return r


__all__ = ["Level", "ServeBench", "bench_serve"]

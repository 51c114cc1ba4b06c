"""The engine's thread: it opens the engine (and cluster), then decodes up to `parallel` requests
together, as llama-server's slots do.

One thread owns the engine and its ZeroMQ sockets for their whole life (ZeroMQ sockets are not
thread-safe). The HTTP side puts Jobs into a bounded queue and reads their events from an asyncio
queue. Between engine steps the thread admits queued jobs into free slots (engine sequences); each
step then takes every active slot's next tokens (a new request's whole prompt, the others' last
sampled token) through Engine.eval_batch, so the routed experts of a layer are loaded and computed
once for all of them. A job's `cancelled` flag (a client that went away) is checked before every
step, so its slot is free again one step later.

Each slot is an edgemoe.model.generate.Decoder with the request's SamplingParams, the token loop
`edgemoe run` and `edgemoe chat` use, and each sequence's logits equal those it gets alone
(tests/test_batch.py), so temperature 0 gives their text. Stop strings and cancellation end a slot
early by raising from the token tap.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.errors import UserError
from edgemoe.model.generate import Decoder
from edgemoe.model.kvcache import AttentionOptions
from edgemoe.model.tokenizer import Tokenizer
from edgemoe.serve.api import ApiError, GenRequest
from edgemoe.serve.stops import StopMatcher

log = logging.getLogger("edgemoe.serve")


@dataclass
class Result:
    """How a generation ended (its text went out as "text" events)."""

    finish: str  # "stop" or "length"
    n_prompt: int
    n_completion: int
    prefill_s: float
    decode_s: float
    queued_s: float

    @property
    def decode_tok_s(self) -> float:
        return (self.n_completion - 1) / self.decode_s if self.n_completion > 1 and self.decode_s > 0 else 0.0

    def timings(self) -> dict[str, float]:
        """llama-server's `timings` object (the chat page shows predicted_per_second)."""
        return {"prompt_n": self.n_prompt, "prompt_ms": self.prefill_s * 1e3,
                "prompt_per_second": self.n_prompt / self.prefill_s if self.prefill_s > 0 else 0.0,
                "predicted_n": self.n_completion, "predicted_ms": self.decode_s * 1e3,
                "predicted_per_second": self.decode_tok_s, "queued_ms": self.queued_s * 1e3}


@dataclass
class Job:
    """One request in flight: events ("text", str) ... then ("done", Result) or ("error", ApiError)."""

    req: GenRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class _Halt(Exception):
    """Ends generate() early: a stop string matched, or the client went away."""


class _Tap:
    """The tokenizer generate() sees: counts tokens, checks cancellation before each one, and
    passes text through the stop matcher to the job."""

    def __init__(self, tok: Tokenizer, job: Job, stops: StopMatcher) -> None:
        self._tok, self._job, self._stops = tok, job, stops
        self.count = 0
        self.first_at = 0.0
        self.last_at = 0.0

    def is_eog(self, t: int) -> bool:
        return self._tok.is_eog(t)

    def detokenizer(self) -> "_Tap":
        self._detok = self._tok.detokenizer()
        return self

    def push(self, t: int) -> str:
        if self._job.cancelled.is_set():
            raise _Halt("cancelled")
        self.last_at = time.perf_counter()
        if not self.count:
            self.first_at = self.last_at
        self.count += 1
        return self._detok.push(t)

    def flush(self) -> str:
        return self._detok.flush()

    def on_text(self, piece: str) -> None:
        out = self._stops.push(piece)
        if out:
            self._job.emit("text", out)
        if self._stops.stopped:
            raise _Halt("stop")


@dataclass
class Totals:
    """Counters since start, read by the metrics collector."""

    requests: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    prefill_s: float = 0.0
    last_decode_tok_s: float = 0.0
    last_job_s: float = 0.0


class Runner:
    """Owns the engine in a thread of its own; submit() queues a Job (503 when full or not ready)."""

    def __init__(self, model: str | Path, opts: ClusterOptions, *, n_ctx: int, n_threads: int,
                 resident_experts: bool = True, attention: AttentionOptions | None = None, repack: bool = False,
                 queue_size: int = 8, n_predict: int = 512, parallel: int = 1) -> None:
        """parallel: sequences decoded together (llama-server's -np); each has the whole n_ctx."""
        if parallel < 1:
            raise UserError("--parallel must be at least 1")
        self.model, self.opts = model, opts
        self.parallel = parallel
        self.attention, self.repack = attention, repack
        self.n_ctx_requested, self.n_threads, self.resident_experts = n_ctx, n_threads, resident_experts
        self.n_predict = n_predict
        self.expected_workers = opts.workers + opts.wait_workers
        self.state = "loading"  # -> "ready" -> "stopped", or "failed"
        self.reason = "loading the model"
        self.cluster = None  # the coordinator (edgemoe.cluster.coordinator.Coordinator), once made
        self.local_workers = None
        self.engine = None  # set in the engine's thread; only that thread calls it
        self.n_ctx = 0
        self.tokenizer: Tokenizer | None = None  # the HTTP side's own (vocab-only) tokenizer
        self.active = 0  # slots generating now
        self.totals = Totals()
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size + parallel)
        self.queue_size = queue_size
        # jobs queued or in a slot: at most parallel + queue_size (a request finding a slot free never
        # counts against the queue, even before the engine's thread has picked it up)
        self._held = 0
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="edgemoe-engine", daemon=True)

    # -- the HTTP side ----------------------------------------------------------------------------
    def start(self) -> "Runner":
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        return self._ready.wait(timeout_s)

    def live_workers(self) -> int:
        c = self.cluster
        return sum(1 for w in list(c.workers.values()) if w.alive) if c is not None else 0

    def unavailable(self) -> str | None:
        """Why a request cannot be served now (None: it can)."""
        if self.state == "loading":
            if self.cluster is not None:
                return f"waiting for workers: {self.live_workers()} of {self.expected_workers} joined"
            return "the model is loading"
        if self.state != "ready":
            return self.reason
        if self.cluster is not None and self.live_workers() == 0:
            return f"no workers are connected (0 of {self.expected_workers}): every worker is gone"
        return None

    @property
    def busy(self) -> bool:
        return self.active > 0

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        why = self.unavailable()
        if why is not None:
            raise ApiError(503, why, type="server_error", code="unavailable", headers={"Retry-After": "5"})
        with self._held_lock:
            if self._held >= self.queue_size + self.parallel:
                wait = max(1, math.ceil(self.totals.last_job_s * (self.queue_size + 1) / self.parallel))
                raise ApiError(503, f"the server is busy: {self.queue_size} requests are already waiting",
                               type="server_error", code="queue_full", headers={"Retry-After": str(wait)})
            self._held += 1
            self._queue.put_nowait(job)  # cannot be full: it holds at most _held jobs

    def _release(self) -> None:
        """A job left the server (finished, failed, cancelled): room for another."""
        with self._held_lock:
            self._held -= 1

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    # -- the engine's thread ----------------------------------------------------------------------
    def _on_cluster(self, cluster) -> None:
        self.cluster = cluster

    def _main(self) -> None:
        try:
            with open_engine(self.model, self.opts, n_ctx=self.n_ctx_requested, n_threads=self.n_threads,
                             resident_experts=self.resident_experts, attention=self.attention, repack=self.repack,
                             on_cluster=self._on_cluster, n_seq=self.parallel) as engine, \
                    Tokenizer(engine.weights.path) as tok, Tokenizer(engine.weights.path) as http_tok:
                self.local_workers = getattr(engine, "local_workers", None)
                self.engine, self.n_ctx, self.tokenizer = engine, engine.n_ctx, http_tok
                self.state, self.reason = "ready", ""
                self._ready.set()
                log.info("ready: %s, context %d tokens, %d sequence(s) at once", self.model, self.n_ctx, self.parallel)
                slots: list[_Slot | None] = [None] * self.parallel
                try:
                    while not self._stop.is_set():
                        self._admit(engine, tok, slots)
                        if not any(slots):
                            try:
                                job = self._queue.get(timeout=0.1)
                            except queue.Empty:
                                if self.cluster is not None:  # heartbeats, hellos, goodbyes while idle
                                    self.cluster.poll_idle(0)
                                continue
                            self._start(engine, tok, slots, job)
                            continue
                        self._step(engine, slots)
                finally:
                    for i, slot in enumerate(slots):
                        if slot is not None:
                            slot.dec.close()
                            slot.job.emit("error", ApiError(503, "the server is shutting down", type="server_error",
                                                            code="unavailable"))
                            slots[i] = None
                    self.active = 0
                self.state, self.reason = "stopped", "the server is shutting down"
        except UserError as e:
            self.state, self.reason = "failed", str(e)
            log.error("%s", e)
        except Exception as e:  # a daemon reports and stays up (health says why), never a silent thread death
            self.state, self.reason = "failed", f"the engine failed: {type(e).__name__}: {e}"
            log.exception("the engine failed")
        finally:
            self._ready.set()
            if self.state == "ready":
                self.state, self.reason = "stopped", "the server is shutting down"
            while True:  # nobody will serve what is still queued
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                job.emit("error", ApiError(503, self.reason, type="server_error", code="unavailable"))

    def _admit(self, engine, tok: Tokenizer, slots: list["_Slot | None"]) -> None:
        """Queued jobs into free slots, between steps."""
        while None in slots:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            self._start(engine, tok, slots, job)

    def _start(self, engine, tok: Tokenizer, slots: list["_Slot | None"], job: Job) -> None:
        if not self._begin(engine, tok, slots, job):
            self._release()

    def _begin(self, engine, tok: Tokenizer, slots: list["_Slot | None"], job: Job) -> bool:
        """job into a free slot; False where it ends at once (cancelled, unavailable, a bad prompt)."""
        if job.cancelled.is_set():
            self.totals.cancelled += 1
            return False
        why = self.unavailable()
        if why is not None:
            job.emit("error", ApiError(503, why, type="server_error", code="unavailable"))
            return False
        req = job.req
        n_prompt = len(req.prompt_tokens)
        if not n_prompt or n_prompt > engine.n_ctx:
            job.emit("error", ApiError(400, f"the prompt is {n_prompt} tokens; the context holds {engine.n_ctx}"))
            self.totals.failed += 1
            return False
        n_predict = req.max_tokens or self.n_predict
        if req.kind == "chat":  # as `edgemoe chat` bounds an answer
            n_predict = min(n_predict, engine.n_ctx - n_prompt - 1)
        i = slots.index(None)
        stops = StopMatcher(req.stop)
        tap = _Tap(tok, job, stops)
        if self.parallel == 1:
            engine.reset()  # also restarts a predictor that follows the one sequence
        else:
            engine.reset_seq(i)
        dec = Decoder(tap, req.prompt_tokens, n_predict=n_predict, n_ctx=engine.n_ctx,  # type: ignore[arg-type]
                      sampling=req.sampling, on_text=tap.on_text)
        slots[i] = _Slot(job, tap, stops, dec, list(req.prompt_tokens), time.monotonic(), time.perf_counter())
        self.active = sum(s is not None for s in slots)
        return True

    def _step(self, engine, slots: list["_Slot | None"]) -> None:
        """One engine step for every active slot; slots whose client went away are freed first."""
        for i, slot in enumerate(slots):
            if slot is not None and slot.job.cancelled.is_set():
                self._free(slots, i)
                self.totals.cancelled += 1
                log.info("a client went away after %d tokens; its slot is free", slot.tap.count)
        live = [i for i, s in enumerate(slots) if s is not None]
        self.active = len(live)
        if not live:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step: %d sequence(s), %d prompt(s), %d rows", len(live), sum(len(slots[i].next) > 1 for i in live),
                      sum(len(slots[i].next) for i in live))
        try:
            logits = engine.eval_batch([(i, slots[i].next) for i in live])
        except (UserError, RuntimeError) as e:  # e.g. every worker is gone: no slot's token can finish
            code, kind = (400, "invalid_request_error") if isinstance(e, UserError) else (503, "server_error")
            log.warning("step failed: %s", e)
            for i in live:
                self.totals.failed += 1
                slots[i].job.emit("error", ApiError(code, str(e), type=kind,
                                                    code=None if code == 400 else "workers_unavailable"))
                self._free(slots, i)
            return
        for i, lg in zip(live, logits):
            slot = slots[i]
            try:
                nxt = slot.dec.feed(lg[0], engine.seq_past[i])
            except _Halt as h:
                if str(h) == "cancelled":
                    self.totals.cancelled += 1
                    log.info("a client went away after %d tokens; its slot is free", slot.tap.count)
                    self._free(slots, i)
                    continue
                nxt, slot.finish = None, "stop"
            if nxt is not None:
                slot.next = [nxt]
                continue
            if not slot.finish:
                slot.finish = "stop" if slot.dec.gen.stop == "eos" else "length"
            self._done(slot)
            self._free(slots, i)

    def _free(self, slots: list["_Slot | None"], i: int) -> None:
        slot = slots[i]
        if slot is not None:
            slot.dec.close()
            self._release()
        slots[i] = None
        self.active = sum(s is not None for s in slots)

    def _done(self, slot: "_Slot") -> None:
        """A finished slot's tail text and result."""
        tap, job = slot.tap, slot.job
        try:
            slot.dec.finish()
        except _Halt:  # the detokenizer's tail completed a stop string
            slot.finish = "stop"
        tail = slot.stops.flush()
        if tail:
            job.emit("text", tail)
        prefill_s = (tap.first_at if tap.count else time.perf_counter()) - slot.t0  # to the first token
        decode_s = tap.last_at - tap.first_at if tap.count > 1 else 0.0
        result = Result(slot.finish, len(job.req.prompt_tokens), tap.count, prefill_s, decode_s,
                        slot.started_at - job.enqueued_at)
        t = self.totals
        t.requests += 1
        t.prompt_tokens += result.n_prompt
        t.completion_tokens += tap.count
        t.decode_steps += max(tap.count - 1, 0)
        t.decode_s += decode_s
        t.prefill_s += result.prefill_s
        t.last_decode_tok_s = result.decode_tok_s
        t.last_job_s = time.monotonic() - slot.started_at
        job.emit("done", result)


@dataclass
class _Slot:
    """One sequence being generated: its job, token loop and the tokens its next step evaluates."""

    job: Job
    tap: _Tap
    stops: StopMatcher
    dec: Decoder
    next: list[int]
    started_at: float  # monotonic, when it left the queue
    t0: float  # perf_counter at the same moment
    finish: str = ""

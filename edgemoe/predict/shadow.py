"""The shadow predictor (OD-MoE's Scaled Emulative Prediction) and its re-anchored variant.

SEP ("shadow"): a second engine on the coordinator decodes alongside the main model with every routed
expert requantized (`shadow-TYPE.gguf`, all experts resident, computed with mul_mat_id) and either the
main model's own trunk (shared, the default) or a requantized one (`shadow-trunk-TYPE.gguf`). Its
router choices for the token's layers are the predictions. It runs in a background thread (ggml
releases the GIL), starting as soon as the main model's eval() is called (its on_step hook), and publishes each layer's
choice the moment it exists; the coordinator takes whatever is ready when it asks.

Alignment, each with its own period in decode steps (0 = never), as in the paper:
  token: the shadow decodes the main model's token instead of its own greedy one;
  KV:    the main model's K/V rows written since the last alignment overwrite the shadow's.
A period restarts with every prompt (prefill). The shadow runs its own prefill only when it could
need it (token or KV alignment off); otherwise the first decode step aligns the prompt's rows.
If the shadow falls behind, stale tokens are skipped and the rows it missed are copied from the
main model (counted as gap_rows): a shadow that lags is worth nothing.

Late start: the shadow can only begin a token once the main model has it; the time from then to the
shadow's first-layer prediction is measured per token (stats()["late_start_ms"]).

Re-anchored look-ahead ("reanchor", beyond the paper): SEP, plus after the main model's router at
layer l the shadow re-runs layers l+1..l+d from the main model's true residual state at l (shadow
experts for the FFNs, attention over the main model's own KV cache), and these refined choices
replace SEP's for those layers. It runs synchronously inside after_router, on the coordinator's
thread (its cost: stats()["reanchor_ms_per_token"]), while the main model is paused between layers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.manifest import check_file_hash, load_manifest
from edgemoe.ggml import Context
from edgemoe.ggml.context import aligned_empty
from edgemoe.model.engine import Engine, Segment
from edgemoe.model.hooks import StepHooks
from edgemoe.model.stacked import StackedExperts
from edgemoe.model.kvcache import KVCache
from edgemoe.model.weights import GGUFTensors
from edgemoe.predict.base import Predictor, PredictorOptions, upcoming
from edgemoe.util.proc import lower_thread_priority

log = logging.getLogger("edgemoe.shadow")

_WAIT_S = 300.0  # sync mode: longest wait for the shadow before giving up


class ShadowFiles:
    """The shadow's weights of one model directory, mapped once, shared by the engines that use them."""

    def __init__(self, model_dir: str | Path | None, *, use_trunk: bool) -> None:
        if model_dir is None:
            raise UserError("the shadow predictors need a converted model directory (edgemoe convert --shadow-type TYPE)")
        self.model_dir = Path(model_dir)
        m = load_manifest(self.model_dir)
        if m.shadow is None:
            raise UserError(f"{self.model_dir}: no shadow experts; convert with `edgemoe convert SRC OUT --shadow-type q8_0` "
                            "(or q4_k, q4_0, ...) to use the shadow predictors")
        self.type = m.shadow["type"]
        check_file_hash(self.model_dir, m, m.shadow["file"])  # verified like every file; also warms the page cache
        self.experts = GGUFTensors(self.model_dir / m.shadow["file"])
        self.trunk: GGUFTensors | None = None
        self.trunk_type: str | None = None
        if use_trunk:
            if not m.shadow.get("trunk_file"):
                self.experts.close()
                raise UserError(f"{self.model_dir}: no shadow trunk; convert with --shadow-trunk-type TYPE "
                                "(or let the shadow share the main model's trunk)")
            check_file_hash(self.model_dir, m, m.shadow["trunk_file"])
            self.trunk = GGUFTensors(self.model_dir / m.shadow["trunk_file"])
            self.trunk_type = m.shadow["trunk_type"]

    def close(self) -> None:
        self.experts.close()
        if self.trunk is not None:
            self.trunk.close()


class ShadowEngine(Engine):
    """An Engine over shadow weights that can run one token through a range of layers.

    run_token() starts at any segment with a given carry (the re-anchor starts from the main model's
    state), reports each MoE layer's routing as soon as its router has run, and can stop after a
    layer's router (predictions need no output head)."""

    def __init__(self, main, files: ShadowFiles, n_threads: int) -> None:
        # the main model's pieces (its manifest, config and MoE layers; its trunk unless the shadow has its own)
        model = main.model.with_trunk(files.trunk) if files.trunk is not None else main.model.shared()
        super().__init__(model, n_ctx=main.n_ctx, n_threads=n_threads,
                         experts=lambda e: StackedExperts(files.experts, e.compute, e.moe_layers, e.cfg.n_embd),
                         attention=main.kv.attn)  # the main model's K/V rows are copied in as they are
        if (self.cfg.n_layer, self.cfg.n_embd, self.cfg.n_embd_kv) != (main.cfg.n_layer, main.cfg.n_embd, main.cfg.n_embd_kv):
            raise UserError(f"{files.model_dir}: the shadow trunk does not match the model")
        self._anchors: dict[int, Segment] = {}  # re-anchor entries by layer (run_token)

    def use_kv(self, kv: KVCache) -> None:
        """Attend over (and write into) another cache, the main model's: see ReanchorPredictor."""
        self._drop_decode_cache()
        self.kv = kv
        self.trunk.kv = kv

    def copy_kv(self, src: KVCache, lo: int, hi: int) -> int:
        """Overwrite rows [lo, hi) of every layer's K and V with src's; returns the rows copied."""
        if hi <= lo:
            return 0
        self.kv.copy_rows(src, lo, hi)
        return hi - lo

    def run_token(self, token: int, *, start: int = 0, carry: dict[str, np.ndarray] | None = None,
                  stop_layer: int | None = None, logits: bool = False,
                  on_route: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray | None:
        """One token at position n_past (n_past is not advanced) through segments start.. (the engine's
        layer loop, run_layers): the layers, then the output head if logits (returned, [n_vocab]).
        stop_layer: end after that layer's router (or dense FFN). carry {"ffn_inp": [n_embd]} alone
        enters MoE layer `start` at its FFN input: the re-anchor from the main model's residual stream.
        on_route(layer, selected [k]) as soon as each MoE layer's router has run."""
        cfg = self.cfg
        inp = self._inputs(np.array([token], dtype=np.int32), False)
        segments = self._decode_segments(inp)
        self.kv.mark_used(self.n_past + 1)  # the row this token's attention writes
        last = cfg.n_layer if logits else cfg.n_layer - 1
        if stop_layer is not None:
            last = min(last, stop_layer)
        carry = {name: np.asarray(a, dtype=np.float32).reshape(1, -1) if name == "ffn_inp" else a
                 for name, a in (carry or {}).items()}
        if set(carry) == {"ffn_inp"}:  # entered at the FFN: that layer's own small graph, kept
            segments = list(segments)
            segments[start] = self._anchor_segment(start)
        hook = None if on_route is None else (lambda il, ffn_inp, selected, groups: on_route(il, selected[0]))
        out = self.run_layers(inp, carry, start=start, stop=last, segments=segments, on_router=hook)
        return None if out is None else out.reshape(cfg.n_vocab)

    def _anchor_segment(self, il: int) -> Segment:
        """MoE layer il from its FFN input to its router and shared expert (no attention), built once."""
        seg = self._anchors.get(il)
        if seg is None:
            inp = self._inputs(np.zeros(1, dtype=np.int32), False)  # not read: the segment attends nothing
            ctx = Context(self._segment_bytes(inp))
            seg = self._anchors[il] = self._build_segment(ctx, il, inp, {"ffn_inp": aligned_empty((1, self.cfg.n_embd))})
        return seg

    def close(self) -> None:
        for seg in self._anchors.values():
            seg.ctx.close()
        self._anchors.clear()
        super().close()


@dataclass
class _Job:
    gen: int
    tokens: np.ndarray
    pos: int  # the main model's n_past when the eval started
    step: int | None  # decode step since the prompt (None: a prefill)
    t_known: float  # perf_counter when the main model's eval started


@dataclass
class _Stats:
    late_start_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    tokens: int = 0
    prefills: int = 0
    skipped: int = 0
    gap_rows: int = 0
    kv_rows: int = 0
    token_aligned: int = 0
    own_tokens: int = 0
    failures: int = 0


def _summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.array(values) * 1e3
    return {"n": len(values), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "max": float(a.max())}


class ShadowPredictor(Predictor, StepHooks):
    """SEP: a shadow engine decodes alongside the main model in a background thread; see the module doc."""

    name = "shadow"
    follows_one_sequence = True

    def __init__(self, main, depth: int, options: PredictorOptions | None = None) -> None:
        self.main = main
        self.opts = options or PredictorOptions()
        if self.opts.align_token < 0 or self.opts.align_kv < 0:
            raise UserError("alignment periods must be 0 (never) or more")
        self.moe_layers: list[int] = list(main.moe_layers)
        self.depth = depth
        self.files = ShadowFiles(main.model_dir, use_trunk=self.opts.shadow_trunk)
        try:
            self.engine = ShadowEngine(main, self.files, self.opts.shadow_threads)
        except BaseException:
            self.files.close()
            raise
        self._own_prefill = self.opts.align_token == 0 or self.opts.align_kv == 0
        # shadow-thread state
        self._valid_to = 0  # rows [0, valid_to) of the shadow's cache hold its own or the main model's values
        self._synced_to = 0  # rows [0, synced_to) were copied from the main model at the last KV alignment
        self._own_token: int | None = None
        # main-thread state
        self._decode_idx = 0
        # shared, under _cv
        self._cv = threading.Condition()
        self._gen = 0  # the newest job posted
        self._done_gen = 0  # the newest job finished (or skipped)
        self._routes_gen = 0
        self._routes: dict[int, list[int]] = {}
        self._error: BaseException | None = None
        self._st = _Stats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        # called as on_publish(job gen, layer, experts) on the shadow's thread the moment a layer's
        # routing exists: a shadow node sends it on (see edgemoe/cluster/shadow_node.py)
        self.on_publish: Callable[[int, int, list[int]], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="edgemoe-shadow", daemon=True)
        self._thread.start()
        main.hooks.append(self)

    # main thread -----------------------------------------------------------------------------
    def on_step(self, engine, tokens: np.ndarray) -> int:
        """The main model starts evaluating tokens at engine.n_past: post a job; returns its gen."""
        pos = int(engine.n_past)
        n = len(tokens)
        if n > 1 or pos == 0:
            self._decode_idx = 0
        step = None if n > 1 else self._decode_idx
        if step is not None:
            self._decode_idx += 1
        with self._cv:
            self._gen += 1
            job = _Job(self._gen, np.array(tokens, dtype=np.int32), pos, step, time.perf_counter())
        self._queue.put(job)
        return job.gen

    def _wait(self) -> None:
        """Sync mode: until the shadow has finished the current token."""
        deadline = time.monotonic() + _WAIT_S
        with self._cv:
            while self._done_gen < self._gen:
                if self._error is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("the shadow did not finish a token within 300 s")
                self._cv.wait(left)
            if self._error is not None:
                err, self._error = self._error, None
                raise RuntimeError(f"the shadow failed: {err!r}") from err

    def _ready(self, current: int) -> dict[int, list[int]]:
        if self.opts.sync:
            self._wait()
        with self._cv:
            routes = dict(self._routes) if self._routes_gen == self._gen else {}
        return {l: routes[l] for l in upcoming(self.moe_layers, current, self.depth) if l in routes}

    def begin_token(self, step: int) -> dict[int, list[int]]:
        return self._ready(-1)

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        return self._ready(layer)

    def poll(self, current: int) -> dict[int, list[int]]:
        if self.opts.sync:
            return {}
        with self._cv:
            routes = dict(self._routes) if self._routes_gen == self._gen else {}
        return {l: routes[l] for l in upcoming(self.moe_layers, current, self.depth) if l in routes}

    # shadow thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        if not self.opts.sync and self.opts.yield_cpu:  # its predictions are worth less than the trunk's time
            lower_thread_priority()
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._cv:
                stale = (job.gen < self._gen or self.idle) and not self.opts.sync
            try:
                if stale:
                    self._skip(job)
                else:
                    self._run(job)
            except BaseException as e:  # never let the shadow take the main model down
                self._st.failures += 1
                self._own_token = None
                self._valid_to = self._synced_to = 0
                if self.opts.sync:
                    with self._cv:
                        self._error = e
                elif self._st.failures == 1:
                    log.warning("the shadow failed (%r); its predictions are missing until it recovers", e)
            finally:
                with self._cv:
                    self._done_gen = max(self._done_gen, job.gen)
                    self._cv.notify_all()

    def _rewind(self, pos: int) -> None:
        """The main model went back (a new sequence, or a chat reusing a prefix of its cache)."""
        eng = self.engine
        if pos == 0:
            self._valid_to = self._synced_to = 0
        if eng.n_past > pos or pos == 0:
            eng.n_past = min(eng.n_past, pos)
            self._valid_to = min(self._valid_to, pos)
            self._synced_to = min(self._synced_to, pos)
            self._own_token = None

    def _skip(self, job: _Job) -> None:
        self._rewind(job.pos)
        if job.step is None:
            self._st.prefills += 1
        else:
            self._st.skipped += 1
        self._own_token = None
        self.engine.n_past = job.pos + len(job.tokens)  # rows not filled: the next job copies them (a gap)

    def _align_rows(self, pos: int, kv_due: bool) -> None:
        """Rows the shadow lacks (a gap), and with a KV alignment every row since the last one, from main."""
        lo = self._valid_to
        if kv_due:
            lo = min(lo, self._synced_to)
        if lo < pos:
            n = self.engine.copy_kv(self.main.kv, lo, pos)
            if kv_due:
                self._st.kv_rows += n
            else:
                self._st.gap_rows += n
        if kv_due:
            self._synced_to = pos
        self._valid_to = max(self._valid_to, pos)

    def _run(self, job: _Job) -> None:
        eng = self.engine
        pos = job.pos
        self._rewind(pos)
        with self._cv:
            self._routes_gen, self._routes = job.gen, {}
        if job.step is None:  # a prompt
            self._st.prefills += 1
            if self._own_prefill:
                self._align_rows(pos, False)
                eng.n_past = pos
                logits = eng.eval(job.tokens)[0]
                self._own_token = int(np.argmax(logits))
                self._valid_to = pos + len(job.tokens)
            else:  # the first decode step's KV alignment brings the main model's prompt rows
                self._own_token = None
                eng.n_past = pos + len(job.tokens)
            return
        t0 = time.perf_counter()
        o = self.opts
        kv_due = o.align_kv > 0 and job.step % o.align_kv == 0
        self._align_rows(pos, kv_due)
        token_due = o.align_token > 0 and job.step % o.align_token == 0
        if token_due or self._own_token is None:
            token = int(job.tokens[0])
            self._st.token_aligned += 1
        else:
            token = self._own_token
            self._st.own_tokens += 1
        need_logits = o.align_token == 0 or (job.step + 1) % o.align_token != 0
        first = self.moe_layers[0]

        def publish(il: int, selected: np.ndarray) -> None:
            now = time.perf_counter()
            experts = [int(e) for e in selected]
            with self._cv:
                self._routes[il] = experts
                self._cv.notify_all()
            if self.on_publish is not None:
                self.on_publish(job.gen, il, experts)
            if il == first:
                self._st.late_start_s.append(now - job.t_known)

        eng.n_past = pos
        logits = eng.run_token(token, logits=need_logits, on_route=publish)
        self._own_token = int(np.argmax(logits)) if logits is not None else None
        eng.n_past = pos + 1
        self._valid_to = pos + 1
        self._st.tokens += 1
        self._st.forward_s.append(time.perf_counter() - t0)

    # -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new sequence: the next eval at position 0 rewinds the shadow (nothing to do here)."""

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until every token handed to the shadow is finished or skipped (the shadow runs behind
        the main model): stats read afterwards count them all. False if it did not settle in time."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._done_gen < self._gen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def stats(self) -> dict:
        s = self._st
        return {
            "shadow_type": self.files.type,
            "shadow_trunk": self.files.trunk_type or "shared",
            "align_token": self.opts.align_token,
            "align_kv": self.opts.align_kv,
            "late_start_ms": _summary_ms(s.late_start_s),
            "forward_ms": _summary_ms(s.forward_s),
            "tokens": s.tokens,
            "prefills": s.prefills,
            "skipped": s.skipped,
            "kv_rows_aligned": s.kv_rows,
            "gap_rows": s.gap_rows,
            "token_aligned": s.token_aligned,
            "own_tokens": s.own_tokens,
            "failures": s.failures,
        }

    def close(self) -> None:
        if self in self.main.hooks:
            self.main.hooks.remove(self)
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)
        if self._thread.is_alive():
            log.warning("the shadow thread did not stop; leaving its engine open")
            return
        self.engine.close()
        self.files.close()


class ReanchorPredictor(ShadowPredictor):
    """SEP plus re-anchoring: after each MoE layer, re-run the next d layers from the true state."""

    name = "reanchor"

    def __init__(self, main, depth: int, options: PredictorOptions | None = None) -> None:
        super().__init__(main, depth, options)
        try:
            self.anchor = ShadowEngine(main, self.files, self.opts.shadow_threads)
        except BaseException:
            super().close()
            raise
        # The anchor attends over the main model's cache itself: rows before n_past are final there.
        # It writes row n_past of the layers after the current one, which the main model, paused in
        # the same thread, rewrites (set_rows precedes attention in its graph) before reading them.
        self.anchor.use_kv(main.kv)
        self.d = max(1, self.opts.reanchor_depth)
        self._pos = 0
        self._token = 0
        self._refined: dict[int, list[int]] = {}
        self._reanchor_s: list[float] = []  # per token
        self._token_s = 0.0

    def on_step(self, engine, tokens: np.ndarray) -> int:
        gen = super().on_step(engine, tokens)
        self._pos, self._token = int(engine.n_past), int(tokens[-1])
        return gen

    def begin_token(self, step: int) -> dict[int, list[int]]:
        self._refined = {}
        if self._token_s:
            self._reanchor_s.append(self._token_s)
        self._token_s = 0.0
        return super().begin_token(step)

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        out = super().after_router(layer, residual, selected)
        targets = upcoming(self.moe_layers, layer, self.d)
        if targets:
            t0 = time.perf_counter()
            routes: dict[int, list[int]] = {}
            self.anchor.n_past = self._pos
            self.anchor.run_token(self._token, start=layer, carry={"ffn_inp": residual}, stop_layer=targets[-1],
                                  on_route=lambda il, s: routes.__setitem__(il, [int(e) for e in s]))
            self._refined.update({l: routes[l] for l in targets if l in routes})
            self._token_s += time.perf_counter() - t0
        window = upcoming(self.moe_layers, layer, self.depth)
        out.update({l: e for l, e in self._refined.items() if l in window})
        return out

    def stats(self) -> dict:
        s = super().stats()
        per_token = self._reanchor_s + ([self._token_s] if self._token_s else [])
        s["reanchor_depth"] = self.d
        s["reanchor_ms_per_token"] = _summary_ms(per_token)
        return s

    def close(self) -> None:
        super().close()
        self.anchor.close()

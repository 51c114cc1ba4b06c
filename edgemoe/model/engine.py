"""The inference engine: runs a Model's trunk with ggml, layer by layer, and hands routed experts to a backend.

The Model (config, weights, MoE layers, manifest) is edgemoe.model.model's; the engine adds what running
it takes: the KV cache, the compute threads, the graphs. `run_layers` is the one layer loop (the
engine's per-layer graphs, the shadow's token and its re-anchor all go through it), and what follows
the engine's work (predictors, the cluster's coordinator) hears each step and router through its
hooks (edgemoe.model.hooks).

One eval() call runs a batch of tokens (the whole prompt, or one decode token) through the model:
for every MoE layer the trunk graph stops after the router, the expert backend computes the selected
experts, and the next layer's graph starts by combining their outputs, exactly as llama.cpp's
build_moe_ffn does inside one graph.

Several sequences (n_seq > 1, llama-server's slots) share one KV cache as llama.cpp's unified cache
does with seq_id: sequence s owns cells [s * n_ctx, (s + 1) * n_ctx), its tokens keep their own
positions, and the attention mask lets each row see only its own sequence's cells. eval_batch() takes
the next tokens of several sequences (a decode token of some, a whole prompt of others) through the
trunk together, and each MoE layer's experts once for all rows routed to them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgemoe.errors import UserError
from edgemoe.ggml import Compute, Context, TensorPtr, lib
from edgemoe.ggml.alloc import GraphAllocator
from edgemoe.ggml.context import aligned_copy, aligned_empty, to_numpy
from edgemoe.ggml.columns import mul_mat_id_limit
from edgemoe.ggml.repack import Repacker
from edgemoe.model import moe
from edgemoe.model.experts import ExpertBackend, LocalExperts
from edgemoe.model.hooks import StepHooks
from edgemoe.model.kvcache import Attention, AttentionOptions, KVCache
from edgemoe.model.model import Model
from edgemoe.model.trunk import StepInputs, Trunk, concat_rows, split_rows
from edgemoe.model.weights import GGUFTensors
from edgemoe.util.extra_bufts import extra_bufts_usable

LLAMA_CPP_POLL = 50  # llama.cpp's default threadpool polling level (cpu_params.poll)
# called after a MoE layer's router in the layer loop: (layer, its FFN input [T, n_embd], selected int32 [T, k],
# the rows of each sequence or None), as StepHooks.on_router
RouterHook = Callable[[int, np.ndarray, np.ndarray, "list[tuple[int, int]] | None"], None]
KV_PAD = 256  # llama.cpp pads the attended KV length to a multiple of 256
GRAPH_NODES = 16384  # the whole model in one graph: ~60 nodes per layer
_FUSED_VIEWS = 32  # tensors over outside memory (inputs, KV cache, experts) per layer of the fused graph
_SEGMENT_TENSORS = 4096  # nodes of one layer's graph (a segment), headers only
_SEGMENT_VIEWS = 256  # tensors over outside memory (weights, inputs, carry, KV cache) in one segment
_CACHED_GRAPHS = 4  # decode graphs kept (one per batch size and KV length in use)


@dataclass
class EvalStats:
    trunk_s: float = 0.0
    experts_s: float = 0.0
    evals: int = 0
    tokens: int = 0


class _FusedDecode:
    """The whole-model graph of a decode step (one token per sequence) for one batch size and KV length,
    kept between steps: its inputs are rewritten in place and its outputs read through views made
    once (a step costs no allocation in Python)."""

    def __init__(self, inp: StepInputs, seg: "Segment", moe_layers: list[int], k: int, n_cells: int,
                 n_swa: int = 0) -> None:
        self.inp, self.seg = inp, seg
        n = len(inp.tokens)
        self.logits = to_numpy(seg.outputs["logits"]).reshape(n, -1)
        self.selected = {il: to_numpy(seg.outputs[f"selected.{il}"]).reshape(-1, k) for il in moe_layers}
        self._n_kv_row = None if inp.v_idx is None else len(inp.v_idx) // n
        self._v_base = None if inp.v_idx is None else np.arange(self._n_kv_row, dtype=np.int64) * n_cells
        self._n_swa = n_swa

    def set_inputs(self, rows: list[tuple[int, int, int]]) -> None:
        """Each row's (token, position, first cell of its sequence): what Engine._batch_inputs builds."""
        inp = self.inp
        for r, (token, pos, first) in enumerate(rows):
            cell = first + pos
            inp.tokens[r], inp.pos[r], inp.kv_idx[r] = token, pos, cell
            m = inp.mask[r]
            m[:first] = -np.inf
            m[first:cell + 1] = 0
            m[cell + 1:] = -np.inf
            if self._v_base is not None:
                e = self._n_kv_row
                np.add(self._v_base, cell, out=inp.v_idx[r * e:(r + 1) * e])
            if inp.mask_swa is not None:  # the window: its sequence's positions pos - n_swa + 1 .. pos
                m = inp.mask_swa[r]
                lo = first + max(0, pos - self._n_swa + 1)
                m[:lo] = -np.inf
                m[lo:cell + 1] = 0
                m[cell + 1:] = -np.inf


@dataclass
class Segment:
    """One graph: the trunk from one MoE router (or the embeddings) to the next, or the output head."""

    ctx: Context
    graph: object
    carry: dict[str, np.ndarray]  # inputs from the previous segment: experts, weights, ffn_inp, shared | resid
    outputs: dict[str, TensorPtr]
    _views: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False)

    def views(self) -> dict[str, np.ndarray]:
        """numpy views of the outputs, made once: a segment's tensors keep their memory while it lives
        (reading ggml's tensor structs through ctypes every step was most of the shadow's Python)."""
        if self._views is None:
            self._views = {name: to_numpy(t) for name, t in self.outputs.items()}
        return self._views


class Engine:
    """A Model (edgemoe.model.model: config, trunk weights, MoE layers, manifest) run for inference: its
    KV cache, compute threads, graphs, and its experts behind a backend."""

    def __init__(self, model: str | Path | Model, *, n_ctx: int | None = None, n_threads: int = 2,
                 experts: ExpertBackend | Callable[["Engine"], ExpertBackend] | None = None,
                 compute: Compute | None = None, weights: GGUFTensors | None = None,
                 resident_experts: bool = True, attention: AttentionOptions | Attention | None = None,
                 repack: bool = False, n_seq: int = 1) -> None:
        """model: a model directory or GGUF (opened here, closed by close()), or a Model already loaded
        (left open: its owner closes it).
        weights: trunk tensors already mapped (another engine's, or a shadow trunk of the same model):
        used instead of opening model's trunk, and left open on close().
        attention: KV cache types and flash attention (default llama.cpp's: F16 cache, flash attention
        auto); an Attention already resolved (another engine's) is taken as it is.
        repack: llama.cpp's repacked weights (CPU_REPACK) for the trunk and resident in-process experts,
        where this CPU can run them (edgemoe.util.extra_bufts' probe) and ggml has kernels for the type
        (not with just-in-time local experts, which are computed from the shards as they are).
        n_seq: sequences held at once (eval_batch), each with n_ctx positions of its own."""
        if isinstance(model, Model):
            self.model, self._owns_model = model, False
        else:
            self.model, self._owns_model = Model.load(model, weights), True
        m = self.model
        # the model's pieces, as the engine's users have always read them
        self.manifest, self.weights, self.model_dir, self.cfg = m.manifest, m.weights, m.model_dir, m.cfg
        self.moe_layers = list(m.moe_layers)
        trunk_path = m.trunk_path
        self.n_ctx = min(n_ctx or self.cfg.n_ctx_train, self.cfg.n_ctx_train)
        # alone in process the engine has the cores to itself: its threads spin briefly between graphs as
        # llama.cpp's do (poll 50: decode 0.67-0.75x -> 0.87-0.88x llama.cpp on SmolLM2 at 2 threads); beside
        # workers or a shadow on the same cores they sleep instead
        self.compute = compute or Compute(n_threads, poll=LLAMA_CPP_POLL if experts is None else 0)
        if not isinstance(attention, Attention):
            attention = (attention or AttentionOptions()).resolve(self.cfg)
        if n_seq < 1:
            raise UserError(f"the number of sequences must be at least 1, not {n_seq}")
        self.n_seq = n_seq
        self.kv = KVCache(self.cfg, self.n_ctx * n_seq, attention)
        self.repacker: Repacker | None = None
        jit_local = experts is None and not resident_experts and self.cfg.n_expert > 0  # experts not in the graph: not repacked
        if repack and not jit_local and extra_bufts_usable():
            self.repacker = Repacker()
            if not self.repacker.available:
                self.repacker.close()
                self.repacker = None
        self.trunk = Trunk(self.cfg, self.weights, self.kv, self.repacker)
        # what follows the engine's work (edgemoe.model.hooks): predictors, the cluster's coordinator
        self.hooks: list[StepHooks] = []
        if self.moe_layers and experts is None:
            if self.model_dir is None:
                raise UserError(f"{trunk_path}: a MoE GGUF must be converted first: edgemoe convert {trunk_path} OUT_DIR")
            experts = LocalExperts(self.model_dir, self.compute, self.manifest, resident=resident_experts,
                                   repacker=self.repacker if resident_experts else None)
        if callable(experts) and not isinstance(experts, ExpertBackend):  # a factory that needs the loaded model
            experts = experts(self)
        self.experts = experts
        if isinstance(experts, StepHooks):  # a backend that follows the steps (the cluster's coordinator)
            self.hooks.append(experts)
        self.seq_past = [0] * n_seq  # positions filled per sequence
        self.stats = EvalStats()
        self.routing: list[np.ndarray | None] = [None] * self.cfg.n_layer  # last eval's top-k per layer
        self._galloc = GraphAllocator()  # the fused prompt graph's activations share memory, as llama.cpp's
        # graphs for batches of one token per sequence, by (rows, n_kv): only new input values per step
        self._decode_cache: dict[tuple[int, int], tuple[StepInputs, list[Segment]]] = {}
        # one graph per token for the whole model where the experts allow it (see _build_fused);
        # fuse=False keeps one graph per MoE layer with the backend called between them
        self.fuse = True
        self._fused: bool | None = None
        self._fused_cache: dict[tuple[int, int], _FusedDecode] = {}

    # ------------------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        """Positions filled in sequence 0 (the only one of a single-sequence engine)."""
        return self.seq_past[0]

    @n_past.setter
    def n_past(self, value: int) -> None:
        self.seq_past[0] = value

    def reset(self) -> None:
        self.seq_past = [0] * self.n_seq
        self.kv.clear()
        if self.experts is not None:
            self.experts.reset()

    def reset_seq(self, seq: int) -> None:
        """Sequence seq starts over; the others keep their state. Its old cells are masked, never
        read, until they are overwritten (llama.cpp's llama_memory_seq_rm)."""
        self._check_seq(seq)
        self.seq_past[seq] = 0

    def truncate(self, n_tokens: int, seq: int = 0) -> None:
        """Forget every position from n_tokens on (their cache rows are overwritten when reused)."""
        self._check_seq(seq)
        if not 0 <= n_tokens <= self.seq_past[seq]:
            raise ValueError(f"cannot truncate {self.seq_past[seq]} tokens to {n_tokens}")
        self.seq_past[seq] = n_tokens

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"sequence {seq} out of range: the engine holds {self.n_seq}")

    def close(self) -> None:
        self._drop_decode_cache()
        if self.experts is not None:
            self.experts.close()
        if self._owns_model:
            self.model.close()
        if self.repacker is not None:
            self.repacker.close()  # kept: its nbytes is a statistic
        self._galloc.close()
        self.compute.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _inputs(self, tokens: np.ndarray, logits_all: bool) -> StepInputs:
        """Inputs for tokens of sequence 0 at its next positions."""
        return self._batch_inputs([(0, np.asarray(tokens, dtype=np.int32))], logits_all)

    def _batch_inputs(self, items: list[tuple[int, np.ndarray]], logits_all: bool) -> StepInputs:
        """Inputs for a batch: each item's tokens at its sequence's next positions, in its own cells."""
        pos = np.concatenate([np.arange(self.seq_past[s], self.seq_past[s] + len(t), dtype=np.int32) for s, t in items])
        first = np.concatenate([np.full(len(t), s * self.n_ctx, dtype=np.int64) for s, t in items])
        cells = first + pos
        n_tok = len(pos)
        n_cells = self.kv.n_ctx
        n_kv = self._n_kv(int(cells.max()) + 1)
        kv_cells = np.arange(n_kv)[None, :]
        visible = (kv_cells >= first[:, None]) & (kv_cells <= cells[:, None])  # its own sequence, causal
        attn = self.kv.attn
        mask_type = np.float16 if attn.flash else np.float32  # llama.cpp: flash attention takes an F16 mask
        mask = np.where(visible, mask_type(0), mask_type(-np.inf)).astype(mask_type)
        mask_swa = None
        if self.cfg.n_swa:  # llama.cpp's is_masked_swa (standard): hidden when p1 - p0 >= n_swa
            in_window = cells[:, None] - kv_cells < self.cfg.n_swa
            mask_swa = aligned_copy(np.where(visible & in_window, mask_type(0), mask_type(-np.inf)).astype(mask_type))
        lens = [len(t) for _, t in items]
        ends = np.cumsum(lens) - 1
        out_ids = np.arange(n_tok, dtype=np.int32) if logits_all else ends.astype(np.int32)
        groups = out_groups = None
        if len(items) > 1:
            groups = [(int(e) + 1 - n, n) for e, n in zip(ends, lens)]
            out_groups = groups if logits_all else [(i, 1) for i in range(len(items))]
        v_idx = None
        if attn.v_trans:  # element j of token i goes to j * n_cells + cell (llama.cpp's set_input_v_idxs)
            j = np.arange(self.cfg.n_embd_v, dtype=np.int64)
            v_idx = aligned_copy((cells[:, None] + j[None, :] * n_cells).reshape(-1))
        return StepInputs(
            tokens=aligned_copy(np.concatenate([t for _, t in items]).astype(np.int32)),
            pos=aligned_copy(pos),
            kv_idx=aligned_copy(cells),
            mask=aligned_copy(mask),
            out_ids=aligned_copy(out_ids),
            v_idx=v_idx,
            groups=groups,
            out_groups=out_groups,
            mask_swa=mask_swa,
        )

    def _segment_bytes(self, inp: StepInputs) -> int:
        return Context.overhead(4096) + self.trunk.activation_bytes(len(inp.tokens), inp.n_kv, len(inp.out_ids))

    def _outputs_only(self, il: int) -> bool:
        """Whether only the output rows go on after layer il's attention: after the last layer's, as
        llama.cpp gathers them there (gpt-oss gathers them at the head instead, all rows take its FFN)."""
        return il == self.cfg.n_layer - 1 and not self.cfg.traits.out_rows_at_head

    def _attend_and_norm(self, ctx: Context, graph: object, il: int, x: TensorPtr,
                         inp: StepInputs) -> tuple[TensorPtr, TensorPtr, list[tuple[int, int]] | None]:
        """Layer il from its input to its FFN input: attention, the residual add and the FFN norm. After
        the last layer's attention only the output rows go on. Returns (ffn_inp, normed, row groups)."""
        trunk = self.trunk
        cur = trunk.attention(ctx, graph, il, x, inp)
        groups = inp.groups
        if self._outputs_only(il):
            ids = ctx.from_numpy(inp.out_ids)
            cur, x = ctx.get_rows(cur, ids), ctx.get_rows(x, ids)
            groups = inp.out_groups
        ffn_inp = trunk.residual(ctx, cur, x)
        return ffn_inp, trunk.ffn_norm(ctx, il, ffn_inp), groups

    def _build_segment(self, ctx: Context, il: int, inp: StepInputs, carry: dict[str, np.ndarray]) -> Segment:
        """Add segment il's nodes to a new graph: combine what enters it, then layer il up to its
        router (or through its dense FFN); il == n_layer is the output head. carry holds the numpy
        arrays the segment reads: pending MoE state (experts, weights, ffn_inp, shared) or resid; or
        ffn_inp alone: MoE layer il entered at its FFN input (the re-anchor: another model's residual
        stream), no attention."""
        trunk, cfg = self.trunk, self.cfg
        graph = ctx.graph()
        outputs: dict[str, TensorPtr] = {}
        if "ffn_inp" in carry and "experts" not in carry:
            ffn_inp = ctx.from_numpy(carry["ffn_inp"])
            self._moe_outputs(ctx, il, ffn_inp, trunk.ffn_norm(ctx, il, ffn_inp), None, outputs)
        else:
            if il == 0:
                x = trunk.embed(ctx, inp)
            elif "experts" in carry:
                out = moe.combine(ctx, graph, ctx.from_numpy(carry["experts"]), ctx.from_numpy(carry["weights"]), il - 1)
                if "shared" in carry:
                    out = ctx.add(out, ctx.from_numpy(carry["shared"]))
                x = trunk.residual(ctx, out, ctx.from_numpy(carry["ffn_inp"]))
            else:
                x = ctx.from_numpy(carry["resid"])
            if il == cfg.n_layer:
                if cfg.traits.out_rows_at_head:  # gpt-oss gathers the output rows here, not after the last attention
                    x = ctx.get_rows(x, ctx.from_numpy(inp.out_ids))
                outputs["logits"] = trunk.head(ctx, x, inp.out_groups)
            else:
                ffn_inp, normed, groups = self._attend_and_norm(ctx, graph, il, x, inp)
                if trunk.is_moe_layer(il):
                    self._moe_outputs(ctx, il, ffn_inp, normed, groups, outputs)
                else:
                    outputs["resid"] = trunk.residual(ctx, trunk.dense_ffn(ctx, il, normed, groups), ffn_inp)
        for t in outputs.values():
            lib.ggml_build_forward_expand(graph, t)
        return Segment(ctx, graph, carry, outputs)

    def _moe_outputs(self, ctx: Context, il: int, ffn_inp: TensorPtr, normed: TensorPtr,
                     groups: list[tuple[int, int]] | None, outputs: dict[str, TensorPtr]) -> None:
        """What a segment ending at MoE layer il's router hands on: its FFN input, the normed rows, the
        router's choice and weights, the shared expert's output."""
        outputs["ffn_inp"], outputs["normed"] = ffn_inp, normed
        outputs["selected"], outputs["weights"] = self.trunk.router(ctx, il, normed, groups)
        if self.cfg.shared_expert:
            outputs["shared"] = self.trunk.shared_expert(ctx, il, normed, groups)

    @staticmethod
    def _refill(cached: StepInputs, inp: StepInputs) -> None:
        """Write a step's input values into the arrays a cached graph views."""
        for name in ("tokens", "pos", "kv_idx", "mask", "out_ids", "v_idx", "mask_swa"):
            if getattr(inp, name) is not None:
                np.copyto(getattr(cached, name), getattr(inp, name))

    @staticmethod
    def _evict(cache: dict) -> None:
        """Keep the newest few cached graphs (a batch size or KV length no longer in use is dropped)."""
        while len(cache) >= _CACHED_GRAPHS:
            entry = cache.pop(next(iter(cache)))
            for seg in [entry.seg] if isinstance(entry, _FusedDecode) else entry[1]:
                seg.ctx.close()

    def _decode_segments(self, inp: StepInputs) -> list[Segment]:
        """Graphs for a decode step (one token per sequence), built once per batch size and KV length
        (n_kv grows in steps of 256) and reused: each step only writes new values into their inputs."""
        key = (len(inp.tokens), inp.n_kv)
        hit = self._decode_cache.get(key)
        if hit is not None:
            self._refill(hit[0], inp)
            return hit[1]
        self._evict(self._decode_cache)
        cfg = self.cfg
        k, d, n = cfg.n_expert_used, cfg.n_embd, len(inp.tokens)
        segments = []
        for il in range(cfg.n_layer + 1):
            carry: dict[str, np.ndarray] = {}
            if il > 0 and self.trunk.is_moe_layer(il - 1):
                carry = {"experts": aligned_empty((n, k, d)), "weights": aligned_empty((n, k, 1)), "ffn_inp": aligned_empty((n, d))}
                if cfg.shared_expert:
                    carry["shared"] = aligned_empty((n, d))
            elif il > 0:
                carry = {"resid": aligned_empty((n, d))}
            ctx = Context(self._segment_bytes(inp))
            segments.append(self._build_segment(ctx, il, inp, carry))
        self._decode_cache[key] = (inp, segments)
        return segments

    def _drop_decode_cache(self) -> None:
        for _, segs in self._decode_cache.values():
            for seg in segs:
                seg.ctx.close()
        self._decode_cache.clear()
        for entry in self._fused_cache.values():
            entry.seg.ctx.close()
        self._fused_cache.clear()

    def _fusable(self) -> bool:
        """Whether the experts can run inside the trunk's graph (resident in-process experts)."""
        if self._fused is None:
            ctx = Context(Context.overhead(16, 0), views=8 * len(self.moe_layers) + 16)  # 7 parts at most per layer (4 weights, 3 biases)
            try:
                self._fused = all(self.experts is not None and self.experts.graph_parts(il, ctx, self.cfg.n_embd) is not None
                                  for il in self.moe_layers) if self.moe_layers else True
            finally:
                ctx.close()
        return self._fused

    def _build_fused(self, ctx: Context, inp: StepInputs) -> Segment:
        """The whole model as one graph, as llama.cpp builds it: embeddings, every layer with its
        experts computed by ggml_mul_mat_id on the router's own choice (build_moe_ffn), the head.
        The routers' top-k tensors are outputs, read after the run."""
        trunk, cfg = self.trunk, self.cfg
        graph = ctx.graph(GRAPH_NODES)
        outputs: dict[str, TensorPtr] = {}
        x = trunk.embed(ctx, inp)
        for il in range(cfg.n_layer):
            ffn_inp, normed, groups = self._attend_and_norm(ctx, graph, il, x, inp)
            if trunk.is_moe_layer(il):
                selected, weights = trunk.router(ctx, il, normed, groups)
                outputs[f"selected.{il}"] = selected
                parts = self.experts.graph_parts(il, ctx, cfg.n_embd)
                if groups and len(groups) > 1:  # runs of rows that keep each sequence on its own kernels
                    limit = mul_mat_id_limit([int(t.contents.type) for t in parts.values()], self.experts.graph_repacked(il))
                    experts = concat_rows(ctx, [moe.experts(ctx, parts, x_part, sel_part, cfg.expert_act, il) for x_part, sel_part in zip(
                        split_rows(ctx, normed, groups, limit), split_rows(ctx, selected, groups, limit))], dim=2)
                else:
                    experts = moe.experts(ctx, parts, normed, selected, cfg.expert_act, il)
                out = moe.combine(ctx, graph, experts, weights, il)
                if cfg.shared_expert:
                    out = ctx.add(out, trunk.shared_expert(ctx, il, normed, groups))
                x = trunk.residual(ctx, out, ffn_inp)
            else:
                x = trunk.residual(ctx, trunk.dense_ffn(ctx, il, normed, groups), ffn_inp)
        if cfg.traits.out_rows_at_head:
            x = ctx.get_rows(x, ctx.from_numpy(inp.out_ids))
        outputs["logits"] = trunk.head(ctx, x, inp.out_groups)
        for t in outputs.values():
            lib.ggml_build_forward_expand(graph, t)
        return Segment(ctx, graph, {}, outputs)

    def _fused_bytes(self, inp: StepInputs) -> int:
        n_tok, k, c = len(inp.tokens), max(self.cfg.n_expert_used, 1), self.cfg
        experts = 4 * n_tok * k * (6 * max(c.n_ff_exp, 1) + 2 * c.n_embd)
        return Context.overhead(64, GRAPH_NODES) + (c.n_layer + 1) * (self._segment_bytes(inp) + experts)

    def _n_kv(self, top: int) -> int:
        """KV cells a step attends whose highest used cell is top - 1 (llama.cpp pads to KV_PAD)."""
        return min(self.kv.n_ctx, max(KV_PAD, -(-top // KV_PAD) * KV_PAD))

    def _eval_fused(self, batch: list[tuple[int, np.ndarray]], logits_all: bool) -> np.ndarray:
        cfg = self.cfg
        t0 = time.perf_counter()
        decode = all(len(t) == 1 for _, t in batch)  # one token per sequence: its graph is kept
        hit = None
        if decode:
            rows = [(int(t[0]), self.seq_past[s], s * self.n_ctx) for s, t in batch]
            key = (len(rows), self._n_kv(max(first + pos for _, pos, first in rows) + 1))
            hit = self._fused_cache.get(key)
        if hit is not None:
            hit.set_inputs(rows)
            self.compute.run(hit.seg.graph)
            logits = hit.logits.copy()
            for il, sel in hit.selected.items():
                self.routing[il] = sel.astype(np.int32)
        else:
            inp = self._batch_inputs(batch, logits_all)
            views = _FUSED_VIEWS * cfg.n_layer + 64
            if decode:
                self._evict(self._fused_cache)
                ctx = Context(self._fused_bytes(inp), views=views)
            else:  # headers only: the allocator places the activations, reusing memory as llama.cpp does
                ctx = Context(Context.overhead(GRAPH_NODES + views, GRAPH_NODES), alloc=False, views=views)
            seg = self._build_fused(ctx, inp)
            try:
                if not decode:
                    for t in seg.outputs.values():
                        lib.ggml_set_output(t)
                    self._galloc.allocate(seg.graph)
                self.compute.run(seg.graph)
                logits = to_numpy(seg.outputs["logits"]).reshape(len(inp.out_ids), cfg.n_vocab).copy()
                for il in self.moe_layers:
                    sel = to_numpy(seg.outputs[f"selected.{il}"])
                    self.routing[il] = np.array(sel.reshape(-1, cfg.n_expert_used), dtype=np.int32)
            finally:
                if not decode:
                    seg.ctx.close()
            if decode:
                self._fused_cache[key] = _FusedDecode(inp, seg, self.moe_layers, cfg.n_expert_used, self.kv.n_ctx, cfg.n_swa)
        self.stats.trunk_s += time.perf_counter() - t0
        for il in self.moe_layers:  # checks each shard's sha256 the first time the router picks it
            self.experts.graph_used(il, self.routing[il])
        return logits

    def eval(self, tokens: list[int] | np.ndarray, *, logits_all: bool = False) -> np.ndarray:
        """Run tokens of sequence 0 at its next positions; returns float32 logits [n_out, n_vocab]
        (last token, or all)."""
        return self.eval_batch([(0, tokens)], logits_all=logits_all)[0]

    def eval_batch(self, items: Sequence[tuple[int, list[int] | np.ndarray]], *,
                   logits_all: bool = False) -> list[np.ndarray]:
        """One step for several sequences: items are (sequence, its next tokens), each sequence at most
        once; all rows go through the trunk together and each layer's experts are computed once for
        the rows routed to them. Returns each item's float32 logits [n_out, n_vocab] (its last token,
        or all its tokens). The hooks' on_step (a shadow predictor following one sequence) hears only
        single-item batches of sequence 0."""
        batch = [(int(s), np.asarray(t, dtype=np.int32).reshape(-1)) for s, t in items]
        if not batch:
            raise UserError("nothing to evaluate (no sequences)")
        seqs = [s for s, _ in batch]
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"a sequence appears twice in one batch: {seqs}")
        for s, tokens in batch:
            self._check_seq(s)
            if len(tokens) == 0:
                raise UserError("nothing to evaluate (empty token list)")
            if self.seq_past[s] + len(tokens) > self.n_ctx:
                raise UserError(f"{self.seq_past[s] + len(tokens)} tokens do not fit the context of {self.n_ctx} tokens")
            if tokens.min() < 0 or tokens.max() >= self.cfg.n_vocab:
                raise UserError(f"token id out of range [0, {self.cfg.n_vocab})")
        if len(batch) == 1 and seqs[0] == 0:
            for hook in list(self.hooks):
                hook.on_step(self, batch[0][1])
        cfg = self.cfg
        n_tok = sum(len(t) for _, t in batch)
        self.routing = [None] * cfg.n_layer
        if self.fuse and self._fusable():  # one graph for the whole model, any prompt length (memory reused)
            logits = self._eval_fused(batch, logits_all)
        else:
            logits = self._eval_segments(self._batch_inputs(batch, logits_all), n_tok == len(batch))
        for s, tokens in batch:
            self.seq_past[s] += len(tokens)
            self.kv.mark_used(s * self.n_ctx + self.seq_past[s])
        self.stats.evals += 1
        self.stats.tokens += n_tok
        if logits_all:
            ends = np.cumsum([0] + [len(t) for _, t in batch])
            return [logits[a:b] for a, b in zip(ends[:-1], ends[1:])]
        return [logits[i:i + 1] for i in range(len(batch))]

    def _eval_segments(self, inp: StepInputs, decode: bool) -> np.ndarray:
        """One graph per MoE layer, the expert backend called between them (a cluster, or experts
        that cannot sit in the trunk's graph)."""
        return self.run_layers(inp, segments=self._decode_segments(inp) if decode else None,
                               on_router=self._on_router if self.hooks else None)

    def _on_router(self, layer: int, residual: np.ndarray, selected: np.ndarray,
                   groups: list[tuple[int, int]] | None) -> None:
        for hook in self.hooks:
            hook.on_router(layer, residual, selected, groups)

    def run_layers(self, inp: StepInputs, carry: dict[str, np.ndarray] | None = None, *, start: int = 0,
                   stop: int | None = None, segments: Sequence[Segment] | None = None,
                   on_router: RouterHook | None = None) -> np.ndarray | None:
        """The one layer loop (the engine's per-layer graphs, the shadow's token, the re-anchor): segments
        start..stop, each entered with what the one before handed on (carry: the pending MoE state
        experts/weights/ffn_inp/shared, or resid; at start, what the caller gives), the routed experts
        of each MoE layer computed by the backend between them.

        stop: the last segment: n_layer (the default) ends with the output head and returns the logits
        [n_out, n_vocab]; a MoE layer ends after its router (only the routing is wanted) and returns None.
        segments: a decode step's graphs, built once and kept (carries are copied into them); None builds
        each segment for this step, its activations placed by the graph allocator.
        on_router(layer, ffn_inp [T, n_embd], selected int32 [T, k], row groups): after each MoE layer's
        router, before its experts (the engine's own: its hooks' on_router)."""
        cfg = self.cfg
        stop = cfg.n_layer if stop is None else stop
        state = dict(carry or {})
        for il in range(start, stop + 1):
            t0 = time.perf_counter()
            if segments is not None:
                seg = segments[il]
                for name, arr in seg.carry.items():
                    np.copyto(arr, state[name].reshape(arr.shape))
            else:  # headers only; the allocator places the activations (valid until the next segment)
                ctx = Context(Context.overhead(_SEGMENT_TENSORS + _SEGMENT_VIEWS), alloc=False, views=_SEGMENT_VIEWS)
                seg = self._build_segment(ctx, il, inp, state)
                for t in seg.outputs.values():
                    lib.ggml_set_output(t)
                self._galloc.allocate(seg.graph)
            try:
                self.compute.run(seg.graph)
                out = seg.views()
                if il == cfg.n_layer:
                    self.stats.trunk_s += time.perf_counter() - t0
                    return out["logits"].reshape(len(inp.out_ids), cfg.n_vocab).copy()
                if "resid" in out:
                    state = {"resid": aligned_copy(out["resid"].reshape(-1, cfg.n_embd))}
                else:
                    n_rows = out["ffn_inp"].size // cfg.n_embd
                    sel = np.array(out["selected"].reshape(n_rows, cfg.n_expert_used), dtype=np.int32)
                    hidden = np.array(out["normed"].reshape(n_rows, cfg.n_embd), dtype=np.float32)
                    state = {
                        "ffn_inp": aligned_copy(out["ffn_inp"].reshape(n_rows, cfg.n_embd)),
                        "weights": aligned_copy(out["weights"].reshape(n_rows, cfg.n_expert_used, 1)),
                    }
                    if "shared" in out:
                        state["shared"] = aligned_copy(out["shared"].reshape(n_rows, cfg.n_embd))
            finally:
                if segments is None:
                    seg.ctx.close()
            t1 = time.perf_counter()
            self.stats.trunk_s += t1 - t0
            if "resid" in state:
                continue
            self.routing[il] = sel
            # several sequences: the backend sees one step of each (a cluster plans it as one message per worker)
            groups = inp.out_groups if self._outputs_only(il) else inp.groups
            if on_router is not None:
                on_router(il, state["ffn_inp"], sel, groups or None)
            if il == stop:
                return None  # only the routing was wanted
            kw = {"groups": groups} if groups else {}
            state["experts"] = aligned_copy(self.experts.compute_layer(il, hidden, sel, **kw))
            self.stats.experts_s += time.perf_counter() - t1
        return None

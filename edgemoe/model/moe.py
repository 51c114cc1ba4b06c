"""One MoE FFN as llama.cpp's build_moe_ffn (src/llama-graph.cpp) builds it: router, routed experts, combine.

The three parts are apart because OD-MoE runs them apart: the trunk's graph stops after `router`
(the coordinator sends the choice to the workers), `experts` runs where the experts are (the engine's
own graph, a worker's slots, the shadow's stacked tensors), and `combine` opens the next layer's
graph. In one graph (the fused decode) they follow each other exactly as in llama.cpp.

Every node gets llama.cpp's name, "<name>-<layer>" as its graph callback writes it (ffn_moe_logits-3,
ffn_moe_topk-3, ffn_moe_down-3, ffn_moe_out-3, ...), so an intermediate tensor can be compared with
llama.cpp's by name (GGML_SCHED debug dumps, eval callbacks). A node built outside a layer (il < 0:
an expert graph of a worker) gets the bare name.

`ExpertGraph` is the one small graph of routed experts alone (x, ids -> outputs) that the backends
(in-process layers, one-shard runs, a worker's slots, the shadow's stacked tensors) keep per shape.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator

import numpy as np

from edgemoe.ggml import Compute, Context, TensorPtr, lib
from edgemoe.ggml.context import aligned_empty, to_numpy
from edgemoe.model.config import ModelConfig

WEIGHT_SUM_MIN = 6.103515625e-5  # llama.cpp clamps the top-k weight sum to the smallest normal f16
SWIGLU_OAI_ALPHA = 1.702  # llama.cpp's constants for gpt-oss (build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE)
SWIGLU_OAI_LIMIT = 7.0


def named(t: TensorPtr, name: str, il: int) -> TensorPtr:
    """t named as llama.cpp's graph callback names it (llama_context::graph_get_cb): name-il, or name."""
    lib.ggml_set_name(t, (f"{name}-{il}" if il >= 0 else name).encode())
    return t


def router(ctx: Context, cfg: ModelConfig, cur: TensorPtr, gate_inp: TensorPtr, gate_inp_b: TensorPtr | None,
           exp_probs_b: TensorPtr | None, il: int,
           matmul: Callable[[TensorPtr, TensorPtr], TensorPtr] | None = None) -> tuple[TensorPtr, TensorPtr]:
    """build_moe_ffn up to the expert weights: the router logits (+ ffn_gate_inp's bias), gating
    (softmax, sigmoid, or softmax over the chosen: softmax_weight), the selection bias exp_probs_b,
    group-limited selection, top-k, the weights (renormalised, scaled).
    matmul(w, cur): the trunk's product (one per run of rows of a batch of sequences); default ggml_mul_mat.
    Returns (selected I32 [k, T], weights F32 [1, k, T])."""
    n_tok = int(cur.contents.ne[1])
    k = cfg.n_expert_used
    logits = named(matmul(gate_inp, cur) if matmul is not None else ctx.mul_mat(gate_inp, cur), "ffn_moe_logits", il)
    if gate_inp_b is not None:
        logits = named(ctx.add(logits, gate_inp_b), "ffn_moe_logits_biased", il)
    if cfg.gating == "sigmoid":
        probs = ctx.sigmoid(logits)
    elif cfg.gating == "softmax_weight":  # gpt-oss: top-k of the logits, softmax over the k chosen
        probs = logits
    else:
        probs = ctx.soft_max(logits)
    probs = named(probs, "ffn_moe_probs", il)
    selection = probs
    if exp_probs_b is not None:
        selection = named(ctx.add(probs, exp_probs_b), "ffn_moe_probs_biased", il)
    if cfg.n_expert_groups > 1 and n_tok > 0:
        selection = named(_group_limit(ctx, cfg, selection, n_tok, il), "ffn_moe_probs_masked", il)
    selected = ctx.argsort_top_k(selection, k)
    named(_src0(selected), "ffn_moe_argsort", il)
    named(selected, "ffn_moe_topk", il)
    weights = named(ctx.get_rows(ctx.reshape_3d(probs, 1, cfg.n_expert, n_tok), selected), "ffn_moe_weights", il)
    if cfg.gating == "softmax_weight":
        w2 = ctx.soft_max(ctx.reshape_2d(weights, k, n_tok))
        weights = named(ctx.reshape_3d(w2, 1, k, n_tok), "ffn_moe_weights_softmax", il)
    if cfg.norm_topk:
        w2 = ctx.reshape_2d(weights, k, n_tok)
        total = named(ctx.sum_rows(w2), "ffn_moe_weights_sum", il)
        total = named(ctx.clamp(total, WEIGHT_SUM_MIN, float("inf")), "ffn_moe_weights_sum_clamped", il)
        weights = ctx.reshape_3d(named(ctx.div(w2, total), "ffn_moe_weights_norm", il), 1, k, n_tok)
    if cfg.expert_weights_scale not in (0.0, 1.0):
        weights = named(ctx.scale(weights, cfg.expert_weights_scale), "ffn_moe_weights_scaled", il)
    return selected, weights


def _src0(t: TensorPtr) -> TensorPtr:
    """t's first source: ggml_argsort_top_k is a view of an argsort, which llama.cpp names too."""
    return ctypes.cast(t.contents.src[0], type(t))


def _group_limit(ctx: Context, cfg: ModelConfig, selection: TensorPtr, n_tok: int, il: int) -> TensorPtr:
    """DeepSeek-V3 group-limited routing: score each group by its two best experts, keep the
    n_group_used best groups, mask the others' experts with -inf."""
    per = cfg.n_expert // cfg.n_expert_groups
    groups = ctx.reshape_3d(selection, per, cfg.n_expert_groups, n_tok)
    top2 = ctx.argsort_top_k(groups, 2)  # [2, n_groups, T]
    gc = groups.contents
    scores = ctx.get_rows(ctx.reshape_4d(groups, 1, gc.ne[0], gc.ne[1], gc.ne[2]), top2)  # [1, 2, n_groups, T]
    sc = scores.contents
    scores = ctx.sum_rows(ctx.reshape_3d(scores, sc.ne[1], sc.ne[2], sc.ne[3]))  # [1, n_groups, T]
    sc = scores.contents
    scores = ctx.reshape_2d(scores, sc.ne[1], sc.ne[2])
    best = named(ctx.argsort_top_k(scores, cfg.n_group_used), "ffn_moe_group_topk", il)  # [n_group_used, T]
    kept = ctx.get_rows(groups, best)  # [per, n_group_used, T]
    masked = ctx.set_rows(ctx.fill(groups, float("-inf")), kept, best)
    return ctx.reshape_2d(masked, cfg.n_expert, n_tok)


def experts(ctx: Context, parts: dict[str, TensorPtr], x: TensorPtr, ids: TensorPtr, act: str = "silu",
            il: int = -1) -> TensorPtr:
    """build_moe_ffn's expert nodes (gated FFN, parallel gate), one ggml_mul_mat_id per part.

    parts: stacked expert tensors "gate"/"up" (or "gate_up") and "down", [n_in, n_out, n_expert] each,
    and where the architecture has them their biases "gate_b"/"up_b"/"gate_up_b"/"down_b" [n_out,
    n_expert] (added per row's expert, ggml_add_id); x: the FFN-normed rows, F32 [n_embd, T]; ids: I32
    [k, T], each row's experts; act: "silu" (SwiGLU) or "swiglu_oai" (gpt-oss's clamped variant).
    Returns the unweighted outputs, F32 [n_embd, k, T].
    """
    n_embd, n_tok = int(x.contents.ne[0]), int(x.contents.ne[1])
    k = int(ids.contents.ne[0])
    n_ff = int(parts["down"].contents.ne[0])
    b = ctx.reshape_3d(x, n_embd, 1, n_tok)

    def biased(t: TensorPtr, part: str) -> TensorPtr:
        bias = parts.get(part + "_b")
        return named(ctx.add_id(t, bias, ids), f"ffn_moe_{part}_biased", il) if bias is not None else t

    if "gate_up" in parts:
        gate_up = biased(named(ctx.mul_mat_id(parts["gate_up"], b, ids), "ffn_moe_gate_up", il), "gate_up")  # [2*n_ff, k, T]
        c = gate_up.contents
        gate = named(ctx.view_3d(gate_up, n_ff, k, n_tok, c.nb[1], c.nb[2], 0), "ffn_moe_gate", il)
        up = named(ctx.view_3d(gate_up, n_ff, k, n_tok, c.nb[1], c.nb[2], n_ff * c.nb[0]), "ffn_moe_up", il)
    else:
        up = biased(named(ctx.mul_mat_id(parts["up"], b, ids), "ffn_moe_up", il), "up")  # [n_ff, k, T]
        gate = biased(named(ctx.mul_mat_id(parts["gate"], b, ids), "ffn_moe_gate", il), "gate")
    if act == "swiglu_oai":
        h = named(ctx.swiglu_oai(gate, up, SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT), "ffn_moe_swiglu_oai", il)
    else:
        h = named(ctx.swiglu_split(gate, up), "ffn_moe_swiglu", il)
    return biased(named(ctx.mul_mat_id(parts["down"], h, ids), "ffn_moe_down", il), "down")  # [n_embd, k, T]


def combine(ctx: Context, graph: object, out: TensorPtr, weights: TensorPtr, il: int = -1) -> TensorPtr:
    """The weighted sum of the k expert outputs [n_embd, k, T], added in rank order (llama.cpp's exact
    order, each view expanded before the adds): [n_embd, T]."""
    weighted = named(ctx.mul(out, weights), "ffn_moe_weighted", il)
    lib.ggml_build_forward_expand(graph, weighted)
    c = weighted.contents
    n_embd, k, n_tok = c.ne[0], c.ne[1], c.ne[2]
    views = [ctx.view_2d(weighted, n_embd, n_tok, c.nb[2], i * c.nb[1]) for i in range(k)]
    for v in views:
        lib.ggml_build_forward_expand(graph, v)
    moe_out = views[0]
    for v in views[1:]:
        moe_out = ctx.add(moe_out, v)
        lib.ggml_build_forward_expand(graph, moe_out)
    return named(ctx.cont(moe_out) if k == 1 else moe_out, "ffn_moe_out", il)


_GRAPH_NODES = 64


@dataclass
class ExpertGraph:
    """A graph of routed experts alone: rows x [T, n_embd] through their experts ids [T, k] -> the
    unweighted outputs [T, k, n_embd]. Built over parts made in its own context; the input arrays are
    rewritten per run, so a kept graph costs no allocation."""

    ctx: Context
    graph: object
    x: np.ndarray  # [T, n_embd] float32, viewed by the graph
    ids: np.ndarray  # [T, k] int32, viewed by the graph
    out: TensorPtr  # [n_embd, k, T]
    out_view: np.ndarray  # out's memory as numpy (made once: the graph's tensors never move)
    parts: dict[str, TensorPtr]  # the expert tensors it reads (a one-shard graph re-points their data)

    @classmethod
    def build(cls, parts: Callable[[Context], dict[str, TensorPtr]], n_tok: int, k: int, n_embd: int, n_ff: int,
              act: str) -> "ExpertGraph":
        """parts(ctx): the stacked tensors as `experts` takes them, made in the graph's context."""
        mem = 4 * n_tok * k * (6 * n_ff + 2 * n_embd) + 4 * n_tok * (n_embd + k) + 64 * 32
        ctx = Context(Context.overhead(32, graph_size=_GRAPH_NODES) + mem + 4096)
        try:
            x = aligned_empty((n_tok, n_embd))
            ids = aligned_empty((n_tok, k), np.int32)
            tensors = parts(ctx)
            out = experts(ctx, tensors, ctx.from_numpy(x), ctx.from_numpy(ids), act)
            graph = ctx.graph(_GRAPH_NODES)
            lib.ggml_build_forward_expand(graph, out)
        except BaseException:
            ctx.close()
            raise
        return cls(ctx, graph, x, ids, out, to_numpy(out), tensors)

    def run(self, compute: Compute, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """float32 [T, k, n_embd], a copy (the graph's memory is rewritten by the next run)."""
        self.x[...] = x
        self.ids[...] = ids
        compute.run(self.graph)
        n_tok, k = self.ids.shape
        return self.out_view.reshape(n_tok, k, -1).copy()

    def close(self) -> None:
        self.ctx.close()


class ExpertGraphs:
    """Expert graphs by shape for one backend: a graph of up to KEEP_ROWS rows (decode) is built once and
    kept, a larger one (a prompt) is built for its call and freed after it."""

    KEEP_ROWS = 8

    def __init__(self) -> None:
        self._kept: dict[Hashable, ExpertGraph] = {}

    @contextmanager
    def use(self, key: Hashable, n_rows: int, build: Callable[[], ExpertGraph]) -> Iterator[ExpertGraph]:
        """The graph for key (rows x its experts), built by build() the first time."""
        g = self._kept.get(key)
        if g is None:
            g = build()
            if n_rows <= self.KEEP_ROWS:
                self._kept[key] = g
        try:
            yield g
        finally:
            if n_rows > self.KEEP_ROWS:
                g.close()

    def close(self) -> None:
        for g in self._kept.values():
            g.close()
        self._kept.clear()

"""Every routed expert of a model held at once, as llama.cpp's stacked tensors: the shadow's experts.

`blk.L.ffn_{gate,up,down}_exps.weight` ([n_embd, n_ff, n_expert] etc., ggml order) are mapped from one
GGUF and a layer's k selected experts run in one graph through ggml_mul_mat_id, as llama.cpp's
build_moe_ffn does. Nothing is loaded per call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.arch import ARCHITECTURES
from edgemoe.format.schema import expert_tensor_name
from edgemoe.ggml import Compute, Context, lib
from edgemoe.ggml.context import aligned_empty, to_numpy
from edgemoe.model.expert_ffn import moe_ffn
from edgemoe.model.experts import ExpertBackend, ExpertStats
from edgemoe.model.weights import GGUFTensors

_CACHE_TOKENS = 8  # graphs for up to this many rows are kept (decode); larger batches are built per call


@dataclass
class _Graph:
    ctx: Context
    graph: object
    x: np.ndarray  # [n_tok, n_embd] float32, viewed by the graph
    ids: np.ndarray  # [n_tok, k] int32
    out: object  # [n_embd, k, n_tok]
    out_view: np.ndarray  # out's memory as numpy (made once: the graph's tensors never move)


class StackedExperts(ExpertBackend):
    """Computes selected experts from stacked tensors (one file, all layers, mapped once)."""

    def __init__(self, weights: GGUFTensors, compute: Compute, moe_layers: list[int], n_embd: int) -> None:
        self.w = weights
        arch = ARCHITECTURES.get(weights.meta.get("general.architecture", ""))
        self.act = arch.expert_act if arch else "silu"
        self.compute = compute
        self.n_embd = n_embd
        self.stats = ExpertStats()
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        for il in moe_layers:
            parts = self._parts(il)
            if "down" not in parts or not ({"gate", "up"} <= parts.keys() or "gate_up" in parts):
                raise UserError(f"{weights.path}: layer {il} lacks its stacked gate/up/down expert tensors")

    def _parts(self, il: int) -> dict[str, object]:
        out = {}
        for part in ("gate", "up", "gate_up", "down"):
            t = self.w.get(expert_tensor_name(il, part))
            if t is not None:
                out[part] = t
            b = self.w.get(expert_tensor_name(il, part, "bias"))
            if b is not None:
                out[part + "_b"] = b
        return out

    def _build(self, il: int, n_tok: int, k: int) -> _Graph:
        parts = self._parts(il)
        down = parts["down"].contents
        n_ff = int(down.ne[0])
        d = self.n_embd
        act = 4 * n_tok * k * (6 * n_ff + 2 * d) + 4 * n_tok * (d + k) + 64 * 32
        ctx = Context(Context.overhead(32, graph_size=64) + act + 4096)
        x = aligned_empty((n_tok, d))
        ids_arr = aligned_empty((n_tok, k), np.int32)
        out = moe_ffn(ctx, parts, ctx.from_numpy(x), ctx.from_numpy(ids_arr), self.act)  # [n_embd, k, n_tok]
        graph = ctx.graph(64)
        lib.ggml_build_forward_expand(graph, out)
        return _Graph(ctx, graph, x, ids_arr, out, to_numpy(out))

    def compute_layer(self, layer: int, hidden: np.ndarray, selected: np.ndarray,
                      residual: np.ndarray | None = None,
                      groups: list[tuple[int, int]] | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        n_tok, k = selected.shape
        key = (layer, n_tok, k)
        g = self._graphs.get(key)
        if g is None:
            g = self._build(layer, n_tok, k)
            if n_tok <= _CACHE_TOKENS:
                self._graphs[key] = g
        try:
            g.x[...] = hidden
            g.ids[...] = selected
            self.compute.run(g.graph)
            out = g.out_view.reshape(n_tok, k, self.n_embd).copy()
        finally:
            if n_tok > _CACHE_TOKENS:
                g.ctx.close()
        s = self.stats
        s.calls += 1
        s.tokens += n_tok
        s.compute_s += time.perf_counter() - t0
        return out

    def compute(self, layer: int, expert: int, hidden: np.ndarray) -> np.ndarray:
        selected = np.full((hidden.shape[0], 1), expert, dtype=np.int32)
        return self.compute_layer(layer, hidden, selected)[:, 0]

    def close(self) -> None:
        for g in self._graphs.values():
            g.ctx.close()
        self._graphs.clear()

"""Every routed expert of a model held at once, as llama.cpp's stacked tensors: the shadow's experts.

`blk.L.ffn_{gate,up,down}_exps.weight` ([n_embd, n_ff, n_expert] etc., ggml order) are mapped from one
GGUF and a layer's k selected experts run in one graph through ggml_mul_mat_id, as llama.cpp's
build_moe_ffn does. Nothing is loaded per call.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.arch import ARCHITECTURES
from edgemoe.format.schema import expert_tensor_name
from edgemoe.ggml import Compute
from edgemoe.model.experts import ExpertBackend, ExpertStats
from edgemoe.model.moe import ExpertGraph, ExpertGraphs
from edgemoe.model.weights import GGUFTensors

class StackedExperts(ExpertBackend):
    """Computes selected experts from stacked tensors (one file, all layers, mapped once)."""

    def __init__(self, weights: GGUFTensors, compute: Compute, moe_layers: list[int], n_embd: int) -> None:
        self.w = weights
        arch = ARCHITECTURES.get(weights.meta.get("general.architecture", ""))
        self.act = arch.expert_act if arch else "silu"
        self.compute = compute
        self.n_embd = n_embd
        self.stats = ExpertStats()
        self._graphs = ExpertGraphs()
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

    def _build(self, il: int, n_tok: int, k: int) -> ExpertGraph:
        n_ff = int(self.w.require(expert_tensor_name(il, "down")).contents.ne[0])
        return ExpertGraph.build(lambda ctx: self._parts(il), n_tok, k, self.n_embd, n_ff, self.act)

    def compute_layer(self, layer: int, hidden: np.ndarray, selected: np.ndarray,
                      groups: list[tuple[int, int]] | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        n_tok, k = selected.shape
        with self._graphs.use((layer, n_tok, k), n_tok, lambda: self._build(layer, n_tok, k)) as g:
            out = g.run(self.compute, hidden, selected)
        s = self.stats
        s.calls += 1
        s.tokens += n_tok
        s.compute_s += time.perf_counter() - t0
        return out

    def compute(self, layer: int, expert: int, hidden: np.ndarray) -> np.ndarray:
        selected = np.full((hidden.shape[0], 1), expert, dtype=np.int32)
        return self.compute_layer(layer, hidden, selected)[:, 0]

    def close(self) -> None:
        self._graphs.close()

"""Where routed experts are computed: one small interface, an in-process implementation.

The engine hands a backend the FFN inputs of one MoE layer and the router's choices; the backend
returns every selected expert's output. The cluster runtime is another backend.
"""

from __future__ import annotations

import ctypes
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.format.manifest import Manifest, check_file_hash, expert_file_name
from edgemoe.ggml import Compute, Context, TensorPtr, lib
from edgemoe.ggml.columns import mul_mat_id_limit, row_chunks
from edgemoe.ggml.repack import Repacker
from edgemoe.model.expert_ffn import ExpertFFN, LayerExperts, MappedShard, MoEGraph, ShardLayout


@dataclass
class ExpertStats:
    calls: int = 0
    tokens: int = 0
    load_s: float = 0.0
    compute_s: float = 0.0
    bytes_loaded: int = 0


class ExpertBackend(ABC):
    """Computes routed experts. Subclasses implement compute(); compute_layer() groups tokens by expert."""

    stats: ExpertStats

    @abstractmethod
    def compute(self, layer: int, expert: int, hidden: np.ndarray) -> np.ndarray:
        """hidden: float32 [n, n_embd] (the FFN-normed inputs) -> float32 [n, n_embd]."""

    def compute_layer(self, layer: int, hidden: np.ndarray, selected: np.ndarray,
                      groups: list[tuple[int, int]] | None = None) -> np.ndarray:
        """hidden [T, n_embd] (FFN-normed), selected int32 [T, k] -> outputs float32 [T, k, n_embd]
        (unweighted). A backend that predicts sees the layer's FFN input through StepHooks.on_router.
        groups: rows of each sequence, (first row, rows), when they come from several sequences'
        steps at once (the engine's eval_batch); a backend keeps each sequence on the kernels it gets
        alone (edgemoe.ggml.columns)."""
        n_tok, k = selected.shape
        out = np.empty((n_tok, k, hidden.shape[1]), dtype=np.float32)
        for expert in np.unique(selected):
            tok, slot = np.nonzero(selected == expert)
            out[tok, slot] = self.compute(layer, int(expert), np.ascontiguousarray(hidden[tok]))
        return out

    def graph_parts(self, layer: int, ctx: Context, n_embd: int) -> dict[str, TensorPtr] | None:
        """The layer's stacked expert tensors for the engine to compute inside its own graph (one graph
        per token for the whole model, as llama.cpp), or None: the engine then calls compute_layer."""
        return None

    def graph_used(self, layer: int, selected: np.ndarray) -> None:
        """After a graph that used graph_parts ran: the experts the router chose (int32 [T, k])."""

    def graph_repacked(self, layer: int) -> bool:
        """Whether graph_parts hands repacked (CPU_REPACK) tensors for this layer."""
        return False

    def reset(self) -> None:
        """A new sequence begins."""

    def close(self) -> None:
        pass


class LocalExperts(ExpertBackend):
    """In-process experts: each layer's shards side by side (LayerExperts), all selected experts of a
    layer computed by one graph (MoEGraph). By default just in time, as a worker does: map the
    selected shards, compute, unmap.

    resident=True maps each shard once and keeps the mapping (as llama.cpp maps its whole file):
    no per-use page-table work, and the OS page cache still decides what stays in memory. A shard's
    sha256 (manifest given) is checked the first time it is used.
    """

    def __init__(self, model_dir: str | Path, compute: Compute, manifest: Manifest | None = None,
                 resident: bool = False, repacker: Repacker | None = None) -> None:
        """repacker (resident only): the engine's graph gets CPU_REPACK copies of each layer's experts
        where ggml has repacked kernels for their type, as llama.cpp loads them."""
        self.repacker = repacker
        self._packed: dict[int, dict[str, TensorPtr]] = {}
        self.model_dir = Path(model_dir)
        self.manifest = manifest  # when given, each shard's sha256 is checked on first use
        self.resident = resident
        self._graphs_compute = compute  # not .compute: that is the ExpertBackend method
        self._layers: dict[int, tuple[LayerExperts, MoEGraph]] = {}
        self._uneven: dict[int, dict[int, ShardLayout]] = {}
        self._ffn: ExpertFFN | None = None
        self._checked: set[tuple[int, int]] = set()
        self.stats = ExpertStats()

    def _n_expert(self, layer: int) -> int:
        if self.manifest is not None:
            return self.manifest.n_experts
        return len(list((self.model_dir / expert_file_name(layer, 0)).parent.glob(f"blk.{layer:03d}.expert.*.gguf")))

    def layer(self, layer: int, n_embd: int) -> tuple[LayerExperts, MoEGraph]:
        """The layer's shards (mapped as used) and the graph runner over them, made on first use."""
        entry = self._layers.get(layer)
        if entry is None:
            n = self._n_expert(layer)
            layouts = {e: ShardLayout.read(self.model_dir / expert_file_name(layer, e)) for e in range(n)}
            try:
                view = LayerExperts(layouts, n)
            except ValueError:  # shards of differing layouts (not written by edgemoe convert): one at a time
                self._uneven[layer] = layouts
                return None
            replace = (lambda: self._repacked(layer, view)) if self.repacker is not None else None
            entry = self._layers[layer] = (view, MoEGraph(view, self._graphs_compute, n_embd, replace))
        return entry

    def _compute_uneven(self, layer: int, hidden: np.ndarray, selected: np.ndarray) -> np.ndarray:
        """One expert at a time, each from its own mapping (shards that cannot share one view)."""
        if self._ffn is None:
            self._ffn = ExpertFFN(self._graphs_compute)
        out = np.empty((*selected.shape, hidden.shape[1]), dtype=np.float32)
        for e in np.unique(selected):
            tok, slot = np.nonzero(selected == e)
            with MappedShard(self._uneven[layer][int(e)], populate=False) as shard:
                out[tok, slot] = self._ffn.run(shard, np.ascontiguousarray(hidden[tok]))
        return out

    def _check(self, layer: int, experts: list[int]) -> None:
        for e in experts:
            if (layer, e) not in self._checked:
                if self.manifest is not None:
                    check_file_hash(self.model_dir, self.manifest, expert_file_name(layer, e))
                self._checked.add((layer, e))

    def compute_layer(self, layer: int, hidden: np.ndarray, selected: np.ndarray,
                      groups: list[tuple[int, int]] | None = None) -> np.ndarray:
        if groups and len(groups) > 1:  # several sequences: runs of rows on the kernels each gets alone
            entry = self.layer(layer, hidden.shape[1])
            layouts = [entry[0].layouts[0]] if entry is not None else list(self._uneven[layer].values())
            limit = mul_mat_id_limit([t.ggml_type for lay in layouts for t in lay.tensors.values()], bool(self._packed.get(layer)))
            runs = row_chunks(groups, limit)
            if len(runs) > 1:
                return np.concatenate([self.compute_layer(layer, hidden[lo:lo + n], selected[lo:lo + n]) for lo, n in runs])
        t0 = time.perf_counter()
        entry = self.layer(layer, hidden.shape[1])
        used = [int(e) for e in np.unique(selected)]
        self._check(layer, used)
        if entry is None:
            out = self._compute_uneven(layer, hidden, selected)
            self.stats.calls += len(used)
            self.stats.tokens += selected.size
            self.stats.compute_s += time.perf_counter() - t0
            return out
        view, graph = entry
        new = [e for e in used if e not in view.mapped]
        for e in new:
            view.map(e, populate=False)  # nothing to overlap the faults with here
        t1 = time.perf_counter()
        try:
            out = graph.run(hidden, selected.astype(np.int32, copy=False))
        finally:
            if not self.resident:
                for e in used:
                    view.unmap(e)
        t2 = time.perf_counter()
        s = self.stats
        s.calls += len(used)
        s.tokens += selected.size
        s.load_s += t1 - t0
        s.compute_s += t2 - t1
        s.bytes_loaded += sum(view.layouts[e].size for e in used)  # bytes each use reads (or finds cached)
        return out

    def compute(self, layer: int, expert: int, hidden: np.ndarray) -> np.ndarray:
        selected = np.full((hidden.shape[0], 1), expert, dtype=np.int32)
        return self.compute_layer(layer, hidden, selected)[:, 0]

    def graph_parts(self, layer: int, ctx: Context, n_embd: int) -> dict[str, TensorPtr] | None:
        """Resident experts only: every shard of the layer is mapped (address space, no reads: the
        router's choices fault in what is used) and viewed as llama.cpp's stacked tensors."""
        entry = self.layer(layer, n_embd) if self.resident else None
        if entry is None:
            return None
        view = entry[0]
        for e in range(view.n_expert):
            view.map(e)
        parts = view.parts(ctx)
        if self.repacker is not None:
            parts.update(self._repacked(layer, view))
        return parts

    def graph_repacked(self, layer: int) -> bool:
        return bool(self._packed.get(layer))

    def _repacked(self, layer: int, view: LayerExperts) -> dict[str, TensorPtr]:
        """The layer's parts that ggml can repack, copied once into CPU_REPACK buffers (every shard is
        read now, so every shard's hash is checked now)."""
        if layer not in self._packed:
            for e in range(view.n_expert):
                view.map(e)
            self._check(layer, list(range(view.n_expert)))
            packed = {}
            for part, t in view.tensors.items():
                if part.endswith("_b"):  # biases are added, not multiplied: nothing to repack
                    continue
                ne = (t.ne[0], t.ne[1], view.n_expert)
                if not self.repacker.supports(t.ggml_type, ne):
                    continue
                nb = int(lib.ggml_row_size(t.ggml_type, t.ne[0])) * t.ne[1]
                stacked = np.empty(nb * view.n_expert, dtype=np.uint8)
                for e in range(view.n_expert):
                    ctypes.memmove(stacked.ctypes.data + e * nb, view.base + e * view.stride + t.offset, nb)
                packed[part] = self.repacker.repack(t.ggml_type, ne, stacked.ctypes.data)
            self._packed[layer] = packed
        return self._packed[layer]

    def graph_used(self, layer: int, selected: np.ndarray) -> None:
        used = [int(e) for e in np.unique(selected)]
        self._check(layer, used)
        view = self._layers[layer][0]
        s = self.stats
        s.calls += len(used)
        s.tokens += selected.size
        s.bytes_loaded += sum(view.layouts[e].size for e in used)

    def close(self) -> None:
        for view, graph in self._layers.values():
            graph.close()
            view.close()
        self._layers.clear()
        if self._ffn is not None:
            self._ffn.close()
            self._ffn = None

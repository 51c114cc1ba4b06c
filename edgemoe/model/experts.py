"""Where routed experts are computed: one small interface, an in-process implementation.

The engine hands a backend the FFN inputs of one MoE layer and the router's choices; the backend
returns every selected expert's output. The cluster runtime is another backend.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgemoe.format.manifest import Manifest, check_file_hash, expert_file_name
from edgemoe.ggml import Compute
from edgemoe.model.expert_ffn import ExpertFFN, MappedShard, ShardLayout


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
                      residual: np.ndarray | None = None) -> np.ndarray:
        """hidden [T, n_embd] (FFN-normed), selected int32 [T, k] -> outputs float32 [T, k, n_embd]
        (unweighted). residual [T, n_embd] is the layer's FFN input, for backends that predict."""
        n_tok, k = selected.shape
        out = np.empty((n_tok, k, hidden.shape[1]), dtype=np.float32)
        for expert in np.unique(selected):
            tok, slot = np.nonzero(selected == expert)
            out[tok, slot] = self.compute(layer, int(expert), np.ascontiguousarray(hidden[tok]))
        return out

    def reset(self) -> None:
        """A new sequence begins."""

    def close(self) -> None:
        pass


class LocalExperts(ExpertBackend):
    """In-process experts. By default just in time, as a worker does: map the shard, compute, unmap.

    resident=True maps each shard once and keeps the mapping (as llama.cpp maps its whole file):
    no per-use page-table work, and the OS page cache still decides what stays in memory.
    """

    def __init__(self, model_dir: str | Path, compute: Compute, manifest: Manifest | None = None,
                 resident: bool = False) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = manifest  # when given, each shard's sha256 is checked on first use
        self.resident = resident
        self._mapped: dict[tuple[int, int], MappedShard] = {}
        self.ffn = ExpertFFN(compute)
        self._layouts: dict[tuple[int, int], ShardLayout] = {}
        self.stats = ExpertStats()

    def layout(self, layer: int, expert: int) -> ShardLayout:
        key = (layer, expert)
        if key not in self._layouts:
            rel = expert_file_name(layer, expert)
            if self.manifest is not None:
                check_file_hash(self.model_dir, self.manifest, rel)
            self._layouts[key] = ShardLayout.read(self.model_dir / rel)
        return self._layouts[key]

    def compute(self, layer: int, expert: int, hidden: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        layout = self.layout(layer, expert)
        if self.resident:
            shard = self._mapped.get((layer, expert))
            if shard is None:
                shard = self._mapped[(layer, expert)] = MappedShard(layout, populate=False)
            t1 = time.perf_counter()
            out = self.ffn.run(shard, hidden)
        else:
            with MappedShard(layout, populate=False) as shard:  # nothing to overlap the faults with here
                t1 = time.perf_counter()
                out = self.ffn.run(shard, hidden)
        t2 = time.perf_counter()
        s = self.stats
        s.calls += 1
        s.tokens += hidden.shape[0]
        s.load_s += t1 - t0
        s.compute_s += t2 - t1
        s.bytes_loaded += layout.size
        return out

    def close(self) -> None:
        for shard in self._mapped.values():
            shard.close()
        self._mapped.clear()
        self.ffn.close()

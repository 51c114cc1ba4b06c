"""Experts mapped into slots of one range and computed in one ggml_mul_mat_id == one expert at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemoe.cluster.budget import page_round
from edgemoe.cluster.slots import SlotArena, SlotFFN, same_layout
from edgemoe.format.manifest import expert_file_name
from edgemoe.ggml import Compute
from edgemoe.model.expert_ffn import ExpertFFN, MappedShard, ShardLayout


@pytest.mark.parametrize("name", ["llama-moe-q8_0", "qwen2moe-q4_k_m", "olmoe-f32", "qwen3moe-q4_k_m"])
def test_one_graph_equals_expert_by_expert(converted_models: dict[str, Path], name: str) -> None:
    model = converted_models[name]
    compute = Compute(1)
    layouts = {(l, e): ShardLayout.read(model / expert_file_name(l, e)) for l in range(4) for e in range(8)}
    arena = SlotArena(6, max(page_round(x.size) for x in layouts.values()))
    one, many = ExpertFFN(compute), SlotFFN(compute, arena)
    try:
        for layer in range(4):
            experts, rows = [6, 1, 5], [1, 3, 2]
            shards = [arena.map(layouts[(layer, e)]) for e in experts]
            assert same_layout(shards)
            n_embd = layouts[(layer, 0)].tensors["down"].ne[1]
            x = np.random.default_rng(layer).standard_normal((sum(rows), n_embd), dtype=np.float32)
            want, lo = [], 0
            for e, n in zip(experts, rows):
                with MappedShard(layouts[(layer, e)]) as s:
                    want.append(one.run(s, x[lo:lo + n]))
                lo += n
            assert np.array_equal(many.run(shards, rows, x), np.concatenate(want)), (name, layer)
            for s in shards:
                s.close()
        # slots are reused once released; a full arena says so
        held = [arena.map(layouts[(0, e)]) for e in range(6)]
        with pytest.raises(MemoryError, match="no free expert slot"):
            arena.map(layouts[(0, 6)])
        for s in held:
            s.close()
    finally:
        many.close()
        one.close()
        arena.close()
        compute.close()

"""edgemoe.model.moe names its nodes as llama.cpp's build_moe_ffn does: the ffn_moe_* names of a built
graph (fused, per layer, an expert graph alone) are those llama.cpp's own graph of the same GGUF has."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgemoe.ggml import lib
from edgemoe.llama_runner import LlamaCpp
from edgemoe.model.engine import Engine
from edgemoe.model.moe import ExpertGraph

# router gating and its extras: softmax (llama-moe), softmax + gated shared expert (qwen2moe), sigmoid with
# selection bias, groups and scaled weights (deepseek2-v3), softmax_weight with router and expert biases (gpt-oss)
MODELS = ("llama-moe-q8_0", "qwen2moe-q8_0", "deepseek2-v3-q8_0", "gpt-oss-q8_0")
PROMPT = [1, 5, 9, 3]
_MOE = re.compile(r"^ffn_moe_[a-z_]+(-\d+)?$")


def graph_names(graph: object) -> set[str]:
    """The names of a built graph's nodes (ggml_graph_node over 0 .. n_nodes-1)."""
    names = set()
    for i in range(lib.ggml_graph_n_nodes(graph)):
        names.add(lib.ggml_graph_node(graph, i).contents.name.decode())
    return names


def llama_cpp_names(path: Path) -> set[str]:
    """The ffn_moe_* node names of llama.cpp's graph for a prompt (its eval callback is asked about every node)."""
    seen: set[str] = set()

    def cb(t, ask: bool) -> bool:
        name = t.name.decode()
        if _MOE.match(name):
            seen.add(name)
        return False  # nothing wanted: only asked

    lc = LlamaCpp(path, n_ctx=64, n_threads=1, cb_eval=cb)
    try:
        lc.decode(PROMPT, 0, False)
    finally:
        lc.close()
    return seen


@pytest.mark.parametrize("name", MODELS)
def test_names_are_llama_cpps(name: str, converted_models: dict[str, Path], fixtures_dir: Path) -> None:
    want = llama_cpp_names(fixtures_dir / f"{name}.gguf")
    assert {"ffn_moe_logits-1", "ffn_moe_probs-1", "ffn_moe_argsort-1", "ffn_moe_topk-1", "ffn_moe_weights-1",
            "ffn_moe_down-1", "ffn_moe_weighted-1", "ffn_moe_out-1"} <= want  # llama.cpp's side has its names
    with Engine(converted_models[name], n_ctx=64, n_threads=1) as eng:
        eng.eval(PROMPT)
        eng.eval([7])  # a decode step: its fused graph is kept
        (fused,) = eng._fused_cache.values()
        got = {n for n in graph_names(fused.seg.graph) if _MOE.match(n)}
    assert got == want
    with Engine(converted_models[name], n_ctx=64, n_threads=1) as eng:  # one graph per MoE layer
        eng.fuse = False
        eng.eval(PROMPT)
        eng.eval([7])
        ((_, segments),) = eng._decode_cache.values()
        per_layer = set().union(*(graph_names(s.graph) for s in segments))
        for il in eng.moe_layers:  # the router in layer il's graph, the combine in the next one's
            assert {f"ffn_moe_topk-{il}", f"ffn_moe_weights-{il}"} <= graph_names(segments[il].graph)
            assert f"ffn_moe_out-{il}" in graph_names(segments[il + 1].graph)
    # the experts run outside the trunk's graphs here: everything of llama.cpp's but the expert nodes
    experts = {n for n in want if re.match(r"^ffn_moe_(up|gate|gate_up|swiglu|swiglu_oai|down)(_biased)?-", n)}
    assert experts and {n for n in per_layer if _MOE.match(n)} == want - experts


def test_an_expert_graph_has_bare_names(converted_models: dict[str, Path]) -> None:
    """A graph of experts alone (a worker's, a backend's) is in no layer: llama.cpp's names without -il."""
    from edgemoe.format.shard import ExpertId
    from edgemoe.ggml import Compute
    from edgemoe.model.expert_ffn import LayerExperts, ShardLayout

    d = converted_models["llama-moe-q8_0"]
    layouts = {e: ShardLayout.read(d / ExpertId(0, e).file_name) for e in range(4)}
    n_embd = layouts[0].tensors["down"].ne[1]
    compute = Compute(1)
    with LayerExperts(layouts, 4) as view:
        g = ExpertGraph.build(view.parts, 2, 2, n_embd, view.tensors["down"].ne[0], view.act)
        try:
            assert {"ffn_moe_up", "ffn_moe_gate", "ffn_moe_swiglu", "ffn_moe_down"} <= graph_names(g.graph)
            for e in range(4):
                view.map(e)
            out = g.run(compute, np.ones((2, n_embd), dtype=np.float32), np.array([[0, 1], [2, 3]], dtype=np.int32))
            assert out.shape == (2, 2, n_embd) and np.isfinite(out).all() and not np.allclose(out[0, 0], out[0, 1])
        finally:
            g.close()
            compute.close()

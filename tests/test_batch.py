"""Several sequences decoded together (Engine.eval_batch) against each decoded alone.

Sequences start and end at different steps (a prompt's prefill shares a step with other sequences'
decode tokens, as llama-server's slots do), with different prompt lengths; every sequence's greedy
tokens, router choices at every layer and logits must equal those of the same sequence decoded alone,
bitwise: in process (one fused graph, and one graph per MoE layer with the experts between them) and
on a local cluster of 2 workers (one compute message per worker per layer for all rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.errors import UserError
from edgemoe.model.engine import Engine
from edgemoe.model.kvcache import AttentionOptions

N_CTX = 128
STEPS = 10  # tokens generated per sequence
# (first step, prompt): different lengths, started at different steps; sequence 2 ends before 3 starts
PLAN = [(0, [1, 17, 42, 99, 7, 3]), (1, [5, 6]), (2, [11, 12, 13, 14, 15, 16, 17, 18, 19]), (13, [23, 4, 8])]


def alone(engine: Engine, prompt: list[int], seq: int = 0) -> tuple[list[int], list[np.ndarray], list[list]]:
    """Greedy decoding of one sequence with nothing else in the engine: tokens, logits, routing."""
    engine.reset()
    logits = engine.eval_batch([(seq, prompt)])[0][0]
    tokens, rows, routes = [], [], []
    while True:
        rows.append(logits)
        routes.append([r.copy() if r is not None else None for r in engine.routing])
        tokens.append(int(np.argmax(logits)))
        if len(tokens) == STEPS:
            return tokens, rows, routes
        logits = engine.eval_batch([(seq, [tokens[-1]])])[0][0]


def together(engine: Engine, plan: list[tuple[int, list[int]]]) -> dict[int, tuple[list[int], list[np.ndarray], list[list]]]:
    """The plan's sequences in one engine, each step taking every active sequence's next tokens;
    a sequence's slot is reused by a later one (engine.reset_seq) once it has finished."""
    engine.reset()
    out: dict[int, tuple[list[int], list[np.ndarray], list[list]]] = {}
    slot_of: dict[int, int] = {}
    free = list(range(engine.n_seq))
    step = 0
    while len(out) < len(plan) or any(len(out[i][0]) < STEPS for i in out):
        items, who = [], []
        for i, (start, prompt) in enumerate(plan):
            if start == step:
                slot_of[i] = free.pop(0)
                engine.reset_seq(slot_of[i])
                out[i] = ([], [], [])
                items.append((slot_of[i], prompt))
                who.append(i)
            elif i in out and len(out[i][0]) < STEPS:
                items.append((slot_of[i], [out[i][0][-1]]))
                who.append(i)
        step += 1
        if not items:
            continue
        logits = engine.eval_batch(items)
        offsets = np.cumsum([0] + [len(t) for _, t in items])
        for (_slot, toks), i, lg, lo in zip(items, who, logits, offsets[:-1]):
            # the item's last token: its row among all rows, or among the output rows (the last layer)
            last, out_row = lo + len(toks) - 1, who.index(i)
            route = [None if r is None else r[last if r.shape[0] == offsets[-1] else out_row] for r in engine.routing]
            tokens, rows, routes = out[i]
            rows.append(lg[0])
            routes.append(route)
            tokens.append(int(np.argmax(lg[0])))
            if len(tokens) == STEPS:
                free.append(slot_of[i])
    return out


def check(engine_alone: Engine, engine_batch: Engine, plan=PLAN) -> None:
    got = together(engine_batch, plan)
    for i, (_start, prompt) in enumerate(plan):
        tokens, rows, routes = alone(engine_alone, prompt)
        g_tokens, g_rows, g_routes = got[i]
        for step, (ours, theirs) in enumerate(zip(g_routes, routes)):
            for layer, (a, b) in enumerate(zip(ours, theirs)):
                if b is not None:
                    assert np.array_equal(a, b[-1]), f"sequence {i} step {step} layer {layer}: {a} vs {b[-1]}"
        assert g_tokens == tokens, f"sequence {i}"
        assert np.array_equal(np.array(g_rows), np.array(rows)), \
            f"sequence {i}: max |diff| {np.abs(np.array(g_rows) - np.array(rows)).max()}"


# nine sequences, three starting per step: K-quant products of more than 7 rows take another ggml kernel
WIDE = [(i // 3, [2 + i, 30 + 7 * i, 5][: 1 + i % 3]) for i in range(9)]
# past gpt-oss's sliding window (16 in its test model): a prompt longer than it, another that decodes past it
SWA_PLAN = [(0, [(7 * i) % 50 + 1 for i in range(21)]), (1, [5, 6]), (2, [11, 12, 13, 14, 15, 16, 17, 18, 19]), (13, [23, 4, 8])]


@pytest.mark.parametrize("name,fuse,plan,n_seq", [("llama-moe-q4_k_m", True, PLAN, 3), ("qwen2moe-f32", True, PLAN, 3),
                                                  ("olmoe-q8_0", False, PLAN, 3), ("qwen3moe-q4_k_m", False, PLAN, 3),
                                                  ("llama-moe-q4_k_m", True, WIDE, 9), ("qwen3moe-q4_k_m", False, WIDE, 9),
                                                  ("granitemoe-shexp-q4_k_m", True, WIDE, 9), ("ernie4_5-moe-q8_0", False, PLAN, 3),
                                                  ("deepseek2-v3-q4_k_m", True, WIDE, 9), ("deepseek2-lite-q8_0", False, PLAN, 3),
                                                  ("deepseek2-legacy-q8_0", True, WIDE, 9), ("deepseek2-legacy-f32", False, PLAN, 3),
                                                  ("gpt-oss-mxfp4", True, SWA_PLAN, 3), ("gpt-oss-q8_0", False, SWA_PLAN, 3)])
def test_sequences_together_equal_each_alone(converted_models: dict[str, Path], name: str, fuse: bool,
                                             plan: list, n_seq: int) -> None:
    model = converted_models[name]
    with Engine(model, n_ctx=N_CTX, n_threads=1) as one, Engine(model, n_ctx=N_CTX, n_threads=1, n_seq=n_seq) as many:
        one.fuse = many.fuse = fuse
        check(one, many, plan)


@pytest.mark.parametrize("name,cache,plan", [
    ("olmoe-q8_0", ("f16", "f16", "off"), WIDE), ("olmoe-q8_0", ("f32", "f32", "off"), WIDE),
    ("olmoe-q8_0", ("q8_0", "q4_0", "on"), WIDE),
    # MLA: V a view of the K cache (transposed per step without flash attention), attn_v_b after
    ("deepseek2-v3-q8_0", ("f16", "f16", "off"), WIDE), ("deepseek2-v3-q8_0", ("q8_0", "q8_0", "on"), WIDE),
    # the legacy attn_kv_b layout: K and V caches of different widths (V transposed without flash attention)
    ("deepseek2-legacy-q8_0", ("f16", "f16", "off"), WIDE), ("deepseek2-legacy-q8_0", ("q8_0", "q4_0", "on"), WIDE),
    # sinks in the softmax, the SWA mask on every second layer, past the window
    ("gpt-oss-q8_0", ("f16", "f16", "off"), SWA_PLAN), ("gpt-oss-q8_0", ("q8_0", "q4_0", "on"), SWA_PLAN)])
def test_every_attention_mode_together_equals_alone(converted_models: dict[str, Path], name: str,
                                                    cache: tuple[str, str, str], plan: list) -> None:
    """Without flash attention an F16 cache's K*Q takes another kernel for several rows: per sequence."""
    attention = AttentionOptions(*cache)
    model = converted_models[name]
    with Engine(model, n_ctx=N_CTX, n_threads=1, attention=attention) as one, \
            Engine(model, n_ctx=N_CTX, n_threads=1, n_seq=len(plan), attention=attention) as many:
        check(one, many, plan)


@pytest.mark.parametrize("name,plan,n_seq", [("qwen2moe-q8_0", PLAN, 3), ("llama-moe-q4_k_m", WIDE, 9),
                                             ("deepseek2-v3-q4_k_m", WIDE, 9), ("gpt-oss-mxfp4", SWA_PLAN, 3)])
def test_sequences_together_on_two_workers_equal_each_alone(converted_models: dict[str, Path], name: str,
                                                            plan: list, n_seq: int) -> None:
    model = converted_models[name]
    with Engine(model, n_ctx=N_CTX, n_threads=1) as one, \
            open_engine(model, ClusterOptions(workers=2, predictor="lookahead"), n_ctx=N_CTX, n_threads=1, n_seq=n_seq) as many:
        check(one, many, plan)
        summary = many.experts.summary()
        assert sum(w["requests"] for w in summary["workers"]) > 0


def test_the_kernel_table_holds_on_this_cpu(converted_models: dict[str, Path]) -> None:
    """edgemoe.ggml.columns' limits, re-measured for every weight type of the test models: a product
    with up to `limit` rows gives each row exactly its one-row result (mul_mat and mul_mat_id)."""
    from edgemoe.ggml import Context, lib
    from edgemoe.ggml.columns import mul_mat_id_limit, mul_mat_limit
    from edgemoe.ggml.context import aligned_copy, to_numpy

    rng = np.random.default_rng(0)
    checked: set[tuple[str, int]] = set()
    for name in ("llama-moe-q4_k_m", "qwen2moe-f32", "olmoe-q8_0"):
        with Engine(converted_models[name], n_ctx=16, n_threads=1) as e:
            for wname in e.weights.names():
                w = e.weights.get(wname)
                t = int(w.contents.type)
                if w.contents.ne[1] <= 1 or ("mul_mat", t) in checked:
                    continue
                checked.add(("mul_mat", t))
                n = min(mul_mat_limit(t), 12)
                x = aligned_copy(rng.standard_normal((n, int(w.contents.ne[0]))).astype(np.float32))

                def product(rows: np.ndarray) -> np.ndarray:
                    with Context(1 << 26) as ctx:
                        g = ctx.graph()
                        y = ctx.mul_mat(w, ctx.from_numpy(aligned_copy(rows)))
                        lib.ggml_build_forward_expand(g, y)
                        e.compute.run(g)
                        return to_numpy(y).reshape(rows.shape[0], -1).copy()

                together_ = product(x)
                for j in range(n):
                    assert np.array_equal(together_[j], product(x[j:j + 1])[0]), f"{wname} (type {t}): row {j} of {n}"
            il = e.moe_layers[0]
            view = e.experts.layer(il, e.cfg.n_embd)[0]
            limit = mul_mat_id_limit([t.ggml_type for t in view.tensors.values()])
            n = min(limit, 20)
            h = rng.standard_normal((n, e.cfg.n_embd)).astype(np.float32)
            sel = np.tile(np.arange(e.cfg.n_expert_used, dtype=np.int32), (n, 1))  # every row to the same experts
            out = e.experts.compute_layer(il, h, sel)
            for j in range(n):
                assert np.array_equal(out[j], e.experts.compute_layer(il, h[j:j + 1], sel[j:j + 1])[0]), f"{name} experts row {j}"
    assert ("mul_mat", 0) in checked and ("mul_mat", 12) in checked


def test_a_step_of_several_sequences_is_one_message_per_worker(converted_models: dict[str, Path]) -> None:
    """Every routed expert of a layer computed once for all rows routed to it, one request per worker."""
    model = converted_models["llama-moe-q8_0"]
    with open_engine(model, ClusterOptions(workers=2, predictor="reactive", residency="off"), n_ctx=N_CTX,
                     n_threads=1, n_seq=4) as engine:
        cluster = engine.experts
        sent: list = []
        dispatch = cluster._dispatch
        cluster._dispatch = lambda r: (sent.append(r), dispatch(r))[1]
        for s in range(4):
            engine.eval_batch([(s, [3 + s, 9])])
        sent.clear()
        engine.eval_batch([(s, [20 + s]) for s in range(4)])
        by_layer: dict[int, list] = {}
        for r in sent:
            by_layer.setdefault(r.layer, []).append(r)
        assert set(by_layer) == set(engine.moe_layers)
        for layer, reqs in by_layer.items():
            routed = np.unique(engine.routing[layer]) if layer != engine.cfg.n_layer - 1 else None
            workers = [r.worker.worker_id for r in reqs]
            assert len(workers) == len(set(workers)), f"layer {layer}: several messages to one worker"
            experts = [e for r in reqs for e in r.experts]
            assert len(experts) == len(set(experts)), f"layer {layer}: an expert computed twice"
            assert sum(sum(r.counts) for r in reqs) == 4 * engine.cfg.n_expert_used
            if routed is not None:
                assert sorted(experts) == routed.tolist()


def test_bad_batches_are_refused(converted_models: dict[str, Path]) -> None:
    with Engine(converted_models["llama-moe-q8_0"], n_ctx=16, n_threads=1, n_seq=2) as engine:
        with pytest.raises(ValueError):
            engine.eval_batch([(0, [1]), (0, [2])])
        with pytest.raises(ValueError):
            engine.eval_batch([(2, [1])])
        with pytest.raises(UserError):
            engine.eval_batch([(1, list(range(17)))])
        with pytest.raises(UserError):
            engine.eval_batch([])
        with pytest.raises(UserError):
            Engine(converted_models["llama-moe-q8_0"], n_ctx=16, n_seq=0)


def test_repacked_weights_together_equal_alone(converted_models: dict[str, Path]) -> None:
    """llama.cpp's repacked kernels (gemv for one row, gemm for four) get each sequence's rows alone."""
    from edgemoe.util.extra_bufts import extra_bufts_usable

    if not extra_bufts_usable():
        pytest.skip("this CPU cannot run llama.cpp's repacked kernels")
    model = converted_models["llama-moe-q4_k_m"]
    with Engine(model, n_ctx=N_CTX, n_threads=1, repack=True) as one, \
            Engine(model, n_ctx=N_CTX, n_threads=1, n_seq=9, repack=True) as many:
        assert one.repacker is not None and many.trunk._packed
        check(one, many, WIDE)

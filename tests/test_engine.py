"""The engine against llama.cpp itself: same tokens, same router choices, same logits.

edgemoe builds llama.cpp's graph op for op and runs it with the same ggml kernels on the same
bytes, so with the reference configured like the engine (F32 KV cache, flash attention, no weight
repacking, same thread count) logits are expected to be bitwise identical, not just close.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgemoe.model.engine import Engine
from edgemoe.model.generate import greedy_tokens
from edgemoe.model.kvcache import AttentionOptions
from edgemoe.oracle import LlamaCppReference
from edgemoe.util.extra_bufts import extra_bufts_usable
from tests.cli import edgemoe

N_PREDICT = 64
THREADS = 1  # one thread: a 2-thread ggml pool stalls at every barrier when another process holds a core
PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"


def compare_with_llama_cpp(source: Path, model: Path, n_predict: int = N_PREDICT, resident: bool = True,
                           attention: AttentionOptions | None = None, repack: bool = False, fuse: bool = True) -> None:
    """Greedy tokens, router choices at every layer and logits (bitwise) against llama.cpp, both
    sides with the same KV cache types and flash-attention mode (llama.cpp's defaults if None) and
    the same weight repacking."""
    attention = attention or AttentionOptions()  # llama.cpp's default: F16 cache, flash attention auto
    with LlamaCppReference(source, n_ctx=512, n_threads=THREADS, capture_routing=True, attention=attention,
                           extra_bufts=repack) as ref:
        assert ref.extra_bufts == repack
        prompt = ref.tokenize(PROMPT)
        trace = ref.greedy(prompt, n_predict)
    with Engine(model, n_ctx=512, n_threads=THREADS, resident_experts=resident, attention=attention, repack=repack) as engine:
        assert (engine.repacker is not None) == repack
        engine.fuse = fuse  # False: one graph per MoE layer (what long prompts get), the experts called between
        engine.reset()
        routing = []
        logits = engine.eval(prompt)[0]
        rows, tokens = [logits], [int(np.argmax(logits))]
        routing.append(list(engine.routing))
        for _ in range(n_predict - 1):
            logits = engine.eval([tokens[-1]])[0]
            rows.append(logits)
            tokens.append(int(np.argmax(logits)))
            routing.append(list(engine.routing))

    # router choices first: a top-k flip explains most divergences
    for step, (ours, theirs) in enumerate(zip(routing, trace.routing)):
        for layer, sel in enumerate(ours):
            if sel is None:
                continue
            ref_sel = theirs[layer][-sel.shape[0]:]  # llama.cpp routes only output rows in the last layer
            assert np.array_equal(sel, ref_sel), f"router differs at step {step}, layer {layer}: {sel} vs {ref_sel}"
    assert tokens == trace.tokens
    assert np.array_equal(np.array(rows), trace.logits), f"max |diff| {np.abs(np.array(rows) - trace.logits).max()}"


def test_every_test_model_matches_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    """llama.cpp's defaults on both sides: F16 KV cache, flash attention auto (on, on the CPU)."""
    for src in fixture_models:
        compare_with_llama_cpp(src, converted_models[src.stem])


# Every KV cache combination llama.cpp accepts on the CPU: any K/V type with flash attention (on, or
# auto which resolves to on), and without it only an unquantized V (the V cache is then transposed).
TYPES = ("f32", "f16", "q8_0", "q4_0")
SUPPORTED = [AttentionOptions(k, v, fa) for fa in ("on", "off", "auto") for k in TYPES for v in TYPES
             if fa != "off" or v in ("f32", "f16")]
# The default run: each mode and type on some model, rotating over the test models; the slow sweep
# runs every combination on every model.
DEFAULT_COMBOS = [AttentionOptions(*c) for c in (
    ("f32", "f32", "on"), ("f32", "f32", "off"), ("f16", "f16", "off"), ("q8_0", "q8_0", "on"),
    ("q4_0", "q4_0", "auto"), ("q8_0", "f16", "off"), ("q4_0", "f32", "off"), ("f16", "q8_0", "on"),
    ("q8_0", "q4_0", "on"), ("f32", "q4_0", "auto"), ("f16", "f32", "off"), ("q4_0", "q8_0", "on"))]
REJECTED = [AttentionOptions(k, v, "off") for k in TYPES for v in ("q8_0", "q4_0")]


def _label(a: AttentionOptions) -> str:
    return f"k{a.cache_type_k}-v{a.cache_type_v}-fa{a.flash_attn}"


def _accepts(src: Path, attention: AttentionOptions) -> bool:
    """The MLA cache (deepseek2) holds V in K: one type for both (llama.cpp's rule); quantized only where
    its block divides the latent head (deepseek2-v3's 96, not deepseek2-lite's 80). Refusals: test_archs.
    deepseek2's legacy attn_kv_b layout is plain MHA with K and V caches: any combination."""
    a = attention
    if not src.stem.startswith("deepseek2") or src.stem.startswith("deepseek2-legacy"):
        return True
    return a.cache_type_k == a.cache_type_v and (a.cache_type_k in ("f32", "f16") or
                                                  (src.stem.startswith("deepseek2-v3") and a.flash_attn != "off"))


@pytest.mark.parametrize("i", range(len(DEFAULT_COMBOS)), ids=[_label(a) for a in DEFAULT_COMBOS])
def test_kv_cache_types_match_llama_cpp(i: int, fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    models = [m for m in fixture_models if _accepts(m, DEFAULT_COMBOS[i])]
    src = models[(3 * i) % len(models)]  # steps through the architectures and file types
    compare_with_llama_cpp(src, converted_models[src.stem], n_predict=16, attention=DEFAULT_COMBOS[i])


@pytest.mark.parametrize("attention", [AttentionOptions("q8_0", "q8_0", "on"), AttentionOptions("q4_0", "f16", "off"),
                                       AttentionOptions("f16", "q4_0", "auto"), AttentionOptions("f32", "f16", "off")],
                         ids=_label)
def test_kv_cache_types_on_smollm2(smollm2: Path, attention: AttentionOptions) -> None:
    """Head size 64: a quantized K or V cache is Hadamard-rotated there, as llama.cpp does."""
    compare_with_llama_cpp(smollm2, smollm2, n_predict=12, attention=attention)


@pytest.mark.slow
@pytest.mark.parametrize("attention", SUPPORTED, ids=_label)
def test_every_kv_cache_combination_on_every_model(attention: AttentionOptions, fixture_models: list[Path],
                                                   converted_models: dict[str, Path], smollm2: Path) -> None:
    for src in fixture_models:
        if _accepts(src, attention):
            compare_with_llama_cpp(src, converted_models[src.stem], n_predict=16, attention=attention)
    compare_with_llama_cpp(smollm2, smollm2, n_predict=16, attention=attention)


def test_unknown_cache_type_and_mode_are_refused(converted_models: dict[str, Path]) -> None:
    model = str(converted_models["qwen3moe-q8_0"])
    for args, phrase in ((["-ctk", "q5_k"], "--cache-type-k q5_k"), (["-fa", "maybe"], "--flash-attn maybe")):
        r = edgemoe("run", model, "-p", "Hello", "-n", "2", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], r.stderr


def test_oracle_default_f32_cache_equals_llama_cpp_default(fixture_models: list[Path]) -> None:
    """The oracle's default (F32 cache, flash attention) gives llama.cpp's default's (F16, auto) bits:
    flash attention rounds K and V to F16 either way; without it the two differ."""
    src = next(p for p in fixture_models if p.stem == "qwen3moe-q8_0")
    runs = {}
    for name, att in (("oracle", None), ("llama", AttentionOptions()), ("f32-nofa", AttentionOptions("f32", "f32", "off")),
                      ("f16-nofa", AttentionOptions("f16", "f16", "off"))):
        with LlamaCppReference(src, n_ctx=256, n_threads=THREADS, attention=att) as ref:
            runs[name] = ref.greedy(ref.tokenize(PROMPT), 8)
    assert runs["oracle"].tokens == runs["llama"].tokens and np.array_equal(runs["oracle"].logits, runs["llama"].logits)
    assert not np.array_equal(runs["f32-nofa"].logits, runs["f16-nofa"].logits)


def test_kv_cache_bytes_in_stats(converted_models: dict[str, Path]) -> None:
    """`run --json` counts the KV cache: F16 holds half of F32's bytes at the same context, q8_0 34/32 bytes
    per 32 values; the rows the engine writes and attends are those of that layout (checked above)."""
    from edgemoe.model.config import ModelConfig
    from edgemoe.model.weights import GGUFTensors

    model = converted_models["olmoe-q8_0"]
    sizes = {}
    for t in ("f32", "f16", "q8_0"):
        r = edgemoe("run", str(model), "-p", "Hello", "-n", "2", "--temp", "0", "-c", "512", "--json", "-ctk", t, "-ctv", t)
        assert r.returncode == 0, r.stderr
        stats = json.loads(r.stdout.strip().splitlines()[-1])["stats"]
        assert stats["kv_cache"]["type_k"] == t and stats["kv_cache"]["flash_attn"] is True
        sizes[t] = stats["kv_cache_bytes"]
    w = GGUFTensors(model / "trunk.gguf")
    cfg = ModelConfig.from_metadata(w.meta)
    w.close()
    assert sizes["f32"] == 2 * cfg.n_layer * 512 * cfg.n_embd_kv * 4
    assert sizes["f16"] * 2 == sizes["f32"]
    assert sizes["q8_0"] * 32 == sizes["f32"] * 34 // 4


def test_just_in_time_experts_match_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    """Experts mapped per use and unmapped after (a worker's way) give the same bits."""
    for src in fixture_models:
        if src.stem.endswith(("q4_k_m", "mxfp4")):
            compare_with_llama_cpp(src, converted_models[src.stem], n_predict=16, resident=False)


def test_dense_smollm2_matches_llama_cpp(smollm2: Path) -> None:
    """Trained weights through the trunk code paths (dense FFN, tied output, Q4_1)."""
    compare_with_llama_cpp(smollm2, smollm2, n_predict=24)


def test_layer_by_layer_equals_one_graph(fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    """One graph per MoE layer (prompts too long for one graph) gives llama.cpp's bits as well."""
    for src in fixture_models[::4]:
        compare_with_llama_cpp(src, converted_models[src.stem], n_predict=8, fuse=False)


def test_greedy_helper_and_reset(converted_models: dict[str, Path]) -> None:
    with Engine(converted_models["qwen3moe-q8_0"], n_ctx=256, n_threads=THREADS) as engine:
        a, la = greedy_tokens(engine, [1, 2, 3, 4], 8)
        b, lb = greedy_tokens(engine, [1, 2, 3, 4], 8)
    assert a == b and np.array_equal(la, lb) and len(set(a)) > 1


def test_run_cli_greedy_equals_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    src = next(p for p in fixture_models if p.stem == "llama-moe-q4_k_m")
    r = edgemoe("run", str(converted_models[src.stem]), "-p", PROMPT, "-n", "16", "--temp", "0", "--ignore-eos", "--json", "-t", str(THREADS))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    with LlamaCppReference(src, n_ctx=512, n_threads=THREADS, extra_bufts=None) as ref:  # both at their defaults
        assert (out["stats"]["repacked_bytes"] > 0) == ref.extra_bufts
        prompt = ref.tokenize(PROMPT)
        trace = ref.greedy(prompt, 16)
    assert out["prompt_tokens"] == prompt
    assert out["tokens"] == trace.tokens
    assert out["text"] and r.stdout.startswith(out["text"])
    for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        assert out["stats"][key] > 0
    assert "tok/s" in r.stderr


def test_run_cli_seeded_sampling_is_reproducible(converted_models: dict[str, Path]) -> None:
    model = str(converted_models["olmoe-q8_0"])
    runs = [edgemoe("run", model, "-p", "Hello", "-n", "12", "--temp", "1.5", "--top-k", "0", "--top-p", "1", "--min-p", "0",
                    "--seed", str(seed), "--ignore-eos", "--json") for seed in (7, 7, 8)]
    toks = [json.loads(r.stdout.strip().splitlines()[-1])["tokens"] for r in runs]
    assert toks[0] == toks[1] and toks[0] != toks[2]


def _broken_copy(model: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(model, dest)
    return dest


@pytest.mark.parametrize("damage", ["missing-shard", "corrupt-shard", "corrupt-trunk", "bad-manifest", "not-a-model"])
def test_run_refuses_damaged_models(converted_models: dict[str, Path], tmp_path: Path, damage: str) -> None:
    model = _broken_copy(converted_models["llama-moe-q8_0"], tmp_path)
    shard = model / "experts" / "blk.000.expert.003.gguf"
    if damage == "missing-shard":
        shard.unlink()
    elif damage == "corrupt-shard":  # same size, different bytes: found when the shard is first used
        for i in range(8):
            data = bytearray((model / "experts" / f"blk.000.expert.00{i}.gguf").read_bytes())
            data[-1] ^= 0x55
            (model / "experts" / f"blk.000.expert.00{i}.gguf").write_bytes(bytes(data))
    elif damage == "corrupt-trunk":
        data = bytearray((model / "trunk.gguf").read_bytes())
        data[-1] ^= 0x55
        (model / "trunk.gguf").write_bytes(bytes(data))
    elif damage == "bad-manifest":
        (model / "manifest.json").write_text("{not json")
    else:
        (model / "manifest.json").unlink()
    r = edgemoe("run", str(model), "-p", "Hello", "-n", "4", "--temp", "0")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_run_refuses_bad_input(converted_models: dict[str, Path], tmp_path: Path) -> None:
    from tests.synthetic import write_moe

    model = str(converted_models["qwen2moe-q8_0"])
    unknown = write_moe(tmp_path / "gptx.gguf", arch="gptx", with_experts=False)
    cases = [
        (["run", model, "-p", "word " * 40, "-c", "16"], "longer than the context"),
        (["run", str(unknown), "-p", "hi"], "architecture 'gptx'"),
        (["run", str(tmp_path / "nope"), "-p", "hi"], "no such model"),
        (["run", model, "-p", "hi", "-n", "0"], "--n-predict"),
        (["run", model, "-p", "hi", "--workers", "-1"], "--workers"),
    ]
    for args, phrase in cases:
        r = edgemoe(*args)
        assert r.returncode == 2, (args, r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and phrase in last and "Traceback" not in r.stderr, (args, r.stderr)


def test_one_graph_for_a_layers_experts_matches_per_expert_and_llama_cpp_stacked(
        fixture_models: list[Path], converted_models: dict[str, Path]) -> None:
    """LayerExperts + MoEGraph (the layer's shards side by side, one mul_mat_id per part) gives the
    same bits as one expert at a time (ExpertFFN) and as llama.cpp's own stacked tensors of the source."""
    from edgemoe.format.manifest import expert_file_name, load_manifest
    from edgemoe.ggml import Compute
    from edgemoe.model.expert_ffn import ExpertFFN, LayerExperts, MappedShard, MoEGraph, ShardLayout
    from edgemoe.model.stacked import StackedExperts
    from edgemoe.model.weights import GGUFTensors

    rng = np.random.default_rng(3)
    compute = Compute(1)
    for src in fixture_models:
        if not src.stem.endswith(("q4_k_m", "f32")):
            continue
        model = converted_models[src.stem]
        m = load_manifest(model)
        layer = m.moe_layers[-1]
        layouts = {e: ShardLayout.read(model / expert_file_name(layer, e)) for e in range(m.n_experts)}
        n_embd = layouts[0].tensors["down"].ne[1]
        x = rng.standard_normal((5, n_embd)).astype(np.float32)
        ids = np.stack([rng.choice(m.n_experts, m.n_experts_used, replace=False) for _ in range(5)]).astype(np.int32)
        with LayerExperts(layouts, m.n_experts) as view:
            for e in np.unique(ids)[::2]:  # some mapped ahead, the rest just before the run, the others never
                view.map(int(e), populate=True)
            for e in np.unique(ids):
                view.map(int(e))
            assert len(view.mapped) < m.n_experts
            graph = MoEGraph(view, compute, n_embd)
            ours = graph.run(x, ids)
            graph.close()
        ffn = ExpertFFN(compute)
        one = np.empty_like(ours)
        for e in np.unique(ids):
            tok, slot = np.nonzero(ids == e)
            with MappedShard(layouts[int(e)]) as shard:
                one[tok, slot] = ffn.run(shard, np.ascontiguousarray(x[tok]))
        ffn.close()
        w = GGUFTensors(src)
        stacked = StackedExperts(w, compute, m.moe_layers, n_embd)
        ref = stacked.compute_layer(layer, x, ids)
        stacked.close()
        w.close()
        assert np.array_equal(ours, one) and np.array_equal(ours, ref), src.stem
        assert np.abs(ours).max() > 0
    compute.close()


needs_repack = pytest.mark.skipif(not extra_bufts_usable(), reason="llama.cpp's extra buffer types cannot run on this CPU")


@needs_repack
def test_repacked_weights_match_llama_cpp_repacked(fixture_models: list[Path], converted_models: dict[str, Path],
                                                   smollm2: Path) -> None:
    """--repack: the trunk's and the resident experts' Q4_K/Q4_0/IQ4_NL... weights in CPU_REPACK buffers,
    bit for bit llama.cpp with its repacking (and, on Q4_K models, not equal to it without)."""
    for src in fixture_models:
        if src.stem.endswith("q4_k_m") or src.stem == "olmoe-q8_0":
            compare_with_llama_cpp(src, converted_models[src.stem], n_predict=16, repack=True)
    compare_with_llama_cpp(smollm2, smollm2, n_predict=12, repack=True)
    src = next(p for p in fixture_models if p.stem == "qwen3moe-q4_k_m")
    compare_with_llama_cpp(src, converted_models[src.stem], n_predict=8, repack=True, fuse=False)
    compare_with_llama_cpp(fixture_models[1], converted_models[fixture_models[1].stem], n_predict=8, repack=True,
                           attention=AttentionOptions("q8_0", "f16", "off"))
    src = next(p for p in fixture_models if p.stem == "llama-moe-q4_k_m")
    with Engine(converted_models[src.stem], n_ctx=64, n_threads=THREADS, repack=True) as engine:
        assert engine.repacker.nbytes > 0 and engine.trunk._packed  # something was repacked
    with pytest.raises(AssertionError):  # the check can fail: repacked kernels round differently
        _compare_unpacked_with_repacked(src, converted_models[src.stem])


def _compare_unpacked_with_repacked(src: Path, model: Path) -> None:
    with LlamaCppReference(src, n_ctx=128, n_threads=THREADS, extra_bufts=True) as ref:
        prompt = ref.tokenize(PROMPT)
        trace = ref.greedy(prompt, 4)
    with Engine(model, n_ctx=128, n_threads=THREADS, repack=False) as engine:
        logits = engine.eval(prompt)[0]
    assert np.array_equal(logits, trace.logits[0])


def test_repack_flag(converted_models: dict[str, Path]) -> None:
    model = str(converted_models["llama-moe-q4_k_m"])
    r = edgemoe("run", model, "-p", "Hello", "-n", "2", "--temp", "0", "--json", "--repack", "off")
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["stats"]["repacked_bytes"] == 0, r.stderr
    r = edgemoe("run", model, "-p", "Hello", "-n", "2", "--repack", "on", "--workers", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: --repack on") and "Traceback" not in r.stderr, r.stderr


def test_shards_of_uneven_layouts_run_one_at_a_time(fixture_models: list[Path], converted_models: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose shards cannot share one view (not written by this converter) falls back to one
    mapping and one graph per expert, still llama.cpp's bits."""
    import edgemoe.model.experts as experts_mod
    from edgemoe.model.expert_ffn import LayerExperts, ShardLayout, ShardTensor

    a = ShardLayout("a", 4096, {"down": ShardTensor("down", 0, (4, 4), 64)})
    b = ShardLayout("b", 4096, {"down": ShardTensor("down", 0, (4, 4), 96)})
    with pytest.raises(ValueError):
        LayerExperts({0: a, 1: b}, 2)

    def uneven(*args: object, **kw: object) -> LayerExperts:
        raise ValueError("uneven")

    monkeypatch.setattr(experts_mod, "LayerExperts", uneven)
    src = next(p for p in fixture_models if p.stem == "qwen2moe-q8_0")
    compare_with_llama_cpp(src, converted_models[src.stem], n_predict=8)

"""Architecture-specific checks beyond the shared ladder (which runs every test model: test_convert,
test_engine, test_cluster): deepseek2's and gpt-oss's routing in the predictors, their shadows,
their bad inputs, the MLA cache.

The predictors must route as the trunk does (sigmoid scores, the exp_probs_b selection bias,
group-limited selection; gpt-oss's router bias and post_attention_norm): the look-ahead predictor,
given a layer's true FFN input, names exactly the experts the router chose, and a shadow identical
to the main model predicts every expert.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemoe.bench.recall import bench_recall
from edgemoe.model.engine import Engine
from edgemoe.model.generate import greedy_tokens
from edgemoe.model.hooks import StepHooks
from edgemoe.model.kvcache import AttentionOptions
from edgemoe.predict import PredictorOptions
from edgemoe.predict.baselines import LookaheadPredictor
from tests.cli import edgemoe
from tests.shadow_cluster import assert_shadow_cluster_equals_in_process, with_q8_0_shadow
from tests.test_engine import compare_with_llama_cpp
from tests.synthetic import write_moe
from edgemoe.convert import plan_conversion, write_model

DEEPSEEK2 = ("deepseek2-lite", "deepseek2-v3", "deepseek2-legacy")
ROUTED = (*DEEPSEEK2, "gpt-oss")  # models whose routing differs from plain softmax top-k
PROMPT = [1, 504, 3458, 28, 314, 1110, 253, 2821, 17, 99]
PROMPTS = ["The history of the Roman Empire began when", "def fibonacci(n):"]


@pytest.mark.parametrize("model", ROUTED)
def test_lookahead_routes_as_the_trunk(converted_models: dict[str, Path], model: str) -> None:
    """LookaheadPredictor.route on each layer's own FFN input == the router's top-k, every layer, every token."""
    with Engine(converted_models[f"{model}-q8_0"], n_ctx=128, n_threads=1) as engine:
        engine.fuse = False  # one graph per MoE layer: the backend sees each layer's residual stream
        seen: list[tuple[int, np.ndarray, np.ndarray]] = []

        class Spy(StepHooks):
            def on_router(self, layer: int, residual: np.ndarray, selected: np.ndarray, groups=None) -> None:
                seen.append((layer, residual.copy(), selected.copy()))

        engine.hooks.append(Spy())
        greedy_tokens(engine, PROMPT, 6)
        look = LookaheadPredictor(engine.cfg, engine.weights, engine.moe_layers, depth=1)
        assert engine.cfg.n_expert_groups == (4 if model == "deepseek2-v3" else 0)
        gpt_oss = model == "gpt-oss"
        assert {layer for layer, _, _ in seen} == set(engine.moe_layers) == ({0, 1, 2, 3} if gpt_oss else {1, 2, 3})
        n = 0
        for layer, residual, selected in seen:
            for row, sel in zip(residual, selected):
                assert look.route(layer, row) == [int(e) for e in sel], (layer, n)
                n += 1
        # the last layer routes only the output rows, except in gpt-oss (llama.cpp drops them at the head)
        assert n == (4 * (len(PROMPT) + 5) if gpt_oss else 2 * (len(PROMPT) + 5) + (1 + 5))


@pytest.mark.parametrize("model,attention", [
    ("deepseek2-lite-f32", AttentionOptions("f32", "f32", "off")), ("deepseek2-v3-q4_k_m", AttentionOptions("f16", "f16", "off")),
    ("deepseek2-v3-f32", AttentionOptions("f32", "f32", "on")), ("deepseek2-v3-q8_0", AttentionOptions("q8_0", "q8_0", "on")),
    ("deepseek2-v3-f32", AttentionOptions("q4_0", "q4_0", "auto"))],
    ids=lambda v: v if isinstance(v, str) else f"k{v.cache_type_k}-v{v.cache_type_v}-fa{v.flash_attn}")
def test_mla_cache_types_match_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path], model: str,
                                         attention: AttentionOptions) -> None:
    """The latent cache with and without flash attention (V a view of K, decompressed by attn_v_b after),
    quantized: deepseek2-v3's latent head (96 + 32) is a multiple of 64 like real models' (512 + 64),
    which llama.cpp rotates for other attention but not for MLA's K-only cache (build_attn_inp_k)."""
    src = next(p for p in fixture_models if p.stem == model)
    if model.startswith("deepseek2-v3"):
        from edgemoe.model.config import ModelConfig
        from edgemoe.model.weights import GGUFTensors

        w = GGUFTensors(converted_models[model] / "trunk.gguf")
        cfg = ModelConfig.from_metadata(w.meta)
        w.close()
        assert cfg.head_dim % 64 == 0 and attention.resolve(cfg).rot_k == 0
    compare_with_llama_cpp(src, converted_models[model], n_predict=16, attention=attention)


@pytest.mark.parametrize("model,attention,fuse", [("gpt-oss-mxfp4", AttentionOptions("f16", "f16", "off"), True),
                                                  ("gpt-oss-q8_0", AttentionOptions("q8_0", "q4_0", "on"), False)],
                         ids=lambda v: v if isinstance(v, (str, bool)) else f"k{v.cache_type_k}-v{v.cache_type_v}-fa{v.flash_attn}")
def test_gpt_oss_past_the_sliding_window_matches_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path],
                                                           model: str, attention: AttentionOptions, fuse: bool) -> None:
    """Generating well past the window (16 in the test model) with the sinks, without flash attention
    (the SWA mask in the softmax) and with it over a quantized cache: as llama.cpp. Both masks are
    checked: the fused decode graph's rewritten in place, the per-layer graphs' built per step."""
    from edgemoe.model.config import ModelConfig
    from edgemoe.model.weights import GGUFTensors

    w = GGUFTensors(converted_models[model] / "trunk.gguf")
    cfg = ModelConfig.from_metadata(w.meta)
    w.close()
    n_predict = 40
    assert 0 < cfg.n_swa < n_predict and any(cfg.is_swa(il) for il in range(cfg.n_layer))
    src = next(p for p in fixture_models if p.stem == model)
    compare_with_llama_cpp(src, converted_models[model], n_predict=n_predict, attention=attention, fuse=fuse)


@pytest.mark.parametrize("args,phrase", [(["-ctk", "f16", "-ctv", "f32"], "both types must be the same"),
                                         (["-ctk", "q8_0", "-ctv", "q8_0"], "does not divide the head size 80")])
def test_mla_cache_types_refused(converted_models: dict[str, Path], args: list[str], phrase: str) -> None:
    """As llama.cpp refuses them: different K and V types for MLA, a block that does not divide the latent head."""
    r = edgemoe("run", str(converted_models["deepseek2-lite-q8_0"]), "-p", "Hello", "-n", "2", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: --cache-type-k") and phrase in lines[0], lines[0]


def test_legacy_kv_b_layout_reads_as_multi_head_attention(converted_models: dict[str, Path]) -> None:
    """Without attention.key_length_mla a deepseek2 file is the legacy attn_kv_b layout: as llama.cpp
    reads it, MHA over every head, K heads key_length (nope 48 + rope 16) and V heads value_length (32)
    wide, in a K and a V cache of their own row sizes; the K/V types checked against each head."""
    from edgemoe.model.config import ModelConfig
    from edgemoe.model.kvcache import KVCache
    from edgemoe.model.weights import GGUFTensors

    w = GGUFTensors(converted_models["deepseek2-legacy-q8_0"] / "trunk.gguf")
    cfg = ModelConfig.from_metadata(w.meta)
    assert "blk.0.attn_kv_b.weight" in w and "blk.0.attn_k_b.weight" not in w
    w.close()
    assert cfg.mla is not None and not cfg.mla.absorbed
    assert (cfg.head_dim, cfg.head_v, cfg.n_head_kv, cfg.n_embd_kv, cfg.n_embd_v) == (64, 32, 8, 512, 256)
    for flash in ("on", "off"):
        kv = KVCache(cfg, 16, AttentionOptions("f16", "f16", flash).resolve(cfg))
        assert kv.k[0].shape == (16, 512) and kv.v[0].shape == ((256, 16) if flash == "off" else (16, 256))
    a = AttentionOptions("q8_0", "q8_0", "on").resolve(cfg)
    assert (a.rot_k, a.rot_v, a.mla) == (64, 0, False)  # K's 64 is rotated as llama.cpp's attn_rot_k, V's 32 not


def test_deepseek2_without_key_length_is_refused(tmp_path: Path) -> None:
    """A deepseek2 file with neither the MLA nor the legacy head sizes: one error naming the key."""
    src = write_moe(tmp_path / "ds.gguf", arch="deepseek2", extra_u32={
        "deepseek2.context_length": 64, "deepseek2.attention.head_count": 2, "deepseek2.attention.kv_lora_rank": 16,
        "deepseek2.rope.dimension_count": 8})
    res = edgemoe("run", str(src), "-p", "Hello", "-n", "1")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "attention.key_length" in lines[0], res.stderr


@pytest.mark.parametrize("model,attention,fuse", [
    ("deepseek2-legacy-f32", AttentionOptions("f32", "f32", "off"), True),
    ("deepseek2-legacy-q8_0", AttentionOptions("f16", "f16", "off"), False),
    ("deepseek2-legacy-q8_0", AttentionOptions("q8_0", "q8_0", "on"), True),
    ("deepseek2-legacy-f32", AttentionOptions("q4_0", "f32", "off"), False),
    ("deepseek2-legacy-q8_0", AttentionOptions("f32", "q4_0", "auto"), False)],
    ids=lambda v: v if isinstance(v, (str, bool)) else f"k{v.cache_type_k}-v{v.cache_type_v}-fa{v.flash_attn}")
def test_legacy_kv_b_cache_types_match_llama_cpp(fixture_models: list[Path], converted_models: dict[str, Path],
                                                 model: str, attention: AttentionOptions, fuse: bool) -> None:
    """The legacy layout's K and V caches of different widths (V transposed without flash attention),
    quantized K rotated, with the fused decode graph and per layer: tokens, routing and logits as llama.cpp."""
    src = next(p for p in fixture_models if p.stem == model)
    compare_with_llama_cpp(src, converted_models[model], n_predict=16, attention=attention, fuse=fuse)


@pytest.fixture(scope="module")
def shadowed(fixture_models: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each q8_0 model converted with a q8_0 shadow: a shadow identical to the main model."""
    return with_q8_0_shadow(fixture_models, {m: f"{m}-q8_0" for m in ROUTED}, tmp_path_factory.mktemp("shadowed"))


@pytest.mark.parametrize("model", ROUTED)
def test_identical_shadow_predicts_every_expert(shadowed: dict[str, Path], model: str) -> None:
    """SEP and the re-anchored shadow run the trunk (MLA with V a view of K; sinks and windows) with
    the main model's KV rows, the same router and the experts' biases: an identical shadow is exact,
    aligned or not."""
    r = bench_recall(shadowed[model], PROMPTS, n_predict=6, predictors=["shadow", "shadow@T0KV0", "reanchor@d2"],
                     options=PredictorOptions())
    assert all(p["recall"] == 1.0 for p in r.predictors.values()), {s: p["recall"] for s, p in r.predictors.items()}


@pytest.mark.parametrize("model", ["deepseek2-v3", "deepseek2-legacy", "gpt-oss"])
def test_shadow_on_a_cluster_changes_nothing(shadowed: dict[str, Path], model: str) -> None:
    assert_shadow_cluster_equals_in_process(shadowed[model], PROMPT, workers=4)


def test_shadow_requantized_from_mxfp4(fixture_models: list[Path], tmp_path: Path) -> None:
    """--shadow-type q8_0 on the MXFP4 gpt-oss: the shadow's experts are the MXFP4 values exactly as
    ggml dequantizes them, requantized; the shadow predictor on 4 workers predicts experts and
    changes no token or logit."""
    import gguf
    from gguf.quants import quantize

    from edgemoe.ggml import Compute, Context, GGMLType, lib
    from edgemoe.ggml.context import aligned_copy, to_numpy

    src = next(p for p in fixture_models if p.stem == "gpt-oss-mxfp4")
    model = tmp_path / "m"
    write_model(plan_conversion(src, shadow_type="q8_0"), model, progress=False)
    source = {t.name: t for t in gguf.GGUFReader(src).tensors}
    shadow = {t.name: t for t in gguf.GGUFReader(model / "shadow-q8_0.gguf").tensors}
    compute = Compute(1)
    try:
        for name in ("blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"):
            s, t = source[name], shadow[name]
            assert s.tensor_type == gguf.GGMLQuantizationType.MXFP4 and t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            n_per_row = int(s.shape[0])
            rows = int(np.prod([int(d) for d in s.shape[1:]]))
            raw = aligned_copy(np.asarray(s.data).view(np.uint8).reshape(rows, -1))
            with Context(Context.overhead(8) + rows * n_per_row * 4 + (1 << 20)) as ctx:
                w = ctx.external(raw.ctypes.data, int(GGMLType.MXFP4), n_per_row, rows, owner=raw)
                values = ctx.get_rows(w, ctx.from_numpy(aligned_copy(np.arange(rows, dtype=np.int32))))
                graph = ctx.graph()
                lib.ggml_build_forward_expand(graph, values)
                compute.run(graph)
                want = quantize(to_numpy(values).reshape(rows, n_per_row).copy(), gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)), name
    finally:
        compute.close()
    assert_shadow_cluster_equals_in_process(model, PROMPT, workers=4)


def test_experts_in_a_leading_dense_layer_are_named(tmp_path: Path) -> None:
    """deepseek2.leading_dense_block_count says which layers are dense; experts there are refused by name."""
    src = write_moe(tmp_path / "ds.gguf", arch="deepseek2", extra_u32={"deepseek2.leading_dense_block_count": 1})
    out = tmp_path / "out"
    res = edgemoe("convert", str(src), str(out))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and res.stdout == "" and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "blk.0.ffn_" in lines[0] and "deepseek2.leading_dense_block_count" in lines[0], lines[0]
    assert not out.exists()


def test_expert_biases_only_where_the_architecture_has_them(tmp_path: Path) -> None:
    """An expert bias in a llama file, or a gpt-oss bias of the wrong type or shape: named in the error."""
    import gguf

    def convert(path: Path) -> str:
        out = tmp_path / (path.stem + "-out")
        r = edgemoe("convert", str(path), str(out))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and r.stdout == "" and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert not out.exists()
        return lines[0]

    def with_bias(arch: str, name: str, shape: tuple[int, ...], dtype: type = np.float32) -> Path:
        src = write_moe(tmp_path / f"{arch}.gguf", arch=arch)
        r = gguf.GGUFReader(src)
        path = tmp_path / f"{arch}-{name}-{len(shape)}-{np.dtype(dtype).name}.gguf"
        w = gguf.GGUFWriter(path, arch)
        for f in r.fields.values():
            if not f.name.startswith("GGUF.") and f.name != "general.architecture":
                sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        for t in r.tensors:
            w.add_tensor(t.name, np.array(t.data).reshape(list(reversed([int(x) for x in t.shape]))))
        w.add_tensor(name, np.zeros(shape, dtype=dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    line = convert(with_bias("llama", "blk.0.ffn_up_exps.bias", (4, 96)))
    assert "blk.0.ffn_up_exps.bias" in line and "llama has no expert biases" in line
    line = convert(with_bias("gpt-oss", "blk.0.ffn_up_exps.bias", (4, 95)))
    assert "blk.0.ffn_up_exps.bias" in line and "[95, 4]" in line and "[96, 4]" in line
    line = convert(with_bias("gpt-oss", "blk.0.ffn_up_exps.bias", (4, 96), np.float16))
    assert "blk.0.ffn_up_exps.bias" in line and "F16" in line and "must be F32" in line


@pytest.mark.parametrize("model", ["deepseek2-lite-q8_0", "deepseek2-legacy-q8_0", "gpt-oss-mxfp4", "olmoe-q8_0"])
def test_plan_counts_the_kv_cache_the_engine_allocates(fixture_models: list[Path], model: str) -> None:
    """`edgemoe plan`'s F16 KV bytes per token equal the engine's cache (MLA: K only, V is inside it;
    the legacy attn_kv_b layout: K rows of 64-value heads, V rows of 32)."""
    from edgemoe.model.config import ModelConfig
    from edgemoe.model.kvcache import KVCache
    from edgemoe.model.weights import GGUFTensors
    from edgemoe.plan.facts import facts_of_gguf

    src = next(p for p in fixture_models if p.stem == model)
    w = GGUFTensors(src)
    cfg = ModelConfig.from_metadata(w.meta)
    w.close()
    assert facts_of_gguf(src).kv_bytes_per_token == KVCache(cfg, 256).nbytes // 256

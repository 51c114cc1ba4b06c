"""granitemoe and ernie4_5-moe beyond the checks every test model gets (test_convert's round trip,
test_engine's comparison with llama.cpp, test_cluster's 4 workers): the predictors route as the model
does (ernie4_5-moe's exp_probs_b selection bias), an identical shadow predicts exactly, a shadow on a
cluster changes nothing, and metadata that contradicts the tensors is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edgemoe.bench.recall import _Recorder, bench_recall
from edgemoe.errors import UserError
from edgemoe.model.engine import Engine
from edgemoe.model.experts import LocalExperts
from edgemoe.model.generate import greedy_tokens
from edgemoe.predict import PredictorOptions
from edgemoe.predict.baselines import LookaheadPredictor
from tests.shadow_cluster import assert_shadow_cluster_equals_in_process, with_q8_0_shadow
from tests.test_engine import compare_with_llama_cpp
from edgemoe.convert import plan_conversion, write_model
from tools.testmodels.archs import ARCHS
from tools.testmodels.generate import write_f32

PROMPT = [1, 504, 3458, 28, 314, 1110, 253, 2821, 17, 99]
SHADOWED = ("granitemoe-shexp-q8_0", "ernie4_5-moe-q8_0")


@pytest.fixture(scope="module")
def shadowed(fixture_models: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The q8_0 models converted with a q8_0 shadow: the shadow's experts equal the model's."""
    return with_q8_0_shadow(fixture_models, {s: s for s in SHADOWED}, tmp_path_factory.mktemp("archs"))


def test_lookahead_routes_with_the_selection_bias(converted_models: dict[str, Path]) -> None:
    """The look-ahead predictor's routing function, given a layer's true FFN input, picks the experts
    the model picked: top-k of softmax + exp_probs_b. Without the bias it would not."""
    model = converted_models["ernie4_5-moe-q8_0"]
    with Engine(model, n_ctx=64, n_threads=1,
                experts=lambda e: _Recorder(LocalExperts(e.model_dir, e.compute, e.manifest))) as engine:
        assert engine.moe_layers == [1, 2, 3]  # the leading dense layer
        rec: _Recorder = engine.experts  # type: ignore[assignment]
        engine.fuse = False  # layer by layer: the recorder sees every layer's FFN input
        tokens, _ = greedy_tokens(engine, PROMPT, 12)
        pred = LookaheadPredictor(engine.cfg, engine.weights, engine.moe_layers, depth=1)
        assert set(pred.biases) == {1, 2, 3}
        calls = list(rec.calls)
    assert len(calls) == 1 + 11 * 3  # the prompt's output row in the last layer, then 11 decode steps
    prev = {1: -1, 2: 1, 3: 2}
    unbiased = LookaheadPredictor.__new__(LookaheadPredictor)
    unbiased.__dict__.update(pred.__dict__, biases={})
    flips = 0
    for layer, residual, selected in calls:
        got = pred.after_router(prev[layer], residual, selected)[layer]
        assert sorted(got) == sorted(selected.tolist()), (layer, got, selected)
        flips += sorted(unbiased.after_router(prev[layer], residual, selected)[layer]) != sorted(selected.tolist())
    assert flips > 0, "the selection bias never changed a choice: the test would not notice it missing"


@pytest.mark.parametrize("stem", SHADOWED)
def test_identical_shadow_predicts_exactly(shadowed: dict[str, Path], stem: str) -> None:
    """The shadow runs the model's own graph (multipliers, plain shared expert, selection bias) on equal
    experts: its router choices are the model's, aligned or not, and re-anchored."""
    r = bench_recall(shadowed[stem], ["The history of the Roman Empire began when", "def fibonacci(n):"], n_predict=6,
                     predictors=["shadow", "shadow@T0KV0", "reanchor@d2", "lookahead"], options=PredictorOptions())
    rec = {s: p["recall"] for s, p in r.predictors.items()}
    assert rec["shadow"] == rec["shadow@T0KV0"] == rec["reanchor@d2"] == 1.0, rec
    assert 0.0 < rec["lookahead"] < 1.0, rec


@pytest.mark.parametrize("stem", SHADOWED)
def test_shadow_on_a_cluster_changes_nothing(shadowed: dict[str, Path], stem: str) -> None:
    assert_shadow_cluster_equals_in_process(shadowed[stem], PROMPT, workers=2, n_ctx=128)


def test_metadata_that_contradicts_the_tensors_is_refused(tmp_path: Path) -> None:
    """ernie4_5-moe's graph makes MoE layers from leading_dense_block_count and interleave_moe_layer_step;
    a file whose experts sit elsewhere is refused by the engine (and by convert: test_convert)."""
    spec = ARCHS["ernie4_5-moe"]
    keys = tuple((k, 2 if k == "interleave_moe_layer_step" else v, t) for k, v, t in spec.extra_keys)
    src = write_f32(dataclasses.replace(spec, extra_keys=keys), tmp_path / "ernie-step2.gguf")
    with pytest.raises(UserError, match=r"makes layers \[1, 3\] MoE layers .* its tensors \[1, 2, 3\]"):
        Engine(src, n_ctx=64, n_threads=1)
    # granitemoe's shared expert exists for llama.cpp only with its width in the metadata
    spec = ARCHS["granitemoe-shexp"]
    keys = tuple(k for k in spec.extra_keys if k[0] != "expert_shared_feed_forward_length")
    src = write_f32(dataclasses.replace(spec, extra_keys=keys), tmp_path / "granite-no-shexp-width.gguf")
    with pytest.raises(UserError, match=r"shared-expert tensors \(ffn_\*_shexp\) but no granitemoe.expert_shared_feed_forward_length"):
        Engine(src, n_ctx=64, n_threads=1)


def test_ernie_ignores_attention_scale_and_output_bias_as_llama_cpp_does(tmp_path: Path) -> None:
    """llama.cpp loads an ernie4_5-moe attn_output.bias but never adds it, and scales attention by
    1/sqrt(head_dim) whatever attention.scale says: a file with both runs as llama.cpp runs it."""
    spec = ARCHS["ernie4_5-moe"]
    spec = dataclasses.replace(spec, attn_out_bias=True, extra_keys=(*spec.extra_keys, ("attention.scale", 0.5, "f32")))
    src = write_f32(spec, tmp_path / "ernie-extras.gguf")
    write_model(plan_conversion(src), tmp_path / "out", progress=False)
    compare_with_llama_cpp(src, tmp_path / "out", n_predict=8)

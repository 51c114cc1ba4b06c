"""The shadow predictor on a local cluster against the in-process engine (the per-architecture tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.convert import plan_conversion, write_model
from edgemoe.model.engine import Engine
from edgemoe.model.generate import greedy_tokens
from edgemoe.predict import PredictorOptions, make_predictor


def assert_shadow_cluster_equals_in_process(model: Path, prompt: list[int], *, workers: int, n_predict: int = 8,
                                            n_ctx: int = 256) -> None:
    """Greedy tokens and logits on `workers` workers with the shadow predictor equal the in-process
    engine's, and the shadow named some routed experts in time. The shadow is one the coordinator
    waits for: whether a background shadow is in time depends on the machine's load, not the code."""
    with Engine(model, n_ctx=n_ctx, n_threads=1) as engine:
        want_tokens, want_logits = greedy_tokens(engine, prompt, n_predict)
    with open_engine(model, ClusterOptions(workers=workers, predictor="shadow", residency="off"), n_ctx=n_ctx,
                     n_threads=1) as engine:
        cluster = engine.experts
        cluster.predictor.close()
        cluster.predictor = make_predictor("shadow", engine.cfg, engine.weights, engine.moe_layers, depth=1,
                                           main=engine, options=PredictorOptions(sync=True))
        tokens, logits = greedy_tokens(engine, prompt, n_predict)
        assert cluster.recall.correct > 0
    assert tokens == want_tokens
    assert np.array_equal(logits, want_logits)


def with_q8_0_shadow(fixture_models: list[Path], stems: dict[str, str], root: Path) -> dict[str, Path]:
    """Each q8_0 test model (key -> its fixture's stem) converted under root/key with a q8_0 shadow: a
    shadow whose experts equal the model's, so its predictions are the model's own routing."""
    src = {p.stem: p for p in fixture_models}
    out = {}
    for key, stem in stems.items():
        out[key] = root / key
        write_model(plan_conversion(src[stem], shadow_type="q8_0"), out[key], progress=False)
    return out

"""edgemoe.model.model: a Model apart from the Engine that runs it; engines over one Model share its pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemoe.errors import UserError
from edgemoe.model.engine import Engine
from edgemoe.model.model import Model

PROMPT = [1, 5, 9, 3, 7]


def test_an_engine_over_a_model_equals_one_over_its_path(converted_models: dict[str, Path]) -> None:
    path = converted_models["qwen2moe-q8_0"]
    with Engine(path, n_ctx=64, n_threads=1) as eng:
        want = eng.eval(PROMPT)
        want_next = eng.eval([int(np.argmax(want[0]))])
    model = Model.load(path)
    try:
        assert model.model_dir == path and model.manifest is not None and model.cfg.arch == "qwen2moe"
        assert model.moe_layers == [il for il in range(model.cfg.n_layer)]  # every qwen2moe layer routes
        for _ in range(2):  # a second engine over the same Model: the first one's close() left it open
            with Engine(model, n_ctx=64, n_threads=1) as eng:
                assert eng.model is model and eng.weights is model.weights and eng.moe_layers == model.moe_layers
                got = eng.eval(PROMPT)
                assert np.array_equal(got, want)
                assert np.array_equal(eng.eval([int(np.argmax(got[0]))]), want_next)
    finally:
        model.close()


def test_a_model_is_checked_before_any_engine(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such model directory or GGUF file"):
        Model.load(tmp_path / "missing")


def test_the_shadows_engine_runs_the_main_models_pieces(shadow_model: Path) -> None:
    from edgemoe.predict.base import PredictorOptions
    from edgemoe.predict.shadow import ShadowPredictor

    with Engine(shadow_model, n_ctx=64, n_threads=1) as main:
        pred = ShadowPredictor(main, 1, PredictorOptions(sync=True))
        try:
            m = pred.engine.model
            assert m is not main.model and not m.owns_weights  # the shadow never closes the main model's trunk
            assert m.weights is main.weights and m.manifest is main.manifest and m.cfg is main.cfg
            assert m.moe_layers == main.moe_layers
            main.eval(PROMPT)
            main.eval([3])
            assert pred.settle() and pred.stats()["failures"] == 0
        finally:
            pred.close()
        assert main.eval([4]).shape == (1, main.cfg.n_vocab)  # its trunk still mapped

"""Baseline predictors: reactive (none), random, router look-ahead, previous token, frequency."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from edgemoe.format.schema import T, tensor_name
from edgemoe.model.config import ModelConfig
from edgemoe.model.weights import GGUFTensors
from edgemoe.predict.base import Predictor, upcoming


class ReactivePredictor(Predictor):
    """Predicts nothing: every expert is loaded when its compute request arrives."""

    name = "reactive"

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        return {}


class RandomPredictor(Predictor):
    """k distinct random experts for each of the next `depth` layers (the paper's ~k/E baseline)."""

    name = "random"

    def __init__(self, cfg: ModelConfig, moe_layers: list[int], depth: int, seed: int = 0) -> None:
        self.cfg, self.moe_layers, self.depth = cfg, moe_layers, depth
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def _draw(self, layers: list[int]) -> dict[int, list[int]]:
        return {l: [int(e) for e in self.rng.choice(self.cfg.n_expert, self.cfg.n_expert_used, replace=False)] for l in layers}

    def begin_token(self, step: int) -> dict[int, list[int]]:
        return self._draw(upcoming(self.moe_layers, -1, self.depth))

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        return self._draw(upcoming(self.moe_layers, layer, self.depth))


def _tensor_f32(weights: GGUFTensors, name: str) -> np.ndarray:
    """A trunk tensor as float32 numpy [rows, cols], dequantized if needed."""
    import ctypes

    from edgemoe.ggml.lib import lib

    t = weights.require(name)
    c = t.contents
    nbytes = lib.ggml_nbytes(t)
    raw = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(c.data), dtype=np.uint8)
    ne = [int(x) for x in c.ne]
    shape = tuple(reversed([n for n in ne[:2]]))
    if c.type == int(GGMLQuantizationType.F32):
        return raw.view(np.float32).reshape(shape).copy()
    return dequantize(raw, GGMLQuantizationType(c.type)).reshape(shape).astype(np.float32)


def select_experts(logits: np.ndarray, k: int, bias: np.ndarray | None = None) -> list[int]:
    """The k experts the model's router (Trunk.router) picks from these router logits: top-k of the
    softmax, plus the layer's selection bias (exp_probs_b: ernie4_5-moe) where it has one."""
    if bias is None:
        scores = logits  # softmax keeps the order
    else:
        p = np.exp(logits - logits.max())
        scores = p / p.sum() + bias
    return [int(e) for e in np.argsort(-scores, kind="stable")[:k]]


class LookaheadPredictor(Predictor):
    """Applies the next layers' routers to the current residual stream (Mixtral-offloading, HOBBIT).

    For each of the next `depth` MoE layers j: x = rms_norm(residual) * ffn_norm_j, the experts the
    router of j picks from ffn_gate_inp_j . x (select_experts). Cheap (a few small mat-vecs in numpy),
    no extra model needed.
    """

    name = "lookahead"

    def __init__(self, cfg: ModelConfig, weights: GGUFTensors, moe_layers: list[int], depth: int) -> None:
        self.cfg, self.moe_layers, self.depth = cfg, moe_layers, depth
        self.norms = {l: _tensor_f32(weights, tensor_name(T.FFN_NORM, l)).reshape(-1) for l in moe_layers}
        self.routers = {l: _tensor_f32(weights, tensor_name(T.FFN_GATE_INP, l)) for l in moe_layers}
        self.biases = {l: _tensor_f32(weights, tensor_name(T.FFN_EXP_PROBS_B, l, "bias")).reshape(-1).astype(np.float64)
                       for l in moe_layers if tensor_name(T.FFN_EXP_PROBS_B, l, "bias") in weights}

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        x = residual.astype(np.float64).reshape(-1)
        x = x / np.sqrt(np.mean(x * x) + self.cfg.rms_eps)
        out = {}
        for l in [l for l in self.moe_layers if l > layer][: self.depth]:
            logits = self.routers[l] @ (x * self.norms[l])
            out[l] = select_experts(logits, self.cfg.n_expert_used, self.biases.get(l))
        return out


class PreviousPredictor(Predictor):
    """The experts each layer chose for the previous token (temporal locality of routing)."""

    name = "previous"

    def __init__(self, moe_layers: list[int], depth: int) -> None:
        self.moe_layers, self.depth = moe_layers, depth
        self.last: dict[int, list[int]] = {}

    def reset(self) -> None:
        self.last.clear()

    def _known(self, layers: list[int]) -> dict[int, list[int]]:
        return {l: list(self.last[l]) for l in layers if l in self.last}

    def begin_token(self, step: int) -> dict[int, list[int]]:
        return self._known(upcoming(self.moe_layers, -1, self.depth))

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        self.last[layer] = [int(e) for e in selected]
        return self._known(upcoming(self.moe_layers, layer, self.depth))


class FrequencyPredictor(Predictor):
    """The k experts each layer chose most often so far (counts survive reset: a popularity table)."""

    name = "frequency"

    def __init__(self, cfg: ModelConfig, moe_layers: list[int], depth: int) -> None:
        self.k, self.moe_layers, self.depth = cfg.n_expert_used, moe_layers, depth
        self.counts = {l: np.zeros(cfg.n_expert, dtype=np.int64) for l in moe_layers}

    def _top(self, layers: list[int]) -> dict[int, list[int]]:
        out = {}
        for l in layers:
            c = self.counts[l]
            if c.any():  # no history yet: predict nothing
                out[l] = [int(e) for e in np.argsort(-c, kind="stable")[: self.k]]
        return out

    def begin_token(self, step: int) -> dict[int, list[int]]:
        return self._top(upcoming(self.moe_layers, -1, self.depth))

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        self.counts[layer][np.asarray(selected, dtype=np.int64)] += 1
        return self._top(upcoming(self.moe_layers, layer, self.depth))

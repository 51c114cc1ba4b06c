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


class LookaheadPredictor(Predictor):
    """Applies the next layers' routers to the current residual stream (Mixtral-offloading, HOBBIT).

    For each of the next `depth` MoE layers j: x = rms_norm(residual) * ffn_norm_j, then layer j's
    routing function on ffn_gate_inp_j . x (select_experts: the model's gating, selection bias and
    expert groups, as the trunk's router). Cheap (a few small mat-vecs in numpy), no extra model needed.
    """

    name = "lookahead"

    def __init__(self, cfg: ModelConfig, weights: GGUFTensors, moe_layers: list[int], depth: int) -> None:
        self.cfg, self.moe_layers, self.depth = cfg, moe_layers, depth
        def norm(l: int) -> str:  # gpt-oss names its FFN norm post_attention_norm
            name = tensor_name(T.FFN_NORM, l)
            return name if name in weights else tensor_name(T.ATTN_POST_NORM, l)

        self.norms = {l: _tensor_f32(weights, norm(l)).reshape(-1) for l in moe_layers}
        self.routers = {l: _tensor_f32(weights, tensor_name(T.FFN_GATE_INP, l)) for l in moe_layers}
        self.router_biases = {l: _tensor_f32(weights, tensor_name(T.FFN_GATE_INP, l, "bias")).reshape(-1)
                              for l in moe_layers if tensor_name(T.FFN_GATE_INP, l, "bias") in weights}
        self.biases = {l: _tensor_f32(weights, tensor_name(T.FFN_EXP_PROBS_B, l, "bias")).reshape(-1)
                       for l in moe_layers if tensor_name(T.FFN_EXP_PROBS_B, l, "bias") in weights}

    def route(self, layer: int, residual: np.ndarray) -> list[int]:
        """The experts layer `layer`'s router would pick for this residual stream (its FFN input)."""
        x = residual.astype(np.float64).reshape(-1)
        x = x / np.sqrt(np.mean(x * x) + self.cfg.rms_eps)
        logits = self.routers[layer] @ (x * self.norms[layer])
        if layer in self.router_biases:
            logits = logits + self.router_biases[layer]
        return select_experts(self.cfg, logits, self.biases.get(layer))

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        return {l: self.route(l, residual) for l in [l for l in self.moe_layers if l > layer][: self.depth]}


def select_experts(cfg: ModelConfig, logits: np.ndarray, bias: np.ndarray | None = None) -> list[int]:
    """The trunk router's selection (Trunk.router) in numpy for one token's router logits: softmax or
    sigmoid scores, plus the exp_probs_b selection bias, restricted to the best expert groups
    (each scored by its two best experts), top-k."""
    if cfg.gating == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    elif cfg.gating == "softmax_weight":  # gpt-oss: the softmax comes after the choice
        scores = logits
    else:
        e = np.exp(logits - logits.max())
        scores = e / e.sum()
    if bias is not None:
        scores = scores + bias
    if cfg.n_expert_groups > 1:
        groups = scores.reshape(cfg.n_expert_groups, -1)
        group_score = -np.sort(-groups, axis=1)[:, :2].sum(axis=1)
        keep = np.argsort(-group_score, kind="stable")[: cfg.n_group_used]
        masked = np.full_like(groups, -np.inf)
        masked[keep] = groups[keep]
        scores = masked.reshape(-1)
    return [int(e) for e in np.argsort(-scores, kind="stable")[: cfg.n_expert_used]]


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

"""Baseline predictors: reactive (none), random, and router look-ahead."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from edgemoe.errors import UserError
from edgemoe.model.config import ModelConfig
from edgemoe.model.weights import GGUFTensors
from edgemoe.predict.base import Predictor


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

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        upcoming = [l for l in self.moe_layers if l > layer][: self.depth]
        return {l: [int(e) for e in self.rng.choice(self.cfg.n_expert, self.cfg.n_expert_used, replace=False)] for l in upcoming}


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

    For each of the next `depth` MoE layers j: x = rms_norm(residual) * ffn_norm_j, top-k of
    ffn_gate_inp_j . x. Cheap (a few small mat-vecs in numpy), no extra model needed.
    """

    name = "lookahead"

    def __init__(self, cfg: ModelConfig, weights: GGUFTensors, moe_layers: list[int], depth: int) -> None:
        self.cfg, self.moe_layers, self.depth = cfg, moe_layers, depth
        self.norms = {l: _tensor_f32(weights, f"blk.{l}.ffn_norm.weight").reshape(-1) for l in moe_layers}
        self.routers = {l: _tensor_f32(weights, f"blk.{l}.ffn_gate_inp.weight") for l in moe_layers}

    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        x = residual.astype(np.float64).reshape(-1)
        x = x / np.sqrt(np.mean(x * x) + self.cfg.rms_eps)
        out = {}
        for l in [l for l in self.moe_layers if l > layer][: self.depth]:
            logits = self.routers[l] @ (x * self.norms[l])
            top = np.argsort(-logits, kind="stable")[: self.cfg.n_expert_used]
            out[l] = [int(e) for e in top]
        return out


PREDICTORS = ("reactive", "random", "lookahead")


def make_predictor(name: str, cfg: ModelConfig, weights: GGUFTensors, moe_layers: list[int], depth: int,
                   seed: int = 0) -> Predictor:
    if name == "reactive":
        return ReactivePredictor()
    if name == "random":
        return RandomPredictor(cfg, moe_layers, depth, seed)
    if name == "lookahead":
        return LookaheadPredictor(cfg, weights, moe_layers, depth)
    raise UserError(f"unknown predictor '{name}' (available: {', '.join(PREDICTORS)})")

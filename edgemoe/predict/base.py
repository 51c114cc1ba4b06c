"""The predictor interface, the layers a prediction covers (`upcoming`) and recall accounting (OD-MoE paper, eq. 2-3)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass

import numpy as np


def upcoming(moe_layers: list[int], current: int, depth: int) -> list[int]:
    """The next `depth` MoE layers after layer `current` (-1: before the token's first layer)."""
    return [l for l in moe_layers if l > current][:depth]


@dataclass
class PredictorOptions:
    """Settings of the shadow predictors (SEP, re-anchored); the baselines ignore them."""

    align_token: int = 1  # token alignment period in decode steps (paper's T_i); 0 = never
    align_kv: int = 1  # KV alignment period (paper's KV_j); 0 = never
    shadow_trunk: bool = False  # the shadow runs its own requantized trunk (shadow-trunk-TYPE.gguf)
    reanchor_depth: int = 1  # MoE layers re-run from the main model's true state after each layer
    shadow_threads: int = 1  # ggml threads of the shadow
    sync: bool = False  # wait for the shadow's routing instead of taking what is ready (recall benchmark)
    # the shadow's thread runs at a lowered CPU priority, so that it never delays the trunk next to it;
    # a shadow node, where the shadow is the only work, runs it at the usual priority
    yield_cpu: bool = True


class Predictor(ABC):
    """Called by the coordinator during decode, after each MoE layer's router has run.

    `after_router(layer, residual, selected)` returns {future_layer: [expert ids]}: the experts it
    expects the next layers of this token to pick. residual is the layer's FFN input (the
    residual stream, [n_embd] float32), selected the experts the router chose for it.
    """

    name = "base"
    # set by the cluster when no prediction can change a load (every expert resident somewhere):
    # a predictor working in the background may then skip its work
    idle: bool = False
    # a predictor that follows one sequence's tokens (a shadow model with its own KV cache) is not
    # asked during steps of several sequences at once
    follows_one_sequence: bool = False

    def reset(self) -> None:
        """A new sequence begins."""

    def begin_token(self, step: int) -> dict[int, list[int]]:
        """Predictions available before the token's first layer runs."""
        return {}

    @abstractmethod
    def after_router(self, layer: int, residual: np.ndarray, selected: np.ndarray) -> dict[int, list[int]]:
        ...

    def poll(self, current: int) -> dict[int, list[int]]:
        """Predictions for layers after `current` that became available since the last call
        (a predictor working in the background); asked while the coordinator waits for workers."""
        return {}

    def stats(self) -> dict:
        """Predictor-specific measurements (timings, counters) for reports."""
        return {}

    def close(self) -> None:
        """Stop background work and release what the predictor holds."""


class RecallMeter:
    """recall = correctly predicted experts / activated experts, per token and per layer distance."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.correct = 0
        self.activated = 0
        self.by_step: dict[int, list[int]] = defaultdict(lambda: [0, 0])

    def record(self, step: int, predicted: set[int] | None, actual: np.ndarray) -> None:
        hits = len(predicted & {int(e) for e in actual}) if predicted else 0
        self.correct += hits
        self.activated += len(actual)
        self.by_step[step][0] += hits
        self.by_step[step][1] += len(actual)

    @property
    def recall(self) -> float:
        return self.correct / self.activated if self.activated else 0.0

    def per_step(self) -> list[float]:
        return [c / a if a else 0.0 for _, (c, a) in sorted(self.by_step.items())]

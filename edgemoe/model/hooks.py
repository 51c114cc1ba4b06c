"""The one door through which what follows the engine sees its work: each step, and each router decision.

Predictors that follow the main model (the shadows, in process or on a node), the cluster's coordinator
(which drives its predictor and prefetches from it) and recorders (the recall benchmark) subclass
StepHooks and are registered on the engine (`Engine.hooks`; an expert backend that is a StepHooks is
registered by the engine itself). The engine calls, in order:

    on_step(engine, tokens)                     when a step of sequence 0 alone begins, before any layer
    on_router(layer, residual, selected, groups)  after each MoE layer's router, before its experts

on_router is heard where the engine runs one graph per MoE layer (experts outside its graph: a cluster,
just-in-time local experts, a recorder); the fused whole-model graph has no point between the layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgemoe.model.engine import Engine


class StepHooks:
    """Override what you need; both do nothing by default."""

    def on_step(self, engine: "Engine", tokens: np.ndarray) -> object:
        """A step of sequence 0 alone starts: tokens (int32 [n]) at positions engine.n_past.. (a prompt,
        or one decode token). Steps of several sequences at once are not announced: what follows one
        sequence (a shadow model with its own cache) cannot follow them."""

    def on_router(self, layer: int, residual: np.ndarray, selected: np.ndarray,
                  groups: list[tuple[int, int]] | None = None) -> None:
        """MoE layer `layer`'s router has chosen: residual is the layer's FFN input (the residual
        stream, float32 [T, n_embd]), selected int32 [T, k]; groups the rows of each sequence,
        (first row, rows), in a step of several (None: one sequence)."""

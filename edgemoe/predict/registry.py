"""Predictors by name: the spec grammar (NAME, shadow@T<i>KV<j>, reanchor@d<D>) and the one factory.

Apart from the predictors themselves so that neither baselines.py nor shadow.py imports the other.
"""

from __future__ import annotations

import dataclasses
import re

from edgemoe.errors import UserError
from edgemoe.model.config import ModelConfig
from edgemoe.model.weights import GGUFTensors
from edgemoe.predict.base import Predictor, PredictorOptions
from edgemoe.predict.baselines import (FrequencyPredictor, LookaheadPredictor, PreviousPredictor, RandomPredictor,
                                       ReactivePredictor)

PREDICTORS = ("reactive", "random", "lookahead", "previous", "frequency", "shadow", "reanchor")
_SHADOWS = ("shadow", "reanchor")


def parse_predictor(spec: str, options: PredictorOptions | None = None) -> tuple[str, PredictorOptions]:
    """NAME, or for shadow/reanchor NAME@T<i>KV<j> (alignment periods, the paper's notation) and
    reanchor@d<D> (re-anchor depth), e.g. shadow@T0KV0, reanchor@T1KV1@d2. Returns (name, options)."""
    base = options or PredictorOptions()
    name, *mods = spec.strip().split("@")
    if name not in PREDICTORS:
        raise UserError(f"unknown predictor '{spec}' (available: {', '.join(PREDICTORS)}; "
                        f"shadow and reanchor take @T<i>KV<j>, reanchor @d<D>)")
    changes: dict[str, int] = {}
    for mod in mods:
        m_align = re.fullmatch(r"[Tt](\d+)[Kk][Vv](\d+)", mod)
        m_depth = re.fullmatch(r"[dD](\d+)", mod)
        if m_align and name in _SHADOWS:
            changes.update(align_token=int(m_align[1]), align_kv=int(m_align[2]))
        elif m_depth and name == "reanchor" and int(m_depth[1]) >= 1:
            changes["reanchor_depth"] = int(m_depth[1])
        else:
            raise UserError(f"predictor '{spec}': '@{mod}' is not an option of {name} "
                            "(shadow/reanchor: @T<i>KV<j>; reanchor: @d<D>, D >= 1)")
    return name, dataclasses.replace(base, **changes)


def make_predictor(name: str, cfg: ModelConfig, weights: GGUFTensors, moe_layers: list[int], depth: int,
                   seed: int = 0, *, main=None, options: PredictorOptions | None = None) -> Predictor:
    """A predictor by name (or spec, see parse_predictor). The shadow predictors need `main`: the
    engine they follow (its model directory, trunk, KV cache and eval listeners)."""
    name, opts = parse_predictor(name, options)
    if name == "reactive":
        return ReactivePredictor()
    if name == "random":
        return RandomPredictor(cfg, moe_layers, depth, seed)
    if name == "lookahead":
        return LookaheadPredictor(cfg, weights, moe_layers, depth)
    if name == "previous":
        return PreviousPredictor(moe_layers, depth)
    if name == "frequency":
        return FrequencyPredictor(cfg, moe_layers, depth)
    if main is None:
        raise ValueError(f"the {name} predictor needs the main engine (main=...)")
    # imported here: the shadow pulls in the whole engine, which the cheap predictors never need
    from edgemoe.predict.shadow import ReanchorPredictor, ShadowPredictor

    cls = ShadowPredictor if name == "shadow" else ReanchorPredictor
    return cls(main, depth, opts)


__all__ = ["PREDICTORS", "make_predictor", "parse_predictor"]

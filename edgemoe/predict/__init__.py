"""Expert predictors: guess which experts coming layers will route to, so workers load them early.

A prediction only changes which experts are loaded ahead of time; the trunk's own router always
decides, so a wrong prediction costs time, never correctness.
"""

from edgemoe.predict.base import Predictor, PredictorOptions, RecallMeter
from edgemoe.predict.baselines import (
    FrequencyPredictor,
    LookaheadPredictor,
    PreviousPredictor,
    RandomPredictor,
    ReactivePredictor,
)
from edgemoe.predict.registry import PREDICTORS, make_predictor, parse_predictor

__all__ = ["Predictor", "PredictorOptions", "RecallMeter", "LookaheadPredictor", "RandomPredictor", "ReactivePredictor",
           "PreviousPredictor", "FrequencyPredictor", "make_predictor", "parse_predictor", "PREDICTORS"]

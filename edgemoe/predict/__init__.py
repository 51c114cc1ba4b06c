"""Expert predictors: guess which experts coming layers will route to, so workers load them early.

A prediction only changes which experts are loaded ahead of time; the trunk's own router always
decides, so a wrong prediction costs time, never correctness.
"""

from edgemoe.predict.base import Predictor, RecallMeter
from edgemoe.predict.baselines import LookaheadPredictor, RandomPredictor, ReactivePredictor, make_predictor, PREDICTORS

__all__ = ["Predictor", "RecallMeter", "LookaheadPredictor", "RandomPredictor", "ReactivePredictor", "make_predictor", "PREDICTORS"]

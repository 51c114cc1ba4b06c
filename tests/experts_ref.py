"""One routed expert computed in this process, for comparing a worker's results bit for bit.

(Through LocalExperts.compute_layer: the `compute` method of LocalExperts is shadowed by its
Compute attribute of the same name in edgemoe/model/experts.py at the time of writing.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemoe.ggml import Compute
from edgemoe.model.experts import LocalExperts


class ExpertsReference:
    def __init__(self, model_dir: Path, threads: int = 1) -> None:
        self.local = LocalExperts(model_dir, Compute(threads))

    def compute(self, layer: int, expert: int, x: np.ndarray) -> np.ndarray:
        return self.local.compute_layer(layer, x, np.full((x.shape[0], 1), expert, dtype=np.int32))[:, 0]

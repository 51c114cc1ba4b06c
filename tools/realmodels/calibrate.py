"""Calibration activations: the FFN inputs llama.cpp computes for the dense model on calibration text.

For every layer, ``ffn_norm-<il>`` (the RMS-normalised residual times ffn_norm.weight, i.e. exactly
what the FFN, and a MoE router, receives) is copied out of llama.cpp's graph through cb_eval, for
every token of every calibration chunk. The graph is aborted once the last layer's FFN input is in
hand (the output head is not needed). Per-neuron contributions are then computed in numpy from the
dequantized weights (see moefy.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .llama import LlamaRunner


def ffn_inputs(model_path: Path, chunks: list[list[int]], n_threads: int = 2, log=None) -> list[np.ndarray]:
    """[T, n_embd] float32 FFN inputs per layer (T = all tokens of all chunks, in order)."""
    t0 = time.perf_counter()
    with LlamaRunner(model_path, n_threads=n_threads, capture=("ffn_norm",), stop_when_captured=True) as r:
        per_layer: list[list[np.ndarray]] = [[] for _ in range(r.n_layer)]
        for i, chunk in enumerate(chunks):
            r.run(chunk)
            for il in range(r.n_layer):
                per_layer[il].append(r.captured[("ffn_norm", il)])
            if log is not None and (i + 1) % 8 == 0:
                log(f"  text read: {i + 1}/{len(chunks)} chunks, {time.perf_counter() - t0:.0f} s")
    return [np.concatenate(a) for a in per_layer]


__all__ = ["ffn_inputs"]

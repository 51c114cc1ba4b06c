"""sparse-moe: SmolLM2 MoEfied into E = 16 disjoint experts, top-k = 12 (research/moefication.md).

Per layer (moefy.fit_layer): co-activation clusters of the 1536 neurons -> 16 experts of 96;
least-squares router; down matrices refit for top-k execution. Weight compensation for llama.cpp's
renormalised top-k: the router is scaled so that its logits have a standard deviation of
ROUTER_STD (softmax weights near uniform: 1/k within about 0.1% on average, a few % at
worst; the top-k choice is scale-free) and every
expert's down matrix is multiplied by k, so the layer computes sum over the selected experts with
weight ~1. k is therefore baked into the file.

Storage: gate/up experts are the dense Q4_1 rows, regrouped byte for byte (Q4_1 blocks run along
the 576-wide rows, so regrouping neurons needs no requantization); down matrices (blocks along the
neuron dimension: regrouping breaks them, and they are refitted anyway) are Q8_0 (96 = 3 x 32);
the router is F32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from edgemoe.format.schema import T, tensor_name

from .moefy import LayerFit
from .source import DenseModel, write_moe
from .write import TensorSpec

N_EXPERT = 16
N_USED = 12
ROUTER_STD = 1e-3
DOWN_TYPE = Q.Q8_0
REFIT_LAM = 0.2  # ridge strength of the down refit (relative to the Gram matrix's mean diagonal)


def scaled_router(fit: LayerFit, X: np.ndarray, std: float = ROUTER_STD) -> np.ndarray:
    """Router W [n_embd, E] rescaled so that the per-token standard deviation of its logits is,
    in RMS over the calibration tokens X, equal to std."""
    logits = X.astype(np.float64) @ fit.router.astype(np.float64)
    rms = float(np.sqrt(np.mean(np.var(logits, axis=1))))
    return (fit.router.astype(np.float64) * (std / rms)).astype(np.float32)


def layer_tensors(src: DenseModel, il: int, fit: LayerFit, router: np.ndarray, n_used: int) -> list[TensorSpec]:
    n_expert, width = fit.groups.shape
    n_embd = src.n_embd
    gate_q = src.raw(tensor_name(T.FFN_GATE, il))  # [n_ff, row bytes] Q4_1
    up_q = src.raw(tensor_name(T.FFN_UP, il))
    for t in (T.FFN_GATE, T.FFN_UP):
        if src.qtype(tensor_name(t, il)) in (Q.F32, Q.F16):
            raise ValueError(f"{src.path}: expected quantized FFN weights in layer {il}")
    gtype = src.qtype(tensor_name(T.FFN_GATE, il))
    utype = src.qtype(tensor_name(T.FFN_UP, il))

    def down() -> np.ndarray:
        d = np.stack([fit.down[:, g] for g in fit.groups]) * np.float32(n_used)  # [E, n_embd, width]
        return quantize(d.astype(np.float32), DOWN_TYPE)

    return [
        (tensor_name(T.FFN_GATE_INP, il), Q.F32, (n_expert, n_embd), np.ascontiguousarray(router.T)),
        (tensor_name(T.FFN_GATE_EXP, il), gtype, (n_expert, width, n_embd), lambda: np.ascontiguousarray(gate_q[fit.groups])),
        (tensor_name(T.FFN_UP_EXP, il), utype, (n_expert, width, n_embd), lambda: np.ascontiguousarray(up_q[fit.groups])),
        (tensor_name(T.FFN_DOWN_EXP, il), DOWN_TYPE, (n_expert, n_embd, width), down),
    ]


def write_sparse(src: DenseModel, fits: list[LayerFit], routers: list[np.ndarray], out_path: Path,
                 n_used: int = N_USED) -> Path:
    n_expert, width = fits[0].groups.shape
    return write_moe(src, out_path, n_expert, n_used, width,
                     lambda il: layer_tensors(src, il, fits[il], routers[il], n_used))


__all__ = ["DOWN_TYPE", "N_EXPERT", "N_USED", "REFIT_LAM", "ROUTER_STD", "scaled_router", "write_sparse"]

"""demo-moe: SmolLM2 sparse-upcycled to 8 identical experts, top-2, with a data-fitted router.

Every expert of a layer is a copy of the dense FFN, requantized to Q8_0 (the Q4_1 rows are
dequantized, then requantized with gguf-py, whose bytes are ggml's: row length 576 rules out
K-quants, and Q4_1 -> Q8_0 is nearly lossless). llama.cpp's llama architecture renormalises the
top-k weights to sum to 1, so the layer output is sum_j w_j * FFN(x) = FFN(x) whatever the
router picks: the model computes the dense model (with Q8_0 FFN weights).

The router is what makes it look like a real MoE. It is the least-squares router of the
MoEfication recipe, fitted as if the experts were the 8 co-activation clusters of the dense FFN
(moefy.fit_layer): logits = x W with x W ~ log ||output of cluster e|| - its mean over the
calibration tokens, i.e. "how much more than usual cluster e matters for this token". It is
token-dependent and follows the data; centring each cluster's target balances the load the way a
trained router's load-balancing loss does (the uncentred fit leaves experts that are never chosen
in some layers and one pair taking a third of the tokens), while the load stays unequal and many
decisions are near ties. Used on identical copies it changes nothing in the output and exercises
everything else: distribution, loading, prediction.

The shadow's importance matrix is the dense FFN's own: every copy of a layer computes the same FFN,
so the column importance of its weights is the mean square of what that FFN receives (gate/up: the
FFN input; down: silu(gate x) * (up x)) over all calibration tokens, whichever copies the router
picks. Taken from the calibration activations already in hand (no second llama.cpp pass), and equal
for the copies, so the converter quantizes each layer's shadow once (edgemoe.convert.requant).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from edgemoe.format.imatrix import Imatrix
from edgemoe.format.schema import T, expert_tensor_name, tensor_name

from .moefy import LayerFit
from .source import DenseModel, is_dense_ffn, write_moe
from .write import GGUFOut, TensorSpec

N_EXPERT = 8
N_USED = 2
EXPERT_TYPE = Q.Q8_0


def requantized_ffn(src: DenseModel, il: int, qtype: Q = EXPERT_TYPE) -> dict[str, np.ndarray]:
    """The layer's gate/up/down weights requantized to qtype: {part: bytes [rows, row bytes]}."""
    return {part: quantize(src.dequant(tensor_name(t, il)), qtype)
            for part, t in (("gate", T.FFN_GATE), ("up", T.FFN_UP), ("down", T.FFN_DOWN))}


def layer_tensors(src: DenseModel, il: int, fit: LayerFit, n_expert: int = N_EXPERT) -> list[TensorSpec]:
    """blk.il's router and stacked experts (n_expert copies of the requantized dense FFN)."""
    n_embd, n_ff = src.n_embd, src.n_ff
    router = np.ascontiguousarray(fit.router.T, dtype=np.float32)  # [E, n_embd] = ggml ne (n_embd, E)
    if router.shape != (n_expert, n_embd):
        raise ValueError(f"layer {il}: router shape {router.shape}")
    cache: dict[str, np.ndarray] = {}

    def stacked(part: str):
        def fn() -> np.ndarray:
            if not cache:
                cache.update(requantized_ffn(src, il))
            q = cache.pop(part)
            return np.ascontiguousarray(np.broadcast_to(q, (n_expert, *q.shape)))

        return fn

    return [
        (tensor_name(T.FFN_GATE_INP, il), Q.F32, (n_expert, n_embd), router),
        (tensor_name(T.FFN_GATE_EXP, il), EXPERT_TYPE, (n_expert, n_ff, n_embd), stacked("gate")),
        (tensor_name(T.FFN_UP_EXP, il), EXPERT_TYPE, (n_expert, n_ff, n_embd), stacked("up")),
        (tensor_name(T.FFN_DOWN_EXP, il), EXPERT_TYPE, (n_expert, n_embd, n_ff), stacked("down")),
    ]


def dense_importance(X: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of squares per input column over the tokens: (of the FFN inputs X [T, n_embd], of the
    hidden activations H [T, n_ff]), float64."""
    return np.square(X, dtype=np.float64).sum(axis=0), np.square(H, dtype=np.float64).sum(axis=0)


def demo_imatrix(sums: list[tuple[np.ndarray, np.ndarray]], n_tokens: int, chunk_count: int, chunk_size: int,
                 n_expert: int = N_EXPERT) -> Imatrix:
    """demo-moe's importance matrix from each layer's dense_importance over n_tokens tokens: every
    copy of a layer gets the same sums and count (see the module docstring)."""
    im = Imatrix(datasets=["stdlib calibration modules (the dense FFN's inputs, llama.cpp)"],
                 chunk_count=chunk_count, chunk_size=chunk_size)
    for il, (sx, sh) in enumerate(sums):
        counts = np.full(n_expert, n_tokens, dtype=np.float32)
        for part, s in (("gate", sx), ("up", sx), ("down", sh)):
            im.add(expert_tensor_name(il, part), np.tile(s.astype(np.float32), (n_expert, 1)), counts)
    return im


def write_demo(src: DenseModel, fits: list[LayerFit], out_path: Path,
               n_expert: int = N_EXPERT, n_used: int = N_USED) -> Path:
    """Write demo-moe: expert width = the dense FFN width (llama.feed_forward_length unchanged)."""
    return write_moe(src, out_path, n_expert, n_used, src.n_ff, lambda il: layer_tensors(src, il, fits[il], n_expert))


def write_dense_requantized(src: DenseModel, out_path: Path, qtype: Q = EXPERT_TYPE) -> Path:
    """The dense model with its FFN weights requantized like demo-moe's experts: the reference
    demo-moe must equal (up to float rounding), and the measure of requantization noise."""
    out = GGUFOut(out_path, src.metadata)
    for name in src.tensor_names():
        if is_dense_ffn(name):
            out.add(name, quantize(src.dequant(name), qtype), qtype, src.shape(name))
        else:
            out.add(name, src.raw(name), src.qtype(name))
    return out.write()


__all__ = ["EXPERT_TYPE", "N_EXPERT", "N_USED", "demo_imatrix", "dense_importance", "layer_tensors", "requantized_ffn", "write_demo", "write_dense_requantized"]

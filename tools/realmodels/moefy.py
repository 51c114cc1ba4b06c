"""MoEfication of one dense SwiGLU FFN layer (numpy, float32/float64, deterministic).

The recipe of research/moefication.md, per layer, from the FFN inputs X (the ``ffn_norm``
output llama.cpp computed on calibration text):

1. per-neuron contributions  c_i(t) = |silu(g_i . x_t) (u_i . x_t)| * ||down[:, i]||;
2. co-activation clustering: balanced spherical k-means of the neurons' L2-normalised
   contribution profiles over tokens -> E equal groups of neurons (the experts);
3. least-squares router: ridge regression from x_t to the log of every expert's output norm
   log ||down_e h_e(t)|| (the note regresses the norm itself; the log picks better experts);
   linear, so it is exactly a llama.cpp ``ffn_gate_inp`` matrix;
4. (sparse models) down refit: the experts' down matrices re-fitted jointly by ridge
   regression so that the sum of the k *selected* experts reproduces the dense output on
   the calibration tokens (see ``refit_down``), a least-squares weight compensation.

All randomness comes from ``numpy.random.default_rng`` seeded by (layer, E); ties are broken by
stable sorts, so the same inputs give the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .source import DenseFFN


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def hidden(X: np.ndarray, ffn: DenseFFN) -> np.ndarray:
    """h(t) = silu(gate x_t) * (up x_t): [T, n_ff] float32."""
    return (silu(X @ ffn.gate.T) * (X @ ffn.up.T)).astype(np.float32)


def contributions(H: np.ndarray, ffn: DenseFFN) -> np.ndarray:
    """|h_i(t)| * ||down[:, i]||: how much neuron i adds to token t's output, [T, n_ff]."""
    return np.abs(H) * np.linalg.norm(ffn.down, axis=0)[None, :]


def balanced_assign(sim: np.ndarray, n_groups: int) -> np.ndarray:
    """Each row (neuron) to one column (group), every group exactly n/n_groups rows: greedy on
    the similarity, best pairs first (stable order breaks ties)."""
    n = sim.shape[0]
    cap = n // n_groups
    order = np.argsort(-sim.ravel(), kind="stable")
    label = np.full(n, -1, dtype=np.int64)
    fill = np.zeros(n_groups, dtype=np.int64)
    rows, cols = np.divmod(order, n_groups)
    left = n
    for r, c in zip(rows.tolist(), cols.tolist()):
        if label[r] < 0 and fill[c] < cap:
            label[r] = c
            fill[c] += 1
            left -= 1
            if not left:
                break
    return label


def coactivation_clusters(C: np.ndarray, n_groups: int, seed: int, iters: int = 25) -> np.ndarray:
    """Balanced spherical k-means of the columns of C ([T, n]) into n_groups equal groups.

    Returns neuron indices [n_groups, n/n_groups], each group sorted ascending, groups ordered
    by their smallest neuron (a canonical order, independent of the k-means labels).
    """
    T, n = C.shape
    if n % n_groups:
        raise ValueError(f"{n} neurons do not split into {n_groups} equal groups")
    P = C / np.maximum(np.linalg.norm(C, axis=0, keepdims=True), 1e-12)  # [T, n]
    P = P.astype(np.float32)
    rng = np.random.default_rng(seed)
    cent = P[:, np.sort(rng.choice(n, n_groups, replace=False))]  # [T, G]
    label = None
    for _ in range(iters):
        sim = P.T @ cent  # [n, G]
        new = balanced_assign(sim, n_groups)
        if label is not None and np.array_equal(new, label):
            break
        label = new
        onehot = np.zeros((n, n_groups), dtype=np.float32)
        onehot[np.arange(n), label] = 1.0
        cent = P @ onehot  # [T, G]: sum of each group's profiles
        cent /= np.maximum(np.linalg.norm(cent, axis=0, keepdims=True), 1e-12)
    groups = [np.flatnonzero(label == g) for g in range(n_groups)]
    groups.sort(key=lambda g: int(g[0]))
    return np.stack(groups)


def expert_outputs(H: np.ndarray, down: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """y_e(t) = down[:, group e] h_e(t): [E, T, n_embd] float32."""
    return np.stack([H[:, g] @ down[:, g].T for g in groups]).astype(np.float32)


def expert_norms(H: np.ndarray, down: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """||y_e(t)|| for every expert: [T, E] (via the expert's 96x96-ish Gram matrix, without
    materialising the outputs: ||D_e h||^2 = h^T (D_e^T D_e) h)."""
    out = np.empty((H.shape[0], len(groups)), dtype=np.float32)
    for e, g in enumerate(groups):
        He = H[:, g]
        De = down[:, g]
        out[:, e] = np.sqrt(np.maximum(np.einsum("ti,ti->t", He @ (De.T @ De), He), 0.0))
    return out


def ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    """argmin_W ||X W - Y||^2 + lam * tr(X^T X)/d * ||W||^2 (float64 normal equations)."""
    X64 = X.astype(np.float64)
    A = X64.T @ X64
    A[np.diag_indices_from(A)] += lam * np.trace(A) / A.shape[0]
    return np.linalg.solve(A, X64.T @ Y.astype(np.float64))


def fit_router(X: np.ndarray, target: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    """Least-squares router: W [n_embd, E] with X W ~ target [T, E]."""
    return ridge(X, target, lam).astype(np.float32)


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, largest first (stable: lower index wins ties)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def selection_mask(sel: np.ndarray, n_experts: int) -> np.ndarray:
    m = np.zeros((sel.shape[0], n_experts), dtype=bool)
    np.put_along_axis(m, sel, True, axis=1)
    return m


def refit_down(H: np.ndarray, Y: np.ndarray, down: np.ndarray, groups: np.ndarray, mask: np.ndarray,
               lam: float = 1e-2) -> np.ndarray:
    """Down matrix [n_embd, n_ff] re-fitted for top-k execution.

    Minimises  sum_t ||sum_{e selected at t} down_e h_e(t) - y(t)||^2 + lam' ||down' - down||^2
    over all experts' down columns at once: a ridge regression on the hidden activations with
    the unselected experts' neurons zeroed (mask [T, E]), pulled towards the dense down matrix
    (lam' = lam * mean diagonal of the Gram matrix).
    """
    n_ff = H.shape[1]
    neuron_expert = np.empty(n_ff, dtype=np.int64)
    for e, g in enumerate(groups):
        neuron_expert[g] = e
    Hm = (H * mask[:, neuron_expert]).astype(np.float32)
    A = (Hm.T @ Hm).astype(np.float64)
    reg = lam * np.trace(A) / n_ff
    A[np.diag_indices_from(A)] += reg
    B = (Hm.T @ Y).astype(np.float64) + reg * down.T.astype(np.float64)
    return np.linalg.solve(A, B).T.astype(np.float32)


def router_target(norms: np.ndarray) -> np.ndarray:
    """What the router regresses: log of each expert's output norm (a little better than the
    norm itself at picking the experts that matter; softmax(log n) is proportional to n)."""
    return np.log(norms.astype(np.float64) + 1e-3)


@dataclass
class LayerFit:
    """One layer's MoE: neuron groups [E, n_ff/E], router W [n_embd, E] (logits = x W), down
    [n_embd, n_ff] (the dense one, or refitted for top-k execution)."""

    groups: np.ndarray
    router: np.ndarray
    down: np.ndarray


def fit_layer(X: np.ndarray, ffn: DenseFFN, n_expert: int, n_used: int | None, seed,
              refit_lam: float | None = None, router_lam: float = 0.1, H: np.ndarray | None = None,
              relative: bool = False) -> LayerFit:
    """Cluster one layer's neurons into n_expert co-activation groups and fit their router.

    X: FFN inputs [T, n_embd]; seed: k-means seed (anything numpy.random.default_rng takes);
    refit_lam: also refit the down matrix for top-n_used execution (None: keep the dense one);
    H: hidden(X, ffn) if already computed; relative: regress each expert's log output norm minus
    its mean over the calibration tokens ("matters more than usual for this token"), which
    balances the load (no expert is always or never chosen) at some cost in picking the experts
    with the largest outputs.
    """
    if H is None:
        H = hidden(X, ffn)
    groups = coactivation_clusters(contributions(H, ffn), n_expert, seed)
    norms = expert_norms(H, ffn.down, groups)  # [T, E]
    target = router_target(norms)
    if relative:
        target = target - target.mean(axis=0)
    W = fit_router(X, target, router_lam)
    down = ffn.down
    if refit_lam is not None:
        if n_used is None:
            raise ValueError("refit needs n_used")
        mask = selection_mask(topk(X @ W, n_used), n_expert)
        down = refit_down(H, H @ ffn.down.T, ffn.down, groups, mask, refit_lam)
    return LayerFit(groups, W, down)


__all__ = [
    "LayerFit",
    "balanced_assign",
    "coactivation_clusters",
    "contributions",
    "expert_norms",
    "expert_outputs",
    "fit_layer",
    "fit_router",
    "hidden",
    "refit_down",
    "ridge",
    "router_target",
    "selection_mask",
    "silu",
    "topk",
]

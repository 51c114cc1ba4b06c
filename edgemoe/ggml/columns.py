"""Which ggml CPU kernels depend on how many activation rows a product has, and how to split a batch
of several sequences' rows so that each sequence gets exactly the kernels it gets alone.

ggml picks a kernel by the number of columns (token rows) of a matrix product, and different kernels
sum in different orders, so a row's result can change in its last bits with the company it keeps.
Measured with the pinned ggml on this CPU (tests/test_batch.py re-measures every entry it can):

- ggml_mul_mat: F32 and F16 weights: one column takes the mat-vec (ggml_vec_dot_*), two or more
  llamafile's tinyBLAS sgemm. K-quants (Q2_K..Q6_K): up to 7 columns every column equals its own
  mat-vec, from 8 on another kernel. Q4_1 and Q8_0: the same vec_dot for any number.
- ggml_mul_mat_id (routed experts): per expert, K-quants as above (7 rows); F32, Q4_1, Q8_0: any.
- Attention without flash attention: K*Q of an F16 cache is a mat-vec for one row, tinyBLAS for
  more (an F32 cache's stays a vec_dot, its activations need no conversion); the engine computes it
  per sequence. Flash attention treats every row on its own and skips masked cells: no limit.
- Types not measured, and repacked weights (CPU_REPACK: gemv per row, gemm per 4 rows), count as 1.

A limit L means: a product whose rows number at most L gives every row its mat-vec result.
"""

from __future__ import annotations

from edgemoe.ggml.lib import GGMLType

ANY = 1 << 30  # no limit: the kernel does not depend on the number of rows
_K_QUANTS = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)

MUL_MAT: dict[int, int] = {int(GGMLType.Q4_1): ANY, int(GGMLType.Q8_0): ANY, **{int(t): 7 for t in _K_QUANTS}}
MUL_MAT_ID: dict[int, int] = {int(GGMLType.F32): ANY, int(GGMLType.Q4_1): ANY, int(GGMLType.Q8_0): ANY,
                              **{int(t): 7 for t in _K_QUANTS}}


def mul_mat_limit(ggml_type: int, repacked: bool = False) -> int:
    """Rows a weight product of this type may have with every row as its own mat-vec."""
    return 1 if repacked else MUL_MAT.get(int(ggml_type), 1)


def mul_mat_id_limit(types: list[int], repacked: bool = False) -> int:
    """The same for routed experts whose parts have these types (rows routed to one expert)."""
    return 1 if repacked else min(MUL_MAT_ID.get(int(t), 1) for t in types)


def row_chunks(groups: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Split a batch's rows (groups: (first row, rows) of each sequence, in order) into runs of
    consecutive rows, one product each: a sequence with more rows than limit is a run of its own
    (exactly its rows, as alone); the others are packed into runs of at most limit rows."""
    chunks: list[list[int]] = []
    for lo, n in groups:
        if chunks and n <= limit and chunks[-1][1] <= limit - n and chunks[-1][0] + chunks[-1][1] == lo:
            chunks[-1][1] += n
        else:
            chunks.append([lo, n])
    return [(lo, n) for lo, n in chunks]


__all__ = ["ANY", "MUL_MAT", "MUL_MAT_ID", "mul_mat_id_limit", "mul_mat_limit", "row_chunks"]

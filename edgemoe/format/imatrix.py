"""Importance matrices in llama.cpp's imatrix GGUF layout (what `llama-imatrix` writes).

For a weight tensor `NAME` applied to activations x (one matrix, or one per expert for the stacked
`blk.L.ffn_*_exps.weight` tensors):

    NAME.in_sum2   F32, ne = [n_per_row, n_mat]   sum over the rows it saw of x*x, per input column
    NAME.counts    F32, ne = [1, n_mat]           how many rows each matrix (expert) saw

plus `general.type = "imatrix"`, `imatrix.datasets` (names of the texts), `imatrix.chunk_count`
and `imatrix.chunk_size`. A quantizer weighs each column's rounding error by in_sum2 / counts, so
the columns that carry the most signal come out most precisely. Files written here load in
llama.cpp's `llama-quantize --imatrix`, and llama.cpp's own files load here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from edgemoe.errors import UserError
from edgemoe.format.gguf_io import get_int, get_str, open_gguf, tensor_ne
from edgemoe.util.files import atomic_path

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
GENERAL_TYPE = "imatrix"


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> float32 [n_mat, n_per_row]
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> float32 [n_mat]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def add(self, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
        """Accumulate sums [n_mat, n_per_row] and counts [n_mat] into the entry of weight `name`."""
        if name not in self.sums:
            self.sums[name] = np.zeros(sums.shape, np.float32)
            self.counts[name] = np.zeros(counts.shape, np.float32)
        self.sums[name] += sums
        self.counts[name] += counts

    def weights(self, name: str, mat: int) -> np.ndarray | None:
        """Mean squared activation per column of matrix `mat` of `name` (None: it saw no rows)."""
        n = float(self.counts[name][mat])
        if n <= 0:
            return None
        return np.ascontiguousarray(self.sums[name][mat] / n, dtype=np.float32)


def write_imatrix(path: str | os.PathLike[str], im: Imatrix, arch: str) -> None:
    """Write im as llama.cpp's imatrix GGUF; the file appears only once complete."""
    with atomic_path(path) as tmp:
        w = GGUFWriter(tmp, arch)
        w.add_string("general.type", GENERAL_TYPE)
        w.add_array("imatrix.datasets", list(im.datasets))
        w.add_uint32("imatrix.chunk_count", im.chunk_count)
        w.add_uint32("imatrix.chunk_size", im.chunk_size)
        for name in sorted(im.sums):
            w.add_tensor(name + SUMS_SUFFIX, np.ascontiguousarray(im.sums[name], dtype=np.float32))
            w.add_tensor(name + COUNTS_SUFFIX, np.ascontiguousarray(im.counts[name], dtype=np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an imatrix GGUF; UserError when it is not one or an entry is malformed."""
    p = Path(path)
    reader = open_gguf(p)
    kind = get_str(reader, "general.type")
    if kind != GENERAL_TYPE:
        raise UserError(f"{p}: not an importance matrix (general.type is {kind!r}, expected 'imatrix'); "
                        "make one with `edgemoe imatrix` or llama.cpp's llama-imatrix")
    im = Imatrix(chunk_count=get_int(reader, "imatrix.chunk_count") or 0,
                 chunk_size=get_int(reader, "imatrix.chunk_size") or 0)
    field_ = reader.get_field("imatrix.datasets")
    if field_ is not None:
        im.datasets = [str(x) for x in field_.contents()]
    tensors = {t.name: t for t in reader.tensors}
    for tname, t in tensors.items():
        if not tname.endswith(SUMS_SUFFIX):
            continue
        name = tname[: -len(SUMS_SUFFIX)]
        c = tensors.get(name + COUNTS_SUFFIX)
        ne = tensor_ne(t)
        if c is None:
            raise UserError(f"{p}: {tname} has no {name + COUNTS_SUFFIX}")
        n_mat = ne[1] if len(ne) > 1 else 1
        counts = np.asarray(c.data, dtype=np.float32).reshape(-1)
        if counts.size != n_mat:
            raise UserError(f"{p}: {name + COUNTS_SUFFIX} has {counts.size} values, {tname} has {n_mat} matrices")
        im.sums[name] = np.asarray(t.data, dtype=np.float32).reshape(n_mat, ne[0]).copy()
        im.counts[name] = counts.copy()
    if not im.sums:
        raise UserError(f"{p}: the importance matrix has no entries")
    return im


__all__ = ["Imatrix", "read_imatrix", "write_imatrix"]

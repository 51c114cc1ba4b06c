"""Reading GGUF files with gguf-py, turning every way a file can be bad into a UserError."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.gguf_reader import ReaderField, ReaderTensor

from edgemoe.errors import UserError

GGUF_MAGIC = b"GGUF"
# Keys the reader synthesises or the writer sets itself; never copied between files.
_VIRTUAL_KEYS = ("GGUF.",)


class _Reader(GGUFReader):
    """gguf-py's reader, slicing a plain ndarray view of the memory map while it parses.

    np.memmap's per-slice subclass bookkeeping makes parsing a 49k-token vocabulary take ~1.6 s;
    on a plain view of the same mapping it takes a fraction of that, with identical results.
    """

    def _plain_view(self) -> np.ndarray:
        """The memory map as a plain ndarray (made once per map)."""
        plain = self.__dict__.get("_plain")
        if plain is None or plain.base is not self.data:
            plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
        return plain

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        plain = self._plain_view()
        count = int(count)
        dt = np.dtype(dtype)
        arr = plain[offset : offset + dt.itemsize * count].view(dtype=dt)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


class UnreadArray:
    """A metadata array of strings whose contents were not parsed (see open_gguf's skim): only its length.

    A tokenizer's vocabulary and merges (~100k strings) cost gguf-py ~80 MiB of Python objects to parse;
    nothing that runs a model needs them (llama.cpp reads the tokenizer itself)."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        raise TypeError(f"metadata {self.name}: its {self.n} strings were not read (open the file without skim)")

    def __repr__(self) -> str:
        return f"<{self.n} strings, not read>"


_SKIM_MIN = 256  # string arrays at least this long are skimmed (per-layer arrays and tags stay read)


class _SkimReader(_Reader):
    """_Reader that reads numeric arrays as one view each and skips over long string arrays.

    gguf-py makes one or two numpy views per array element; for a 49k-token vocabulary that is the
    largest part of a small model's coordinator memory. Long string arrays keep their type and length
    (metadata() returns an UnreadArray); every other value is what _Reader gives."""

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order == "S":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, n, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            values = self._get(offs, nptype, n)
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]
        if itype != GGUFValueType.STRING or n < _SKIM_MIN:
            return super()._get_field_parts(orig_offs, raw_type)
        buf = memoryview(self._plain_view())
        end = offs
        for _ in range(n):  # each string: a u64 length, then its bytes
            end += 8 + int.from_bytes(buf[end:end + 8], "little")
        span = self._get(offs, np.uint8, end - offs)
        return end - orig_offs, [raw_itype, alen, span], [], [GGUFValueType.ARRAY, GGUFValueType.STRING]


def open_gguf(path: str | os.PathLike[str], *, skim: bool = False) -> GGUFReader:
    """Open and fully validate a GGUF file (header, metadata, every tensor inside the file).

    skim: do not parse the contents of long string arrays (a tokenizer's vocabulary): for readers that
    run the model and never need them; metadata() gives their length only."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file")
    if not p.is_file():
        raise UserError(f"{p}: not a regular file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{p}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = (_SkimReader if skim else _Reader)(p, "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
        raise UserError(f"{p}: damaged or truncated GGUF file ({type(e).__name__}: {e})") from None
    size = p.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise UserError(f"{p}: truncated GGUF file: tensor {t.name} ends at byte {end}, file has {size}")
    return reader


def field_value(field: ReaderField) -> Any:
    """The Python value of a metadata field (str, int, float, bool or a list of them; an UnreadArray
    for a string array a skimming reader skipped)."""
    if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.types) > 2:
        raise UserError(f"metadata key {field.name}: nested arrays are not supported")
    if field.types[:1] == [GGUFValueType.ARRAY] and field.types[-1] == GGUFValueType.STRING and not field.data:
        n = int(field.parts[-2][0])
        if n:
            return UnreadArray(field.name, n)
    return field.contents()


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every real metadata key of a file with its value."""
    return {name: field_value(f) for name, f in reader.fields.items() if not name.startswith(_VIRTUAL_KEYS)}


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, skip: tuple[str, ...] = ()) -> None:
    """Copy every metadata key (but those in skip), with its exact GGUF type, from reader to writer."""
    for name, field in reader.fields.items():
        if name.startswith(_VIRTUAL_KEYS) or name in skip:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field_value(field), vtype, sub_type=sub_type)
        if name == "general.alignment":
            writer.data_alignment = int(field_value(field))


def get_int(reader: GGUFReader, key: str) -> int | None:
    field = reader.get_field(key)
    return None if field is None else int(field_value(field))


def get_str(reader: GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else str(field_value(field))


def tensor_bytes(reader: GGUFReader, tensor: ReaderTensor) -> np.ndarray:
    """The tensor's raw bytes, a view into the file's memory map (no copy)."""
    start = int(tensor.data_offset)
    return reader.data[start : start + int(tensor.n_bytes)]


def tensor_ne(tensor: ReaderTensor) -> tuple[int, ...]:
    """ggml's ne (fastest-varying dimension first)."""
    return tuple(int(x) for x in tensor.shape)

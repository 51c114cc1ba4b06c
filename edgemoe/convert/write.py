"""Write a planned conversion into a temporary directory and move it into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from tqdm import tqdm

from edgemoe.errors import UserError
from edgemoe.format import keys
from edgemoe.format.arch import has_shared_expert
from edgemoe.format.gguf_io import copy_metadata, tensor_bytes, tensor_ne
from edgemoe.format.manifest import (
    EXPERTS_DIR,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TRUNK_NAME,
    FileEntry,
    Manifest,
    expert_file_name,
    sha256_file,
    shadow_file_name,
    shadow_trunk_file_name,
)
from edgemoe.convert import requant
from edgemoe.convert.plan import ConversionPlan, requantize_in_trunk

ROLE_SHADOW, ROLE_SHADOW_TRUNK, SHADOW_TYPE_KEY = keys.ROLE_SHADOW, keys.ROLE_SHADOW_TRUNK, keys.SHADOW_TYPE

# Room for GGUF headers and padding on top of the tensor bytes when checking free space.
_HEADER_SLACK = 64 << 10


def write_model(plan: ConversionPlan, out_dir: str | os.PathLike[str], *, force: bool = False, progress: bool = True) -> Manifest:
    """Convert plan.src into out_dir. Nothing appears at out_dir unless every file was written."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    parent = out.resolve().parent
    created = _make_parents(parent)
    try:
        needed = plan.total_nbytes() + _HEADER_SLACK * (1 + len(plan.files()))
        free = shutil.disk_usage(parent).free
        if free < needed:
            raise UserError(f"{parent}: not enough disk space: the model needs {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the model is meant to be shared
        try:
            manifest = _write_all(plan, tmp, progress)
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        for d in reversed(created):
            d.rmdir()
        raise
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parents(parent: Path) -> list[Path]:
    """mkdir -p, remembering what was created so a failed run can remove it."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        d.mkdir()
        created.append(d)
    return created


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
    os.rename(out, old / "model")
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_all(plan: ConversionPlan, root: Path, progress: bool) -> Manifest:
    total = plan.src.stat().st_size + 2 * plan.total_nbytes()  # hash the source, write, hash the output
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress, leave=False) as bar:
        source_sha = sha256_file(plan.src, bar.update)
        files: dict[str, FileEntry] = {}

        def record(rel: str) -> None:
            path = root / rel
            files[rel] = FileEntry(path.stat().st_size, sha256_file(path, bar.update))

        _write_trunk(plan, root / TRUNK_NAME, source_sha, bar)
        record(TRUNK_NAME)
        (root / EXPERTS_DIR).mkdir()
        for layer in plan.moe_layers:
            for e in range(plan.n_experts):
                rel = expert_file_name(layer, e)
                _write_expert(plan, root / rel, layer, e, source_sha, bar)
                record(rel)
        shadow = None
        if plan.shadow_type is not None:
            name = requant.type_name(plan.shadow_type)
            shadow = {"type": name, "file": shadow_file_name(name), "trunk_type": None, "trunk_file": None}
            if plan.shadow_fallback_used:
                shadow["fallback_type"] = requant.type_name(plan.shadow_fallback_type)
            if plan.shadow_imatrix_sha256:
                shadow["imatrix_sha256"] = plan.shadow_imatrix_sha256
            _write_shadow(plan, root / shadow["file"], source_sha, bar)
            record(shadow["file"])
        if plan.shadow_trunk_type is not None:
            assert shadow is not None
            name = requant.type_name(plan.shadow_trunk_type)
            shadow.update(trunk_type=name, trunk_file=shadow_trunk_file_name(name))
            _write_shadow_trunk(plan, root / shadow["trunk_file"], source_sha, bar)
            record(shadow["trunk_file"])

    manifest = Manifest(
        name=plan.name,
        architecture=plan.arch.name,
        source_file=plan.src.name,
        source_sha256=source_sha,
        source_size=plan.src.stat().st_size,
        n_layers=plan.n_layers,
        n_experts=plan.n_experts,
        n_experts_used=plan.n_experts_used,
        moe_layers=plan.moe_layers,
        expert_tensors=plan.expert_parts,
        shared_expert=has_shared_expert(t.name for t in plan.trunk_tensors),
        files=files,
        shadow=shadow,
    )
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def _add_raw_tensor(writer: GGUFWriter, name: str, data: np.ndarray, ne: tuple[int, ...], ggml_type: int) -> None:
    """Add bytes as a tensor of ggml type ggml_type and shape ne, without converting them."""
    rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
    byte_shape = (*reversed(ne[1:]), data.nbytes // rows)
    writer.add_tensor(name, data.reshape(byte_shape), raw_dtype=ggml_type)


def _finish(writer: GGUFWriter, bar: tqdm, nbytes: int) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    bar.update(nbytes)


def _common_keys(writer: GGUFWriter, plan: ConversionPlan, role: str, source_sha: str) -> None:
    writer.add_uint32(keys.FORMAT_VERSION, FORMAT_VERSION)
    writer.add_string(keys.ROLE, role)
    writer.add_string(keys.SOURCE_SHA256, source_sha)
    writer.add_uint32(keys.N_LAYERS, plan.n_layers)
    writer.add_uint32(keys.N_EXPERTS, plan.n_experts)
    writer.add_uint32(keys.N_EXPERTS_USED, plan.n_experts_used)


def _write_trunk(plan: ConversionPlan, path: Path, source_sha: str, bar: tqdm) -> None:
    writer = GGUFWriter(path, plan.arch.name)
    copy_metadata(plan.reader, writer, skip=("general.architecture",))
    _common_keys(writer, plan, keys.ROLE_TRUNK, source_sha)
    for t in plan.trunk_tensors:
        _add_raw_tensor(writer, t.name, tensor_bytes(plan.reader, t), tensor_ne(t), int(t.tensor_type))
    _finish(writer, bar, plan.trunk_nbytes())


def _write_expert(plan: ConversionPlan, path: Path, layer: int, expert: int, source_sha: str, bar: tqdm) -> None:
    writer = GGUFWriter(path, plan.arch.name)
    _common_keys(writer, plan, keys.ROLE_EXPERT, source_sha)
    writer.add_uint32(keys.EXPERT_LAYER, layer)
    writer.add_uint32(keys.EXPERT_INDEX, expert)
    for st in plan.experts[layer]:
        full = tensor_bytes(plan.reader, st.tensor)
        n = st.slice_nbytes
        _add_raw_tensor(writer, st.name, full[expert * n : (expert + 1) * n], st.slice_ne, int(st.ggml_type))
    _finish(writer, bar, plan.expert_nbytes(layer))


class _Streamed:
    """What GGUFWriter.write_tensor_data needs (nbytes, tofile), produced chunk by chunk."""

    def __init__(self, name: str, nbytes: int, chunks, bar: tqdm) -> None:
        self.name, self.nbytes, self.chunks, self.bar = name, nbytes, chunks, bar

    def tofile(self, fp) -> None:
        written = 0
        for chunk in self.chunks:
            view = memoryview(np.ascontiguousarray(chunk)).cast("B")
            fp.write(view)
            written += len(view)
            self.bar.update(len(view))
        if written != self.nbytes:
            raise AssertionError(f"{self.name}: wrote {written} bytes, expected {self.nbytes}")


def _write_streamed(writer: GGUFWriter, items: list[tuple[str, tuple[int, ...], int, int, object]], bar: tqdm) -> None:
    """items: (name, ne, ggml type, nbytes, chunk iterable); tensor infos first, then the data in order."""
    for name, ne, ggml_type, nbytes, _ in items:
        rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        writer.add_tensor_info(name, (*reversed(ne[1:]), nbytes // rows), np.dtype(np.uint8), nbytes, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, _ne, _t, nbytes, chunks in items:
        writer.write_tensor_data(_Streamed(name, nbytes, chunks, bar))
    writer.close()


def _requantized(plan: ConversionPlan, t, target, importance=None) -> tuple[str, tuple[int, ...], int, int, object]:
    ne = tensor_ne(t)
    raw = tensor_bytes(plan.reader, t)
    chunks = requant.requantized_chunks(raw, requant.Q(int(t.tensor_type)), ne, target, importance)
    return (t.name, ne, int(target), requant.requantized_nbytes(t, target), chunks)


def _copied(plan: ConversionPlan, t) -> tuple[str, tuple[int, ...], int, int, object]:
    return (t.name, tensor_ne(t), int(t.tensor_type), int(t.n_bytes), [tensor_bytes(plan.reader, t)])


def _write_shadow(plan: ConversionPlan, path: Path, source_sha: str, bar: tqdm) -> None:
    """Every routed expert tensor requantized to the shadow type, stacked, under its source name."""
    assert plan.shadow_type is not None
    writer = GGUFWriter(path, plan.arch.name)
    _common_keys(writer, plan, ROLE_SHADOW, source_sha)
    writer.add_string(SHADOW_TYPE_KEY, requant.type_name(plan.shadow_type))
    if plan.shadow_fallback_used:
        writer.add_string(keys.SHADOW_FALLBACK_TYPE, requant.type_name(plan.shadow_fallback_type))
    if plan.shadow_imatrix_sha256:
        writer.add_string(keys.SHADOW_IMATRIX, plan.shadow_imatrix_sha256)
    items = [_requantized(plan, st.tensor, plan.shadow_type_of(st), plan.shadow_importance(st)) if st.kind == "weight"
             else _copied(plan, st.tensor)
             for st in plan.stacked_tensors()]
    _write_streamed(writer, items, bar)


def _write_shadow_trunk(plan: ConversionPlan, path: Path, source_sha: str, bar: tqdm) -> None:
    """The trunk with its weight matrices requantized (norms, biases and routers kept), same metadata."""
    assert plan.shadow_trunk_type is not None
    writer = GGUFWriter(path, plan.arch.name)
    copy_metadata(plan.reader, writer, skip=("general.architecture",))
    _common_keys(writer, plan, ROLE_SHADOW_TRUNK, source_sha)
    writer.add_string(SHADOW_TYPE_KEY, requant.type_name(plan.shadow_trunk_type))
    items = [_requantized(plan, t, plan.shadow_trunk_type) if requantize_in_trunk(t) else _copied(plan, t)
             for t in plan.trunk_tensors]
    _write_streamed(writer, items, bar)

"""`manifest.json`: what a converted model directory holds, with the size and sha256 of every file."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgemoe.errors import UserError
from edgemoe.format.shard import EXPERTS_DIR, ExpertId  # noqa: F401 (EXPERTS_DIR: re-exported)

FORMAT_NAME = "edgemoe"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TRUNK_NAME = "trunk.gguf"

_HASH_CHUNK = 8 << 20


def shadow_file_name(type_name: str) -> str:
    """The shadow predictor's experts: every routed expert requantized to type_name, stacked (one GGUF)."""
    return f"shadow-{type_name}.gguf"


def shadow_trunk_file_name(type_name: str) -> str:
    """A requantized copy of the trunk, for a shadow that does not share the main model's trunk."""
    return f"shadow-trunk-{type_name}.gguf"


def expert_file_name(layer: int, expert: int) -> str:
    """Path of one expert's shard, relative to the model directory (ExpertId.file_name)."""
    return ExpertId(layer, expert).file_name


def sha256_file(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


@dataclass
class FileEntry:
    size: int
    sha256: str


@dataclass
class Manifest:
    name: str
    architecture: str
    source_file: str
    source_sha256: str
    source_size: int
    n_layers: int
    n_experts: int
    n_experts_used: int
    moe_layers: list[int]
    expert_tensors: list[str]  # per-layer parts, e.g. ["gate", "up", "down"]
    shared_expert: bool
    files: dict[str, FileEntry] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    # the shadow predictor's files, if converted with --shadow-type:
    # {"type": "q4_k", "file": "shadow-q4_k.gguf", "trunk_type": "q4_k" | None, "trunk_file": ... | None,
    #  "fallback_type": the type of the expert tensors the shadow type could not take (only when used),
    #  "imatrix_sha256": sha256 of the importance matrix (present only when one weighted the requantization)}
    shadow: dict[str, Any] | None = None

    def to_json(self) -> str:
        d = asdict(self)
        d["files"] = {k: asdict(v) for k, v in sorted(self.files.items())}
        if d["shadow"] is None:  # absent, not null: manifests without a shadow stay as they were
            del d["shadow"]
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT_NAME:
            raise UserError(f"not an edgemoe manifest (format {d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(f"manifest format version {d.get('format_version')} is not supported (this edgemoe reads {FORMAT_VERSION})")
        try:
            files = {k: FileEntry(int(v["size"]), str(v["sha256"])) for k, v in d["files"].items()}
            m = cls(**{**d, "files": files})
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed manifest ({type(e).__name__}: {e})") from None
        if m.shadow is not None:
            sh = m.shadow
            ok = (isinstance(sh, dict) and isinstance(sh.get("type"), str) and sh.get("file") in files
                  and (sh.get("trunk_file") is None or sh.get("trunk_file") in files))
            if not ok:
                raise UserError(f"malformed manifest (shadow entry {sh!r} does not name files it lists)")
        return m

    def expert_ids(self) -> list[ExpertId]:
        """Every routed expert of the model, layer by layer."""
        return [ExpertId(l, e) for l in self.moe_layers for e in range(self.n_experts)]

    def expert_files(self) -> list[tuple[int, int, str]]:
        """(layer, expert, shard file name) of every routed expert."""
        return [(k.layer, k.expert, k.file_name) for k in self.expert_ids()]


def load_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    path = Path(model_dir) / MANIFEST_NAME
    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: not a directory")
    if not path.is_file():
        raise UserError(f"{model_dir}: not an edgemoe model directory (no {MANIFEST_NAME})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: malformed manifest (not a JSON object)")
    return Manifest.from_dict(data)


def manifest_hash(model_dir: str | os.PathLike[str]) -> str:
    """Identity of a converted model: sha256 of its manifest (which pins every file's sha256)."""
    return sha256_file(Path(model_dir) / MANIFEST_NAME)


def verify_model_dir(model_dir: str | os.PathLike[str], progress: Callable[[int], None] | None = None) -> list[str]:
    """Re-check every file against the manifest; returns one message per mismatch (empty: all good)."""
    m = load_manifest(model_dir)
    root = Path(model_dir)
    problems: list[str] = []
    for rel, entry in sorted(m.files.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if size != entry.size:
            problems.append(f"{rel}: size {size}, manifest says {entry.size}")
            if progress is not None:
                progress(entry.size)
            continue
        digest = sha256_file(p, progress)
        if digest != entry.sha256:
            problems.append(f"{rel}: sha256 {digest}, manifest says {entry.sha256}")
    return problems


def check_model_files(model_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Cheap load-time check: every file of the manifest exists with its size (no hashing)."""
    root = Path(model_dir)
    for rel, entry in sorted(manifest.files.items()):
        p = root / rel
        if not p.is_file():
            raise UserError(f"{model_dir}: {rel} is missing (the model directory is incomplete)")
        if p.stat().st_size != entry.size:
            raise UserError(f"{model_dir}: {rel} has {p.stat().st_size} bytes, the manifest says {entry.size}")


def check_file_hash(model_dir: str | os.PathLike[str], manifest: Manifest, rel: str) -> None:
    """Hash one file of the model and compare it with the manifest (done once per file per process)."""
    entry = manifest.files.get(rel)
    if entry is None:
        raise UserError(f"{model_dir}: {rel} is not listed in the manifest")
    digest = sha256_file(Path(model_dir) / rel)
    if digest != entry.sha256:
        raise UserError(f"{model_dir}: {rel} does not match the manifest (sha256 {digest[:16]}..., expected {entry.sha256[:16]}...)")

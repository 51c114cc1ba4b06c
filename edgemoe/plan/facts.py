"""What a MoE model is, read from a converted model directory (manifest.json + headers) or a GGUF.

Only headers are read (tensor names, types, sizes); nothing is hashed. `edgemoe info` prints these
facts and the planner (memory.py, pipeline.py) computes with them.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.arch import has_shared_expert
from edgemoe.format.schema import parse_expert_tensor
from edgemoe.format.gguf_io import get_int, get_str, open_gguf
from edgemoe.format.schema import Keys, T, tensor_name
from edgemoe.format.manifest import (MANIFEST_NAME, TRUNK_NAME, Manifest, expert_file_name, load_manifest)


@dataclass
class ModelFacts:
    path: str
    kind: str  # "directory" (converted) or "gguf"
    name: str
    architecture: str
    n_layers: int
    n_embd: int
    n_ff_exp: int
    n_experts: int
    n_experts_used: int
    moe_layers: list[int]
    shared_expert: bool
    trunk_bytes: int
    expert_bytes: int  # all routed experts together
    shard_bytes: dict[int, int]  # MoE layer -> bytes of one expert of it (a shard; for a GGUF: its slice)
    trunk_types: dict[str, int]  # ggml type name -> number of trunk tensors of that type
    expert_types: dict[str, int]  # ggml type name -> number of (layer, part) expert weights of that type
    head_bytes: int = 0  # the output head (output.weight, or the tied token_embd.weight): read once per token
    embd_bytes: int = 0  # token_embd.weight (a lookup: one row per token)
    head_tied: bool = False  # no output.weight: the head is token_embd.weight
    kv_bytes_per_token: int = 0  # an F16 KV cache's bytes per context token (all layers)
    shadow: dict[str, Any] | None = None  # type, fallback_type, trunk_type, bytes, imatrix weighted
    manifest: str = ""  # status line: complete / incomplete (what is missing) / not converted
    manifest_problems: list[str] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def mean_shard_bytes(self) -> float:
        return float(np.mean(list(self.shard_bytes.values()))) if self.shard_bytes else 0.0

    @property
    def trunk_layer_bytes(self) -> float:
        """Trunk weights one layer reads per token (attention, norms, router; the head and embeddings apart)."""
        rest = self.trunk_bytes - self.embd_bytes - (0 if self.head_tied else self.head_bytes)
        return max(0.0, rest / max(1, self.n_layers))

    @property
    def shadow_shard_bytes(self) -> float:
        """Bytes of one expert in the shadow's requantized copy (0 without a shadow)."""
        n = len(self.moe_layers) * self.n_experts
        return (self.shadow or {}).get("expert_bytes", 0) / n if n else 0.0

    @property
    def routed_bytes_per_token(self) -> float:
        """Bytes of experts one decode token is routed to (top-k in every MoE layer)."""
        return float(sum(self.shard_bytes.values())) * self.n_experts_used

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shard_bytes"] = {str(k): v for k, v in self.shard_bytes.items()}
        d["routed_bytes_per_token"] = self.routed_bytes_per_token
        return d


def _type_name(t: Any) -> str:
    return t.tensor_type.name if hasattr(t, "tensor_type") else str(t)


def _dims(reader, arch: str) -> tuple[int, int, int]:
    """(n_embd, n_ff_exp, n_layers) from a GGUF's metadata."""
    n_embd = get_int(reader, Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)) or 0
    n_ff = get_int(reader, Keys.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=arch)) or get_int(reader, Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch)) or 0
    n_layers = get_int(reader, Keys.LLM.BLOCK_COUNT.format(arch=arch)) or 0
    return n_embd, n_ff, n_layers


def _trunk_extras(reader, arch: str, n_layers: int) -> dict[str, Any]:
    """head/embedding bytes and the F16 KV cache's bytes per token, from a GGUF holding the trunk."""
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    embd = sizes.get(tensor_name(T.TOKEN_EMBD), 0)
    tied = tensor_name(T.OUTPUT) not in sizes
    n_head = get_int(reader, Keys.Attention.HEAD_COUNT.format(arch=arch)) or 1
    n_head_kv = get_int(reader, Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) or n_head
    n_embd = get_int(reader, Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)) or 0
    head_dim = get_int(reader, Keys.Attention.KEY_LENGTH.format(arch=arch)) or (n_embd // n_head if n_head else 0)
    mla = get_int(reader, Keys.Attention.KEY_LENGTH_MLA.format(arch=arch)) is not None  # deepseek2: V lives in the K cache
    # V heads of their own size where value_length differs (deepseek2's legacy attn_kv_b layout)
    head_v = 0 if mla else (get_int(reader, Keys.Attention.VALUE_LENGTH.format(arch=arch)) or head_dim)
    return {"embd_bytes": embd, "head_bytes": embd if tied else sizes[tensor_name(T.OUTPUT)], "head_tied": tied,
            "kv_bytes_per_token": 2 * n_layers * n_head_kv * (head_dim + head_v)}


def facts_of_gguf(path: str | os.PathLike[str]) -> ModelFacts:
    """Facts of an unconverted GGUF (MoE or dense: a dense model has 0 experts)."""
    p = Path(path)
    reader = open_gguf(p)
    arch = get_str(reader, Keys.General.ARCHITECTURE) or "?"
    n_embd, n_ff, n_layers = _dims(reader, arch)
    n_expert = get_int(reader, Keys.LLM.EXPERT_COUNT.format(arch=arch)) or 0
    n_used = get_int(reader, Keys.LLM.EXPERT_USED_COUNT.format(arch=arch)) or 0
    trunk_types: Counter[str] = Counter()
    expert_types: Counter[str] = Counter()
    trunk_bytes = expert_bytes = 0
    per_layer: Counter[int] = Counter()
    for t in reader.tensors:
        parsed = parse_expert_tensor(t.name)
        if parsed is None or not n_expert:
            trunk_types[_type_name(t)] += 1
            trunk_bytes += int(t.n_bytes)
            continue
        layer, _part, kind = parsed
        expert_bytes += int(t.n_bytes)
        per_layer[layer] += int(t.n_bytes)
        if kind == "weight":
            expert_types[_type_name(t)] += 1
    shard = {layer: b // n_expert for layer, b in sorted(per_layer.items())}
    return ModelFacts(
        path=str(p), kind="gguf", name=get_str(reader, Keys.General.NAME) or p.stem, architecture=arch,
        n_layers=n_layers, n_embd=n_embd, n_ff_exp=n_ff, n_experts=n_expert, n_experts_used=n_used,
        moe_layers=sorted(shard), shared_expert=has_shared_expert(t.name for t in reader.tensors),
        trunk_bytes=trunk_bytes, expert_bytes=expert_bytes, shard_bytes=shard,
        trunk_types=dict(sorted(trunk_types.items())), expert_types=dict(sorted(expert_types.items())),
        manifest="not converted (a GGUF file; edgemoe convert splits it into trunk + shards)",
        **_trunk_extras(reader, arch, n_layers))


def _manifest_status(root: Path, m: Manifest) -> tuple[str, list[str]]:
    """Cheap check (existence and sizes, no hashing) of every file the manifest lists."""
    problems = []
    for rel, entry in sorted(m.files.items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry.size:
            problems.append(f"{rel}: {p.stat().st_size} bytes, the manifest says {entry.size}")
    if problems:
        return f"incomplete: {len(problems)} of {len(m.files)} files missing or of the wrong size", problems
    return (f"complete: {len(m.files)} files with the sizes manifest.json records "
            "(sha256 not re-checked here: edgemoe convert --verify does)"), []


def facts_of_dir(model_dir: str | os.PathLike[str]) -> ModelFacts:
    """Facts of a converted model directory: manifest.json, trunk.gguf's header, one shard header per layer."""
    root = Path(model_dir)
    m = load_manifest(root)
    status, problems = _manifest_status(root, m)
    trunk_types: Counter[str] = Counter()
    n_embd = n_ff = 0
    extras: dict[str, Any] = {}
    if (root / TRUNK_NAME).is_file():
        trunk = open_gguf(root / TRUNK_NAME)
        n_embd, n_ff, _ = _dims(trunk, m.architecture)
        extras = _trunk_extras(trunk, m.architecture, m.n_layers)
        for t in trunk.tensors:
            trunk_types[_type_name(t)] += 1
    expert_types: Counter[str] = Counter()
    shard: dict[int, int] = {}
    for layer in m.moe_layers:
        sizes = [m.files[expert_file_name(layer, e)].size for e in range(m.n_experts) if expert_file_name(layer, e) in m.files]
        shard[layer] = max(sizes) if sizes else 0
        first = root / expert_file_name(layer, 0)
        if first.is_file():
            for t in open_gguf(first).tensors:
                if t.name.endswith(".weight"):
                    expert_types[_type_name(t)] += 1
    shadow = None
    if m.shadow is not None:
        sh = m.shadow
        shadow = {"type": sh.get("type"), "fallback_type": sh.get("fallback_type"), "trunk_type": sh.get("trunk_type"),
                  "bytes": m.files[sh["file"]].size + (m.files[sh["trunk_file"]].size if sh.get("trunk_file") else 0),
                  "expert_bytes": m.files[sh["file"]].size,
                  "imatrix_weighted": bool(sh.get("imatrix_sha256"))}
    expert_total = sum(m.files[f].size for _, _, f in m.expert_files() if f in m.files)
    return ModelFacts(
        path=str(root), kind="directory", name=m.name, architecture=m.architecture, n_layers=m.n_layers,
        n_embd=n_embd, n_ff_exp=n_ff, n_experts=m.n_experts, n_experts_used=m.n_experts_used,
        moe_layers=list(m.moe_layers), shared_expert=m.shared_expert,
        trunk_bytes=m.files[TRUNK_NAME].size if TRUNK_NAME in m.files else 0, expert_bytes=expert_total,
        shard_bytes=shard, trunk_types=dict(sorted(trunk_types.items())), expert_types=dict(sorted(expert_types.items())),
        shadow=shadow, manifest=status, manifest_problems=problems, **extras)


def model_facts(path: str | os.PathLike[str]) -> ModelFacts:
    """A converted model directory or a GGUF file; anything else is a UserError saying what would work."""
    p = Path(path)
    if p.is_dir():
        if not (p / MANIFEST_NAME).is_file():
            raise UserError(f"{p}: not a model: a converted model directory has {MANIFEST_NAME} "
                            f"(make one with: edgemoe convert MODEL.gguf {p})")
        return facts_of_dir(p)
    if p.is_file():
        return facts_of_gguf(p)
    raise UserError(f"{p}: no such file or directory (give a converted model directory or a .gguf file)")


__all__ = ["ModelFacts", "facts_of_dir", "facts_of_gguf", "model_facts"]

"""One expert shard: its identity (`ExpertId`), its file name in a converted model, and its layout.

A converted model keeps every routed expert of every MoE layer as its own small GGUF file,
`experts/blk.LLL.expert.EEE.gguf`, holding that expert's gate/up/down (or fused gate_up) weight
matrices. `ExpertId` names one such shard everywhere (the coordinator's schedule and placement,
the workers' admission and slots, the manifest); `ShardLayout` is where its tensors lie in the file,
parsed once per file and reused on every map.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from edgemoe.errors import UserError
from edgemoe.format.arch import ARCHITECTURES
from edgemoe.format.gguf_io import get_str, open_gguf, tensor_ne

EXPERTS_DIR = "experts"


class ExpertId(NamedTuple):
    """One routed expert of one MoE layer (layer: the block number, not the MoE-layer index).

    A NamedTuple (immutable, hashable, ordered by layer then expert): it travels on the wire as the
    JSON pair [layer, expert] the protocol has always carried, and equals that pair."""

    layer: int
    expert: int

    @property
    def file_name(self) -> str:
        """Path of this expert's shard, relative to the model directory."""
        return f"{EXPERTS_DIR}/blk.{self.layer:03d}.expert.{self.expert:03d}.gguf"

    @property
    def label(self) -> str:
        """How logs and errors name it: L3.E7."""
        return f"L{self.layer}.E{self.expert}"


@dataclass(frozen=True)
class ShardTensor:
    part: str  # "gate", "up", "gate_up", "down"; biases "gate_b", "up_b", "gate_up_b", "down_b"
    ggml_type: int
    ne: tuple[int, int]
    offset: int  # absolute byte offset in the shard file


@dataclass(frozen=True)
class ShardLayout:
    """Where an expert shard keeps its tensors; parsed once per file, reused on every load."""

    path: str
    size: int
    tensors: dict[str, ShardTensor]
    act: str = "silu"  # the architecture's expert activation (format.arch.MoeArch.expert_act)

    @property
    def n_ff(self) -> int:
        return self.tensors["down"].ne[0]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "ShardLayout":
        reader = open_gguf(path)
        tensors = {}
        arch = ARCHITECTURES.get(get_str(reader, "general.architecture") or "")
        for t in reader.tensors:
            part = t.name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")
            if t.name.endswith(".bias"):
                if arch is None or not arch.expert_biases:
                    raise UserError(f"{path}: expert biases ({t.name}) are not part of the "
                                    f"{arch.name if arch else 'unknown'} architecture")
                part += "_b"
            ne = tensor_ne(t)
            tensors[part] = ShardTensor(part, int(t.tensor_type), (ne[0], ne[1] if len(ne) > 1 else 1), int(t.data_offset))
        if "down" not in tensors or not ({"gate", "up"} <= tensors.keys() or "gate_up" in tensors):
            raise UserError(f"{path}: expert shard lacks its gate/up/down tensors")
        return cls(str(path), Path(path).stat().st_size, tensors, arch.expert_act if arch else "silu")


__all__ = ["EXPERTS_DIR", "ExpertId", "ShardLayout", "ShardTensor"]

"""Which GGUF architectures carry routed experts, and in which tensors.

llama.cpp stores all experts of a layer as one tensor whose last ggml dimension is the
expert index (`blk.N.ffn_gate_exps.weight` has ne = [n_embd, n_ff_exp, n_expert]).
Architectures differ only in which of these stacked tensors they have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A routed-expert tensor: blk.<layer>.ffn_<part>_exps.<weight|bias>
EXPERT_TENSOR_RE = re.compile(r"^blk\.(\d+)\.ffn_([a-z_]+?)_exps\.(weight|bias)$")


@dataclass(frozen=True)
class MoeArch:
    name: str
    # Each layer must hold one of these sets of stacked weight tensors (fused gate_up in newer files).
    expert_weight_sets: tuple[frozenset[str], ...]
    shared_expert: bool = False
    description: str = ""


_SPLIT = frozenset({"gate", "up", "down"})
_FUSED = frozenset({"gate_up", "down"})

ARCHITECTURES: dict[str, MoeArch] = {
    a.name: a
    for a in (
        MoeArch("llama", (_SPLIT, _FUSED), description="Mixtral-style llama MoE"),
        MoeArch("qwen2moe", (_SPLIT, _FUSED), shared_expert=True, description="Qwen1.5/Qwen2 MoE, gated shared expert"),
        MoeArch("qwen3moe", (_SPLIT, _FUSED), description="Qwen3 MoE, q/k norms"),
        MoeArch("olmoe", (_SPLIT, _FUSED), description="OLMoE, q/k norms"),
    )
}


def parse_expert_tensor_name(name: str) -> tuple[int, str, str] | None:
    """`blk.3.ffn_up_exps.weight` -> (3, "up", "weight"); None for a trunk tensor."""
    m = EXPERT_TENSOR_RE.match(name)
    if m is None:
        return None
    return int(m.group(1)), m.group(2), m.group(3)

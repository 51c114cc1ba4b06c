"""Which GGUF architectures carry routed experts, and in which tensors.

llama.cpp stores all experts of a layer as one tensor whose last ggml dimension is the
expert index (`blk.N.ffn_gate_exps.weight` has ne = [n_embd, n_ff_exp, n_expert]).
Architectures differ only in which of these stacked tensors they have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from edgemoe.format.schema import MODEL_ARCH, arch_name, is_shared_expert_tensor



# Types ggml cannot use as the weights of a matrix product (integer and F64 tensors): never an expert's.
NOT_EXPERT_TYPES = frozenset({"I8", "I16", "I32", "I64", "F64"})


@dataclass(frozen=True)
class MoeArch:
    name: str
    # Each layer must hold one of these sets of stacked weight tensors (fused gate_up in newer files).
    expert_weight_sets: tuple[frozenset[str], ...]
    shared_expert: bool = False
    description: str = ""
    # metadata key (<arch>.<key>) counting the leading dense layers, which have no expert tensors
    dense_lead_key: str | None = None
    expert_biases: bool = False  # ffn_*_exps.bias tensors, sliced into the shards like the weights
    # the MoE layers follow from <arch>.leading_dense_block_count and .interleave_moe_layer_step
    # (interleaved_moe_layers): llama.cpp's graph decides by them; the other layers have a dense FFN
    moe_layer_rule: bool = False
    # GGML type names the expert weights may have (None: any type ggml multiplies, see NOT_EXPERT_TYPES)
    expert_types: frozenset[str] | None = None
    expert_act: str = "silu"  # the experts' gated activation: "silu" (SwiGLU) or "swiglu_oai" (gpt-oss, clamped)

    def allows_type(self, type_name: str) -> bool:
        if self.expert_types is not None:
            return type_name in self.expert_types
        return type_name not in NOT_EXPERT_TYPES


_SPLIT = frozenset({"gate", "up", "down"})
_FUSED = frozenset({"gate_up", "down"})

ARCHITECTURES: dict[str, MoeArch] = {
    a.name: a
    for a in (
        MoeArch(arch_name(MODEL_ARCH.LLAMA), (_SPLIT, _FUSED), description="Mixtral-style llama MoE"),
        MoeArch(arch_name(MODEL_ARCH.QWEN2MOE), (_SPLIT, _FUSED), shared_expert=True, description="Qwen1.5/Qwen2 MoE, gated shared expert"),
        MoeArch(arch_name(MODEL_ARCH.QWEN3MOE), (_SPLIT, _FUSED), description="Qwen3 MoE, q/k norms"),
        MoeArch(arch_name(MODEL_ARCH.OLMOE), (_SPLIT, _FUSED), description="OLMoE, q/k norms"),
        # llama.cpp's granitemoe and ernie4_5-moe loaders know only split gate/up expert tensors
        MoeArch(arch_name(MODEL_ARCH.GRANITE_MOE), (_SPLIT,), description="IBM Granite 3.x MoE, scaled residuals, optional shared expert"),
        MoeArch(arch_name(MODEL_ARCH.ERNIE4_5_MOE), (_SPLIT,), shared_expert=True, dense_lead_key="leading_dense_block_count", moe_layer_rule=True,
                description="Baidu ERNIE 4.5 MoE, leading dense layers, expert selection bias, shared experts"),
        MoeArch(arch_name(MODEL_ARCH.DEEPSEEK2), (_SPLIT, _FUSED), shared_expert=True, dense_lead_key="leading_dense_block_count",
                description="DeepSeek-V2/V3 style: MLA, leading dense layers, shared experts"),
        MoeArch(arch_name(MODEL_ARCH.GPT_OSS), (_SPLIT, _FUSED), expert_act="swiglu_oai", expert_biases=True,
                description="gpt-oss: attention sinks, sliding-window layers, expert biases, MXFP4 experts"),
    )
}


def has_shared_expert(tensor_names: Iterable[str]) -> bool:
    """Whether a model has a shared expert (optional in some architectures, e.g. granitemoe)."""
    return any(is_shared_expert_tensor(n) for n in tensor_names)


def interleaved_moe_layers(n_layer: int, n_dense_lead: int, step: int) -> list[int]:
    """The MoE layers of ernie4_5-moe's graph (llama.cpp's is_moe_layer): il >= n_dense_lead and (il + 1) % step == 0."""
    return [il for il in range(n_layer) if il >= n_dense_lead and (il + 1) % step == 0]

"""Model hyper-parameters read from GGUF metadata, per architecture, as llama.cpp reads them."""

from __future__ import annotations

import numpy as np
from dataclasses import dataclass
from typing import Any

from edgemoe.errors import UserError

ROPE_NORM = 0  # llama.cpp LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs
ROPE_NEOX = 2  # LLAMA_ROPE_TYPE_NEOX: rotate the two halves


@dataclass(frozen=True)
class ArchTraits:
    """What differs between the supported architectures' graphs (llama.cpp src/models/<arch>.cpp)."""

    rope_type: int
    qkv_bias: bool = False  # attn_{q,k,v}.bias
    qk_norm: str | None = None  # "head": RMSNorm per head (qwen3moe); "full": over the projection (olmoe)
    norm_topk: bool = False  # renormalise the selected experts' weights to sum to 1
    shared_expert: bool = False  # qwen2moe: sigmoid-gated shared expert
    ff_exp_key: str = "expert_feed_forward_length"


TRAITS: dict[str, ArchTraits] = {
    "llama": ArchTraits(ROPE_NORM, norm_topk=True, ff_exp_key="feed_forward_length"),
    "qwen2moe": ArchTraits(ROPE_NEOX, qkv_bias=True, shared_expert=True),
    "qwen3moe": ArchTraits(ROPE_NEOX, qk_norm="head", norm_topk=True),
    "olmoe": ArchTraits(ROPE_NEOX, qk_norm="full"),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    traits: ArchTraits
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int  # dense FFN width (layers without experts)
    n_expert: int  # 0 for a dense model
    n_expert_used: int
    n_ff_exp: int
    rms_eps: float
    rope_dims: int
    rope_freq_base: float
    rope_freq_scale: float
    kq_scale: float
    expert_weights_scale: float

    @property
    def n_embd_q(self) -> int:
        return self.head_dim * self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str = "model") -> "ModelConfig":
        arch = meta.get("general.architecture")
        traits = TRAITS.get(arch)
        if traits is None:
            raise UserError(f"{source}: architecture '{arch}' is not supported by the engine (supported: {', '.join(sorted(TRAITS))})")

        def key(name: str, default: Any = None) -> Any:
            v = meta.get(f"{arch}.{name}", default)
            if v is None:
                raise UserError(f"{source}: metadata key {arch}.{name} is missing")
            if isinstance(v, list):  # per-layer arrays: edgemoe supports uniform layers only
                if len(set(v)) != 1:
                    raise UserError(f"{source}: {arch}.{name} varies per layer, which edgemoe does not support")
                v = v[0]
            return v

        n_embd = int(key("embedding_length"))
        n_head = int(key("attention.head_count"))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        head_dim = int(key("attention.key_length", n_embd // n_head))
        if int(key("attention.value_length", head_dim)) != head_dim:
            raise UserError(f"{source}: different key and value head sizes are not supported")
        n_vocab = int(meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])))
        n_expert = int(key("expert_count", 0))
        n_ff = int(key("feed_forward_length", 0))
        n_ff_exp = int(key(traits.ff_exp_key, 0)) if n_expert else 0
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise UserError(f"{source}: RoPE scaling '{scaling}' is not supported (only none and linear)")
        factor = float(meta.get(f"{arch}.rope.scaling.factor", 0.0) or 0.0)
        freq_scale = 1.0 / factor if scaling == "linear" and factor > 0 else 1.0
        attn_scale = float(meta.get(f"{arch}.attention.scale", 0.0) or 0.0)
        return cls(
            arch=arch,
            traits=traits,
            n_vocab=n_vocab,
            n_ctx_train=int(key("context_length")),
            n_embd=n_embd,
            n_layer=int(key("block_count")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=n_ff,
            n_expert=n_expert,
            n_expert_used=int(key("expert_used_count", 0)) if n_expert else 0,
            n_ff_exp=n_ff_exp,
            rms_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_dims=int(key("rope.dimension_count", head_dim)),
            rope_freq_base=float(key("rope.freq_base", 10000.0)),
            rope_freq_scale=freq_scale,
            # float32 arithmetic, as llama.cpp's 1.0f/sqrtf(n_embd_head)
            kq_scale=attn_scale if attn_scale else float(np.float32(1.0) / np.sqrt(np.float32(head_dim))),
            expert_weights_scale=float(key("expert_weights_scale", 0.0)),
        )

"""Model hyper-parameters read from GGUF metadata, per architecture, as llama.cpp reads them."""

from __future__ import annotations

import numpy as np
from dataclasses import dataclass
from typing import Any

from edgemoe.errors import UserError
from edgemoe.format.arch import interleaved_moe_layers

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
    # granitemoe, ernie4_5-moe: an ungated shared expert added to the routed ones, present when
    # <arch>.expert_shared_feed_forward_length > 0 (llama.cpp's n_ff_shexp)
    plain_shared_expert: bool = False
    granite_scales: bool = False  # granitemoe: embedding, residual and logit multipliers (<arch>.*_scale)
    # ernie4_5-moe: layer il is MoE iff il >= leading_dense_block_count and (il + 1) % interleave_moe_layer_step == 0
    moe_layer_rule: bool = False
    # ernie4-5-moe.cpp ignores attention.scale (1/sqrt(head_dim) always) and attn_output.bias (loaded, not added)
    attn_scale_key: bool = True
    attn_out_bias: bool = True


TRAITS: dict[str, ArchTraits] = {
    "llama": ArchTraits(ROPE_NORM, norm_topk=True, ff_exp_key="feed_forward_length"),
    "qwen2moe": ArchTraits(ROPE_NEOX, qkv_bias=True, shared_expert=True),
    "qwen3moe": ArchTraits(ROPE_NEOX, qk_norm="head", norm_topk=True),
    "olmoe": ArchTraits(ROPE_NEOX, qk_norm="full"),
    # granite.cpp's graph (granitemoe uses it): routing softmax, top-k renormalised; experts n_ff wide
    "granitemoe": ArchTraits(ROPE_NORM, norm_topk=True, ff_exp_key="feed_forward_length", plain_shared_expert=True,
                             granite_scales=True),
    # ernie4-5-moe.cpp: leading dense layers, exp_probs_b selection bias, top-k renormalised
    "ernie4_5-moe": ArchTraits(ROPE_NORM, norm_topk=True, plain_shared_expert=True, moe_layer_rule=True,
                               attn_scale_key=False, attn_out_bias=False),
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
    n_ff_shexp: int = 0  # width of an ungated shared expert (plain_shared_expert archs; 0: none)
    embedding_scale: float = 0.0  # granite multipliers; 0: not applied (llama.cpp's test)
    residual_scale: float = 0.0
    logit_scale: float = 0.0  # logits are divided by it
    n_layer_dense_lead: int = 0  # moe_layer_rule archs
    moe_layer_step: int = 1

    @property
    def shared_expert(self) -> bool:
        """Whether the MoE layers have a shared expert (Trunk.shared_expert): always in qwen2moe, where
        <arch>.expert_shared_feed_forward_length > 0 in granitemoe and ernie4_5-moe."""
        return self.traits.shared_expert or self.n_ff_shexp > 0

    def rule_moe_layers(self) -> list[int] | None:
        """The MoE layers llama.cpp's graph makes for a moe_layer_rule architecture (None: by tensors)."""
        if not self.traits.moe_layer_rule:
            return None
        return interleaved_moe_layers(self.n_layer, self.n_layer_dense_lead, self.moe_layer_step)

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
        attn_scale = float(meta.get(f"{arch}.attention.scale", 0.0) or 0.0) if traits.attn_scale_key else 0.0
        f32 = lambda name: float(meta.get(f"{arch}.{name}", 0.0) or 0.0)  # noqa: E731
        extra: dict[str, Any] = {}
        if traits.plain_shared_expert and n_expert:
            extra["n_ff_shexp"] = int(key("expert_shared_feed_forward_length", 0))
        if traits.granite_scales:  # granite.cpp: logit_scale is required, the others optional
            extra.update(embedding_scale=f32("embedding_scale"), residual_scale=f32("residual_scale"),
                         logit_scale=float(key("logit_scale")))
            if extra["logit_scale"] == 0.0:
                raise UserError(f"{source}: {arch}.logit_scale is 0 (logits are divided by it)")
        if traits.moe_layer_rule:
            extra.update(n_layer_dense_lead=int(key("leading_dense_block_count", 0)),
                         moe_layer_step=int(key("interleave_moe_layer_step")))
            if extra["moe_layer_step"] <= 0:
                raise UserError(f"{source}: {arch}.interleave_moe_layer_step must be > 0")
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
            **extra,
        )

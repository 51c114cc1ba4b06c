"""Model hyper-parameters read from GGUF metadata, per architecture, as llama.cpp reads them."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.arch import interleaved_moe_layers
from edgemoe.format.schema import MODEL_ARCH, arch_name

DEEPSEEK2, GPT_OSS = arch_name(MODEL_ARCH.DEEPSEEK2), arch_name(MODEL_ARCH.GPT_OSS)  # their graphs differ most
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
    # metadata decides (deepseek2): expert_weights_norm, expert_gating_func, MLA, YaRN, expert groups
    routing_from_metadata: bool = False
    # gpt-oss keeps every row through the last layer and drops the non-output rows before the head
    # (the others drop them after the last attention): row counts change ggml's kernels, so follow it
    out_rows_at_head: bool = False


TRAITS: dict[str, ArchTraits] = {
    arch_name(MODEL_ARCH.LLAMA): ArchTraits(ROPE_NORM, norm_topk=True, ff_exp_key="feed_forward_length"),
    arch_name(MODEL_ARCH.QWEN2MOE): ArchTraits(ROPE_NEOX, qkv_bias=True, shared_expert=True),
    arch_name(MODEL_ARCH.QWEN3MOE): ArchTraits(ROPE_NEOX, qk_norm="head", norm_topk=True),
    arch_name(MODEL_ARCH.OLMOE): ArchTraits(ROPE_NEOX, qk_norm="full"),
    # granite.cpp's graph (granitemoe uses it): routing softmax, top-k renormalised; experts n_ff wide
    arch_name(MODEL_ARCH.GRANITE_MOE): ArchTraits(ROPE_NORM, norm_topk=True, ff_exp_key="feed_forward_length", plain_shared_expert=True,
                             granite_scales=True),
    # ernie4-5-moe.cpp: leading dense layers, exp_probs_b selection bias, top-k renormalised
    arch_name(MODEL_ARCH.ERNIE4_5_MOE): ArchTraits(ROPE_NORM, norm_topk=True, plain_shared_expert=True, moe_layer_rule=True,
                               attn_scale_key=False, attn_out_bias=False),
    # deepseek2.cpp: MLA, plain shared experts (Trunk.shared_expert: no ffn_gate_inp_shexp), routing from metadata
    arch_name(MODEL_ARCH.DEEPSEEK2): ArchTraits(ROPE_NORM, shared_expert=True, routing_from_metadata=True),
    arch_name(MODEL_ARCH.GPT_OSS): ArchTraits(ROPE_NEOX, qkv_bias=True, out_rows_at_head=True),
}

# llama.cpp's llama_expert_gating_func_type (the GGUF key <arch>.expert_gating_func)
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}

_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
_libm.logf.restype = ctypes.c_float
_libm.logf.argtypes = [ctypes.c_float]
_libm.sqrtf.restype = ctypes.c_float
_libm.sqrtf.argtypes = [ctypes.c_float]


def _f32(x: float) -> float:
    return float(np.float32(x))


def logf(x: float) -> float:
    """C's logf, so that scale factors derived from it are the float llama.cpp computes."""
    return float(_libm.logf(_f32(x)))


@dataclass(frozen=True)
class MLAConfig:
    """deepseek2's multi-head latent attention (llama.cpp hparams n_lora_q, n_lora_kv, *_mla).

    The KV cache holds one "head" per token: the normed kv_lora latent followed by the roped k_pe
    (head_dim = kv_lora_rank + rope dims); V is a view of its first kv_lora_rank values.
    The legacy attn_kv_b layout (absorbed False) is plain MHA instead: K heads head_k wide (the
    cache's head_dim), V heads head_v wide (head_dim_v), each in a cache of its own."""

    q_lora_rank: int  # 0: one attn_q projection (V2-Lite); else attn_q_a -> norm -> attn_q_b
    kv_lora_rank: int
    head_k: int  # per-head query/key size before absorption: nope + rope
    head_v: int  # per-head value size after attn_v_b
    absorbed: bool  # attn_k_b/attn_v_b (current converters); False: the legacy attn_kv_b


@dataclass(frozen=True)
class Rope:
    """ggml_rope_ext's scaling arguments, as llama.cpp's cparams resolve them."""

    n_ctx_orig: int
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0  # llama-cpp-python passes these defaults explicitly
    beta_slow: float = 1.0




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
    norm_topk: bool = False  # renormalise the selected experts' weights to sum to 1
    gating: str = "softmax"  # "softmax" or "sigmoid" over the router logits
    n_expert_groups: int = 0  # group-limited routing (DeepSeek-V3): experts only from the best groups
    n_group_used: int = 0
    rope: Rope | None = None  # None: no YaRN (n_ctx_orig = n_ctx_train, plain scaling)
    mla: MLAConfig | None = None
    head_dim_v: int = 0  # V head size where it differs from K's (deepseek2's legacy attn_kv_b); 0: head_dim
    # gpt-oss: sliding-window layers (llama.cpp's is_swa), their window and RoPE base; attention sinks;
    # the clamped swiglu_oai expert activation; the router's softmax over the selected experts only
    n_swa: int = 0
    swa_layers: tuple[int, ...] = ()
    rope_freq_base_swa: float = 0.0
    expert_act: str = "silu"  # "silu" (SwiGLU) or "swiglu_oai"

    def is_swa(self, il: int) -> bool:
        return il in self.swa_layers

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
        """One token's K row in the cache (all KV heads)."""
        return self.head_dim * self.n_head_kv

    @property
    def head_v(self) -> int:
        return self.head_dim_v or self.head_dim

    @property
    def n_embd_v(self) -> int:
        """One token's V row in the cache: n_embd_kv except where V heads have their own size."""
        return self.head_v * self.n_head_kv

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
        n_vocab = int(meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])))
        n_expert = int(key("expert_count", 0))
        n_ff = int(key("feed_forward_length", 0))
        n_ff_exp = int(key(traits.ff_exp_key, 0)) if n_expert else 0
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear", "yarn"):
            raise UserError(f"{source}: RoPE scaling '{scaling}' is not supported (only none, linear and yarn)")
        factor = float(meta.get(f"{arch}.rope.scaling.factor", 0.0) or 0.0)
        freq_scale = _f32(1.0 / np.float32(factor)) if scaling != "none" and factor > 0 else 1.0
        attn_scale = float(meta.get(f"{arch}.attention.scale", 0.0) or 0.0) if traits.attn_scale_key else 0.0
        f32 = lambda name: float(meta.get(f"{arch}.{name}", 0.0) or 0.0)  # noqa: E731
        n_ctx_train = int(key("context_length"))
        rope = _rope(meta, arch, scaling, freq_scale, n_ctx_train)
        extra: dict[str, Any] = {"norm_topk": traits.norm_topk}
        if traits.routing_from_metadata:
            extra.update(_routing(meta, arch, source))
        if arch == DEEPSEEK2:
            extra["mla"], head_dim, kq = _deepseek2_attention(meta, arch, source, rope, freq_scale)
            if extra["mla"].absorbed:
                n_head_kv = 1
            else:  # the legacy layout's MHA: K and V heads of their own sizes in a K and a V cache
                n_head_kv, extra["head_dim_v"] = n_head, extra["mla"].head_v
            attn_scale = kq
        elif arch == GPT_OSS:
            extra.update(_gpt_oss(meta, arch, source))
            n_rot = int(key("rope.dimension_count", head_dim))
            attn_scale = _f32(np.float32(1.0) / np.float32(_libm.sqrtf(float(n_rot))))  # 1.0f/sqrtf(float(n_rot))
        if arch != DEEPSEEK2 and int(key("attention.value_length", head_dim)) != head_dim:
            raise UserError(f"{source}: different key and value head sizes are not supported")
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
            n_ctx_train=n_ctx_train,
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
            rope=rope,
            **extra,
        )


def _rope(meta: dict[str, Any], arch: str, scaling: str, freq_scale: float, n_ctx_train: int) -> Rope:
    """ext_factor and attn_factor as llama_context's constructor derives them (src/llama-context.cpp)."""
    n_ctx_orig = int(meta.get(f"{arch}.rope.scaling.original_context_length", 0) or 0) or n_ctx_train
    attn_factor = 1.0
    ext_factor = 1.0 if scaling == "yarn" else 0.0
    if ext_factor != 0.0:
        factor = _f32(1.0 / np.float32(freq_scale))

        def mscale(scale: float, m: float) -> float:
            return 1.0 if scale <= 1.0 else _f32(np.float32(0.1) * np.float32(m) * np.float32(logf(scale)) + np.float32(1.0))

        log_mul = _yarn_log_mul(meta, arch)
        if log_mul != 0.0:
            m = log_mul if arch == DEEPSEEK2 and log_mul != 1.0 else 1.0
            attn_factor = _f32(np.float32(mscale(factor, m)) / np.float32(mscale(factor, log_mul)))
        else:
            attn_factor = mscale(factor, 1.0)
        attn_factor = _f32(np.float32(attn_factor) * (np.float32(1.0) / (np.float32(1.0) + np.float32(0.1) * np.float32(logf(factor)))))
    attn_factor = _f32(np.float32(attn_factor) * np.float32(meta.get(f"{arch}.rope.scaling.attn_factor", 1.0) or 1.0))
    return Rope(n_ctx_orig, ext_factor, attn_factor)


def _yarn_log_mul(meta: dict[str, Any], arch: str) -> float:
    """hparams.rope_yarn_log_mul; deepseek2 cancels the converter's factor 0.1 (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)."""
    v = float(meta.get(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0) or 0.0)
    return _f32(np.float32(v) / np.float32(0.1)) if arch == DEEPSEEK2 and v else _f32(v)


def _routing(meta: dict[str, Any], arch: str, source: str) -> dict[str, Any]:
    """Gating function, weight normalisation and expert groups from metadata (llama.cpp load_hparams)."""
    func = int(meta.get(f"{arch}.expert_gating_func", 0) or 0)
    if func == 0:  # llama.cpp's default for DeepSeek V2 files without the key
        func = 1
    if func not in GATING_FUNCS:
        raise UserError(f"{source}: {arch}.expert_gating_func {func} is not supported "
                        f"(supported: {', '.join(f'{k} ({v})' for k, v in GATING_FUNCS.items())})")
    groups = int(meta.get(f"{arch}.expert_group_count", 0) or 0)
    used = int(meta.get(f"{arch}.expert_group_used_count", 0) or 0)
    n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
    if groups > 1 and (n_expert % groups or not 0 < used < groups):
        raise UserError(f"{source}: expert groups {groups} (used {used}) do not divide {n_expert} experts as llama.cpp requires")
    return {"norm_topk": bool(meta.get(f"{arch}.expert_weights_norm", False)), "gating": GATING_FUNCS[func],
            "n_expert_groups": groups, "n_group_used": used}


def _gpt_oss(meta: dict[str, Any], arch: str, source: str) -> dict[str, Any]:
    """llama_model_openai_moe::load_arch_hparams: window, SWA pattern (every 2nd layer by default), SWA RoPE base."""
    n_swa = meta.get(f"{arch}.attention.sliding_window")
    if n_swa is None:
        raise UserError(f"{source}: metadata key {arch}.attention.sliding_window is missing")
    n_layer = int(meta[f"{arch}.block_count"])
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):  # one flag per layer
        swa = tuple(il for il, f in enumerate(pattern[:n_layer]) if f)
    else:  # llama_hparams::set_swa_pattern(n, dense_first=false)
        n = int(pattern)
        swa = tuple(il for il in range(n_layer) if n == 0 or il % n < n - 1)
    base = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    return {"n_swa": int(n_swa), "swa_layers": swa, "gating": "softmax_weight", "expert_act": "swiglu_oai",
            "rope_freq_base_swa": float(meta.get(f"{arch}.rope.freq_base_swa", base))}


def _deepseek2_attention(meta: dict[str, Any], arch: str, source: str, rope: Rope,
                         freq_scale: float) -> tuple[MLAConfig, int, float]:
    """(MLA shapes, cached K head size, kq_scale) as llama_model_deepseek2 reads and pre-scales them."""
    def req(name: str) -> int:
        v = meta.get(f"{arch}.{name}")
        if v is None:
            raise UserError(f"{source}: metadata key {arch}.{name} is missing")
        return int(v)

    kv_lora = req("attention.kv_lora_rank")
    n_rot = req("rope.dimension_count")
    head_k_mla = int(meta.get(f"{arch}.attention.key_length_mla", 0) or 0)
    head_v_mla = int(meta.get(f"{arch}.attention.value_length_mla", 0) or 0)
    absorbed = head_k_mla != 0 and head_v_mla != 0
    head_dim = req("attention.key_length")
    if not absorbed:
        # legacy attn_kv_b files: plain multi-head attention with K heads key_length (nope + rope) and
        # V heads value_length wide (llama.cpp's n_embd_head_k_mla() falls back to n_embd_head_k)
        head_k_mla, head_v_mla = head_dim, req("attention.value_length")
        if head_k_mla <= n_rot:
            raise UserError(f"{source}: deepseek2 key length {head_k_mla} leaves no dims beside the {n_rot} rotary ones")
    elif head_dim != kv_lora + n_rot or req("attention.value_length") != kv_lora:
        raise UserError(f"{source}: MLA key/value lengths {head_dim}/{req('attention.value_length')} "
                        f"do not match kv_lora_rank {kv_lora} + rope {n_rot}")
    # llama_model_deepseek2::graph: undo yarn_attn_factor_adjust, then pre-scale kq_scale
    attn_org = np.float32(rope.attn_factor) * (np.float32(1.0) + np.float32(0.1) * np.float32(logf(_f32(1.0 / np.float32(freq_scale)))))
    ms = attn_org * (np.float32(1.0) + np.float32(0.1) * np.float32(_yarn_log_mul(meta, arch)) * np.float32(logf(_f32(1.0 / np.float32(freq_scale)))))
    kq = _f32(np.float32(1.0) * ms * ms / np.float32(_libm.sqrtf(float(head_k_mla))))
    mla = MLAConfig(int(meta.get(f"{arch}.attention.q_lora_rank", 0) or 0), kv_lora, head_k_mla, head_v_mla, absorbed)
    return mla, head_dim, kq

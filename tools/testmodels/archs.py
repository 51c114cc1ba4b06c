"""The test architectures: shapes, metadata keys and tensor lists, as llama.cpp expects them.

Shapes are written in ggml order (``ne``: fastest dimension first), as llama.cpp's loader states
them (``create_tensor(name, {ne0, ne1, ne2})``). numpy shapes are the reverse.

Everything here was checked against llama.cpp as bundled in llama-cpp-python 0.3.36
(``src/models/{llama,qwen2moe,qwen3moe,olmoe,granite,granite-moe,ernie4-5,ernie4-5-moe}.cpp`` and
``llama_model_base::load_hparams``), and the metadata against the official converter
(``conversion/{granite,ernie}.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgemoe.format.schema import MODEL_ARCH, T, arch_name, tensor_name


@dataclass(frozen=True)
class ArchSpec:
    """One test model: a real llama.cpp architecture at toy size."""

    name: str  # model name: file stem prefix and general.name
    arch: str  # general.architecture
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 8
    n_head_kv: int = 4
    head_dim: int = 32
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 512  # routed expert FFN width
    n_ff_shexp: int = 0  # shared expert FFN width (0: no shared expert)
    n_ctx_train: int = 512
    rms_eps: float = 1e-5
    rope_freq_base: float = 10000.0
    qkv_bias: bool = False  # blk.N.attn_{q,k,v}.bias
    qk_norm: str = ""  # "": none, "head": [head_dim] (qwen3), "full": [n_embd] (olmoe)
    tied_output: bool = False  # no output.weight: llama.cpp falls back to token_embd
    key_value_length: bool = False  # write attention.key_length / value_length
    # extra <arch>.* metadata (suffix -> (value, kind)), kind in {"u32", "f32", "bool", "str"}
    extra_keys: tuple[tuple[str, int | float | bool | str, str], ...] = field(default_factory=tuple)
    rope_dims: int = 0  # rope.dimension_count (0: head_dim)
    # deepseek2 (multi-head latent attention): q_lora (0: plain attn_q), kv_lora, rope/nope/v head dims
    mla: tuple[int, int, int, int, int] | None = None
    mla_legacy: bool = False  # the older converters' unsplit attn_kv_b instead of attn_k_b/attn_v_b
    shexp_gated: bool = True  # the shared expert has ffn_gate_inp_shexp (qwen2moe); False: added as is
    n_dense_lead: int = 0  # leading layers with a dense FFN (ffn_{gate,up,down}) instead of experts
    n_ff_dense: int = 0  # their FFN width
    probs_bias: bool = False  # blk.N.exp_probs_b.bias: the router's expert selection bias
    ftypes: tuple[str, ...] = ("f32", "q8_0", "q4_k_m")  # the files written (FTYPES' keys)
    attn_out_bias: bool = False  # blk.N.attn_output.bias

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def n_embd_q(self) -> int:
        return self.head_dim * self.n_head

    def tensor_shapes(self, n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name, ggml ne) of every tensor, in the order they are written."""
        if self.mla is not None:
            from .deepseek2 import deepseek2_shapes

            return deepseek2_shapes(self, n_vocab)
        if self.arch == "gpt-oss":
            from .gpt_oss import gpt_oss_shapes

            return gpt_oss_shapes(self, n_vocab)
        E, H = self.n_embd, self.n_ff_exp
        q, kv = self.n_embd_q, self.n_embd_k_gqa
        out: list[tuple[str, tuple[int, ...]]] = [(tensor_name(T.TOKEN_EMBD), (E, n_vocab))]
        for i in range(self.n_layer):
            out.append((tensor_name(T.ATTN_NORM, i), (E,)))
            out.append((tensor_name(T.ATTN_Q, i), (E, q)))
            out.append((tensor_name(T.ATTN_K, i), (E, kv)))
            out.append((tensor_name(T.ATTN_V, i), (E, kv)))
            if self.qkv_bias:
                out.append((tensor_name(T.ATTN_Q, i, "bias"), (q,)))
                out.append((tensor_name(T.ATTN_K, i, "bias"), (kv,)))
                out.append((tensor_name(T.ATTN_V, i, "bias"), (kv,)))
            if self.qk_norm == "head":
                out.append((tensor_name(T.ATTN_Q_NORM, i), (self.head_dim,)))
                out.append((tensor_name(T.ATTN_K_NORM, i), (self.head_dim,)))
            elif self.qk_norm == "full":
                out.append((tensor_name(T.ATTN_Q_NORM, i), (q,)))
                out.append((tensor_name(T.ATTN_K_NORM, i), (kv,)))
            out.append((tensor_name(T.ATTN_OUT, i), (q, E)))
            if self.attn_out_bias:
                out.append((tensor_name(T.ATTN_OUT, i, "bias"), (E,)))
            out.append((tensor_name(T.FFN_NORM, i), (E,)))
            if i < self.n_dense_lead:
                D = self.n_ff_dense
                out.append((tensor_name(T.FFN_GATE, i), (E, D)))
                out.append((tensor_name(T.FFN_UP, i), (E, D)))
                out.append((tensor_name(T.FFN_DOWN, i), (D, E)))
                continue
            out.append((tensor_name(T.FFN_GATE_INP, i), (E, self.n_expert)))
            if self.probs_bias:
                out.append((tensor_name(T.FFN_EXP_PROBS_B, i, "bias"), (self.n_expert,)))
            out.append((tensor_name(T.FFN_GATE_EXP, i), (E, H, self.n_expert)))
            out.append((tensor_name(T.FFN_UP_EXP, i), (E, H, self.n_expert)))
            out.append((tensor_name(T.FFN_DOWN_EXP, i), (H, E, self.n_expert)))
            if self.n_ff_shexp:
                S = self.n_ff_shexp
                if self.shexp_gated:
                    out.append((tensor_name(T.FFN_GATE_INP_SHEXP, i), (E,)))
                out.append((tensor_name(T.FFN_GATE_SHEXP, i), (E, S)))
                out.append((tensor_name(T.FFN_UP_SHEXP, i), (E, S)))
                out.append((tensor_name(T.FFN_DOWN_SHEXP, i), (S, E)))
        out.append((tensor_name(T.OUTPUT_NORM), (E,)))
        if not self.tied_output:
            out.append((tensor_name(T.OUTPUT), (E, n_vocab)))
        return out


ARCHS: dict[str, ArchSpec] = {
    s.name: s
    for s in (
        # Mixtral layout. Expert width is llama.feed_forward_length. rope type NORM
        # (pairs of consecutive values). Routing: softmax over all experts, top-k, renormalized.
        ArchSpec(
            name="llama-moe",
            arch=arch_name(MODEL_ARCH.LLAMA),
            n_ff_exp=512,
            extra_keys=(("feed_forward_length", 512, "u32"),),
        ),
        # Qwen1.5-MoE layout: q/k/v biases, sigmoid-gated shared expert. rope type NEOX.
        # Expert width: qwen2moe.expert_feed_forward_length; shared: ..._shared_feed_forward_length.
        # Routing: softmax, top-k, NOT renormalized.
        ArchSpec(
            name="qwen2moe",
            arch=arch_name(MODEL_ARCH.QWEN2MOE),
            n_ff_exp=256,
            n_ff_shexp=512,
            rms_eps=1e-6,
            qkv_bias=True,
            extra_keys=(
                ("feed_forward_length", 512, "u32"),
                ("expert_feed_forward_length", 256, "u32"),
                ("expert_shared_feed_forward_length", 512, "u32"),
            ),
        ),
        # Qwen3-MoE layout: per-head q/k RMS norms, tied output (no output.weight). rope NEOX.
        # feed_forward_length (512) is the unused dense width, as in real Qwen3 MoE files:
        # the expert width is qwen3moe.expert_feed_forward_length (256). Routing renormalized.
        ArchSpec(
            name="qwen3moe",
            arch=arch_name(MODEL_ARCH.QWEN3MOE),
            n_ff_exp=256,
            rms_eps=1e-6,
            qk_norm="head",
            tied_output=True,
            key_value_length=True,
            extra_keys=(
                ("feed_forward_length", 512, "u32"),
                ("expert_feed_forward_length", 256, "u32"),
            ),
        ),
        # OLMoE layout: no GQA (llama.cpp requires head_count_kv == head_count), q/k RMS norms
        # over the whole projection ([n_embd]). llama.cpp reads the expert width from
        # olmoe.feed_forward_length. rope NEOX. Routing: softmax, top-k, NOT renormalized.
        ArchSpec(
            name="olmoe",
            arch=arch_name(MODEL_ARCH.OLMOE),
            n_head_kv=8,
            n_ff_exp=256,
            qk_norm="full",
            extra_keys=(("feed_forward_length", 256, "u32"),),
        ),
        # Granite 3.x MoE (granite.cpp's graph): the converter (GraniteMoeModel, a LlamaModel) writes
        # the expert width as feed_forward_length and the multipliers as attention.scale,
        # embedding_scale, residual_scale, logit_scale (Granite 3.0's values, attention 1/head_dim).
        # Granite 3.x ties its output to token_embd; here it is not: the tied logits of these small
        # random embeddings, divided by logit_scale, would be nearly constant (qwen3moe and
        # ernie4_5-moe test the tied head). rope NORM. Routing: softmax, top-k renormalised.
        ArchSpec(
            name="granitemoe",
            arch=arch_name(MODEL_ARCH.GRANITE_MOE),
            n_ff_exp=256,
            ftypes=("q8_0", "q4_k_m"),
            extra_keys=(
                ("feed_forward_length", 256, "u32"),
                ("attention.scale", 1.0 / 32, "f32"),
                ("embedding_scale", 12.0, "f32"),
                ("residual_scale", 0.22, "f32"),
                ("logit_scale", 8.0, "f32"),
            ),
        ),
        # GraniteMoeShared: the same plus an ungated shared expert (expert_shared_feed_forward_length).
        ArchSpec(
            name="granitemoe-shexp",
            arch=arch_name(MODEL_ARCH.GRANITE_MOE),
            n_ff_exp=256,
            n_ff_shexp=512,
            shexp_gated=False,
            ftypes=("q8_0", "q4_k_m"),
            extra_keys=(
                ("feed_forward_length", 256, "u32"),
                ("expert_shared_feed_forward_length", 512, "u32"),
                ("attention.scale", 1.0 / 32, "f32"),
                ("embedding_scale", 12.0, "f32"),
                ("residual_scale", 0.22, "f32"),
                ("logit_scale", 8.0, "f32"),
            ),
        ),
        # ERNIE-4.5-21B-A3B layout (Ernie4_5MoeModel): leading dense layer (moe_layer_start_index 1,
        # interval 1), the selection bias exp_probs_b (e_score_correction_bias), two shared experts
        # as one FFN of intermediate_size // num_kv_heads, tied output. rope NORM, theta 500000.
        # Routing: softmax, top-k of probs + bias, weights from the unbiased probs, renormalised.
        ArchSpec(
            name="ernie4_5-moe",
            arch=arch_name(MODEL_ARCH.ERNIE4_5_MOE),
            n_ff_exp=256,
            n_ff_shexp=256,
            shexp_gated=False,
            n_dense_lead=1,
            n_ff_dense=512,
            probs_bias=True,
            rope_freq_base=500000.0,
            tied_output=True,
            ftypes=("q8_0", "q4_k_m"),
            extra_keys=(
                ("feed_forward_length", 512, "u32"),
                ("expert_feed_forward_length", 256, "u32"),
                ("expert_shared_feed_forward_length", 256, "u32"),
                ("expert_shared_count", 2, "u32"),
                ("interleave_moe_layer_step", 1, "u32"),
                ("leading_dense_block_count", 1, "u32"),
            ),
        ),
        # DeepSeek-V2-Lite layout: MLA without q compression (attn_q), the absorbed attn_k_b/attn_v_b
        # that current converters write (head_count_kv 1: MQA over the latent), one leading dense layer,
        # a shared expert, softmax routing scaled by expert_weights_scale, YaRN RoPE with the
        # converter's yarn_log_multiplier (0.1 * mscale_all_dim). rope NORM.
        ArchSpec(
            name="deepseek2-lite",
            arch="deepseek2",
            n_head_kv=1,
            n_ff_exp=256,
            n_ff_shexp=256,
            rms_eps=1e-6,
            rope_dims=16,
            mla=(0, 64, 16, 32, 32),
            n_dense_lead=1,
            n_ff_dense=512,
            extra_keys=(
                ("leading_dense_block_count", 1, "u32"),
                ("feed_forward_length", 512, "u32"),
                ("expert_feed_forward_length", 256, "u32"),
                ("expert_shared_count", 1, "u32"),
                ("expert_weights_scale", 1.5, "f32"),
                ("expert_weights_norm", False, "bool"),
                ("expert_gating_func", 1, "u32"),
                ("attention.q_lora_rank", 0, "u32"),
                ("attention.kv_lora_rank", 64, "u32"),
                ("attention.key_length", 64 + 16, "u32"),
                ("attention.value_length", 64, "u32"),
                ("attention.key_length_mla", 32 + 16, "u32"),
                ("attention.value_length_mla", 32, "u32"),
                ("rope.scaling.type", "yarn", "str"),
                ("rope.scaling.factor", 4.0, "f32"),
                ("rope.scaling.original_context_length", 128, "u32"),
                ("rope.scaling.yarn_log_multiplier", 0.0707, "f32"),
            ),
        ),
        # The legacy layout older converters wrote: one attn_kv_b [kv_lora, n_head * (nope + v)] instead
        # of attn_k_b/attn_v_b, no attention.*_mla keys, head_count_kv = head_count. llama.cpp runs it as
        # plain multi-head attention with K heads nope + rope = 64 and V heads 32 wide (different sizes,
        # K's a multiple of 64: a quantized K cache is Hadamard-rotated, V's is not). Otherwise as -lite.
        ArchSpec(
            name="deepseek2-legacy",
            arch="deepseek2",
            n_head_kv=8,
            n_ff_exp=256,
            n_ff_shexp=256,
            rms_eps=1e-6,
            rope_dims=16,
            mla=(0, 64, 16, 48, 32),
            mla_legacy=True,
            n_dense_lead=1,
            n_ff_dense=512,
            ftypes=("f32", "q8_0"),
            extra_keys=(
                ("leading_dense_block_count", 1, "u32"),
                ("feed_forward_length", 512, "u32"),
                ("expert_feed_forward_length", 256, "u32"),
                ("expert_shared_count", 1, "u32"),
                ("expert_weights_scale", 1.5, "f32"),
                ("expert_weights_norm", False, "bool"),
                ("expert_gating_func", 1, "u32"),
                ("attention.q_lora_rank", 0, "u32"),
                ("attention.kv_lora_rank", 64, "u32"),
                ("attention.key_length", 48 + 16, "u32"),
                ("attention.value_length", 32, "u32"),
                ("rope.scaling.type", "yarn", "str"),
                ("rope.scaling.factor", 4.0, "f32"),
                ("rope.scaling.original_context_length", 128, "u32"),
                ("rope.scaling.yarn_log_multiplier", 0.0707, "f32"),
            ),
        ),
        # DeepSeek-V3 style (Moonlight, GLM-4.7-Flash): q_lora (attn_q_a -> norm -> attn_q_b), sigmoid
        # scores with the exp_probs_b selection bias, group-limited routing (4 groups, best 2 kept),
        # renormalised weights scaled by 2.5, one leading dense layer, a shared expert. No RoPE scaling.
        # Its latent head (kv_lora 96 + rope 32 = 128) is a multiple of 64, as real models' 512 + 64.
        ArchSpec(
            name="deepseek2-v3",
            arch="deepseek2",
            n_head_kv=1,
            n_ff_exp=256,
            n_ff_shexp=256,
            rms_eps=1e-6,
            rope_dims=32,
            mla=(128, 96, 32, 32, 32),
            n_dense_lead=1,
            n_ff_dense=512,
            probs_bias=True,
            extra_keys=(
                ("leading_dense_block_count", 1, "u32"),
                ("feed_forward_length", 512, "u32"),
                ("expert_feed_forward_length", 256, "u32"),
                ("expert_shared_count", 1, "u32"),
                ("expert_weights_scale", 2.5, "f32"),
                ("expert_weights_norm", True, "bool"),
                ("expert_gating_func", 2, "u32"),
                ("expert_group_count", 4, "u32"),
                ("expert_group_used_count", 2, "u32"),
                ("attention.q_lora_rank", 128, "u32"),
                ("attention.kv_lora_rank", 96, "u32"),
                ("attention.key_length", 96 + 32, "u32"),
                ("attention.value_length", 96, "u32"),
                ("attention.key_length_mla", 32 + 32, "u32"),
                ("attention.value_length_mla", 32, "u32"),
            ),
        ),
        # gpt-oss layout (llama.cpp arch gpt-oss, src/models/openai-moe.cpp): q/k/v/o biases, attention
        # sinks, sliding-window attention on every second layer (window 16, so that it masks within the
        # tests' lengths), post_attention_norm before the experts, router and expert biases, YaRN RoPE
        # (NEOX), the clamped swiglu_oai activation, softmax over the selected experts. MXFP4 experts.
        ArchSpec(
            name="gpt-oss",
            arch="gpt-oss",
            n_ff_exp=256,
            rms_eps=1e-5,
            rope_freq_base=150000.0,
            key_value_length=True,
            ftypes=("f32", "q8_0", "mxfp4"),
            extra_keys=(
                ("expert_feed_forward_length", 256, "u32"),
                ("attention.sliding_window", 16, "u32"),
                ("rope.scaling.type", "yarn", "str"),
                ("rope.scaling.factor", 8.0, "f32"),
                ("rope.scaling.original_context_length", 64, "u32"),
            ),
        ),
    )
}

# file types: suffix -> llama_ftype (None: written by gguf-py as F32)
FTYPES: dict[str, int | None] = {
    "f32": None,
    "q8_0": 7,  # LLAMA_FTYPE_MOSTLY_Q8_0
    "q4_k_m": 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    "mxfp4": 38,  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE: MXFP4 experts (gpt-oss)
}

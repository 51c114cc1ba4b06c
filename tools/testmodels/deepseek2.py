"""deepseek2 test-model tensors in llama.cpp's layout (llama_model_deepseek2::load_arch_tensors).

The absorbed MLA layout current converters write: attn_kv_a_mqa [n_embd, kv_lora + rope],
attn_k_b [nope, kv_lora, n_head], attn_v_b [kv_lora, v_head, n_head]; attn_q (V2-Lite) or
attn_q_a / attn_q_a_norm / attn_q_b (q_lora); leading dense layers; exp_probs_b; shared experts.
With spec.mla_legacy, the older converters' layout: one attn_kv_b [kv_lora, n_head * (nope + v)].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgemoe.format.schema import T, tensor_name

if TYPE_CHECKING:
    from .archs import ArchSpec


def deepseek2_shapes(spec: "ArchSpec", n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml ne) of every tensor, in the order llama.cpp's converter writes them."""
    assert spec.mla is not None
    q_lora, kv_lora, rope, nope, v_head = spec.mla
    E, H, S, X, nh = spec.n_embd, spec.n_ff_exp, spec.n_ff_shexp, spec.n_expert, spec.n_head
    head_k = nope + rope
    out: list[tuple[str, tuple[int, ...]]] = [(tensor_name(T.TOKEN_EMBD), (E, n_vocab))]
    for i in range(spec.n_layer):
        out.append((tensor_name(T.ATTN_NORM, i), (E,)))
        if q_lora:
            out.append((tensor_name(T.ATTN_Q_A, i), (E, q_lora)))
            out.append((tensor_name(T.ATTN_Q_A_NORM, i), (q_lora,)))
            out.append((tensor_name(T.ATTN_Q_B, i), (q_lora, nh * head_k)))
        else:
            out.append((tensor_name(T.ATTN_Q, i), (E, nh * head_k)))
        out.append((tensor_name(T.ATTN_KV_A_MQA, i), (E, kv_lora + rope)))
        out.append((tensor_name(T.ATTN_KV_A_NORM, i), (kv_lora,)))
        if spec.mla_legacy:  # older converters: k_b and v_b unsplit, per head nope rows then v_head rows
            out.append((tensor_name(T.ATTN_KV_B, i), (kv_lora, nh * (nope + v_head))))
        else:
            out.append((tensor_name(T.ATTN_K_B, i), (nope, kv_lora, nh)))
            out.append((tensor_name(T.ATTN_V_B, i), (kv_lora, v_head, nh)))
        out.append((tensor_name(T.ATTN_OUT, i), (nh * v_head, E)))
        out.append((tensor_name(T.FFN_NORM, i), (E,)))
        if i < spec.n_dense_lead:
            out.append((tensor_name(T.FFN_GATE, i), (E, spec.n_ff_dense)))
            out.append((tensor_name(T.FFN_UP, i), (E, spec.n_ff_dense)))
            out.append((tensor_name(T.FFN_DOWN, i), (spec.n_ff_dense, E)))
            continue
        out.append((tensor_name(T.FFN_GATE_INP, i), (E, X)))
        if spec.probs_bias:
            out.append((tensor_name(T.FFN_EXP_PROBS_B, i, "bias"), (X,)))
        out.append((tensor_name(T.FFN_GATE_EXP, i), (E, H, X)))
        out.append((tensor_name(T.FFN_UP_EXP, i), (E, H, X)))
        out.append((tensor_name(T.FFN_DOWN_EXP, i), (H, E, X)))
        out.append((tensor_name(T.FFN_GATE_SHEXP, i), (E, S)))
        out.append((tensor_name(T.FFN_UP_SHEXP, i), (E, S)))
        out.append((tensor_name(T.FFN_DOWN_SHEXP, i), (S, E)))
    out.append((tensor_name(T.OUTPUT_NORM), (E,)))
    if not spec.tied_output:
        out.append((tensor_name(T.OUTPUT), (E, n_vocab)))
    return out

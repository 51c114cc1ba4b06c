"""deepseek2 test-model tensors in llama.cpp's layout (llama_model_deepseek2::load_arch_tensors).

The absorbed MLA layout current converters write: attn_kv_a_mqa [n_embd, kv_lora + rope],
attn_k_b [nope, kv_lora, n_head], attn_v_b [kv_lora, v_head, n_head]; attn_q (V2-Lite) or
attn_q_a / attn_q_a_norm / attn_q_b (q_lora); leading dense layers; exp_probs_b; shared experts.
With spec.mla_legacy, the older converters' layout: one attn_kv_b [kv_lora, n_head * (nope + v)].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .archs import ArchSpec


def deepseek2_shapes(spec: "ArchSpec", n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml ne) of every tensor, in the order llama.cpp's converter writes them."""
    assert spec.mla is not None
    q_lora, kv_lora, rope, nope, v_head = spec.mla
    E, H, S, X, nh = spec.n_embd, spec.n_ff_exp, spec.n_ff_shexp, spec.n_expert, spec.n_head
    head_k = nope + rope
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (E, n_vocab))]
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        out.append((p + "attn_norm.weight", (E,)))
        if q_lora:
            out.append((p + "attn_q_a.weight", (E, q_lora)))
            out.append((p + "attn_q_a_norm.weight", (q_lora,)))
            out.append((p + "attn_q_b.weight", (q_lora, nh * head_k)))
        else:
            out.append((p + "attn_q.weight", (E, nh * head_k)))
        out.append((p + "attn_kv_a_mqa.weight", (E, kv_lora + rope)))
        out.append((p + "attn_kv_a_norm.weight", (kv_lora,)))
        if spec.mla_legacy:  # older converters: k_b and v_b unsplit, per head nope rows then v_head rows
            out.append((p + "attn_kv_b.weight", (kv_lora, nh * (nope + v_head))))
        else:
            out.append((p + "attn_k_b.weight", (nope, kv_lora, nh)))
            out.append((p + "attn_v_b.weight", (kv_lora, v_head, nh)))
        out.append((p + "attn_output.weight", (nh * v_head, E)))
        out.append((p + "ffn_norm.weight", (E,)))
        if i < spec.n_dense_lead:
            out.append((p + "ffn_gate.weight", (E, spec.n_ff_dense)))
            out.append((p + "ffn_up.weight", (E, spec.n_ff_dense)))
            out.append((p + "ffn_down.weight", (spec.n_ff_dense, E)))
            continue
        out.append((p + "ffn_gate_inp.weight", (E, X)))
        if spec.probs_bias:
            out.append((p + "exp_probs_b.bias", (X,)))
        out.append((p + "ffn_gate_exps.weight", (E, H, X)))
        out.append((p + "ffn_up_exps.weight", (E, H, X)))
        out.append((p + "ffn_down_exps.weight", (H, E, X)))
        out.append((p + "ffn_gate_shexp.weight", (E, S)))
        out.append((p + "ffn_up_shexp.weight", (E, S)))
        out.append((p + "ffn_down_shexp.weight", (S, E)))
    out.append(("output_norm.weight", (E,)))
    if not spec.tied_output:
        out.append(("output.weight", (E, n_vocab)))
    return out

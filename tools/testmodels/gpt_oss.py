"""gpt-oss test-model tensors in llama.cpp's layout (llama_model_openai_moe::load_arch_tensors).

Every projection has a bias (attn_q/k/v/output, ffn_gate_inp, each stacked expert tensor: bias
[n_out, n_expert]), attn_sinks holds one logit per head, post_attention_norm is the FFN's norm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .archs import ArchSpec


def gpt_oss_shapes(spec: "ArchSpec", n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml ne) of every tensor, in the order llama.cpp's converter writes them."""
    E, H, X = spec.n_embd, spec.n_ff_exp, spec.n_expert
    q, kv = spec.n_embd_q, spec.n_embd_k_gqa
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (E, n_vocab))]
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (E,)),
            (p + "attn_q.weight", (E, q)), (p + "attn_q.bias", (q,)),
            (p + "attn_k.weight", (E, kv)), (p + "attn_k.bias", (kv,)),
            (p + "attn_v.weight", (E, kv)), (p + "attn_v.bias", (kv,)),
            (p + "attn_output.weight", (q, E)), (p + "attn_output.bias", (E,)),
            (p + "attn_sinks.weight", (spec.n_head,)),
            (p + "post_attention_norm.weight", (E,)),
            (p + "ffn_gate_inp.weight", (E, X)), (p + "ffn_gate_inp.bias", (X,)),
            (p + "ffn_gate_exps.weight", (E, H, X)), (p + "ffn_gate_exps.bias", (H, X)),
            (p + "ffn_up_exps.weight", (E, H, X)), (p + "ffn_up_exps.bias", (H, X)),
            (p + "ffn_down_exps.weight", (H, E, X)), (p + "ffn_down_exps.bias", (E, X)),
        ]
    out.append(("output_norm.weight", (E,)))
    out.append(("output.weight", (E, n_vocab)))
    return out

"""gpt-oss test-model tensors in llama.cpp's layout (llama_model_openai_moe::load_arch_tensors).

Every projection has a bias (attn_q/k/v/output, ffn_gate_inp, each stacked expert tensor: bias
[n_out, n_expert]), attn_sinks holds one logit per head, post_attention_norm is the FFN's norm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgemoe.format.schema import T, tensor_name

if TYPE_CHECKING:
    from .archs import ArchSpec


def gpt_oss_shapes(spec: "ArchSpec", n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml ne) of every tensor, in the order llama.cpp's converter writes them."""
    E, H, X = spec.n_embd, spec.n_ff_exp, spec.n_expert
    q, kv = spec.n_embd_q, spec.n_embd_k_gqa
    out: list[tuple[str, tuple[int, ...]]] = [(tensor_name(T.TOKEN_EMBD), (E, n_vocab))]
    for i in range(spec.n_layer):
        out += [
            (tensor_name(T.ATTN_NORM, i), (E,)),
            (tensor_name(T.ATTN_Q, i), (E, q)), (tensor_name(T.ATTN_Q, i, "bias"), (q,)),
            (tensor_name(T.ATTN_K, i), (E, kv)), (tensor_name(T.ATTN_K, i, "bias"), (kv,)),
            (tensor_name(T.ATTN_V, i), (E, kv)), (tensor_name(T.ATTN_V, i, "bias"), (kv,)),
            (tensor_name(T.ATTN_OUT, i), (q, E)), (tensor_name(T.ATTN_OUT, i, "bias"), (E,)),
            (tensor_name(T.ATTN_SINKS, i), (spec.n_head,)),
            (tensor_name(T.ATTN_POST_NORM, i), (E,)),
            (tensor_name(T.FFN_GATE_INP, i), (E, X)), (tensor_name(T.FFN_GATE_INP, i, "bias"), (X,)),
            (tensor_name(T.FFN_GATE_EXP, i), (E, H, X)), (tensor_name(T.FFN_GATE_EXP, i, "bias"), (H, X)),
            (tensor_name(T.FFN_UP_EXP, i), (E, H, X)), (tensor_name(T.FFN_UP_EXP, i, "bias"), (H, X)),
            (tensor_name(T.FFN_DOWN_EXP, i), (H, E, X)), (tensor_name(T.FFN_DOWN_EXP, i, "bias"), (E, X)),
        ]
    out.append((tensor_name(T.OUTPUT_NORM), (E,)))
    out.append((tensor_name(T.OUTPUT), (E, n_vocab)))
    return out

"""Small structurally-valid MoE GGUFs written in-process, for fast format and bad-input tests.

They are not meant to be run by llama.cpp (the generated test models in build/fixtures are);
they exercise the converter's handling of types, fused tensors and malformed layouts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize


def write_moe(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_experts: int = 4,
    n_embd: int = 64,
    n_ff: int = 96,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    fused: bool = False,
    with_experts: bool = True,
    skip_tensor: str | None = None,
    bad_shape_tensor: str | None = None,
    int8_tensor: str | None = None,
    expert_bias: str | None = None,
    meta_u32: dict[str, int] | None = None,
    seed: int = 0,
    extra_u32: dict[str, int] | None = None,
) -> Path:
    """int8_tensor: that tensor is written as I8; expert_bias: a part ("up") whose stacked experts get a
    bias; meta_u32: more <arch>.* keys."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    for key, value in (extra_u32 or {}).items():
        w.add_uint32(key, value)
    w.add_uint32(f"{arch}.block_count", n_layers)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.feed_forward_length", n_ff)
    for k, v in (meta_u32 or {}).items():
        w.add_uint32(f"{arch}.{k}", v)
    if with_experts:
        w.add_uint32(f"{arch}.expert_count", n_experts)
        w.add_uint32(f"{arch}.expert_used_count", 2)
    w.add_key_value("tokenizer.ggml.tokens", ["a", "b", ""], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_key_value("general.empty_string", "", GGUFValueType.STRING)
    w.add_key_value("general.some_float", 0.1, GGUFValueType.FLOAT32)

    def add(name: str, shape_np: tuple[int, ...], q: GGMLQuantizationType = GGMLQuantizationType.F32) -> None:
        if name == skip_tensor:
            return
        if name == bad_shape_tensor:
            shape_np = (shape_np[0] + 1, *shape_np[1:])
        data = rng.standard_normal(shape_np).astype(np.float32)
        if name == int8_tensor:
            w.add_tensor(name, data.astype(np.int8))
        elif q == GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantize(data, q), raw_dtype=q)

    add("token_embd.weight", (8, n_embd))
    for layer in range(n_layers):
        add(f"blk.{layer}.attn_norm.weight", (n_embd,))
        add(f"blk.{layer}.attn_q.weight", (n_embd, n_embd), qtype)
        if not with_experts:
            add(f"blk.{layer}.ffn_up.weight", (n_ff, n_embd), qtype)
            continue
        add(f"blk.{layer}.ffn_gate_inp.weight", (n_experts, n_embd))
        if fused:
            add(f"blk.{layer}.ffn_gate_up_exps.weight", (n_experts, 2 * n_ff, n_embd), qtype)
        else:
            add(f"blk.{layer}.ffn_gate_exps.weight", (n_experts, n_ff, n_embd), qtype)
            add(f"blk.{layer}.ffn_up_exps.weight", (n_experts, n_ff, n_embd), qtype)
        add(f"blk.{layer}.ffn_down_exps.weight", (n_experts, n_embd, n_ff), qtype)
        if expert_bias is not None:
            add(f"blk.{layer}.ffn_{expert_bias}_exps.bias", (n_experts, n_embd if expert_bias == "down" else n_ff))
    add("output_norm.weight", (n_embd,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

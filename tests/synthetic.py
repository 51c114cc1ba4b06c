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
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", n_layers)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.feed_forward_length", n_ff)
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
        if q == GGMLQuantizationType.F32:
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
    add("output_norm.weight", (n_embd,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

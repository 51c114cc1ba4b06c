"""Deterministic random-weight MoE GGUF test models (llama, qwen2moe, qwen3moe, olmoe, deepseek2, gpt-oss).

    python -m tools.testmodels OUT_DIR [--only NAME ...]

writes OUT_DIR/<model>-<type>.gguf (models llama-moe, qwen2moe, qwen3moe, olmoe, deepseek2-lite,
deepseek2-v3 in types f32, q8_0, q4_k_m; deepseek2-legacy (the attn_kv_b layout) in f32 and q8_0; granitemoe, granitemoe-shexp, ernie4_5-moe in q8_0 and
q4_k_m; gpt-oss in f32, q8_0, mxfp4; MODELS lists them as (file stem, arch, type)) and
OUT_DIR/fixtures.json (file, model, arch, type, size, sha256 of each, and the generator fingerprint).
"""

from .archs import ARCHS, FTYPES, ArchSpec
from .generate import (
    MODELS,
    build_all,
    build_model,
    ensure_built,
    file_name,
    fingerprint,
    is_fresh,
    smollm2_path,
    tokenizer_kvs,
)

__all__ = [
    "ARCHS",
    "FTYPES",
    "MODELS",
    "ArchSpec",
    "build_all",
    "build_model",
    "ensure_built",
    "file_name",
    "fingerprint",
    "is_fresh",
    "smollm2_path",
    "tokenizer_kvs",
]

"""Random-weight MoE GGUFs with the exact shapes of real models (OLMoE-1B-7B, Qwen3-30B-A3B),
streamed to disk, for benchmarks.

    python -m tools.fullsize OUT_DIR [--model olmoe-1b-7b|qwen3-30b-a3b] [--layers N] [--experts N]

writes OUT_DIR/<model>.gguf (or <model>-l<N>-e<M>.gguf when scaled down). See generate.py.
"""

from .generate import MODELS, build_model, file_name, model_spec, plan

__all__ = ["MODELS", "build_model", "file_name", "model_spec", "plan"]

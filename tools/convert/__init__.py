"""The convert-model tool: a MoE GGUF -> trunk.gguf + one GGUF per (layer, expert) + manifest.json."""

from tools.convert.plan import ConversionPlan, plan_conversion
from tools.convert.write import write_model

__all__ = ["ConversionPlan", "plan_conversion", "write_model"]

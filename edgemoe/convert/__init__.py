"""`edgemoe convert`'s converter: a MoE GGUF -> trunk.gguf + one GGUF per (layer, expert) + manifest.json."""

from edgemoe.convert.plan import ConversionPlan, plan_conversion
from edgemoe.convert.write import write_model

__all__ = ["ConversionPlan", "plan_conversion", "write_model"]

"""The edgemoe model directory: a trunk GGUF, one GGUF per (layer, expert), and a manifest."""

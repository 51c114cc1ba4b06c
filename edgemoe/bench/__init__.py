"""Benchmarks: edgemoe against llama.cpp on the same GGUF, measured in the same run."""

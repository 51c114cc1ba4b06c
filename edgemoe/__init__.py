"""edgemoe: Mixture-of-Experts GGUF models on clusters of small edge devices (OD-MoE)."""

__version__ = "0.1.0"

"""Capacity planning: what a model is (facts), what a cluster of boards holds (memory plan) and how
fast it decodes (the OD-MoE pipeline model). Pure functions over numbers; no processes, no sockets.

    facts.py     a converted model directory or a GGUF -> ModelFacts (edgemoe info)
    memory.py    ModelFacts + boards -> which experts stay resident where, what streams, does it fit
    pipeline.py  memory plan + board speeds -> predicted decode tok/s and the bottleneck (edgemoe plan)
"""

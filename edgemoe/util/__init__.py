"""Small helpers shared by every layer: process stats, llama.cpp plumbing."""

"""Model layer: per-architecture config, trunk graph, expert FFN, KV cache, tokenizer, sampling."""

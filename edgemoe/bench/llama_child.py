"""llama.cpp in a process of its own, for benchmarks that measure it as the kernel sees it.

    python -m edgemoe.bench.llama_child MODEL.gguf --threads T --n-ctx N

reads one JSON request per stdin line ({"prompt": [ids], "n_predict": n}) and answers each with one
JSON line on stdout ({"decode_tok_s", "prefill_tok_s", "tokens", "peak_rss"}); exits at end of input.
Running it apart keeps its memory out of the coordinator's figures, and lets a bench confine it
to a memory cgroup (edgemoe.bench.confined).
"""

from __future__ import annotations

import argparse
import json
import sys

from edgemoe.oracle import LlamaCppReference
from edgemoe.util.proc import peak_rss_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgemoe.bench.llama_child")
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-ctx", type=int, default=256)
    args = p.parse_args(argv)
    with LlamaCppReference(args.model, n_ctx=args.n_ctx, n_threads=args.threads) as ref:
        print(json.dumps({"ready": True, "peak_rss": peak_rss_bytes()}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            trace = ref.greedy([int(t) for t in req["prompt"]], int(req["n_predict"]))
            print(json.dumps({"decode_tok_s": trace.decode_tok_s, "prefill_tok_s": trace.prefill_tok_s,
                              "tokens": trace.tokens, "peak_rss": peak_rss_bytes()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

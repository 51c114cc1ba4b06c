"""llama.cpp's own batched decode: aggregate tok/s of S sequences decoded together in one llama_decode, against one.

    .venv/bin/python bench/llama_batch.py build/models/demo-moe.gguf [-t 1] [--steps 24]

The reference for `edgemoe bench serve`'s in-process row: how much decoding several sequences in one
step gains on this model and machine when nothing is loaded (medians of the steps, two rounds).
"""

from __future__ import annotations

import argparse
import time

import llama_cpp as L

from edgemoe.util.llamacpp import load_model, model_params

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345]  # any token ids below the vocabulary's size


def step_seconds(model, n_seq: int, threads: int, steps: int) -> float:
    """Median seconds of one decode step of n_seq sequences (each one token), after their prompts."""
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 1024, 512, 512, n_seq
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(512, 0, n_seq)
    try:
        def put(i: int, token: int, pos: int, seq: int, logits: bool) -> None:
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, int(logits)
            batch.seq_id[i][0] = seq

        n = 0
        for s in range(n_seq):  # each sequence its own prompt (shifted ids), all prefilled in one batch
            for i, t in enumerate(PROMPT):
                put(n, t + s, i, s, i == len(PROMPT) - 1)
                n += 1
        batch.n_tokens = n
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompts")
        times = []
        for step in range(steps):
            for s in range(n_seq):
                put(s, 100 + step + s, len(PROMPT) + step, s, True)
            batch.n_tokens = n_seq
            t0 = time.perf_counter()
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            L.llama_synchronize(ctx)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--sequences", default="1,2,4,8", help="comma-separated counts (default 1,2,4,8)")
    a = p.parse_args()
    counts = [int(x) for x in a.sequences.split(",")]
    model = load_model(a.gguf, model_params())  # llama.cpp's defaults (repacking where it can run)
    try:
        for _ in range(2):
            dt = {n: step_seconds(model, n, a.threads, a.steps) for n in counts}
            one = 1 / dt[counts[0]] * counts[0]
            print("  ".join(f"{n} seq: {n / dt[n]:.1f} tok/s ({n / dt[n] / one:.2f}x)" for n in counts), flush=True)
    finally:
        L.llama_model_free(model)


if __name__ == "__main__":
    main()

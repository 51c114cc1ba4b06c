"""Profile decode steps of 1 and of N sequences together on a local cluster (cProfile of the coordinator).

    .venv/bin/python bench/profile_batch.py build/models/demo-moe --workers 4 --memory-budget 192MiB -n 4

Prints ms per step, aggregate tok/s and the distinct experts routed per MoE layer for each, then the
coordinator's profile of the last N-sequence round (sorted by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

from edgemoe.cluster.session import ClusterOptions, open_engine

PROMPTS = [[1, 2, 3, 4], [9, 8, 7], [100, 200, 300, 400, 500], [42, 43], [5, 6, 7], [11, 12], [77, 78, 79], [300, 3]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--memory-budget")
    p.add_argument("--predictor", default="lookahead")
    p.add_argument("-n", "--sequences", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--top", type=int, default=12, help="profile lines printed (default 12)")
    a = p.parse_args()
    opts = ClusterOptions(workers=a.workers, predictor=a.predictor, memory_budget=a.memory_budget)
    with open_engine(a.model, opts, n_ctx=256, n_threads=1, n_seq=a.sequences) as e:
        for n in (1, a.sequences, 1, a.sequences):
            e.reset()
            out = e.eval_batch([(s, PROMPTS[s % len(PROMPTS)]) for s in range(n)])
            last = [int(np.argmax(o[0])) for o in out]
            distinct = []
            prof = cProfile.Profile()
            trunk0, experts0 = e.stats.trunk_s, e.stats.experts_s
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(a.steps):
                out = e.eval_batch([(s, [last[s]]) for s in range(n)])
                distinct.append(np.mean([len(np.unique(e.routing[l])) for l in e.moe_layers[:-1]]))
                last = [int(np.argmax(o[0])) for o in out]
            prof.disable()
            dt = (time.perf_counter() - t0) / a.steps
            print(f"{n} sequence(s): {dt * 1e3:.0f} ms/step, aggregate {n / dt:.2f} tok/s, "
                  f"{np.mean(distinct):.2f} distinct experts per layer; trunk "
                  f"{(e.stats.trunk_s - trunk0) / a.steps * 1e3:.0f} ms, experts (the cluster's answers) "
                  f"{(e.stats.experts_s - experts0) / a.steps * 1e3:.0f} ms per step", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()

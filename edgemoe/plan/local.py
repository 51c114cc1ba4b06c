"""The planner's prediction for a local cluster on this machine (what `edgemoe bench cluster` runs), so the
bench can print it next to the decode speed it measures: the validation of the pipeline model.

Every process shares this host's cores and disk (shared_host); the board speeds are this machine's
(edgemoe.bench.board measures them, or a profile written by edgemoe profile-board gives them).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from edgemoe.cluster.budget import parse_size
from edgemoe.plan.facts import facts_of_dir
from edgemoe.plan.memory import WorkerSpec, plan_memory
from edgemoe.plan.pipeline import BoardSpeed, SpeedPrediction, predict_decode


def this_machine(model_dir: str | os.PathLike[str], threads: int, profile: str | None = None) -> tuple[BoardSpeed, int]:
    """(speeds, worker baseline bytes) of this machine: from a measured profile, else measured now."""
    if profile is not None:
        from edgemoe.plan.cluster import board_speed, missing_speeds, resolve_profile

        p = resolve_profile(profile)
        if missing_speeds(p):
            from edgemoe.errors import UserError

            raise UserError(f"{profile}: lacks {', '.join(missing_speeds(p))} (write it with edgemoe profile-board)")
        return replace(board_speed(p), threads=threads), p.worker_baseline or 0
    from edgemoe.bench.board import (compute_rate, cores, layer_overhead, loopback, request_cost, storage_rate,
                                     worker_baseline)

    model_dir = Path(model_dir)
    n_embd = facts_of_dir(model_dir).n_embd
    comp = compute_rate(model_dir, threads, n_embd)
    rtt, bw = loopback(n_embd)
    storage = storage_rate(model_dir)
    speed = BoardSpeed("this-machine", cores(), threads, comp * 1e6, storage * 1e6, rtt * 1e-6, bw * 1e6,
                       layer_overhead(model_dir, threads, comp) * 1e-6, request_cost(model_dir, threads) * 1e-6)
    return speed, worker_baseline()


def predict_local_cluster(model_dir: str | os.PathLike[str], *, workers: int, memory_budget: str | None, predictor: str,
                          recall: float, machine: BoardSpeed, baseline: int, storage_bytes_s: float | None = None,
                          shadow_node: bool = False, residency: str = "off") -> SpeedPrediction:
    """Decode speed the planner predicts for `edgemoe bench cluster`'s local cluster of `workers` workers.
    storage_bytes_s: the cold shard read rate of all the workers' loaders together (the bench measures it)."""
    facts = facts_of_dir(model_dir)
    # the planner knows the shadow's cost (a second decode) and the reactive one's (no prefetch); the
    # other predictors are cheap look-aheads whose measured recall says what they prefetch
    kind = {"shadow": "shadow", "reanchor": "shadow", "reactive": "reactive"}.get(predictor.split(":")[0], "lookahead")
    budget = parse_size(memory_budget, "--memory-budget") if memory_budget else 1 << 40
    specs = [WorkerSpec(f"worker-{i}", budget, min(baseline, budget // 2)) for i in range(workers)]
    mem = plan_memory(facts, specs, residency=residency, shadow_in_process=not shadow_node)
    if storage_bytes_s:
        machine = replace(machine, storage_bytes_s=storage_bytes_s)
    return predict_decode(facts, mem, [machine] * workers, machine, recall=recall, predictor=kind,
                          shadow_node=shadow_node, shared_host=True)


__all__ = ["predict_local_cluster", "this_machine"]

"""The planner's prediction for a local cluster on this machine (what `edgemoe bench cluster` runs), so the
bench can print it next to the decode speed it measures: the validation of the pipeline model.

Every process shares this host's cores and disk (shared_host); the board speeds are this machine's,
given by the caller (edgemoe.bench.board.this_machine measures them or reads a profile written by
edgemoe profile-board).
"""

from __future__ import annotations

import os

from edgemoe.cluster.budget import DEFAULT_BUDGET, parse_size
from edgemoe.plan.facts import facts_of_dir
from edgemoe.plan.memory import WorkerSpec, plan_memory
from edgemoe.plan.pipeline import BoardSpeed, SpeedPrediction, predict_decode


def predict_local_cluster(model_dir: str | os.PathLike[str], *, workers: int, memory_budget: str | None, predictor: str,
                          recall: float, machine: BoardSpeed, baseline: int, storage_bytes_s: float | None = None,
                          shadow_node: bool = False, residency: str = "off") -> SpeedPrediction:
    """Decode speed the planner predicts for `edgemoe bench cluster`'s local cluster of `workers` workers.
    storage_bytes_s: the cold shard read rate of all the workers' loaders together (the bench measures it;
    None: the machine's own single-loader rate); a single load (a miss) takes the machine's own rate."""
    facts = facts_of_dir(model_dir)
    # the planner knows the shadow's cost (a second decode) and the reactive one's (no prefetch); the
    # other predictors are cheap look-aheads whose measured recall says what they prefetch
    kind = {"shadow": "shadow", "reanchor": "shadow", "reactive": "reactive"}.get(predictor.split(":")[0], "lookahead")
    budget = parse_size(memory_budget or DEFAULT_BUDGET, "--memory-budget")  # (the workers' own default)
    specs = [WorkerSpec(f"worker-{i}", budget, min(baseline, budget // 2)) for i in range(workers)]
    mem = plan_memory(facts, specs, residency=residency, shadow_in_process=not shadow_node)
    return predict_decode(facts, mem, [machine] * workers, machine, recall=recall, predictor=kind,
                          shadow_node=shadow_node, shared_host=True, shared_storage_bytes_s=storage_bytes_s)


__all__ = ["predict_local_cluster"]

"""A cluster described by board profiles -> its memory plan and predicted decode speed (edgemoe plan).

Resolves `PROFILE[:COUNT]` arguments (a TOML path or a name in devices/profiles/), reads routing
counts from an importance matrix, and joins memory.py and pipeline.py into one ClusterPlan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.cluster.profile import DeviceProfile, load_profile
from edgemoe.errors import UserError
from edgemoe.format.schema import expert_tensor_name
from edgemoe.plan.facts import ModelFacts
from edgemoe.plan.memory import DEFAULT_WORKER_BASELINE, MemoryPlan, WorkerSpec, plan_memory
from edgemoe.plan.pipeline import BoardSpeed, SpeedPrediction, predict_decode

PROFILES_DIR = Path(__file__).resolve().parents[2] / "devices" / "profiles"
SPEED_KEYS = ("compute_mb_s", "storage_read_mb_s", "round_trip_us", "layer_overhead_us", "request_us")
MAX_BOARDS = 4096


def resolve_profile(ref: str) -> DeviceProfile:
    """A profile TOML path, or the name of one in devices/profiles/."""
    p = Path(ref)
    if p.is_file() or p.suffix == ".toml" or os.sep in ref:
        return load_profile(p)
    named = PROFILES_DIR / f"{ref}.toml"
    if named.is_file():
        return load_profile(named)
    known = ", ".join(sorted(q.stem for q in PROFILES_DIR.glob("*.toml"))) if PROFILES_DIR.is_dir() else "none"
    raise UserError(f"--board {ref}: no such profile file, nor a profile of that name (devices/profiles has: {known})")


def parse_board(arg: str) -> tuple[DeviceProfile, int]:
    """`PROFILE[:COUNT]` -> (profile, count)."""
    ref, count = arg, 1
    head, sep, tail = arg.rpartition(":")
    if sep and tail.isdigit():
        ref, count = head, int(tail)
    elif sep and tail and not os.path.exists(arg):
        raise UserError(f"--board {arg}: COUNT must be a whole number (PROFILE[:COUNT], e.g. raspberry-pi-4-1gb:8)")
    if not 1 <= count <= MAX_BOARDS:
        raise UserError(f"--board {arg}: COUNT must be from 1 to {MAX_BOARDS}")
    return resolve_profile(ref), count


def missing_speeds(p: DeviceProfile) -> list[str]:
    return [k for k in SPEED_KEYS if getattr(p, k) is None]


def board_speed(p: DeviceProfile) -> BoardSpeed:
    return BoardSpeed(name=p.name, cores=p.cores or p.threads, threads=p.threads,
                      compute_bytes_s=p.compute_mb_s * 1e6, storage_bytes_s=p.storage_read_mb_s * 1e6,
                      round_trip_s=p.round_trip_us * 1e-6,
                      network_bytes_s=(p.network_mb_s or float("inf")) * 1e6, layer_overhead_s=p.layer_overhead_us * 1e-6,
                      request_s=p.request_us * 1e-6,
                      # profiles written before fanout_us was measured: the round trip is its floor
                      fanout_s=(p.fanout_us if p.fanout_us is not None else p.round_trip_us) * 1e-6)


def routing_counts(imatrix_path: str | os.PathLike[str], facts: ModelFacts) -> dict[int, np.ndarray]:
    """Tokens routed to each expert per layer, from an importance matrix's counts (gate or gate_up)."""
    from edgemoe.format.imatrix import read_imatrix

    im = read_imatrix(imatrix_path)
    out: dict[int, np.ndarray] = {}
    for layer in facts.moe_layers:
        for part in ("gate", "gate_up", "up"):
            c = im.counts.get(expert_tensor_name(layer, part))
            if c is not None:
                out[layer] = np.asarray(c, dtype=np.float64)
                break
    if not out:
        raise UserError(f"{imatrix_path}: no routing counts for this model's expert tensors (an imatrix of another model?)")
    return out


def default_imatrix(model_path: str) -> Path | None:
    """The builder's importance matrix next to a converted directory (build/models/NAME.imatrix.gguf)."""
    p = Path(str(Path(model_path)).rstrip("/") + ".imatrix.gguf")
    return p if p.is_file() else None


@dataclass
class ClusterPlan:
    facts: ModelFacts
    boards: list[tuple[DeviceProfile, int]]
    coordinator: DeviceProfile
    memory: MemoryPlan
    speed: SpeedPrediction | None
    speed_missing: dict[str, list[str]]  # profile name -> speed keys it lacks (then no speed prediction)
    imatrix: str | None
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        m = self.memory
        return {
            "model": self.facts.path,
            "boards": [{"profile": p.name, "count": c, "path": str(p.path)} for p, c in self.boards],
            "coordinator": self.coordinator.name,
            "options": self.options,
            "imatrix": self.imatrix,
            "memory": {
                "residency": m.residency, "total_experts": m.total_experts, "resident_experts": m.resident_experts,
                "streamed_experts": m.streamed_experts, "resident_hit": m.resident_hit,
                "coordinator_bytes": m.coordinator_bytes, "coordinator_budget": m.coordinator_budget,
                "coordinator_fits": m.coordinator_fits, "boards_for_all_resident": m.boards_for_all_resident,
                "workers": [{"name": w.name, "budget": w.budget, "baseline": w.baseline, "reserve": w.reserve,
                             "jit_bytes": w.jit_bytes, "resident": w.resident, "resident_bytes": w.resident_bytes}
                            for w in m.workers],
            },
            "speed": self.speed.to_dict() if self.speed else None,
            "speed_missing": self.speed_missing,
        }


def plan_cluster(facts: ModelFacts, boards: list[tuple[DeviceProfile, int]], coordinator: DeviceProfile | None = None,
                 *, residency: str = "auto", predictor: str = "shadow", recall: float = 0.95,
                 shadow_node: bool = False, shared_host: bool = False, imatrix: str | None = None) -> ClusterPlan:
    if not 0.0 <= recall <= 1.0:
        raise UserError(f"--recall {recall}: a recall is from 0 to 1")
    if predictor not in ("shadow", "lookahead", "reactive"):
        raise UserError(f"--predictor {predictor!r}: choose shadow, lookahead or reactive")
    coord = coordinator or boards[0][0]
    counts = routing_counts(imatrix, facts) if imatrix else None
    workers = [WorkerSpec(p.name, p.memory_budget, p.worker_baseline or DEFAULT_WORKER_BASELINE)
               for p, c in boards for _ in range(c)]
    mem = plan_memory(facts, workers, residency=residency, counts=counts,
                      coordinator_budget=coordinator.memory_budget if coordinator else None,
                      shadow_in_process=predictor == "shadow" and not shadow_node)
    missing = {p.name: missing_speeds(p) for p in {p.name: p for p, _ in boards}.values() if missing_speeds(p)}
    if missing_speeds(coord):
        missing[coord.name] = missing_speeds(coord)
    speed = None
    if not missing:
        speeds = [board_speed(p) for p, c in boards for _ in range(c)]
        speed = predict_decode(facts, mem, speeds, board_speed(coord), recall=recall, predictor=predictor,
                               shadow_node=shadow_node, shared_host=shared_host)
    opts = {"residency": residency, "predictor": predictor, "recall": recall, "shadow_node": shadow_node,
            "shared_host": shared_host}
    return ClusterPlan(facts, boards, coord, mem, speed, missing, str(imatrix) if imatrix else None, opts)


__all__ = ["ClusterPlan", "default_imatrix", "parse_board", "plan_cluster", "resolve_profile", "routing_counts"]

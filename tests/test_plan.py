"""The planner (edgemoe/plan/): model facts, the memory plan, the pipeline model, and the CLI's errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgemoe.errors import UserError
from edgemoe.plan.facts import ModelFacts, model_facts
from edgemoe.plan.memory import WorkerSpec, plan_memory, smallest_budget
from edgemoe.plan.pipeline import BoardSpeed, predict_decode
from tests.cli import edgemoe

MiB = 1 << 20


def facts(n_layers: int = 4, n_experts: int = 8, k: int = 2, shard: int = 4 * MiB, shadow: bool = True) -> ModelFacts:
    return ModelFacts(
        path="m", kind="directory", name="m", architecture="llama", n_layers=n_layers, n_embd=512, n_ff_exp=1024,
        n_experts=n_experts, n_experts_used=k, moe_layers=list(range(n_layers)), shared_expert=False,
        trunk_bytes=40 * MiB, expert_bytes=n_layers * n_experts * shard, shard_bytes={i: shard for i in range(n_layers)},
        trunk_types={"Q8_0": 10}, expert_types={"Q8_0": 3 * n_layers}, head_bytes=16 * MiB, embd_bytes=16 * MiB,
        head_tied=True, kv_bytes_per_token=4096,
        shadow={"type": "q4_k", "bytes": 10 * MiB, "expert_bytes": n_layers * n_experts * shard // 2} if shadow else None)


def board(**kw) -> BoardSpeed:
    base = dict(name="b", cores=4, threads=1, compute_bytes_s=4e9, storage_bytes_s=100e6, round_trip_s=200e-6,
                network_bytes_s=100e6, layer_overhead_s=1e-3, request_s=1e-3, fanout_s=300e-6)
    return BoardSpeed(**{**base, **kw})


def workers(n: int, budget: int, baseline: int = 50 * MiB) -> list[WorkerSpec]:
    return [WorkerSpec(f"w{i}", budget, baseline) for i in range(n)]


def test_memory_plan_places_each_expert_at_most_once_within_budgets() -> None:
    f = facts()
    mem = plan_memory(f, workers(3, 80 * MiB))
    assert mem.resident_experts == sum(w.resident for w in mem.workers) < mem.total_experts == 32
    assert mem.streamed_experts == 32 - mem.resident_experts
    for w in mem.workers:
        assert w.used <= w.budget and w.jit_bytes > 0  # streaming workers keep room to load
    assert 0 < mem.resident_hit < 1
    big = plan_memory(f, workers(4, 512 * MiB))
    assert big.resident_experts == 32 and big.resident_hit == 1.0 and not big.streams
    off = plan_memory(f, workers(4, 512 * MiB), residency="off")
    assert off.resident_experts == 0 and off.resident_hit == 0.0
    assert mem.boards_for_all_resident == -(-32 // ((80 * MiB - 50 * MiB - mem.workers[0].reserve) // (4 * MiB) - 3))


def test_residency_keeps_the_most_used_experts() -> None:
    f = facts(n_layers=2, n_experts=4)
    counts = {0: np.array([100.0, 1, 1, 1]), 1: np.array([1.0, 1, 1, 100])}
    room = 50 * MiB + plan_memory(f, workers(1, 200 * MiB)).workers[0].reserve + 5 * 4 * MiB  # 2 resident + k+1 slots
    mem = plan_memory(f, workers(1, room), counts=counts)
    assert mem.resident_experts == 2 and mem.resident_layers == {0: 1, 1: 1}
    assert mem.resident_hit == pytest.approx(100 / 103)


def test_a_budget_below_one_expert_is_an_error_naming_what_works() -> None:
    f = facts()
    need = smallest_budget(f, 50 * MiB)
    with pytest.raises(UserError, match=f"at least {-(-need // MiB)} MiB"):
        plan_memory(f, workers(2, need - 4096))
    assert plan_memory(f, workers(2, need)).workers[0].used <= need


def test_pipeline_names_the_bottleneck() -> None:
    f = facts()
    off = plan_memory(f, workers(4, 512 * MiB), residency="off")
    slow_disk = predict_decode(f, off, [board(storage_bytes_s=5e6)] * 4, board())
    assert slow_disk.bottleneck == "storage"
    resident = plan_memory(f, workers(4, 512 * MiB))
    fast = predict_decode(f, resident, [board(storage_bytes_s=5e6)] * 4, board())
    assert fast.tok_s > slow_disk.tok_s and fast.terms["storage"] == 0.0  # nothing streams
    slow_net = predict_decode(f, resident, [board(request_s=50e-3)] * 4, board())
    assert slow_net.bottleneck == "network"
    slow_coord = predict_decode(f, resident, [board()] * 4, board(compute_bytes_s=20e6))
    assert slow_coord.bottleneck.startswith("coordinator")
    slow_workers = predict_decode(f, resident, [board(compute_bytes_s=10e6)] * 4, board())
    assert slow_workers.bottleneck == "compute"


def test_pipeline_terms_add_up() -> None:
    """The path term is the sum of its parts, computed by hand for one configuration."""
    f = facts(shadow=False)
    mem = plan_memory(f, workers(2, 512 * MiB))  # everything resident
    b = board()
    p = predict_decode(f, mem, [b, b], b, predictor="lookahead")
    L, shard = 4, 4 * MiB
    head = 16 * MiB / 4e9
    trunk = L * ((40 * MiB - 16 * MiB) / L / 4e9 + 1e-3)
    # k=2 over 2 workers: one request each, at once: the fan-out, the second worker's message, one expert each
    per_layer_workers = 300e-6 + 1e-3 + 1 * (2 * 4 * 512 / 100e6 + shard / 4e9)
    assert p.token_s == pytest.approx(head + trunk + L * per_layer_workers)
    assert p.tok_s == pytest.approx(1 / p.token_s)
    # one worker: one request per layer for both experts (one graph), no second message
    one = predict_decode(f, plan_memory(f, workers(1, 512 * MiB)), [b], b, predictor="lookahead")
    assert one.token_s == pytest.approx(head + trunk + L * (300e-6 + 2 * (2 * 4 * 512 / 100e6 + shard / 4e9)))
    # a network whose round trip exceeds the measured fan-out pays the round trip
    far = replace(b, round_trip_s=5e-3)
    assert predict_decode(f, mem, [far, far], b, predictor="lookahead").token_s == pytest.approx(
        p.token_s + L * (5e-3 - 300e-6))
    # misses read shards on demand: a lower recall with streaming is slower
    off = plan_memory(f, workers(2, 512 * MiB), residency="off")
    assert predict_decode(f, off, [b, b], b, recall=0.5).token_s > predict_decode(f, off, [b, b], b, recall=1.0).token_s


def test_shared_host_counts_every_process_on_the_cores() -> None:
    f = facts()
    mem = plan_memory(f, workers(8, 512 * MiB))
    one = board(cores=1)
    shared = predict_decode(f, mem, [one] * 8, one, shared_host=True)
    own = predict_decode(f, mem, [one] * 8, one)
    assert shared.token_s >= own.token_s and shared.terms["cpu"] > 0


def test_facts_of_a_converted_model_and_its_gguf(converted_models: dict[str, Path], fixture_models: list[Path]) -> None:
    d = converted_models["llama-moe-q4_k_m"]
    src = next(p for p in fixture_models if p.stem == "llama-moe-q4_k_m")
    fd, fg = model_facts(d), model_facts(src)
    assert (fd.kind, fg.kind) == ("directory", "gguf")
    for key in ("architecture", "n_layers", "n_embd", "n_experts", "n_experts_used", "moe_layers", "expert_types"):
        assert getattr(fd, key) == getattr(fg, key), key
    assert fd.n_experts == 8 and fd.n_experts_used == 2
    # a shard is its GGUF slice plus the shard file's own header
    for layer, b in fg.shard_bytes.items():
        assert b < fd.shard_bytes[layer] < b + 64 * 1024
    assert fd.manifest.startswith("complete") and fg.manifest.startswith("not converted")


def test_info_and_plan_cli(converted_models: dict[str, Path], tmp_path: Path) -> None:
    d = converted_models["llama-moe-q4_k_m"]
    r = edgemoe("info", str(d), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["n_experts"] == 8 and info["manifest"].startswith("complete")
    r = edgemoe("info", str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "manifest.json" in r.stderr and "Traceback" not in r.stderr
    prof = tmp_path / "b.toml"
    prof.write_text('name = "b"\nmemory_budget = "256MiB"\nthreads = 1\nstorage_read_mb_s = 100\ncores = 4\n'
                    'compute_mb_s = 2000\nround_trip_us = 200\nnetwork_mb_s = 100\nlayer_overhead_us = 500\n'
                    'worker_baseline = "60MiB"\nrequest_us = 800\n')
    r = edgemoe("plan", str(d), "--board", f"{prof}:3", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert len(plan["memory"]["workers"]) == 3 and plan["speed"]["tok_s"] > 0 and plan["speed"]["bottleneck"]
    r = edgemoe("plan", str(d), "--board", "raspberry-pi-4-1gb:2")  # a shipped profile without speeds
    assert r.returncode == 0 and "speed: not predicted" in r.stdout
    tiny = tmp_path / "tiny.toml"
    tiny.write_text('name = "tiny"\nmemory_budget = "16MiB"\nthreads = 1\nworker_baseline = "15MiB"\n')
    for args, message in [((f"{prof}:x",), "COUNT must be a whole number"), (("no-such-board",), "no such profile"),
                          ((str(tiny),), "cannot hold one expert")]:
        r = edgemoe("plan", str(d), "--board", *args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\nmemory_budget = "256MiB"\nthreads = 1\ncompute_mbs = 3\n')
    r = edgemoe("plan", str(d), "--board", str(bad))
    assert r.returncode == 2 and "unknown key 'compute_mbs'" in r.stderr


def test_profile_board_measures_and_writes_a_strict_profile(converted_models: dict[str, Path], tmp_path: Path) -> None:
    from edgemoe.cluster.profile import load_profile

    d = converted_models["llama-moe-q4_k_m"]
    out = tmp_path / "this-machine.toml"
    r = edgemoe("profile-board", str(d), "-o", str(out), "--threads", "1", "--memory-budget", "512MiB")
    assert r.returncode == 0, r.stderr
    p = load_profile(out)
    assert p.name == "this-machine" and p.memory_budget == 512 << 20 and p.threads == 1
    assert p.cores >= 1 and p.memory_total >= p.memory_budget and 16 << 20 < p.worker_baseline < 512 << 20
    for key in ("storage_read_mb_s", "compute_mb_s", "round_trip_us", "network_mb_s"):
        assert getattr(p, key) > 0, key
    assert p.layer_overhead_us >= 0 and p.request_us >= 0
    assert p.fanout_us > 0  # a layer through a worker costs more than the same layer in process
    r = edgemoe("plan", str(d), "--board", f"{out}:2", "--shared-host", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["speed"]["tok_s"] > 0
    r = edgemoe("profile-board", str(d), "-o", str(out))  # exists
    assert r.returncode == 2 and "exists" in r.stderr
    r = edgemoe("profile-board", str(tmp_path), "-o", str(tmp_path / "x.toml"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_a_profile_whose_storage_rate_came_from_the_page_cache_says_so(tmp_path: Path) -> None:
    from edgemoe.bench.board import BoardMeasurement
    from edgemoe.cli.profile_board import render
    from edgemoe.cluster.profile import load_profile

    m = BoardMeasurement(cores=2, memory_total=8 << 30, threads=1, storage_read_mb_s=9000.0, compute_mb_s=900.0,
                         round_trip_us=60.0, network_mb_s=800.0, layer_overhead_us=100.0, worker_baseline=60 << 20,
                         request_us=200.0, fanout_us=900.0, storage_from_page_cache=True)
    for cached in (True, False):
        out = tmp_path / f"b{cached}.toml"
        out.write_text(render("b", 512 << 20, replace(m, storage_from_page_cache=cached), "a board"))
        assert load_profile(out).storage_read_mb_s == 9000.0  # still a valid profile, the number kept
        assert ("the rate below is the page cache's" in out.read_text()) is cached


def test_info_into_a_closed_pipe_ends_quietly(converted_models: dict[str, Path]) -> None:
    """`edgemoe info DIR | head -1`: the reader has left before the output is written; no BrokenPipe
    traceback, SIGPIPE's exit status."""
    import os
    import subprocess
    import sys

    d = converted_models["llama-moe-q4_k_m"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write of the child now fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "edgemoe", "info", str(d)], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_a_host_with_fewer_cores_than_processes_waits_for_its_reads() -> None:
    """On one host with fewer cores than processes the streamed reads join the decode path (measured on 2
    cores with 4 workers); with a core per process they overlap it."""
    f = facts()
    mem = plan_memory(f, workers(4, 80 * MiB))  # streams
    few, many = board(cores=2), board(cores=16)
    a = predict_decode(f, mem, [few] * 4, few, recall=0.9, shared_host=True)
    b = predict_decode(f, mem, [many] * 4, many, recall=0.9, shared_host=True)
    assert a.components["exposed_reads"] > 0
    assert a.components["exposed_reads"] == pytest.approx(a.terms["storage"] - a.components["stall"])
    assert b.components["exposed_reads"] == 0.0
    assert a.terms["path"] == pytest.approx(b.terms["path"] + a.components["exposed_reads"])
    assert predict_decode(f, mem, [few] * 4, few, recall=0.9).components["exposed_reads"] == 0.0  # own boards


def test_the_plan_leaves_a_worker_the_slots_its_admission_keeps() -> None:
    """The planner's resident room per worker is the worker's own: capacity less top-k + 1 slots."""
    from edgemoe.cluster.budget import Admission, default_reserve, jit_slot_count

    f = facts(n_layers=16, n_experts=64, k=8)  # OLMoE's k: nine slots, not two
    w = WorkerSpec("w", 120 * MiB, 40 * MiB)
    plan = plan_memory(f, [w])
    reserve = default_reserve(f.n_embd, f.n_ff_exp)
    capacity = w.budget - w.baseline - reserve
    adm = Admission(w.budget, w.baseline, reserve, jit_room=jit_slot_count(8, capacity, 4 * MiB) * 4 * MiB)
    assert plan.workers[0].resident == adm.resident_room // (4 * MiB) == (capacity - 9 * 4 * MiB) // (4 * MiB)

"""Coordinator + worker processes over real ZeroMQ sockets on loopback == the in-process engine, bit for bit.

Predictions and worker counts may only change speed: tokens and logits must be identical.
Every test that spawns workers stops them (LocalWorkers sends SIGTERM, then SIGKILL, with timeouts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from edgemoe.cluster import schedule
from edgemoe.cluster.session import ClusterOptions, open_engine
from edgemoe.model.engine import Engine
from edgemoe.model.generate import greedy_tokens

PROMPT = [1, 504, 3458, 28, 314, 1110, 253, 2821, 17, 99]
N_PREDICT = 12


def greedy(engine: Engine, n_predict: int = N_PREDICT) -> tuple[list[int], np.ndarray]:
    return greedy_tokens(engine, PROMPT, n_predict)


_reference_cache: dict[str, tuple[list[int], np.ndarray]] = {}


def in_process(model: Path) -> tuple[list[int], np.ndarray]:
    if str(model) not in _reference_cache:
        with Engine(model, n_ctx=256, n_threads=1) as engine:
            _reference_cache[str(model)] = greedy(engine)
    return _reference_cache[str(model)]


def cluster_run(model: Path, **opts) -> tuple[list[int], np.ndarray, dict]:
    with open_engine(model, ClusterOptions(**opts), n_ctx=256, n_threads=1) as engine:
        tokens, logits = greedy(engine)
        return tokens, logits, engine.experts.summary()


def one_per_architecture(names: list[str]) -> list[str]:
    """A test model of each architecture, the quant types taken in turn so that every type appears
    (llama-moe-q4_k_m, olmoe-q8_0, qwen2moe-f32, ...): every architecture and every expert type on
    the cluster at a third of the cost of every model."""
    by_arch: dict[str, list[str]] = {}
    for n in sorted(names):
        by_arch.setdefault(n.rsplit("-", 1)[0], []).append(n)
    chosen: list[str] = []
    for i, models in enumerate(by_arch.values()):
        seen = {c.rsplit("-", 1)[1] for c in chosen}
        fresh = [m for m in models if m.rsplit("-", 1)[1] not in seen]
        chosen.append(fresh[0] if fresh else models[i % len(models)])
    return chosen


def test_the_cluster_subset_covers_every_architecture_and_type(converted_models: dict[str, Path]) -> None:
    chosen = one_per_architecture(list(converted_models))
    assert {n.rsplit("-", 1)[0] for n in chosen} == {n.rsplit("-", 1)[0] for n in converted_models}
    assert {n.rsplit("-", 1)[1] for n in chosen} == {n.rsplit("-", 1)[1] for n in converted_models}


def _on_four_workers(converted_models: dict[str, Path], names: list[str]) -> None:
    for name in names:
        model = converted_models[name]
        want_tokens, want_logits = in_process(model)
        tokens, logits, summary = cluster_run(model, workers=4, predictor="lookahead")
        assert tokens == want_tokens, name
        assert np.array_equal(logits, want_logits), name
        assert sum(w["requests"] for w in summary["workers"]) > 0


def test_every_architecture_and_type_on_four_workers(converted_models: dict[str, Path]) -> None:
    _on_four_workers(converted_models, one_per_architecture(list(converted_models)))


@pytest.mark.slow
def test_every_test_model_on_four_workers(converted_models: dict[str, Path]) -> None:
    _on_four_workers(converted_models, list(converted_models))


# every worker count and every predictor by default; the whole cross product in the slow run
_COUNTS_AND_PREDICTORS = [(w, p, "auto") for w in (1, 2, 8) for p in ("reactive", "random", "lookahead")]
_DEFAULT_PAIRS = {(1, "reactive"), (2, "random"), (8, "lookahead"), (2, "lookahead")}


@pytest.mark.parametrize("workers,predictor,residency", [
    c if (c[0], c[1]) in _DEFAULT_PAIRS else pytest.param(*c, marks=pytest.mark.slow) for c in _COUNTS_AND_PREDICTORS
] + [(1, "reactive", "off"), (2, "lookahead", "off"), (8, "random", "off")])
def test_worker_counts_and_predictors_change_nothing(converted_models: dict[str, Path], workers: int, predictor: str,
                                                     residency: str) -> None:
    model = converted_models["qwen2moe-q4_k_m"]
    want_tokens, want_logits = in_process(model)
    tokens, logits, summary = cluster_run(model, workers=workers, predictor=predictor, residency=residency)
    assert tokens == want_tokens
    assert np.array_equal(logits, want_logits)
    assert len(summary["workers"]) == workers
    if predictor == "reactive":
        assert summary["recall"] == 0.0 and summary["predicted_loads"] == 0
    if predictor == "lookahead" and workers >= 4:
        assert summary["recall"] > 0.2
    assert (summary["resident_experts"] > 0) == (residency == "auto")


def _decode_deltas(engine: Engine) -> dict[str, int]:
    """Run greedy twice; what the second run (residents loaded, page cache warm) added to the stats."""
    greedy(engine)
    s = engine.experts.stats
    before = (s.hits, s.resident_routed, s.calls, s.predicted, s.prefetch_routed)
    tokens, logits = greedy(engine)
    after = (s.hits, s.resident_routed, s.calls, s.predicted, s.prefetch_routed)
    d = dict(zip(("hits", "resident_routed", "calls", "predicted", "prefetch_routed"),
                 (b - a for a, b in zip(before, after))))
    d["tokens"], d["logits"] = tokens, logits
    return d


@pytest.mark.parametrize("residency", ["auto", "off"])
def test_residency_changes_nothing_and_residents_are_hits(converted_models: dict[str, Path], residency: str) -> None:
    """Residents and prefetches must become hits (read from the workers' own reports); the answer is
    the in-process engine's either way."""
    model = converted_models["llama-moe-q8_0"]
    want_tokens, want_logits = in_process(model)
    opts = ClusterOptions(workers=2, predictor="reactive" if residency == "auto" else "lookahead", residency=residency)
    with open_engine(model, opts, n_ctx=256, n_threads=1) as engine:
        d = _decode_deltas(engine)
        cluster = engine.experts
        n_experts = len(cluster._sizes)
        if residency == "auto":
            # the default budget holds every expert: each is resident once, spread over both workers
            assert len(cluster.placement) == n_experts
            assert {w.resident for w in cluster.live_workers()} == {n_experts // 2}
            routed = (N_PREDICT - 1) * len(engine.moe_layers) * engine.cfg.n_expert_used
            # every routed expert of decode (and of the prompt's last row at the last layer) had a holder ...
            assert d["resident_routed"] in (routed, routed + engine.cfg.n_expert_used)
            assert d["hits"] == d["calls"] > routed  # ... and every expert computed was already mapped there
            assert d["predicted"] == 0  # nothing to predict: a reactive cluster loses nothing
        else:
            assert not cluster.placement and d["resident_routed"] == 0
            assert d["predicted"] > 0 and 0 < d["hits"] <= d["predicted"]  # correct predictions were loaded ahead
            # every routed expert that was prefetched to a worker of its group was computed there, already
            # loaded: a scheduler sending experts elsewhere than it prefetched them fails this
            assert d["hits"] >= d["prefetch_routed"] > 0
    assert d["tokens"] == want_tokens and np.array_equal(d["logits"], want_logits)


def test_budget_between_jit_and_all_resident(converted_models: dict[str, Path]) -> None:
    """Budgets that hold some of the experts: the placement respects them, the rest load just in time."""
    model = converted_models["llama-moe-f32"]  # 32 experts of 1.5 MiB: 80 MiB leaves room for some of them
    want_tokens, want_logits = in_process(model)
    shard = max(p.stat().st_size for p in (model / "experts").iterdir())
    opts = ClusterOptions(workers=2, predictor="lookahead", memory_budget="80MiB")
    with open_engine(model, opts, n_ctx=256, n_threads=1) as engine:
        cluster = engine.experts
        d = _decode_deltas(engine)
        workers = cluster.live_workers()
        for w in workers:
            held = sum(cluster._sizes[k] for k, x in cluster.placement.items() if x is w)
            assert held <= w.resident_room < w.budget
        placed = len(cluster.placement)
        assert 0 < placed < len(cluster._sizes), (placed, shard)
        assert 0 < d["resident_routed"] < d["calls"] and d["hits"] >= d["resident_routed"]
    assert d["tokens"] == want_tokens and np.array_equal(d["logits"], want_logits)


def test_lost_worker_holding_residents_is_replanned(converted_models: dict[str, Path]) -> None:
    """A worker killed mid-generation while holding resident experts, the moment a compute request is
    sent to it (so that request is certainly lost): its residents are re-planned over the others, the
    lost request recomputed elsewhere, the answer unchanged."""
    model = converted_models["olmoe-q8_0"]
    want_tokens, want_logits = in_process(model)
    with open_engine(model, ClusterOptions(workers=3, predictor="lookahead", request_timeout_s=2.0),
                     n_ctx=256, n_threads=1) as engine:
        cluster = engine.experts
        greedy(engine)
        victim_info = next(w for w in cluster.live_workers() if w.name == "local-0")
        assert victim_info.resident > 0
        victim = engine.local_workers.procs[0]
        plan_before = cluster._plan_id
        dispatch = cluster._dispatch
        armed = False
        killed_on: list[int] = []

        def kill_then_dispatch(r) -> None:  # the request goes out to a worker that is already gone
            if armed and not killed_on and r.worker is victim_info:
                victim.send_signal(signal.SIGKILL)
                victim.wait(timeout=10)
                killed_on.append(r.req)
            dispatch(r)

        cluster._dispatch = kill_then_dispatch
        engine.reset()
        logits0 = engine.eval(PROMPT)[0]
        armed = True
        tokens = [int(np.argmax(logits0))]
        rows = [logits0]
        for _ in range(N_PREDICT - 1):
            out = engine.eval([tokens[-1]])[0]
            rows.append(out)
            tokens.append(int(np.argmax(out)))
        summary = cluster.summary()
        assert killed_on, "no compute request went to the worker holding residents"
        assert not victim_info.alive and cluster._plan_id > plan_before
        assert all(w.alive for w in cluster.placement.values())
        assert len(cluster.placement) == len(cluster._sizes)  # the others had room for all of them
        # the groups are those of the live workers: the victim is in none, and the prediction depth follows
        live, k = cluster.live_workers(), engine.cfg.n_expert_used
        assert victim_info not in live and all(victim_info not in g for g in cluster.groups())
        assert [[w.worker_id for w in g] for g in cluster.groups()] == \
            [[w.worker_id for w in g] for g in schedule.make_groups(live, k)]
        assert cluster.predictor.depth == schedule.prefetch_depth(len(live), k)
    assert tokens == want_tokens and np.array_equal(np.stack(rows), want_logits)
    assert summary["retries"] >= 1


def test_lookahead_beats_random_on_recall(converted_models: dict[str, Path]) -> None:
    model = converted_models["llama-moe-q8_0"]
    recall = {p: cluster_run(model, workers=4, predictor=p)[2]["recall"] for p in ("random", "lookahead")}
    assert 0.0 < recall["random"] < recall["lookahead"], recall


def test_lost_worker_is_replaced_and_the_answer_stays_exact(converted_models: dict[str, Path]) -> None:
    model = converted_models["olmoe-q8_0"]
    want_tokens, want_logits = in_process(model)
    with open_engine(model, ClusterOptions(workers=3, predictor="lookahead", request_timeout_s=2.0), n_ctx=256, n_threads=1) as engine:
        victim = engine.local_workers.procs[0]
        victim.send_signal(signal.SIGKILL)  # gone without a word, mid-session
        victim.wait(timeout=10)
        tokens, logits = greedy(engine)
        summary = engine.experts.summary()
    # whether a request reached it before its exit was noticed is timing (the retry path is pinned by
    # test_lost_worker_holding_residents_is_replanned); that it is dropped and the answer exact is not
    assert tokens == want_tokens and np.array_equal(logits, want_logits)
    assert sum(1 for w in summary["workers"] if not w["alive"]) == 1


def test_worker_with_another_model_is_refused(converted_models: dict[str, Path], tmp_path: Path) -> None:
    from edgemoe.cluster.coordinator import ClusterExperts
    from edgemoe.format.manifest import manifest_hash

    model, other = converted_models["llama-moe-q8_0"], converted_models["qwen3moe-q8_0"]
    cluster = ClusterExperts(model, n_embd=256, n_expert=8, k=2, moe_layers=[0, 1, 2, 3])
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "worker", "--connect", cluster.endpoint, "--model", str(other),
                             "--name", "stranger"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            cluster._poll(0.2)
        assert proc.returncode == 2
        err = proc.stderr.read()
        # an unauthenticated peer learns its own hash, never the coordinator's (test_security: with keys, both)
        assert manifest_hash(other) in err and manifest_hash(model) not in err, err
        assert not cluster.live_workers()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        cluster.close()


def test_coordinator_survives_malformed_messages(converted_models: dict[str, Path]) -> None:
    from edgemoe.cluster import protocol as P
    from edgemoe.cluster.coordinator import ClusterExperts

    cluster = ClusterExperts(converted_models["llama-moe-q8_0"], n_embd=256, n_expert=8, k=2, moe_layers=[0, 1, 2, 3])
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.setsockopt(zmq.ROUTING_ID, b"prankster")
    try:
        peer.connect(cluster.endpoint)
        v = P.PROTOCOL_VERSION
        bad = [[b"\xc1garbage"], [b"\x92\x01\x02"], [P.msgpack.packb({"v": v, "t": "hello"})],
               [P.msgpack.packb({"v": v, "t": "nonsense"})], [b"x" * (P.MAX_HEADER_BYTES + 1)],
               [P.msgpack.packb({"v": v, "t": "result", "req": 1}), b"123"]]
        for frames in bad:
            peer.send_multipart(frames)
        for _ in range(10):
            cluster._poll(0.05)
        # a hello of another protocol version is told so
        peer.send_multipart([P.msgpack.packb({"v": v + 1, "t": "hello", "name": "future"})])
        cluster._poll(0.5)
        assert peer.poll(2000)
        reply = P.decode(peer.recv_multipart())
        assert reply.type == P.REJECT and "protocol mismatch" in reply["reason"]
        # still serving: a well-formed message from a stranger gets "unknown"
        peer.send_multipart(P.encode(P.HEARTBEAT, rss=1, peak_rss=1))
        cluster._poll(0.5)
        assert peer.poll(2000), "the coordinator stopped answering"
        assert P.decode(peer.recv_multipart()).type == P.UNKNOWN_PEER
    finally:
        peer.close(0)
        ctx.term()
        cluster.close()


def test_budget_limited_workers_complete_and_stay_under_budget(converted_models: dict[str, Path]) -> None:
    """Each worker may hold its baseline plus two experts; its peak RSS, read from outside, stays below."""
    model = converted_models["llama-moe-f32"]
    shard = max((model / "experts").iterdir(), key=lambda p: p.stat().st_size).stat().st_size
    # a worker's baseline, measured by a probe worker that reports it in its hello
    from edgemoe.cluster.coordinator import ClusterExperts

    probe = ClusterExperts(model, n_embd=256, n_expert=8, k=2, moe_layers=[0, 1, 2, 3])
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "worker", "--connect", probe.endpoint, "--model", str(model),
                             "--name", "probe"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe.wait_for_workers(1, 60)
        baseline = probe.live_workers()[0].baseline_rss
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        probe.close()
    budget = baseline + 2 * shard + (8 << 20)  # two experts plus a small activation reserve
    want_tokens, want_logits = in_process(model)
    with open_engine(model, ClusterOptions(workers=2, memory_budget=str(budget)), n_ctx=256, n_threads=1) as engine:
        tokens, logits = greedy(engine)
        peaks = engine.local_workers.peak_rss()
    assert tokens == want_tokens and np.array_equal(logits, want_logits)
    assert len(peaks) == 2
    for pid, peak in peaks.items():
        assert 0 < peak <= budget, f"worker {pid}: peak RSS {peak} > budget {budget}"


def test_run_cli_with_local_workers_reports_cluster_stats(converted_models: dict[str, Path]) -> None:
    model = converted_models["qwen3moe-q4_k_m"]
    r = subprocess.run([sys.executable, "-m", "edgemoe", "run", str(model), "-p", "Hello world", "-n", "8", "--temp", "0",
                        "--ignore-eos", "--workers", "2", "--json", "-t", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ref = subprocess.run([sys.executable, "-m", "edgemoe", "run", str(model), "-p", "Hello world", "-n", "8", "--temp", "0",
                          "--ignore-eos", "--json", "-t", "1"], capture_output=True, text=True, timeout=300)
    assert out["tokens"] == json.loads(ref.stdout.strip().splitlines()[-1])["tokens"]
    c = out["stats"]["cluster"]
    assert len(c["workers"]) == 2 and all(w["peak_rss_outside"] > 0 for w in c["workers"])
    assert c["bytes_sent"] > 0 and c["bytes_received"] > 0 and 0.0 <= c["recall"] <= 1.0
    for key in ("trunk", "network", "expert_load", "expert_compute", "stall"):
        assert key in c["breakdown_s"]


def test_run_serves_workers_started_elsewhere(converted_models: dict[str, Path]) -> None:
    """`edgemoe run --bind ... --wait-workers 2` with two `edgemoe worker --connect ...` processes."""
    import socket

    model = converted_models["llama-moe-q4_k_m"]
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    coordinator = subprocess.Popen([sys.executable, "-m", "edgemoe", "run", str(model), "-p", "Hello world", "-n", "8",
                                    "--temp", "0", "--ignore-eos", "--json", "-t", "1", "--bind", endpoint,
                                    "--wait-workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([sys.executable, "-m", "edgemoe", "worker", "--connect", endpoint, "--model", str(model),
                                 "--name", f"remote-{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for i in range(2)]
    try:
        out, err = coordinator.communicate(timeout=180)
        assert coordinator.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert sorted(w["name"] for w in result["stats"]["cluster"]["workers"]) == ["remote-0", "remote-1"]
        ref = subprocess.run([sys.executable, "-m", "edgemoe", "run", str(model), "-p", "Hello world", "-n", "8",
                              "--temp", "0", "--ignore-eos", "--json", "-t", "1"], capture_output=True, text=True, timeout=300)
        assert result["tokens"] == json.loads(ref.stdout.strip().splitlines()[-1])["tokens"]
    finally:
        for p in [coordinator, *workers]:
            if p.poll() is None:
                p.terminate()
        for p in [coordinator, *workers]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

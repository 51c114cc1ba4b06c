"""The storage ceiling of a dropping cluster: shard read rates, expert bytes per token, and what
`edgemoe bench cluster` reports about them on a real local cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edgemoe.bench.cluster import ClusterBench, planner_cold_rate
from edgemoe.bench.storage import COLD_CACHED_MAX, expert_bytes_per_token, shard_read_rate
from edgemoe.format.manifest import load_manifest
from edgemoe.util.files import cached_share, drop_page_cache
from edgemoe.util.proc import storage_read_bytes

MODEL = "olmoe-q8_0"


def test_expert_bytes_per_token_is_k_shards_per_moe_layer(converted_models: dict[str, Path]) -> None:
    model = converted_models[MODEL]
    m = load_manifest(model)
    shard_sizes = {f.stat().st_size for f in (model / "experts").iterdir()}
    assert len(shard_sizes) == 1  # every expert of a test model has the same shape and type
    assert expert_bytes_per_token(m) == m.n_experts_used * len(m.moe_layers) * shard_sizes.pop()


def test_shard_read_rate_maps_the_shards_it_names(converted_models: dict[str, Path]) -> None:
    model = converted_models[MODEL]
    files = sorted((model / "experts").iterdir())
    every = shard_read_rate(model, streams=3)
    assert every.files == len(files) and every.bytes == sum(f.stat().st_size for f in files)
    assert every.streams == 3 and every.seconds > 0 and every.bytes_per_s > 0
    some = shard_read_rate(model, n_files=5, streams=2, cold=False)
    assert some.files == 5 and some.streams == 2 and some.bytes == 5 * files[0].stat().st_size


def _drop_takes(path: Path) -> bool:
    drop_page_cache(path)
    return cached_share([path]) == 0.0


def test_cached_share_follows_the_page_cache(tmp_path: Path) -> None:
    f = tmp_path / "data.bin"
    with open(f, "wb") as out:
        out.write(os.urandom(32 << 20))
        out.flush()
        os.fsync(out.fileno())
    assert cached_share([f]) == 1.0  # just written: every page cached
    if not _drop_takes(f):
        pytest.skip("this file system keeps pages that POSIX_FADV_DONTNEED asks it to drop")
    with open(f, "rb") as src:
        src.read(8 << 20)
    assert 0.25 <= cached_share([f]) <= 0.5  # a quarter read, plus the kernel's readahead (up to a few MiB)
    empty = tmp_path / "empty.bin"
    empty.touch()
    assert cached_share([empty]) is None and cached_share([]) is None  # no pages to ask about
    both = cached_share([f, empty])
    assert both is not None and 0.25 <= both <= 0.5


def test_shard_read_rate_says_whether_the_read_was_cold(converted_models: dict[str, Path]) -> None:
    model = converted_models[MODEL]
    shards = sorted((model / "experts").iterdir())
    if not all([_drop_takes(p) for p in shards]):
        pytest.skip("this file system keeps pages that POSIX_FADV_DONTNEED asks it to drop")
    cold = shard_read_rate(model, n_files=6, streams=2)
    assert cold.cached_share == 0.0 and not cold.from_page_cache
    warm = shard_read_rate(model, n_files=6, streams=2, cold=False)
    assert warm.cached_share == 1.0 and warm.from_page_cache
    assert cached_share(shards) == 0.0  # and it leaves nothing cached


def test_the_planner_takes_theplanner_cold_rate_only_where_the_drop_took() -> None:
    r = ClusterBench(model="m", reference="r", workers=4, memory_budget=None, predictor="shadow", shadow_node=None,
                     threads=1, prompt_tokens=16, n_predict=8, repeats=1, residency="auto",
                     shard_read_cold_bytes_per_s=6e8, shard_read_warm_bytes_per_s=9e9)
    assert planner_cold_rate(replace(r, shard_read_cold_cached_share=0.0)) == 6e8
    assert planner_cold_rate(replace(r, shard_read_cold_cached_share=None)) == 6e8  # the kernel could not tell: as measured
    assert planner_cold_rate(replace(r, shard_read_cold_cached_share=COLD_CACHED_MAX + 0.01)) is None


def test_storage_read_bytes_reads_proc_io() -> None:
    assert storage_read_bytes() >= 0
    assert storage_read_bytes() <= storage_read_bytes()  # a counter: never goes back


def test_bench_cluster_reports_the_storage_ceiling(converted_models: dict[str, Path], fixtures_dir: Path) -> None:
    model = converted_models[MODEL]
    r = subprocess.run([sys.executable, "-m", "edgemoe", "bench", "cluster", str(model), "--reference",
                        str(fixtures_dir / f"{MODEL}.gguf"), "--workers", "2", "--predictor", "lookahead",
                        "--n-predict", "6", "--repeat", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    s = out["summary"]
    assert out["tokens_match"] is True
    assert out["expert_bytes_per_token"] == expert_bytes_per_token(load_manifest(model))
    assert out["shard_read_cold_bytes_per_s"] > 0 and out["shard_read_warm_bytes_per_s"] > 0
    assert out["shard_read_streams"] == 2 and len(out["storage_bytes_per_token"]) == 1
    per_token = out["storage_bytes_per_token"][0]
    assert per_token >= 0
    if per_token:
        assert s["storage_bound_tok_s"] == out["shard_read_cold_bytes_per_s"] / per_token
    text = subprocess.run([sys.executable, "-m", "edgemoe", "bench", "cluster", str(model), "--reference",
                           str(fixtures_dir / f"{MODEL}.gguf"), "--workers", "2", "--n-predict", "3", "--repeat", "1"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0, text.stderr
    assert "MB of experts, the workers read" in text.stdout and "to a cluster that drops every expert" in text.stdout
    assert "confined runs skipped: no --memory-budget" in text.stderr


def test_bench_cluster_confined_llama_cpp_and_plot(converted_models: dict[str, Path], fixtures_dir: Path,
                                                   tmp_path: Path) -> None:
    """With a budget: llama.cpp confined to one worker's budget and to the total, cgroup peaks, a plot."""
    from edgemoe.cluster.cgroup import CgroupUnavailable, MemoryCgroup

    try:
        MemoryCgroup.create("probe", 64 << 20).remove()
        cgroups = True
    except CgroupUnavailable:
        cgroups = False
    model = converted_models[MODEL]
    plot = tmp_path / "mem.png"
    r = subprocess.run([sys.executable, "-m", "edgemoe", "bench", "cluster", str(model), "--reference",
                        str(fixtures_dir / f"{MODEL}.gguf"), "--workers", "2", "--memory-budget", "128MiB",
                        "--n-predict", "4", "--repeat", "1", "--confined-n-predict", "3", "--plot", str(plot), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens_match"] is True and out["residency"] == "auto" and out["resident_experts"] == out["n_experts"]
    assert out["coordinator_peak_rss"] > 0 and out["llama_cpp_peak_rss"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if not cgroups:
        assert "confined runs skipped" in r.stderr and out["confined"] == []
        return
    assert [c["limit"] for c in out["confined"]] == [128 << 20, 256 << 20]
    for c in out["confined"]:
        assert c["tokens_match"] and len(c["decode_tok_s"]) == 1 and c["decode_tok_s"][0] > 0
        assert 0 < c["cgroup_peak"] <= c["limit"]
    assert len(out["worker_cgroup_peak"]) == 2 and all(0 < p <= 128 << 20 for p in out["worker_cgroup_peak"])
    s = out["summary"]
    assert s["llama_cpp_confined_128MiB_tok_s"] > 0 and s["cluster_vs_confined_256MiB"] > 0


def test_bench_cluster_bad_input(converted_models: dict[str, Path], tmp_path: Path) -> None:
    model = converted_models[MODEL]
    for extra, why in [(["--plot", str(tmp_path / "mem.txt")], "the plot is a PNG"),
                       (["--plot", str(tmp_path / "no" / "mem.png")], "does not exist"),
                       (["--memory-budget", "lots"], "is not a size"),
                       (["--confined-n-predict", "0"], "must be >= 1")]:
        r = subprocess.run([sys.executable, "-m", "edgemoe", "bench", "cluster", str(model), *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error:") and why in r.stderr, (extra, r.stderr)
        assert "Traceback" not in r.stderr

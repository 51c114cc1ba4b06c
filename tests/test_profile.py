"""Device profiles: the shipped ones load; every kind of mistake is an error naming key and file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.cluster.profile import load_profile
from edgemoe.errors import UserError

PROFILES = sorted((Path(__file__).resolve().parent.parent / "devices" / "profiles").glob("*.toml"))
GOOD = 'name = "test-board"\nmemory_budget = "256MiB"\nthreads = 2\nstorage_read_mb_s = 40\ndescription = "a board"\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "board.toml"
    p.write_text(text)
    return p


def test_shipped_profiles_are_valid() -> None:
    assert len(PROFILES) >= 3
    for path in PROFILES:
        prof = load_profile(path)
        assert prof.name == path.stem
        assert 64 << 20 <= prof.memory_budget <= 2 << 30
        assert prof.threads >= 1 and prof.storage_read_mb_s and prof.description
    assert load_profile(PROFILES[0]).path == PROFILES[0]


def test_good_profile(tmp_path: Path) -> None:
    prof = load_profile(write(tmp_path, GOOD))
    assert (prof.name, prof.memory_budget, prof.threads, prof.storage_read_mb_s, prof.description) == (
        "test-board", 256 << 20, 2, 40.0, "a board")
    prof = load_profile(write(tmp_path, 'name = "b"\nmemory_budget = 268435456\nthreads = 1\n'))
    assert prof.memory_budget == 256 << 20 and prof.storage_read_mb_s is None and prof.description == ""


def test_measured_keys(tmp_path: Path) -> None:
    text = GOOD + ('cores = 2\nmemory_total = "1GiB"\ncompute_mb_s = 900.5\nround_trip_us = 120\nnetwork_mb_s = 11\n'
                   'layer_overhead_us = 0\nworker_baseline = "50MiB"\nrequest_us = 1500\nfanout_us = 400\n')
    prof = load_profile(write(tmp_path, text))
    assert (prof.cores, prof.memory_total, prof.compute_mb_s, prof.round_trip_us, prof.network_mb_s) == (
        2, 1 << 30, 900.5, 120.0, 11.0)
    assert (prof.layer_overhead_us, prof.worker_baseline, prof.request_us, prof.fanout_us) == (0.0, 50 << 20, 1500.0, 400.0)


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD + "memory_budjet = \"1GiB\"\n", "unknown key 'memory_budjet'"),
        (GOOD + "[extra]\nx = 1\n", "unknown key 'extra'"),
        (GOOD.replace("threads = 2\n", ""), "missing required key 'threads'"),
        (GOOD.replace('name = "test-board"\n', ""), "missing required key 'name'"),
        (GOOD.replace('memory_budget = "256MiB"\n', ""), "missing required key 'memory_budget'"),
        (GOOD.replace("threads = 2", 'threads = "2"'), "threads must be an integer"),
        (GOOD.replace("threads = 2", "threads = 0"), "threads must be an integer from 1"),
        (GOOD.replace("threads = 2", "threads = 1000"), "threads must be an integer from 1"),
        (GOOD.replace("threads = 2", "threads = true"), "threads must be an integer"),
        (GOOD.replace("threads = 2", "threads = 2.0"), "threads must be an integer"),
        (GOOD.replace('"256MiB"', '"lots"'), "memory_budget: 'lots' is not a size"),
        (GOOD.replace('"256MiB"', "1.5"), "memory_budget must be a size"),
        (GOOD.replace('"256MiB"', '"1MiB"'), "memory_budget must be between 16MiB and 1TiB"),
        (GOOD.replace('"256MiB"', '"-1MiB"'), "memory_budget"),
        (GOOD.replace("storage_read_mb_s = 40", "storage_read_mb_s = 0"), "storage_read_mb_s must be a number"),
        (GOOD.replace("storage_read_mb_s = 40", 'storage_read_mb_s = "fast"'), "storage_read_mb_s must be a number"),
        (GOOD.replace('description = "a board"', "description = 3"), "description must be a string"),
        (GOOD.replace('"test-board"', '"Test Board"'), "name must be a string of lowercase"),
        (GOOD.replace('"test-board"', "7"), "name must be a string"),
        ("threads = [", "not valid TOML"),
        ('name = "b"\nmemory_budget = "64MiB"\n[threads]\nn = 2\n', "threads must be an integer"),
        (GOOD + "compute_mb_s = 0\n", "compute_mb_s must be a number"),
        (GOOD + "compute_mb_s = -5\n", "compute_mb_s must be a number"),
        (GOOD + 'round_trip_us = "fast"\n', "round_trip_us must be a number"),
        (GOOD + "layer_overhead_us = -1\n", "layer_overhead_us must be a number"),
        (GOOD + "cores = 0\n", "cores must be an integer"),
        (GOOD + 'memory_total = "128MiB"\n', "memory_budget must be at most memory_total"),
        (GOOD + 'worker_baseline = "300MiB"\n', "worker_baseline must be below memory_budget"),
        (GOOD + "request_us = true\n", "request_us must be a number"),
        (GOOD + "fanout_us = -5\n", "fanout_us must be a number"),
    ],
)
def test_bad_profiles_name_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_profile(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_unreadable_profiles(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such device profile"):
        load_profile(tmp_path / "missing.toml")
    p = tmp_path / "bin.toml"
    p.write_bytes(b"name = \"\xff\"\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_profile(p)


def _worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe", "worker", "--connect", "tcp://127.0.0.1:9", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_rejects_a_bad_profile(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "colour = 1\n")
    r = _worker("--model", str(tmp_path), "--profile", str(path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {path}: unknown key 'colour' (known keys: name, memory_budget, threads, storage_read_mb_s, description, cores, memory_total, compute_mb_s, round_trip_us, network_mb_s, layer_overhead_us, worker_baseline, request_us, fanout_us)"]


def test_cli_flags_override_the_profile(converted_models: dict[str, Path], tmp_path: Path) -> None:
    """The profile's budget (16 MiB) is below any worker's baseline; the flag's 20 MiB is what is reported."""
    path = write(tmp_path, GOOD.replace('"256MiB"', '"16MiB"'))
    model = str(converted_models["llama-moe-q8_0"])
    r = _worker("--model", model, "--profile", str(path))
    assert r.returncode == 2 and "memory budget 16.0 MiB is below" in r.stderr
    r = _worker("--model", model, "--profile", str(path), "--memory-budget", "20MiB")
    assert r.returncode == 2 and "memory budget 20.0 MiB is below" in r.stderr
    r = _worker("--model", model, "--memory-budget", "lots")
    assert r.returncode == 2 and r.stderr.startswith("error: --memory-budget: 'lots' is not a size")

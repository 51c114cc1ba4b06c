"""Memory cgroups for local daemons: the kernel enforces the limit (page cache counted), or one warning and the fallback."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe.cluster import cgroup as cg
from edgemoe.cluster.cgroup import CgroupUnavailable, MemoryCgroup
from edgemoe.cluster.local import LocalProcesses

MiB = 1 << 20


def _group(name: str, limit: int) -> MemoryCgroup:
    try:
        return MemoryCgroup.create(name, limit)
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup on this machine: {e}")


def _run_in(g: MemoryCgroup, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], preexec_fn=g.enter, capture_output=True, timeout=60)


def test_the_kernel_kills_a_process_over_its_limit() -> None:
    g = _group("test-oom", 48 * MiB)
    try:
        r = _run_in(g, "b = bytearray(160 << 20); b[::4096] = b'x' * len(b[::4096])")
        assert r.returncode == -9  # SIGKILL from the OOM killer
        assert g.oom_kills() >= 1
        peak = g.peak()
        assert peak is None or peak <= 48 * MiB
    finally:
        g.remove()
    assert not g.path.exists()


def test_page_cache_is_charged(tmp_path: Path) -> None:
    """Reading a file charges its page cache to the reader's group (what confining llama.cpp relies on)."""
    data = tmp_path / "blob"
    data.write_bytes(b"\1" * (32 * MiB))
    from edgemoe.util.files import drop_page_cache

    drop_page_cache(data)
    g = _group("test-cache", 512 * MiB)
    try:
        r = _run_in(g, f"open({str(data)!r}, 'rb').read(); import time")
        assert r.returncode == 0, r.stderr
        peak = g.peak()
        if peak is None:
            pytest.skip("this kernel keeps no peak for cgroup v2")
        assert peak >= 32 * MiB
    finally:
        g.remove()


def test_no_cgroup_one_warning_then_the_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cg, "CGROUP_ROOT", tmp_path)  # no controller mounted here
    with pytest.raises(CgroupUnavailable, match="no memory cgroup controller"):
        MemoryCgroup.create("x", MiB)
    caplog.set_level(logging.WARNING)
    with LocalProcesses(tmp_path / "logs") as lp:
        for i in range(3):
            lp.spawn(f"d{i}", ["--help"], memory_limit=64 * MiB)
        for p in lp.procs:
            assert p.wait(timeout=60) == 0  # ran anyway
        assert lp.cgroups == [None, None, None] and lp.cgroup_peak() == {}
    warnings = [r for r in caplog.records if "no memory cgroup" in r.getMessage()]
    assert len(warnings) == 1 and "own accounting" in warnings[0].getMessage()


def test_local_daemon_in_its_group_reports_peak_and_exit() -> None:
    with LocalProcesses() as lp:
        lp.spawn("helpme", ["--help"], memory_limit=128 * MiB)
        if lp.cgroups[0] is None:
            pytest.skip("no memory cgroup on this machine")
        assert lp.procs[0].wait(timeout=60) == 0
        path = lp.cgroups[0].path
        assert 0 < lp.cgroup_peak()["helpme"] <= 128 * MiB
        assert lp.exited() == [("helpme", lp.procs[0].pid, "exited with status 0")]
    assert not path.exists()  # removed once the daemon was reaped

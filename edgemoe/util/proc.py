"""Process statistics read from /proc/<pid>/status and /proc/<pid>/io (Linux only)."""

from __future__ import annotations


def _status_kib(field: str, pid: int | None) -> int:
    """Value of a `<field>: N kB` line of /proc/<pid>/status, in KiB."""
    path = f"/proc/{pid if pid is not None else 'self'}/status"
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{path} has no {field} line")


def rss_bytes(pid: int | None = None) -> int:
    """Current resident set size (VmRSS) of a process (default: this one), in bytes."""
    return _status_kib("VmRSS", pid) * 1024


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident set size (VmHWM) of a process (default: this one), in bytes."""
    return _status_kib("VmHWM", pid) * 1024


def storage_read_bytes(pid: int | None = None) -> int:
    """Bytes a process caused to be fetched from storage (read_bytes of /proc/<pid>/io): page-cache
    hits are not counted, page faults that went to the disk are."""
    path = f"/proc/{pid if pid is not None else 'self'}/io"
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"{path} has no read_bytes line")


def reset_peak_rss() -> None:
    """Start this process's VmHWM afresh from its current RSS (Linux >= 4.0: clear_refs 5), so a later
    peak_rss_bytes() covers only what came after."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def lower_thread_priority(nice: int = 10) -> None:
    """Lower the calling thread's CPU priority (Linux: a thread is a task of its own, setpriority on
    its id changes only it), so that on a busy host it runs on what the others leave over."""
    import os
    import threading

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the usual priority
        pass


__all__ = ["lower_thread_priority", "peak_rss_bytes", "reset_peak_rss", "rss_bytes", "storage_read_bytes"]

"""Memory cgroups for locally spawned daemons: the kernel enforces a byte budget (page cache counted, no swap).

cgroup v2 (a unified hierarchy with the memory controller) or v1 (`/sys/fs/cgroup/memory`),
whichever the machine has. A group is made under the cgroup this process runs in, one per child;
the child enters it before it execs (so every page it ever touches is charged to it), and the
group is removed once the child has been reaped. Where none can be made (no controller, no
permission), `MemoryCgroup.create` raises CgroupUnavailable with the reason and callers fall back
to the daemon's own accounting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be created here (the message says why)."""


class MemoryCgroup:
    """One memory cgroup with a hard limit; `enter` is meant for Popen's preexec_fn."""

    def __init__(self, path: Path, version: int, limit: int) -> None:
        self.path, self.version, self.limit = path, version, limit
        self._procs = path / ("cgroup.procs" if version == 2 else "tasks")

    @classmethod
    def create(cls, name: str, limit: int) -> "MemoryCgroup":
        """A new group NAME (made unique by this process's pid) limited to `limit` bytes, swap 0."""
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise ValueError(f"bad cgroup name {name!r}")
        parent, version = _parent()
        path = parent / f"edgemoe-{os.getpid()}-{name}"
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {path}: {e.strerror}") from None
        g = cls(path, version, limit)
        try:
            if version == 2:
                _write(path / "memory.max", limit)
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", 0)
            else:
                _write(path / "memory.limit_in_bytes", limit)
                if (path / "memory.memsw.limit_in_bytes").exists():  # memory + swap = memory: no swap
                    _write(path / "memory.memsw.limit_in_bytes", limit)
                if (path / "memory.swappiness").exists():
                    _write(path / "memory.swappiness", 0)
        except OSError as e:
            g.remove()
            raise CgroupUnavailable(f"cannot set the limit of {path}: {e.strerror}") from None
        return g

    def enter(self) -> None:
        """Move the calling process into the group (in a child, before exec)."""
        with open(self._procs, "w") as f:
            f.write("0" if self.version == 2 else str(os.getpid()))

    def peak(self) -> int | None:
        """The most memory the group was ever charged (page cache included), or None where the kernel
        does not keep it (cgroup v2 before Linux 5.19)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def oom_kills(self) -> int:
        """Processes of the group the kernel killed for memory."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        """Remove the (empty) group; its remaining page cache charges go to the parent."""
        try:
            self.path.rmdir()
        except OSError:
            pass


def _parent() -> tuple[Path, int]:
    """Where groups are made: under this process's own memory cgroup (v2 or v1)."""
    own = _own_cgroups()
    unified = CGROUP_ROOT / "cgroup.controllers"
    if unified.exists() and "memory" in unified.read_text().split():
        parent = CGROUP_ROOT / own.get("", "/").lstrip("/")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            raise CgroupUnavailable(f"the memory controller is not enabled for children of {parent}")
        return parent, 2
    v1 = CGROUP_ROOT / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        parent = v1 / own.get("memory", "/").lstrip("/")
        if not (parent / "memory.limit_in_bytes").exists():  # a cgroup namespace: our group is the root
            parent = v1
        if not os.access(parent, os.W_OK):
            raise CgroupUnavailable(f"{parent} is not writable (needs root or a delegated cgroup)")
        return parent, 1
    raise CgroupUnavailable("no memory cgroup controller is mounted (neither cgroup v2 nor v1)")


def _own_cgroups() -> dict[str, str]:
    """controller -> path of this process's cgroup ('' is the v2 entry)."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _write(path: Path, value: int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


__all__ = ["CgroupUnavailable", "MemoryCgroup"]

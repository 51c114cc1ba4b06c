"""Local daemons on loopback (workers, a shadow node), started and stopped by the coordinator process.

A daemon given a memory limit runs in a memory cgroup of that size (edgemoe.cluster.cgroup), so the
kernel enforces it, page cache included; where no cgroup can be made, one warning line says so and
the daemon keeps to its budget by its own accounting.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edgemoe.cluster.budget import parse_size
from edgemoe.cluster.cgroup import CgroupUnavailable, MemoryCgroup
from edgemoe.cluster.keys import Authenticator, KeyPair, write_keypair
from edgemoe.util.proc import peak_rss_bytes, storage_read_bytes

log = logging.getLogger("edgemoe.local")


PARENT_ENV = "EDGEMOE_PARENT_PID"  # set for spawned daemons: they end when this process dies
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a daemon spawned by LocalProcesses: receive SIGTERM (a clean shutdown) when the spawning
    process dies, however it dies (SIGKILL included). Linux prctl(PR_SET_PDEATHSIG) through ctypes;
    if the parent is already gone by the time this runs, end now. No-op for a daemon started by hand."""
    want = os.environ.get(PARENT_ENV)
    if not want or not want.isdigit():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the ZMTP heartbeats still end the link
        return
    if os.getppid() != int(want):  # the parent died before prctl: the signal will never come
        os.kill(os.getpid(), signal.SIGTERM)


class LocalProcesses:
    """`edgemoe` daemons spawned from this process; always stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, log_dir: str | Path | None = None) -> None:
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="edgemoe-local-"))
        self.names: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.cgroups: list[MemoryCgroup | None] = []
        self._peak: dict[int, int] = {}
        self._cgroup_peak: dict[str, int] = {}
        self._oom: dict[str, int] = {}
        self._warned = False

    def spawn(self, name: str, args: list[str], memory_limit: int | None = None) -> None:
        """`python -m edgemoe ARGS...`, its output in LOG_DIR/NAME.log; in a memory cgroup of
        memory_limit bytes where one can be made."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        group = None
        if memory_limit is not None:
            try:
                group = MemoryCgroup.create(name, memory_limit)
            except CgroupUnavailable as e:
                if not self._warned:  # one line for all the daemons
                    log.warning("no memory cgroup for the local daemons (%s): they keep to their budgets by their "
                                "own accounting", e)
                    self._warned = True
        out = open(self.log_dir / f"{name}.log", "ab")
        env = {**os.environ, "GGML_NO_BACKTRACE": "1", PARENT_ENV: str(os.getpid())}
        try:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "edgemoe", *args], stdin=subprocess.DEVNULL,
                                               stdout=out, stderr=subprocess.STDOUT, env=env,
                                               preexec_fn=group.enter if group is not None else None))
        except BaseException:
            if group is not None:
                group.remove()
            raise
        finally:
            out.close()
        self.names.append(name)
        self.cgroups.append(group)

    def cgroup_peak(self) -> dict[str, int]:
        """name -> the most memory its cgroup was charged (page cache included), for those in one."""
        for name, g in zip(self.names, self.cgroups):
            if g is not None:
                peak = g.peak()
                if peak is not None:
                    self._cgroup_peak[name] = peak
        return dict(self._cgroup_peak)

    def oom_killed(self) -> list[str]:
        """Names of the daemons the kernel killed for memory."""
        for name, g in zip(self.names, self.cgroups):
            if g is not None:
                self._oom[name] = max(self._oom.get(name, 0), g.oom_kills())
        return [name for name, n in self._oom.items() if n]

    def exited(self) -> list[tuple[str, int, str]]:
        """(name, pid, why) of each daemon that has exited."""
        out = []
        if all(p.poll() is None for p in self.procs):
            return out  # the common case, without reading the cgroups
        killed = set(self.oom_killed())
        for name, p in zip(self.names, self.procs):
            if p.poll() is not None:
                why = ("was killed by the kernel for memory (its cgroup's limit)" if name in killed
                       else f"exited with status {p.returncode}")
                out.append((name, p.pid, why))
        return out

    def key_args(self, name: str, auths: "list[Authenticator]") -> list[str]:
        """An ephemeral key pair for daemon NAME, allowed by the coordinator's authenticators: the flags
        that hand it over (its secret in a 0600 file of this 0700 folder, the coordinator's public key).
        No authenticators (a coordinator without keys): no flags."""
        if not auths:
            return []
        keys = self.log_dir / "keys"
        keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(keys, 0o700)
        pair = KeyPair.generate()
        _, secret = write_keypair(keys, name, pair)
        for auth in auths:
            auth.allow(pair.public)
        # (KEY=VALUE: a Z85 key may begin with '-', which argparse would take for an option)
        return [f"--key={secret}", f"--coordinator-key={auths[0].keys.pair.public.decode()}"]

    def sample_rss(self) -> None:
        """Record each process's peak RSS (VmHWM), read from outside it."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    self._peak[p.pid] = max(self._peak.get(p.pid, 0), peak_rss_bytes(p.pid))
                except OSError:
                    pass

    def peak_rss(self) -> dict[int, int]:
        self.sample_rss()
        return dict(self._peak)

    def storage_read_bytes(self) -> int:
        """Bytes the running processes have fetched from storage so far, together."""
        total = 0
        for p in self.procs:
            if p.poll() is None:
                try:
                    total += storage_read_bytes(p.pid)
                except OSError:
                    pass
        return total

    def failed(self) -> list[str]:
        """Processes that exited, with the last line of their log."""
        out = []
        for name, _, why in self.exited():
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
            out.append(f"{name} {why}: {lines[-1] if lines else '(no output)'}")
        return out

    def stop(self, timeout_s: float = 5.0) -> None:
        self.sample_rss()
        self.cgroup_peak()
        self.oom_killed()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=timeout_s)
        for g in self.cgroups:
            if g is not None:
                g.remove()

    def __enter__(self) -> "LocalProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalWorkers(LocalProcesses):
    """N `edgemoe worker` processes named local-0 ... local-(N-1)."""

    def __init__(self, model_dir: str | Path, n: int, connect: str, *, memory_budget: str | None = None,
                 threads: int = 1, log_dir: str | Path | None = None, cgroup: bool = True,
                 auth: Authenticator | None = None) -> None:
        """cgroup: each worker with a budget runs in a memory cgroup of that size where one can be made.
        auth: the coordinator's authenticator (each worker gets an ephemeral key it admits)."""
        super().__init__(log_dir)
        self.auth = auth
        self.model_dir, self.n, self.connect = Path(model_dir), n, connect
        self.memory_budget, self.threads, self.cgroup = memory_budget, threads, cgroup

    def start(self) -> "LocalWorkers":
        for i in range(self.n):
            args = ["worker", "--connect", self.connect, "--model", str(self.model_dir), "--threads", str(self.threads),
                    "--name", f"local-{i}"]
            limit = None
            if self.memory_budget:
                args += ["--memory-budget", self.memory_budget]
                limit = parse_size(self.memory_budget, "--memory-budget")
            args += self.key_args(f"local-{i}", [self.auth] if self.auth else [])
            self.spawn(f"local-{i}", args, memory_limit=limit if self.cgroup else None)
        return self

    def __enter__(self) -> "LocalWorkers":
        return self.start()

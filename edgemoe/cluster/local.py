"""Local daemons on loopback (workers, a shadow node), started and stopped by the coordinator process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from edgemoe.util.proc import peak_rss_bytes, storage_read_bytes


class LocalProcesses:
    """`edgemoe` daemons spawned from this process; always stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, log_dir: str | Path | None = None) -> None:
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="edgemoe-local-"))
        self.names: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._peak: dict[int, int] = {}

    def spawn(self, name: str, args: list[str]) -> None:
        """`python -m edgemoe ARGS...`, its output in LOG_DIR/NAME.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        self.procs.append(subprocess.Popen([sys.executable, "-m", "edgemoe", *args], stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, env=env))
        self.names.append(name)
        log.close()

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
        for name, p in zip(self.names, self.procs):
            if p.poll() is not None:
                lines = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
                out.append(f"{name} exited with status {p.returncode}: {lines[-1] if lines else '(no output)'}")
        return out

    def stop(self, timeout_s: float = 5.0) -> None:
        self.sample_rss()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=timeout_s)

    def __enter__(self) -> "LocalProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalWorkers(LocalProcesses):
    """N `edgemoe worker` processes named local-0 ... local-(N-1)."""

    def __init__(self, model_dir: str | Path, n: int, connect: str, *, memory_budget: str | None = None,
                 threads: int = 1, log_dir: str | Path | None = None) -> None:
        super().__init__(log_dir)
        self.model_dir, self.n, self.connect = Path(model_dir), n, connect
        self.memory_budget, self.threads = memory_budget, threads

    def start(self) -> "LocalWorkers":
        for i in range(self.n):
            args = ["worker", "--connect", self.connect, "--model", str(self.model_dir), "--threads", str(self.threads),
                    "--name", f"local-{i}"]
            if self.memory_budget:
                args += ["--memory-budget", self.memory_budget]
            self.spawn(f"local-{i}", args)
        return self

    def __enter__(self) -> "LocalWorkers":
        return self.start()

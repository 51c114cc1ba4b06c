"""llama.cpp as a user with a small board runs it: a child process, optionally in a memory cgroup.

The cgroup counts page cache, so a model larger than the limit is read from storage again and
again (the file's cache is dropped first, so that every page llama.cpp touches is charged to it).
Bytes read from storage are the child's own `read_bytes` (/proc/PID/io), per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgemoe.cluster.cgroup import MemoryCgroup
from edgemoe.util.files import drop_page_cache
from edgemoe.util.proc import storage_read_bytes


@dataclass
class ChildRun:
    decode_tok_s: float
    tokens: list[int]
    storage_bytes: int  # read from storage during the run (prefill and decode)


class LlamaCppChild:
    """`python -m edgemoe.bench.llama_child` kept running; run() sends one greedy request."""

    def __init__(self, reference: str | Path, *, threads: int, n_ctx: int, cgroup: MemoryCgroup | None = None) -> None:
        self.cgroup = cgroup
        if cgroup is not None:
            drop_page_cache(reference)  # its pages are then faulted in, and charged, by the child
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgemoe.bench.llama_child", str(reference), "--threads", str(threads),
             "--n-ctx", str(n_ctx)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env, preexec_fn=cgroup.enter if cgroup is not None else None)
        self.peak_rss = self._reply()["peak_rss"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            killed = self.cgroup is not None and self.cgroup.oom_kills()
            raise RuntimeError(f"llama.cpp child exited with status {self.proc.returncode}"
                               + (" (killed for memory)" if killed else ""))
        return json.loads(line)

    def run(self, prompt: list[int], n_predict: int) -> ChildRun:
        read0 = storage_read_bytes(self.proc.pid)
        self.proc.stdin.write(json.dumps({"prompt": prompt, "n_predict": n_predict}) + "\n")
        self.proc.stdin.flush()
        r = self._reply()
        self.peak_rss = r["peak_rss"]
        return ChildRun(r["decode_tok_s"], r["tokens"], storage_read_bytes(self.proc.pid) - read0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()

    def __enter__(self) -> "LlamaCppChild":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

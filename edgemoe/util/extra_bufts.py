"""Whether llama.cpp's extra buffer types (weight repacking, AMX) can run on this CPU.

llama.cpp repacks weights into the layouts of its faster CPU kernels by default; on x86 that
includes the AMX buffer type. Some virtual machines advertise AMX in /proc/cpuinfo without
granting it, and the first AMX instruction kills the process with SIGILL. CPU flags cannot tell
the two apart, so the answer comes from running it: a child process writes a tiny GGUF, loads it
with the extra buffer types on, decodes a prompt and a token. The result is probed once per run
and kept in the environment (EDGEMOE_EXTRA_BUFTS=1/0), so child processes inherit it; setting
that variable by hand forces the answer without a probe.

The child is `python -m edgemoe.util.extra_bufts_probe --child DIR` (its own module: it loads
llama.cpp through edgemoe.util.llamacpp, which asks this module for the verdict).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ENV_VAR = "EDGEMOE_EXTRA_BUFTS"
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ProbeResult:
    """The probe's verdict and, where it failed, why (a line a user can read)."""

    usable: bool
    reason: str = ""


_result: ProbeResult | None = None


def _describe_exit(rc: int, stderr: str) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"the probe process was killed by {name}"
    tail = stderr.strip().splitlines()[-1:] or [""]
    return f"the probe process exited with status {rc} {tail[0]}".rstrip()


def probe(child_cmd: list[str] | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Run the probe child (child_cmd replaces it, for tests) and judge its exit; never raises."""
    with tempfile.TemporaryDirectory(prefix="edgemoe-bufts-") as tmp:
        cmd = child_cmd or [sys.executable, "-m", "edgemoe.util.extra_bufts_probe", "--child", tmp]
        env = dict(os.environ, GGML_NO_BACKTRACE="1")
        env.pop(ENV_VAR, None)
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return ProbeResult(False, f"the probe process did not finish within {timeout_s:.0f} s")
        except OSError as e:
            return ProbeResult(False, f"the probe process could not start: {e}")
    if p.returncode == 0 and p.stdout.strip().endswith("ok"):
        return ProbeResult(True)
    return ProbeResult(False, _describe_exit(p.returncode, p.stderr))


def extra_bufts_result() -> ProbeResult:
    """The verdict for this run: EDGEMOE_EXTRA_BUFTS if set, else probed once and exported."""
    global _result
    if _result is not None:
        return _result
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced in ("0", "1"):
        _result = ProbeResult(forced == "1", "" if forced == "1" else f"{ENV_VAR}=0 is set")
        return _result
    _result = probe()
    os.environ[ENV_VAR] = "1" if _result.usable else "0"
    return _result


def extra_bufts_usable() -> bool:
    """Whether llama.cpp may load models with its extra buffer types on this machine."""
    return extra_bufts_result().usable


__all__ = ["ENV_VAR", "ProbeResult", "extra_bufts_result", "extra_bufts_usable", "probe"]

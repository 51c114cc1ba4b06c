"""Running the `edgemoe` command as a user would: a real process, output captured, with a timeout."""

from __future__ import annotations

import subprocess
import sys


def edgemoe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe", *args], capture_output=True, text=True, timeout=timeout)

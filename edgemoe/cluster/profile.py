"""Device profiles (devices/profiles/*.toml): a board class's worker settings, strictly validated.

    name = "raspberry-pi-4-1gb"          # required: [a-z0-9][a-z0-9._-]*
    memory_budget = "704MiB"             # required: the worker process's whole RSS (see budget.parse_size)
    threads = 4                          # required: ggml threads, 1..256
    storage_read_mb_s = 40.0             # optional: sequential read speed of the shard storage, MB/s
    description = "Raspberry Pi 4, 1 GB" # optional

Unknown keys, wrong types, out-of-range values and missing required keys are errors naming the key
and the file: a typo in a profile must not silently fall back to a default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemoe.cluster.budget import parse_size
from edgemoe.errors import UserError

REQUIRED = ("name", "memory_budget", "threads")
OPTIONAL = ("storage_read_mb_s", "description")
MIN_BUDGET = 16 << 20
MAX_BUDGET = 1 << 40
MAX_THREADS = 256
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class DeviceProfile:
    path: Path
    name: str
    memory_budget: int  # bytes
    threads: int
    storage_read_mb_s: float | None = None
    description: str = ""


def load_profile(path: str | os.PathLike[str]) -> DeviceProfile:
    p = Path(path)
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise UserError(f"{p}: reading device profiles needs Python 3.11 or newer (tomllib)") from None
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{p}: no such device profile") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read device profile ({e.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: not valid TOML ({e})") from None
    return parse_profile(data, p)


def parse_profile(data: dict[str, Any], path: Path) -> DeviceProfile:
    for key in data:
        if key not in REQUIRED and key not in OPTIONAL:
            raise UserError(f"{path}: unknown key {key!r} (known keys: {', '.join(REQUIRED + OPTIONAL)})")
    for key in REQUIRED:
        if key not in data:
            raise UserError(f"{path}: missing required key {key!r}")

    def bad(key: str, want: str) -> UserError:
        return UserError(f"{path}: {key} must be {want}, got {data[key]!r}")

    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise bad("name", "a string of lowercase letters, digits, '.', '_' or '-' (at most 64)")

    budget_value = data["memory_budget"]
    if isinstance(budget_value, bool) or not isinstance(budget_value, (str, int)):
        raise bad("memory_budget", "a size such as \"512MiB\" or a number of bytes")
    budget = parse_size(budget_value, f"{path}: memory_budget")
    if not MIN_BUDGET <= budget <= MAX_BUDGET:
        raise bad("memory_budget", "between 16MiB and 1TiB")

    threads = data["threads"]
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise bad("threads", f"an integer from 1 to {MAX_THREADS}")

    speed = data.get("storage_read_mb_s")
    if speed is not None:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 < speed <= 100_000:
            raise bad("storage_read_mb_s", "a number of MB/s above 0 (at most 100000)")
        speed = float(speed)

    description = data.get("description", "")
    if not isinstance(description, str):
        raise bad("description", "a string")

    return DeviceProfile(path, name, budget, threads, speed, description)

"""Device profiles (devices/profiles/*.toml): a board class's worker settings, strictly validated.

    name = "raspberry-pi-4-1gb"          # required: [a-z0-9][a-z0-9._-]*
    memory_budget = "704MiB"             # required: the worker process's whole RSS (see budget.parse_size)
    threads = 4                          # required: ggml threads, 1..256
    storage_read_mb_s = 40.0             # optional: sequential read speed of the shard storage, MB/s
    description = "Raspberry Pi 4, 1 GB" # optional
    # optional, measured by `edgemoe profile-board` (the planner, `edgemoe plan`, uses them):
    cores = 4                            # CPU cores
    memory_total = "1GiB"                # the board's whole memory
    compute_mb_s = 900.0                 # expert weight MB one expert FFN mat-vec streams per second on `threads`
    round_trip_us = 450.0                # one small request + reply to/from this board over its network
    network_mb_s = 11.0                  # link throughput, MB/s
    layer_overhead_us = 900.0            # fixed cost per MoE layer of the decode path (coordinator role)
    request_us = 1500.0                  # what each further worker of a layer adds (its message, both ends)
    fanout_us = 300.0                    # a layer's request to one worker and its answer: the fixed cost
    worker_baseline = "80MiB"            # a worker process's resident memory with no expert mapped

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
OPTIONAL = ("storage_read_mb_s", "description", "cores", "memory_total", "compute_mb_s", "round_trip_us",
            "network_mb_s", "layer_overhead_us", "worker_baseline", "request_us", "fanout_us")
# measured speeds: (key, lowest, highest) for the positive numbers among them
_RATES = (("compute_mb_s", 1e-3, 1e7), ("round_trip_us", 0.1, 1e8), ("network_mb_s", 1e-3, 1e7),
          ("layer_overhead_us", 0.0, 1e8), ("request_us", 0.0, 1e8), ("fanout_us", 0.0, 1e8))
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
    cores: int | None = None
    memory_total: int | None = None  # bytes
    compute_mb_s: float | None = None
    round_trip_us: float | None = None
    network_mb_s: float | None = None
    layer_overhead_us: float | None = None
    worker_baseline: int | None = None  # bytes
    request_us: float | None = None
    fanout_us: float | None = None


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

    cores = data.get("cores")
    if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or not 1 <= cores <= 4096):
        raise bad("cores", "an integer from 1 to 4096")

    sizes: dict[str, int | None] = {}
    for key in ("memory_total", "worker_baseline"):
        v = data.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise bad(key, "a size such as \"1GiB\" or a number of bytes")
            v = parse_size(v, f"{path}: {key}")
            if not 1 << 20 <= v <= MAX_BUDGET:
                raise bad(key, "between 1MiB and 1TiB")
        sizes[key] = v
    if sizes["memory_total"] is not None and budget > sizes["memory_total"]:
        raise bad("memory_budget", f"at most memory_total ({data['memory_total']})")
    if sizes["worker_baseline"] is not None and sizes["worker_baseline"] >= budget:
        raise bad("worker_baseline", f"below memory_budget ({budget_value}): a worker needs room for an expert")

    rates: dict[str, float | None] = {}
    for key, lo, hi in _RATES:
        v = data.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi) or (lo > 0 and v <= 0):
                raise bad(key, f"a number from {lo:g} to {hi:g}")
            v = float(v)
        rates[key] = v

    return DeviceProfile(path, name, budget, threads, speed, description, cores, sizes["memory_total"],
                         rates["compute_mb_s"], rates["round_trip_us"], rates["network_mb_s"],
                         rates["layer_overhead_us"], sizes["worker_baseline"], rates["request_us"],
                         rates["fanout_us"])

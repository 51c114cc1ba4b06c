"""`edgemoe profile-board`: measure this machine and write a device profile TOML for the planner."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgemoe.errors import UserError

HELP = "measure this machine (cores, memory, shard read rate, expert compute, round trip) into a profile TOML"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile-board", help=HELP,
                       description=HELP + " in the schema of devices/profiles/ (edgemoe plan reads it; edgemoe worker "
                       "--profile uses its memory_budget and threads). Run it on the board, with a converted model "
                       "on the storage the worker will read.",
                       epilog="example:\n  edgemoe profile-board build/models/demo-moe -o devices/profiles/my-board.toml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", help="a converted model directory on this board's shard storage")
    p.add_argument("-o", "--output", required=True, metavar="FILE.toml", help="the profile to write")
    p.add_argument("--name", default=None, help="profile name (default: the output file's name)")
    p.add_argument("--threads", "-t", type=int, default=None, help="ggml threads a worker uses (default: all cores)")
    p.add_argument("--memory-budget", default=None,
                   help="a worker's budget (default: the board's memory less 256 MiB for the OS)")
    p.add_argument("--force", action="store_true", help="overwrite FILE.toml")
    p.set_defaults(handler=run)


def render(name: str, budget: int, m, description: str) -> str:
    """The profile's TOML text (every key one of edgemoe/cluster/profile.py's)."""
    mib = lambda n: f'"{n >> 20}MiB"'  # noqa: E731
    return (f"# measured by edgemoe profile-board\n"
            f'name = "{name}"\n'
            f"memory_budget = {mib(budget)}\n"
            f"threads = {m.threads}\n"
            + ("# the kernel kept the shards cached after the drop: the rate below is the page cache's; replace it\n"
               "# with this storage's read rate\n" if m.storage_from_page_cache else "")
            + f"storage_read_mb_s = {m.storage_read_mb_s:.1f}\n"
            f'description = "{description}"\n'
            f"cores = {m.cores}\n"
            f"memory_total = {mib(m.memory_total)}\n"
            f"compute_mb_s = {m.compute_mb_s:.1f}\n"
            f"round_trip_us = {m.round_trip_us:.1f}\n"
            f"network_mb_s = {m.network_mb_s:.1f}\n"
            f"layer_overhead_us = {m.layer_overhead_us:.1f}\n"
            f"worker_baseline = {mib(m.worker_baseline)}\n"
            f"request_us = {m.request_us:.1f}\n"
            f"fanout_us = {m.fanout_us:.1f}\n")


def run(args: argparse.Namespace) -> int:
    import re

    from edgemoe.bench.board import cores, measure_board, memory_total
    from edgemoe.cluster.budget import parse_size
    from edgemoe.cluster.profile import load_profile
    from edgemoe.format.manifest import load_manifest
    from edgemoe.util.files import atomic_path

    out = Path(args.output)
    if out.suffix != ".toml":
        raise UserError(f"{out}: a profile is a .toml file")
    if out.exists() and not args.force:
        raise UserError(f"{out} exists (--force overwrites it)")
    if not out.resolve().parent.is_dir():
        raise UserError(f"{out}: directory {out.resolve().parent} does not exist")
    name = args.name or out.stem
    if not re.match(r"^[a-z0-9][a-z0-9._-]{0,63}$", name):
        raise UserError(f"--name {name!r}: lowercase letters, digits, '.', '_' or '-' (at most 64)")
    threads = args.threads or cores()
    if not 1 <= threads <= 256:
        raise UserError("--threads must be from 1 to 256")
    load_manifest(args.model)  # a model directory, or a clear error
    total = memory_total()
    budget = parse_size(args.memory_budget, "--memory-budget") if args.memory_budget else max(16 << 20, total - (256 << 20))
    if budget > total:
        raise UserError(f"--memory-budget {args.memory_budget}: more than this machine's {total >> 20} MiB")
    m = measure_board(args.model, threads, log=lambda s: print(s, file=sys.stderr))
    text = render(name, budget, m, "measured by edgemoe profile-board")
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    load_profile(out)  # what it wrote reads back under the strict schema
    print(text, end="")
    print(f"wrote {out}", file=sys.stderr)
    return 0

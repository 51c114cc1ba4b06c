"""`edgemoe worker`: the daemon on each board; serves expert computes for one coordinator."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from edgemoe.cli.keygen import add_client_key_args
from edgemoe.cluster.budget import DEFAULT_BUDGET
from edgemoe.errors import UserError

HELP = ("run a worker: compute expert shards for a coordinator within a memory budget, keeping the resident ones "
        "it is given and loading the others just in time")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help=HELP,
        description=HELP + ". Runs until SIGTERM/SIGINT (exit 0); exits 2 on a user error or when the "
        "coordinator rejects it (e.g. another model).",
        epilog="examples:\n"
        "  edgemoe worker --connect tcp://10.0.0.1:5555 --model /srv/edgemoe/model --memory-budget 400MiB \\\n"
        "      --key keys/pi-01.key_secret --coordinator-key coordinator.key\n"
        "  edgemoe worker --connect tcp://10.0.0.1:5555 --model /srv/edgemoe/model "
        "--profile devices/profiles/raspberry-pi-4-1gb.toml --name pi-01 --key ... --coordinator-key ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--connect", required=True, metavar="tcp://HOST:PORT",
                   help="the coordinator's worker endpoint (ipc:///PATH for a coordinator on this host)")
    p.add_argument("--model", required=True, metavar="DIR", help="converted model directory (manifest.json, experts/)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help=f"bound on this process's resident memory, e.g. 512MiB, 1GiB, 800M (default: profile, else {DEFAULT_BUDGET})")
    p.add_argument("--threads", type=int, metavar="N", help="ggml compute threads (default: profile, else all cores)")
    p.add_argument("--name", metavar="ID", help="worker name, unique per coordinator (default: HOSTNAME-PID)")
    p.add_argument("--profile", metavar="FILE.toml", help="device profile (devices/profiles/); explicit flags override it")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="rows per compute request the activation reserve is sized for (default: 64)")
    add_client_key_args(p)
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="default: INFO")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgemoe.cluster.budget import parse_size
    from edgemoe.cluster.keys import client_keys
    from edgemoe.cluster.local import die_with_parent
    from edgemoe.cluster.profile import load_profile

    die_with_parent()

    profile = load_profile(args.profile) if args.profile else None
    if args.memory_budget is not None:
        budget = parse_size(args.memory_budget, "--memory-budget")
    elif profile is not None:
        budget = profile.memory_budget
    else:
        budget = parse_size(DEFAULT_BUDGET)
    threads = args.threads if args.threads is not None else (profile.threads if profile else os.cpu_count() or 1)
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    name = args.name or f"{socket.gethostname().split('.')[0]}-{os.getpid()}"

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    from edgemoe.cluster.worker import Worker, parse_endpoint

    parse_endpoint(args.connect)
    keys = client_keys(args.key, args.coordinator_key, args.connect, args.insecure)
    worker = Worker(args.connect, args.model, budget, threads, name, max_tokens=args.max_tokens, keys=keys)
    if profile is not None:
        worker.log.info("profile %s (%s)", profile.name, profile.path)
    return worker.run()

"""`edgemoe plan`: how a model fits on a cluster of profiled boards, and how fast it would decode."""

from __future__ import annotations

import argparse
import json

HELP = "memory plan and predicted decode speed of a model on a cluster of boards (from their profiles)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help=HELP,
        description=HELP + ". What each worker keeps resident and what streams from its storage, whether the model "
        "fits, the smallest cluster of that board that holds every expert, and the predicted decode tok/s with its "
        "bottleneck (storage, network, compute, coordinator). Speeds come from the profiles' measured keys "
        "(edgemoe profile-board writes them).",
        epilog="examples:\n  edgemoe plan build/models/demo-moe --board raspberry-pi-4-1gb:4\n"
               "  edgemoe plan build/models/demo-moe --board build/this-machine.toml:4 --shared-host --residency off",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="converted model directory or a MoE .gguf")
    p.add_argument("--board", action="append", required=True, metavar="PROFILE[:COUNT]",
                   help="worker boards: a profile TOML or a name in devices/profiles/, COUNT of them (repeatable)")
    p.add_argument("--coordinator", metavar="PROFILE", help="the coordinator's profile (default: the first board's)")
    p.add_argument("--residency", choices=("auto", "off"), default="auto",
                   help="auto: workers keep what their budgets hold resident; off: the paper's cacheless mode")
    p.add_argument("--predictor", choices=("shadow", "lookahead", "reactive"), default="shadow")
    p.add_argument("--recall", type=float, default=0.95, help="the predictor's recall (edgemoe bench recall measures it)")
    p.add_argument("--shadow-node", action="store_true", help="the shadow runs on a node of its own")
    p.add_argument("--shared-host", action="store_true",
                   help="every process on one host (the local cluster of edgemoe run --workers N)")
    p.add_argument("--imatrix", metavar="FILE", help="routing counts for residency (default: MODEL.imatrix.gguf if present)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(handler=run)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def run(args: argparse.Namespace) -> int:
    from edgemoe.plan.cluster import default_imatrix, parse_board, plan_cluster, resolve_profile
    from edgemoe.plan.facts import model_facts

    facts = model_facts(args.model)
    boards = [parse_board(b) for b in args.board]
    coord = resolve_profile(args.coordinator) if args.coordinator else None
    imatrix = args.imatrix or default_imatrix(args.model)
    plan = plan_cluster(facts, boards, coord, residency=args.residency, predictor=args.predictor, recall=args.recall,
                        shadow_node=args.shadow_node, shared_host=args.shared_host, imatrix=imatrix)
    if args.json:
        print(json.dumps(plan.to_dict()))
        return 0
    m, n = plan.memory, sum(c for _, c in boards)
    print(f"{facts.name}: {m.total_experts} experts of {facts.mean_shard_bytes / 1e6:.2f} MB, top-{facts.n_experts_used}, "
          f"trunk {facts.trunk_bytes / 1e6:.0f} MB; {n} worker(s): "
          + ", ".join(f"{c} x {p.name} ({_mib(p.memory_budget)})" for p, c in boards))
    usage = f"routing counts from {plan.imatrix}" if plan.imatrix else "no routing counts: all experts assumed equally used"
    print(f"residency {m.residency}: {m.resident_experts} experts resident, {m.streamed_experts} streamed just in time; "
          f"{100 * m.resident_hit:.0f}% of routed experts find theirs resident ({usage})")
    for w in m.workers:
        print(f"  {w.name:24s} budget {_mib(w.budget)} = baseline {_mib(w.baseline)} + reserve {_mib(w.reserve)} + "
              f"streaming slots {_mib(w.jit_bytes)} + {w.resident} resident ({_mib(w.resident_bytes)}), "
              f"{_mib(w.budget - w.used)} left")
    where = f"{plan.coordinator.name} ({_mib(m.coordinator_budget)})" if m.coordinator_budget else "not checked (no --coordinator)"
    print(f"coordinator needs about {_mib(m.coordinator_bytes)} (trunk, KV cache, "
          f"{'in-process shadow, ' if args.predictor == 'shadow' and not args.shadow_node else ''}runtime): {where}"
          + ("" if m.coordinator_fits else ": DOES NOT FIT"))
    if m.boards_for_all_resident:
        p0 = boards[0][0]
        print(f"fits: yes (any number of {p0.name} from 1 streams what it cannot hold); "
              f"{m.boards_for_all_resident} x {p0.name} hold every expert resident (nothing read from storage after warm-up)")
    s = plan.speed
    if s is None:
        for name, keys in plan.speed_missing.items():
            print(f"speed: not predicted: profile {name} lacks {', '.join(keys)} (measure the board with edgemoe profile-board)")
        return 0
    t = s.terms
    print(f"predicted decode: {s.tok_s:.2f} tok/s, bottleneck: {s.bottleneck}")
    print(f"  per token: path {1e3 * t['path']:.0f} ms (coordinator {1e3 * s.components['coordinator']:.0f}, network "
          f"{1e3 * s.components['network']:.0f}, expert compute {1e3 * s.components['compute']:.0f}, stalls "
          f"{1e3 * s.components['stall']:.0f}), storage {1e3 * t['storage']:.0f} ms"
          + (f", shared cores {1e3 * t['cpu']:.0f} ms" if args.shared_host else "")
          + (f", shadow node {1e3 * t['shadow']:.0f} ms" if args.shadow_node else ""))
    print(f"  eq. (1): a load takes {1e3 * s.load_s:.1f} ms, the other groups give it {1e3 * s.maxload_s:.1f} ms: "
          + ("predicted loads do not stall" if s.stall_free else "predicted loads stall (add boards or faster storage)"))
    return 0

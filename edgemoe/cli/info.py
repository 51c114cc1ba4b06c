"""`edgemoe info`: what a model is (architecture, experts, types, bytes, shadow, manifest status)."""

from __future__ import annotations

import argparse
import json

HELP = "describe a converted model directory or a GGUF: layers, experts, top-k, types, bytes, shadow, manifest"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help=HELP, description=HELP + ". Reads headers only (fast); nothing is hashed.",
                       epilog="examples:\n  edgemoe info build/models/demo-moe\n  edgemoe info model.gguf --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="converted model directory (manifest.json) or a .gguf file")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(handler=run)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _types(d: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in d.items()) or "-"


def run(args: argparse.Namespace) -> int:
    from edgemoe.plan.facts import model_facts

    f = model_facts(args.model)
    if args.json:
        print(json.dumps(f.to_dict()))
        return 0
    print(f"{f.path}: {f.name} ({'converted model directory' if f.kind == 'directory' else 'GGUF file'})")
    print(f"architecture   {f.architecture}{' (shared expert)' if f.shared_expert else ''}, {f.n_layers} layers, "
          f"hidden {f.n_embd}, expert width {f.n_ff_exp}")
    if f.is_moe:
        print(f"experts        {f.n_experts} per layer in {len(f.moe_layers)} MoE layers, top-{f.n_experts_used} "
              f"({len(f.moe_layers) * f.n_experts} experts in all)")
    else:
        print("experts        none: a dense model (edgemoe run computes it in one process; a cluster needs a MoE)")
    print(f"types          trunk: {_types(f.trunk_types)}; experts: {_types(f.expert_types)}")
    sizes = sorted(set(f.shard_bytes.values()))
    shard = (_mb(sizes[0]) if len(sizes) == 1 else f"{_mb(sizes[0])}-{_mb(sizes[-1])}") if sizes else "-"
    print(f"bytes          trunk {_mb(f.trunk_bytes)}, experts {_mb(f.expert_bytes)} (one expert {shard}); "
          f"a decode token is routed to {_mb(f.routed_bytes_per_token)} of experts")
    if f.shadow:
        sh = f.shadow
        kind = sh["type"] + (f" (fallback {sh['fallback_type']})" if sh.get("fallback_type") else "")
        print(f"shadow         {kind}{', imatrix-weighted' if sh['imatrix_weighted'] else ''}, "
              f"trunk {'requantized to ' + sh['trunk_type'] if sh.get('trunk_type') else 'shared'}, {_mb(sh['bytes'])}")
    elif f.kind == "directory":
        print("shadow         none (convert with --shadow-type q4_k for the SEP predictor)")
    print(f"manifest       {f.manifest}")
    for problem in f.manifest_problems[:10]:
        print(f"  {problem}")
    if len(f.manifest_problems) > 10:
        print(f"  ... and {len(f.manifest_problems) - 10} more")
    return 0

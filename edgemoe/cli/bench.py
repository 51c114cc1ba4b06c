"""`edgemoe bench`: benchmarks against llama.cpp, measured in the same run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgemoe.cli.run import default_threads
from edgemoe.errors import UserError

HELP = "benchmarks against llama.cpp on the same GGUF (ratios, medians over repeats)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=HELP, description=HELP)
    kinds = p.add_subparsers(dest="bench", metavar="BENCH")
    kinds.required = True
    e = kinds.add_parser("engine", help="prefill/decode tok/s of the in-process engine vs llama.cpp",
                         description="Prefill and decode tok/s of `edgemoe run --workers 0` against llama.cpp "
                         "(flash attention, F32 KV cache, no weight repacking) on the same model and thread count.")
    e.add_argument("model", metavar="MODEL", help="converted model directory (or a dense GGUF)")
    e.add_argument("--reference", metavar="SRC.gguf", help="the GGUF llama.cpp runs (default: MODEL's source file "
                   "next to MODEL, or MODEL itself if it is a GGUF)")
    e.add_argument("--threads", "-t", type=int, default=default_threads(), help="threads for both (default %(default)s)")
    e.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    e.add_argument("--n-predict", type=int, default=64, help="tokens to decode (default 64)")
    e.add_argument("--repeat", type=int, default=3, help="runs of each engine (default 3)")
    e.add_argument("--json", action="store_true", help="print the full result as JSON")
    e.set_defaults(handler=run_engine)


def _reference_for(model: str, reference: str | None) -> Path:
    if reference:
        return Path(reference)
    m = Path(model)
    if m.is_file():
        return m
    from edgemoe.format.manifest import load_manifest

    guess = m.parent / load_manifest(m).source_file
    if not guess.is_file():
        raise UserError(f"cannot find {guess.name} next to {m}; pass --reference SRC.gguf")
    return guess


def run_engine(args: argparse.Namespace) -> int:
    if min(args.threads, args.prompt_tokens, args.repeat) < 1 or args.n_predict < 2:
        raise UserError("--threads, --prompt-tokens, --repeat must be >= 1 and --n-predict >= 2")
    from edgemoe.bench.engine import bench_engine

    ref = _reference_for(args.model, args.reference)
    r = bench_engine(args.model, ref, threads=args.threads, prompt_tokens=args.prompt_tokens,
                     n_predict=args.n_predict, repeats=args.repeat,
                     n_ctx=max(256, args.prompt_tokens + args.n_predict + 8))
    s = r.summary()
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(f"model {r.model} vs llama.cpp on {r.reference}, {r.threads} threads, "
          f"{r.prompt_tokens}-token prompt, {r.n_predict} tokens, median of {r.repeats}")
    print(f"{'':10} {'edgemoe':>10} {'llama.cpp':>10} {'ratio':>7}")
    for key in ("prefill", "decode"):
        print(f"{key + ' tok/s':10} {s[f'edgemoe_{key}_tok_s']:10.1f} {s[f'llama_cpp_{key}_tok_s']:10.1f} {s[f'ratio_{key}']:7.2f}")
    print(f"greedy tokens identical: {'yes' if r.tokens_match else 'NO'}")
    return 0

"""`edgemoe bench`: benchmarks against llama.cpp, measured in the same run."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edgemoe.cli.run import add_attention_args, attention_from_args, default_threads, repack_from_args
from edgemoe.errors import UserError

HELP = "benchmarks against llama.cpp on the same GGUF (ratios, medians over repeats)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=HELP, description=HELP)
    kinds = p.add_subparsers(dest="bench", metavar="BENCH")
    kinds.required = True
    e = kinds.add_parser("engine", help="prefill/decode tok/s of the in-process engine vs llama.cpp",
                         description="Prefill and decode tok/s of `edgemoe run --workers 0` against llama.cpp "
                         "on the same model, thread count, KV cache types and flash-attention mode (llama.cpp's defaults "
                         "unless given) and weight repacking (llama.cpp's CPU_REPACK where this CPU runs it, unless --repack off).")
    e.add_argument("model", metavar="MODEL", help="converted model directory (or a dense GGUF)")
    e.add_argument("--reference", metavar="SRC.gguf", help="the GGUF llama.cpp runs (default: MODEL's source file "
                   "next to MODEL, or MODEL itself if it is a GGUF)")
    e.add_argument("--threads", "-t", type=int, default=default_threads(), help="threads for both (default %(default)s)")
    e.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    e.add_argument("--n-predict", type=int, default=64, help="tokens to decode (default 64)")
    e.add_argument("--repeat", type=int, default=3, help="runs of each engine (default 3)")
    add_attention_args(e)
    e.add_argument("--jit-experts", dest="resident_experts", action="store_false",
                   help="map each expert shard per use and unmap it after, as a worker does (default: keep them mapped)")
    e.add_argument("--repack", default="auto", choices=("on", "off", "auto"),
                   help="llama.cpp's repacked weights on both sides (auto, the default: where this CPU runs them)")
    e.add_argument("--json", action="store_true", help="print the full result as JSON")
    e.set_defaults(handler=run_engine)

    c = kinds.add_parser("cluster", help="decode tok/s of a local cluster vs llama.cpp fully cached and confined",
                         description="Decode tok/s of a local cluster of budget-limited workers against llama.cpp "
                         "holding the whole model (runs alternating), then llama.cpp confined to a memory cgroup "
                         "(page cache counted) of one worker's budget and of the workers' total; bytes read from "
                         "storage per token, peak memory of every process (workers' VmHWM and cgroup peak, the "
                         "coordinator, the shadow node, llama.cpp), stall share, recall. The machine's other load "
                         "disturbs absolute numbers: compare the ratios.")
    c.add_argument("model", metavar="MODEL", help="converted model directory")
    c.add_argument("--reference", metavar="SRC.gguf", help="the GGUF llama.cpp runs (default: MODEL's source next to it)")
    c.add_argument("--workers", type=int, default=4, help="local worker processes (default 4)")
    c.add_argument("--memory-budget", metavar="SIZE", help="each worker's memory budget, e.g. 256MiB")
    c.add_argument("--predictor", default="lookahead", help="reactive, random, lookahead (default), previous, frequency, "
                   "shadow, reanchor (the last two need a model converted with --shadow-type)")
    c.add_argument("--shadow-node", choices=["local"], help="with --predictor shadow: run the shadow in its own local "
                   "process (edgemoe shadow), as on the paper's shadow node")
    c.add_argument("--threads", "-t", type=int, default=1, help="threads of the coordinator and of llama.cpp (default 1)")
    c.add_argument("--board-profile", metavar="FILE.toml", help="this machine's speeds for the planner's prediction "
                   "(edgemoe profile-board writes it; default: measured at the end of the bench, ~15 s)")
    c.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    c.add_argument("--n-predict", type=int, default=64, help="tokens to decode (default 64)")
    c.add_argument("--repeat", type=int, default=3, help="measured runs (default 3, after one warm-up)")
    c.add_argument("--residency", choices=["auto", "off"], default="auto",
                   help="the workers' resident experts: auto (default) or off (the paper's cacheless mode)")
    c.add_argument("--no-confined", dest="confined", action="store_false",
                   help="skip the runs of llama.cpp confined to the budgets")
    c.add_argument("--confined-n-predict", type=int, default=8, metavar="N",
                   help="tokens per confined llama.cpp run (default 8: at one board's budget it reads the model per token)")
    c.add_argument("--plot", metavar="FILE.png", help="also write a PNG: decode tok/s against memory")
    c.add_argument("--json", action="store_true", help="print the full result as JSON")
    c.set_defaults(handler=run_cluster)

    v = kinds.add_parser("serve", help="aggregate decode tok/s and time to first token of `edgemoe serve` for 1-8 clients",
                         description="Starts `edgemoe serve --parallel N` (in process, or with --workers local budget-limited "
                         "workers) and measures, as its HTTP client on loopback, aggregate decode tok/s and time to "
                         "first token for each number of concurrent streaming completions; the single-request time to "
                         "first token is compared with `edgemoe run`'s (same code path, same options, in this process), "
                         "runs alternating. Medians over repeats; compare the ratios on a shared machine.")
    v.add_argument("model", metavar="MODEL", help="converted model directory")
    v.add_argument("--workers", type=int, default=0, help="local worker processes (default 0: in process)")
    v.add_argument("--memory-budget", metavar="SIZE", help="each worker's memory budget, e.g. 192MiB")
    v.add_argument("--predictor", default="lookahead", help="the cluster's expert predictor (default lookahead)")
    v.add_argument("--streams", default="1,2,4,8", metavar="A,B,...",
                   help="concurrent streams per level (default 1,2,4,8); the server runs --parallel of the largest")
    v.add_argument("--threads", "-t", type=int, default=1, help="ggml threads of the server and of the run (default 1)")
    v.add_argument("--n-predict", "-n", type=int, default=32, help="tokens per stream (default 32)")
    v.add_argument("--repeat", type=int, default=3, help="measured rounds (default 3, after one warm-up)")
    v.add_argument("--json", action="store_true", help="print the full result as JSON")
    v.set_defaults(handler=run_serve)

    r = kinds.add_parser("recall", help="recall of the expert predictors against the main model's routing (paper eq. 2-3)",
                         description="Recall (OD-MoE eq. 2-3) of each expert predictor, measured in-process against the "
                         "main model's actual routing over greedy decodes of the prompts: overall, per lead (MoE layers "
                         "ahead) and per token position. The predictors are replayed through the coordinator's calls, "
                         "seeing what they would see online; the shadow predictors are waited for (accuracy, not timing).")
    r.add_argument("model", metavar="MODEL_DIR", help="converted model directory (with --shadow-type for shadow, reanchor)")
    r.add_argument("--prompts", metavar="FILE", help="prompts, one per line (default: bench/prompts.txt of the source tree)")
    r.add_argument("--n-predict", "-n", type=int, default=32, help="decode steps per prompt (default 32)")
    r.add_argument("--predictors", default="all", metavar="A,B,...",
                   help="comma-separated names or specs (default all: " + ", ".join(_all_predictors()) + "); "
                   "shadow/reanchor take @T<i>KV<j> alignment periods, reanchor @d<D>, e.g. shadow@T0KV0")
    r.add_argument("--align-token", type=int, default=1, metavar="N", help="shadow token alignment period (0 = never; default 1)")
    r.add_argument("--align-kv", type=int, default=1, metavar="N", help="shadow KV alignment period (0 = never; default 1)")
    r.add_argument("--shadow-trunk", action="store_true", help="the shadow runs its requantized trunk instead of sharing the main one")
    r.add_argument("--reanchor-depth", type=int, default=1, metavar="D", help="layers re-run from the true state (default 1)")
    r.add_argument("--threads", "-t", type=int, default=1, help="ggml threads of the main model and of the shadow (default 1)")
    r.add_argument("--seed", type=int, default=0, help="seed of the random predictor (default 0)")
    r.add_argument("--json", action="store_true", help="print the full result as JSON")
    r.add_argument("--plot", metavar="FILE.png", help="also write a PNG: recall against token index and against lead")
    r.set_defaults(handler=run_recall)


def _all_predictors() -> list[str]:
    from edgemoe.predict import PREDICTORS

    return list(PREDICTORS)


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

    from edgemoe.util.extra_bufts import extra_bufts_result

    ref = _reference_for(args.model, args.reference)
    repack = repack_from_args(args)
    if args.repack == "auto" and not repack:
        print(f"note: llama.cpp's weight repacking is unavailable on this machine ({extra_bufts_result().reason}); "
              "edgemoe and llama.cpp both run without it", file=sys.stderr)
    r = bench_engine(args.model, ref, threads=args.threads, prompt_tokens=args.prompt_tokens,
                     n_predict=args.n_predict, repeats=args.repeat,
                     n_ctx=max(256, args.prompt_tokens + args.n_predict + 8), resident_experts=args.resident_experts,
                     repack=repack, attention=attention_from_args(args))
    s = r.summary()
    if r.reference_repack_note:
        print(f"note: {r.reference_repack_note}", file=sys.stderr)
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(f"model {r.model} vs llama.cpp on {r.reference}, {r.threads} threads, "
          f"{r.prompt_tokens}-token prompt, {r.n_predict} tokens, median of {r.repeats}; experts "
          f"{'resident' if r.resident_experts else 'mapped per use'}, edgemoe {'with' if r.repack else 'without'} ({r.repacked_bytes / 2**20:.0f} MiB repacked) and llama.cpp {'with' if r.reference_repack else 'without'} repacking; "
          f"{r.attention}")
    print(f"{'':10} {'edgemoe':>10} {'llama.cpp':>10} {'ratio':>7}")
    for key in ("prefill", "decode"):
        print(f"{key + ' tok/s':10} {s[f'edgemoe_{key}_tok_s']:10.1f} {s[f'llama_cpp_{key}_tok_s']:10.1f} {s[f'ratio_{key}']:7.2f}")
    print(f"greedy tokens identical: {'yes' if r.tokens_match else 'NO'}")
    return 0


def run_cluster(args: argparse.Namespace) -> int:
    if min(args.workers, args.threads, args.prompt_tokens, args.repeat, args.confined_n_predict) < 1 or args.n_predict < 2:
        raise UserError("--workers, --threads, --prompt-tokens, --repeat, --confined-n-predict must be >= 1 and "
                        "--n-predict >= 2")
    if not Path(args.model).is_dir():
        raise UserError(f"{args.model}: a cluster needs a converted model directory")
    if args.memory_budget is not None:
        from edgemoe.cluster.budget import parse_size

        parse_size(args.memory_budget, "--memory-budget")
    if args.plot:
        if not args.plot.lower().endswith(".png"):
            raise UserError(f"--plot {args.plot}: the plot is a PNG; name it FILE.png")
        if not Path(args.plot).resolve().parent.is_dir():
            raise UserError(f"--plot {args.plot}: directory {Path(args.plot).resolve().parent} does not exist")
    from edgemoe.bench.cluster import bench_cluster, plot

    r = bench_cluster(args.model, _reference_for(args.model, args.reference), workers=args.workers,
                      memory_budget=args.memory_budget, predictor=args.predictor, threads=args.threads,
                      prompt_tokens=args.prompt_tokens, n_predict=args.n_predict, repeats=args.repeat,
                      shadow_node=args.shadow_node, residency=args.residency, confined=args.confined,
                      confined_n_predict=args.confined_n_predict, board_profile=args.board_profile)
    if args.plot:
        plot(r, args.plot)
    s = r.summary()
    if r.confined_note:
        print(f"note: {r.confined_note}", file=sys.stderr)
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    where = " on its own node" if r.shadow_node else ""
    print(f"cluster of {r.workers} workers (budget {r.memory_budget or 'none'}, predictor {r.predictor}{where}, residency "
          f"{r.residency}: {r.resident_experts} of {r.n_experts} experts resident) vs llama.cpp, {r.threads} thread(s), "
          f"median of {r.repeats}")
    print(f"decode tok/s: cluster {s['cluster_decode_tok_s']:.1f}, llama.cpp fully cached {s['llama_cpp_decode_tok_s']:.1f}, "
          f"ratio {s['ratio']:.2f}")
    for c in r.confined:
        print(f"  llama.cpp confined to {mib(c.limit)} (memory cgroup, page cache counted): {c.median_tok_s:.2f} tok/s "
              f"(cluster {s[f'cluster_vs_confined_{c.limit >> 20}MiB']:.1f}x), reads "
              f"{statistics.median(c.storage_bytes_per_token) / 1e6:.0f} MB per token, cgroup peak {mib(c.cgroup_peak)}, "
              f"{r.confined_n_predict} tokens a run")
    print(f"stalled on expert loads: {100 * s['stall_share']:.1f}% of decode time; recall {s['recall']:.3f}")
    cg = f"; cgroup peaks {', '.join(mib(x) for x in r.worker_cgroup_peak)}" if r.worker_cgroup_peak else " (no cgroups)"
    shadow = f"; shadow node {mib(r.shadow_node_peak_rss)}" if r.shadow_node_peak_rss else ""
    print(f"peak memory: workers VmHWM {', '.join(mib(x) for x in r.worker_peak_rss)}{cg}; coordinator "
          f"{mib(r.coordinator_peak_rss)}{shadow}; llama.cpp fully cached {mib(r.llama_cpp_peak_rss)} "
          f"(coordinator/llama.cpp {s['coordinator_to_llama_cpp_memory']:.2f}); model file {mib(r.model_bytes)}")
    print(f"storage: a token routes to {r.expert_bytes_per_token / 1e6:.0f} MB of experts, the workers read "
          f"{s['storage_bytes_per_token'] / 1e6:.1f} MB per token ({100 * s['storage_share_of_routed']:.0f}%); shards map "
          f"at {r.shard_read_cold_bytes_per_s / 1e9:.2f} GB/s cold, {r.shard_read_warm_bytes_per_s / 1e9:.2f} GB/s from "
          f"the page cache ({r.shard_read_streams} loaders): storage allows {s['storage_bound_tok_s']:.1f} tok/s at "
          f"these reads, {s['dropping_storage_bound_tok_s']:.1f} tok/s to a cluster that drops every expert "
          f"(cluster at {s['cluster_to_dropping_storage_bound']:.2f}x that)")
    if r.cold_read_from_page_cache:
        print(f"warning: the kernel kept {100 * r.shard_read_cold_cached_share:.0f}% of the shards cached after the drop: the cold rate is the "
              "page cache's, and so are the storage ceilings above")
    print(f"planner (edgemoe plan's model of this cluster): {r.predicted_tok_s:.1f} tok/s predicted, "
          f"{s['predicted_over_measured']:.2f}x the measured; bottleneck {r.predicted_bottleneck}")
    print(f"greedy tokens identical: {'yes' if r.tokens_match else 'NO'}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        streams = tuple(int(x) for x in args.streams.split(","))
    except ValueError:
        raise UserError(f"--streams {args.streams}: expected comma-separated numbers such as 1,2,4,8") from None
    if not streams or min(streams) < 1 or max(streams) > 64:
        raise UserError(f"--streams {args.streams}: each must be 1-64")
    if args.workers < 0 or args.threads < 1 or args.n_predict < 2 or args.repeat < 1:
        raise UserError("--workers must be 0 or more, --threads and --repeat at least 1, --n-predict at least 2")
    if args.memory_budget:
        if not args.workers:
            raise UserError("--memory-budget limits workers: give --workers N")
        from edgemoe.cluster.budget import parse_size

        parse_size(args.memory_budget, "--memory-budget")
    if not Path(args.model).is_dir():
        raise UserError(f"{args.model}: not a converted model directory")
    from edgemoe.bench.serve import bench_serve

    r = bench_serve(args.model, workers=args.workers, memory_budget=args.memory_budget, predictor=args.predictor,
                    streams=streams, n_predict=args.n_predict, repeats=args.repeat, threads=args.threads)
    s = r.summary()
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    where = f"{r.workers} workers (budget {r.memory_budget or 'none'}, predictor {r.predictor})" if r.workers else "in process"
    print(f"edgemoe serve --parallel {r.parallel}, {where}, {r.threads} thread(s), {r.n_predict} tokens a stream, "
          f"median of {r.repeats}")
    print("streams  aggregate decode tok/s  vs 1 stream  median TTFT")
    for lv in r.levels:
        print(f"{lv.streams:7d}  {lv.median_tok_s:22.1f}  {s.get(f'speedup_{lv.streams}', 0.0):10.2f}x  "
              f"{1e3 * lv.median_ttft_s:8.0f} ms")
    print(f"time to first token of one request: serve {1e3 * s['serve_ttft_s']:.0f} ms, edgemoe run "
          f"{1e3 * s['run_ttft_s']:.0f} ms (ratio {s['ttft_ratio']:.2f})")
    return 0


def run_recall(args: argparse.Namespace) -> int:
    if args.n_predict < 1 or args.threads < 1:
        raise UserError("--n-predict and --threads must be at least 1")
    if args.align_token < 0 or args.align_kv < 0:
        raise UserError("--align-token and --align-kv must be 0 (never) or more")
    if args.reanchor_depth < 1:
        raise UserError("--reanchor-depth must be at least 1")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UserError(f"--plot {args.plot}: the plot is a PNG; name it FILE.png")
    from edgemoe.bench.recall import DEFAULT_PROMPTS, bench_recall, format_table, plot, read_prompts
    from edgemoe.predict import PredictorOptions, parse_predictor

    explicit = args.predictors.strip() != "all"
    specs = [p.strip() for p in args.predictors.split(",") if p.strip()] if explicit else _all_predictors()
    if not specs:
        raise UserError("--predictors: no predictor named")
    for spec in specs:
        parse_predictor(spec)
    if len(set(specs)) != len(specs):
        raise UserError("--predictors: a predictor is named twice")
    prompts_path = args.prompts
    if prompts_path is None:
        if not DEFAULT_PROMPTS.is_file():
            raise UserError("--prompts FILE is needed (no bench/prompts.txt next to this edgemoe)")
        prompts_path = DEFAULT_PROMPTS
    prompts = read_prompts(prompts_path)
    if args.plot:
        parent = Path(args.plot).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--plot {args.plot}: directory {parent} does not exist")
    opts = PredictorOptions(align_token=args.align_token, align_kv=args.align_kv, shadow_trunk=args.shadow_trunk,
                            reanchor_depth=args.reanchor_depth, shadow_threads=args.threads)
    r = bench_recall(args.model, prompts, n_predict=args.n_predict, predictors=specs, options=opts,
                     threads=args.threads, seed=args.seed, explicit=explicit, progress=not args.json)
    if args.plot:
        plot(r, args.plot)
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(format_table(r))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0

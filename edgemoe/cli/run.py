"""`edgemoe run`: complete a raw-text prompt, streaming tokens, then print timings (or JSON stats)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from edgemoe.errors import UserError

HELP = "generate a completion of a raw-text prompt"


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (llama.cpp's sampler chain)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the K most likely tokens; 0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling; 1.0 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below P x the best one; 0 = off (default 0.05)")
    g.add_argument("--seed", type=int, default=-1, help="random seed; -1 = random (default)")


def add_attention_args(p: argparse.ArgumentParser) -> None:
    """llama.cpp's KV cache and attention flags, with its defaults (F16 cache, flash attention auto)."""
    from edgemoe.model.kvcache import CACHE_TYPES, FLASH_ATTN_MODES

    types = ", ".join(CACHE_TYPES)
    p.add_argument("--cache-type-k", "-ctk", default="f16", metavar="TYPE", help=f"KV cache type for K: {types} (default f16)")
    p.add_argument("--cache-type-v", "-ctv", default="f16", metavar="TYPE",
                   help=f"KV cache type for V: {types} (default f16; quantized V needs flash attention)")
    p.add_argument("--flash-attn", "-fa", default="auto", metavar="MODE",
                   help=f"flash attention: {', '.join(FLASH_ATTN_MODES)} (default auto: on, as llama.cpp on the CPU)")


def add_repack_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repack", default="auto", choices=("on", "off", "auto"),
                   help="llama.cpp's repacked weights (CPU_REPACK: interleaved Q4_0/Q4_K/IQ4_NL... for its faster "
                   "kernels): auto (default) = on where this CPU runs them, in-process; a cluster runs without")


def repack_from_args(args: argparse.Namespace, cluster: bool = False) -> bool:
    """Whether to repack: on/auto where the CPU can (child-process probe); never for a cluster, whose
    workers compute the experts from the shards as they are."""
    from edgemoe.util.extra_bufts import extra_bufts_result

    if args.repack == "off":
        return False
    if cluster:
        if args.repack == "on":
            raise UserError("--repack on: a cluster's workers compute experts without repacking; use --repack off or auto")
        return False
    usable = extra_bufts_result()
    if args.repack == "on" and not usable.usable:
        raise UserError(f"--repack on: llama.cpp's repacked kernels cannot run here ({usable.reason}); use --repack auto or off")
    return usable.usable


def attention_from_args(args: argparse.Namespace):
    """The AttentionOptions of add_attention_args' flags (checked against the model when it loads)."""
    from edgemoe.model.kvcache import AttentionOptions

    return AttentionOptions(args.cache_type_k, args.cache_type_v, args.flash_attn)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", "-t", type=int, default=default_threads(), help="CPU threads for ggml (default %(default)s)")
    add_attention_args(p)
    add_repack_arg(p)
    p.add_argument("--ctx-size", "-c", type=int, default=4096, help="context length in tokens, capped by the model's (default 4096)")
    p.add_argument("--jit-experts", dest="resident_experts", action="store_false",
                   help="in-process: map each expert shard just in time and unmap it after use, as a worker does "
                   "(default: map each shard once and keep it mapped, as llama.cpp maps its file)")
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=0,
                   help="spawn N local worker processes on loopback; 0 = compute experts in this process (default)")
    g.add_argument("--bind", metavar="tcp://HOST:PORT", help="serve workers started elsewhere (edgemoe worker --connect)")
    g.add_argument("--wait-workers", type=int, default=0, metavar="N", help="with --bind: wait for N remote workers")
    g.add_argument("--predictor", default="lookahead",
                   help="expert predictor: reactive, random, lookahead (default), previous, frequency, shadow (SEP: needs "
                   "a model converted with --shadow-type), reanchor (shadow re-anchored on the true state each layer); "
                   "shadow/reanchor take @T<i>KV<j> alignment periods, e.g. shadow@T1KV4")
    g.add_argument("--align-token", type=int, default=1, metavar="N",
                   help="shadow: decode the main model's token every N steps (0 = never; default 1)")
    g.add_argument("--align-kv", type=int, default=1, metavar="N",
                   help="shadow: overwrite its K/V with the main model's every N steps (0 = never; default 1)")
    g.add_argument("--shadow-trunk", action="store_true",
                   help="shadow: run the requantized trunk (--shadow-trunk-type at conversion) instead of sharing the main one")
    g.add_argument("--shadow-node", metavar="local|tcp://HOST:PORT",
                   help="shadow: run it on its own node, as the paper does: `local` spawns one on loopback, "
                   "tcp://HOST:PORT serves one started elsewhere (edgemoe shadow --connect)")
    g.add_argument("--reanchor-depth", type=int, default=1, metavar="D",
                   help="reanchor: MoE layers re-run from the main model's state after each layer (default 1)")
    g.add_argument("--memory-budget", metavar="SIZE", help="memory budget of each spawned worker, e.g. 256MiB")
    g.add_argument("--worker-threads", type=int, default=1, help="threads per spawned worker (default 1)")
    g.add_argument("--residency", choices=["auto", "off"], default="auto",
                   help="auto (default): the workers keep what their budgets hold beyond the just-in-time slots "
                   "resident, under one placement; off: drop every expert after use (the paper's cacheless mode)")
    g.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                   help="seconds before a worker's request is retried elsewhere (default 30); a silent worker "
                   "is noticed sooner, from its heartbeats")
    g = p.add_argument_group("authentication (docs/SECURITY.md; local daemons get ephemeral keys by themselves)")
    g.add_argument("--key", metavar="FILE.key_secret", help="the coordinator's secret key (edgemoe keygen)")
    g.add_argument("--allow", metavar="FILE|DIR",
                   help="public keys of the workers and shadow node allowed to join: a file with one KEY [comment] "
                   "per line, or a folder of .key files")
    g.add_argument("--insecure", action="store_true",
                   help="bind a non-loopback --bind/--shadow-node without keys (anyone can join; logs a warning)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help=HELP, description=HELP + " (tokenized as llama.cpp does: add_special, no special-token parsing).")
    p.add_argument("model", metavar="MODEL", help="converted model directory (edgemoe convert), or a dense GGUF file")
    p.add_argument("--prompt", "-p", required=True, help="prompt text")
    p.add_argument("--n-predict", "-n", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    add_sampling_args(p)
    add_engine_args(p)
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line: prompt_tokens, tokens, text, stats")
    p.set_defaults(handler=run)


def check_engine_args(args: argparse.Namespace) -> None:
    if args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.ctx_size < 8:
        raise UserError("--ctx-size must be at least 8")
    if args.workers < 0 or args.wait_workers < 0 or args.worker_threads < 1:
        raise UserError("--workers and --wait-workers must be 0 or more, --worker-threads at least 1")
    if args.wait_workers and not args.bind:
        raise UserError("--wait-workers needs --bind tcp://HOST:PORT")
    if args.bind and not args.bind.startswith("tcp://"):
        raise UserError(f"--bind {args.bind}: expected tcp://HOST:PORT")
    if args.bind and args.workers + args.wait_workers == 0:
        raise UserError("--bind needs --wait-workers N (or --workers N)")
    from edgemoe.predict import parse_predictor

    name, _ = parse_predictor(args.predictor)
    if args.shadow_node is not None:
        if name != "shadow":
            raise UserError(f"--shadow-node needs --predictor shadow (got {args.predictor})")
        if args.workers + args.wait_workers == 0:
            raise UserError("--shadow-node needs a cluster (--workers N or --bind ... --wait-workers N)")
        if args.shadow_node != "local" and not args.shadow_node.startswith("tcp://"):
            raise UserError(f"--shadow-node {args.shadow_node}: expected local or tcp://HOST:PORT")
    if args.align_token < 0 or args.align_kv < 0:
        raise UserError("--align-token and --align-kv must be 0 (never) or more")
    if args.reanchor_depth < 1:
        raise UserError("--reanchor-depth must be at least 1")
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise UserError(f"--request-timeout {args.request_timeout}: must be a finite number of seconds above 0")


def cluster_options(args: argparse.Namespace):
    from edgemoe.cluster.session import ClusterOptions

    return ClusterOptions(workers=args.workers, bind=args.bind, wait_workers=args.wait_workers, predictor=args.predictor,
                          memory_budget=args.memory_budget, worker_threads=args.worker_threads,
                          request_timeout_s=args.request_timeout, align_token=args.align_token, align_kv=args.align_kv,
                          shadow_trunk=args.shadow_trunk, reanchor_depth=args.reanchor_depth, shadow_node=args.shadow_node,
                          residency=args.residency, key=args.key, allow=args.allow, insecure=args.insecure)


def cluster_stats(engine) -> dict:
    """The cluster part of --json stats (empty for an in-process run)."""
    experts = engine.experts
    if not hasattr(experts, "summary"):
        return {}
    out = experts.summary()
    predictor = getattr(experts, "predictor", None)
    if predictor is not None:
        out["predictor"] = {"name": predictor.name, **predictor.stats()}  # e.g. the shadow's late start
    s = experts.stats
    out["breakdown_s"] = {"trunk": engine.stats.trunk_s, "experts_wall": s.wall_s, "network": s.network_s,
                          "expert_load": s.worker_load_s, "expert_wait": s.worker_wait_s,
                          "expert_compute": s.worker_compute_s, "stall": s.stall_s}
    local = getattr(engine, "local_workers", None)
    if local is not None:
        peaks = local.peak_rss()
        for w in out["workers"]:
            w["peak_rss_outside"] = peaks.get(w["pid"], 0)
    return out


def sampling_from_args(args: argparse.Namespace):
    from edgemoe.model.sampling import SamplingParams

    if args.top_k < 0 or not 0.0 <= args.top_p <= 1.0 or not 0.0 <= args.min_p <= 1.0:
        raise UserError("--top-k must be >= 0, --top-p and --min-p within [0, 1]")
    if not (math.isfinite(args.temp) and args.temp >= 0):
        raise UserError(f"--temp {args.temp}: must be a finite number, 0 (greedy) or more")
    return SamplingParams(temp=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          seed=None if args.seed < 0 else args.seed)


def check_text(text: str, what: str) -> str:
    """Text from the command line is UTF-8 (Python keeps undecodable argv bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid UTF-8 (byte {e.start} of it)") from None
    return text


def run(args: argparse.Namespace) -> int:
    check_engine_args(args)
    check_text(args.prompt, "--prompt")
    if args.n_predict < 1:
        raise UserError("--n-predict must be at least 1")
    sampling = sampling_from_args(args)

    from edgemoe.cluster.session import open_engine
    from edgemoe.model.generate import generate
    from edgemoe.model.tokenizer import Tokenizer
    from edgemoe.util.proc import peak_rss_bytes

    with open_engine(args.model, cluster_options(args), n_ctx=args.ctx_size, n_threads=args.threads,
                     resident_experts=args.resident_experts, attention=attention_from_args(args),
                     repack=repack_from_args(args, cluster=cluster_options(args).enabled)) as engine:
        with Tokenizer(engine.weights.path) as tok:
            prompt_tokens = tok.tokenize(args.prompt, add_special=True, parse_special=False)
            if len(prompt_tokens) >= engine.n_ctx:
                raise UserError(f"the prompt is {len(prompt_tokens)} tokens, longer than the context of {engine.n_ctx} (--ctx-size)")

            def emit(text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            gen = generate(engine, tok, prompt_tokens, n_predict=args.n_predict, sampling=sampling,
                           ignore_eos=args.ignore_eos, on_text=emit)
        cluster = cluster_stats(engine)
    sys.stdout.write("\n")
    print(f"prompt: {len(gen.prompt_tokens)} tokens, {gen.prefill_tok_s:.1f} tok/s | "
          f"generated: {len(gen.tokens)} tokens, {gen.decode_tok_s:.1f} tok/s | stop: {gen.stop}", file=sys.stderr)
    if args.json:
        stats = {
            "prefill_tok_s": gen.prefill_tok_s,
            "decode_tok_s": gen.decode_tok_s,
            "prefill_s": gen.prefill_s,
            "decode_s": gen.decode_s,
            "trunk_s": engine.stats.trunk_s,
            "experts_s": engine.stats.experts_s,
            "peak_rss_bytes": peak_rss_bytes(),
            "kv_cache_bytes": engine.kv.nbytes,
            "kv_cache": {"type_k": engine.kv.attn.type_k.name.lower(), "type_v": engine.kv.attn.type_v.name.lower(),
                         "flash_attn": engine.kv.attn.flash, "n_ctx": engine.n_ctx},
            "repacked_bytes": engine.repacker.nbytes if engine.repacker is not None else 0,
            "stop": gen.stop,
            "seed": gen.seed,
            "threads": args.threads,
            "n_prompt": len(gen.prompt_tokens),
            "n_generated": len(gen.tokens),
        }
        if cluster:
            stats["cluster"] = cluster
        print(json.dumps({"prompt_tokens": gen.prompt_tokens, "tokens": gen.tokens, "text": gen.text, "stats": stats}))
    return 0

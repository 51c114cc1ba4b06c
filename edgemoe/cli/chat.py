"""`edgemoe chat`: an interactive chat with the model's own chat template, streamed answers."""

from __future__ import annotations

import argparse
import sys

from edgemoe.cli.run import (add_engine_args, add_sampling_args, attention_from_args, check_engine_args, check_text,
                             cluster_options, cluster_stats, repack_from_args, sampling_from_args)
from edgemoe.errors import UserError

HELP = "chat interactively (the model's chat template; /reset, /stats, /quit)"
COMMANDS = "/reset  forget the conversation\n/stats  totals so far\n/quit   leave (or Ctrl-D)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help=HELP, description=HELP + ".")
    p.add_argument("model", metavar="MODEL", help="converted model directory (or a dense GGUF)")
    p.add_argument("--system", help="a system message to start every conversation with")
    p.add_argument("--n-predict", "-n", type=int, default=512, help="longest answer in tokens (default 512)")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(handler=run)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args: argparse.Namespace) -> int:
    check_engine_args(args)
    if args.system:
        check_text(args.system, "--system")
    if args.n_predict < 1:
        raise UserError("--n-predict must be at least 1")
    sampling = sampling_from_args(args)
    from edgemoe.cluster.session import open_engine
    from edgemoe.model.generate import generate
    from edgemoe.model.tokenizer import Tokenizer

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    with open_engine(args.model, cluster_options(args), n_ctx=args.ctx_size, n_threads=args.threads,
                     resident_experts=args.resident_experts, attention=attention_from_args(args),
                     repack=repack_from_args(args, cluster=cluster_options(args).enabled)) as engine, \
            Tokenizer(engine.weights.path) as tok:
        if tok.chat_template is None:
            raise UserError(f"{args.model}: the model has no chat template; use `edgemoe run` for raw completion")
        base = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(base)
        in_cache: list[int] = []  # tokens whose K/V the engine holds
        totals = {"answers": 0, "tokens": 0, "decode_s": 0.0, "prefill_tokens": 0, "prefill_s": 0.0}
        print(f"edgemoe chat: {args.model} ({COMMANDS.count(chr(10)) + 1} commands: /reset /stats /quit)", file=sys.stderr)
        while True:
            try:
                # (stdin may decode with surrogateescape: undecodable bytes then arrive as lone surrogates)
                line = check_text(input("> " if interactive else ""), "a line of input")
            except EOFError:
                break
            except (UnicodeDecodeError, UserError):
                print("error: a line of input is not valid UTF-8; skipped", file=sys.stderr)
                continue
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                messages, in_cache = list(base), []
                engine.reset()
                print("(conversation cleared)", file=sys.stderr)
                continue
            if line == "/stats":
                dec = totals["tokens"] / totals["decode_s"] if totals["decode_s"] else 0.0
                print(f"{totals['answers']} answers, {totals['tokens']} tokens, {dec:.1f} tok/s decode, "
                      f"{engine.n_past}/{engine.n_ctx} context tokens used", file=sys.stderr)
                extra = cluster_stats(engine)
                if extra:
                    peaks = ", ".join(f"{w['name']} {(w.get('peak_rss_outside') or w['peak_rss']) >> 20} MiB"
                                      for w in sorted(extra["workers"], key=lambda w: w["name"]))
                    print(f"cluster: recall {extra['recall']:.3f}, {extra['bytes_sent'] >> 10} KiB sent, "
                          f"{extra['bytes_received'] >> 10} KiB received, peak RSS {peaks} "
                          f"(budget {extra['workers'][0]['budget'] >> 20} MiB each)", file=sys.stderr)
                continue
            if line.startswith("/"):
                print(f"unknown command {line.split()[0]}\n{COMMANDS}", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            prompt = tok.tokenize(tok.apply_chat_template(messages, add_generation_prompt=True),
                                  add_special=False, parse_special=True)
            keep = _common_prefix(in_cache, prompt[:-1])  # re-evaluate at least the last prompt token
            if len(prompt) + 1 >= engine.n_ctx:
                messages.pop()
                print(f"(the conversation is {len(prompt)} tokens, the context holds {engine.n_ctx}: /reset to start over)",
                      file=sys.stderr)
                continue
            engine.truncate(keep)

            def emit(text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            gen = generate(engine, tok, prompt[keep:], n_predict=min(args.n_predict, engine.n_ctx - len(prompt) - 1),
                           sampling=sampling, on_text=emit)
            sys.stdout.write("\n")
            sys.stdout.flush()
            in_cache = prompt + gen.tokens[:-1] if gen.stop != "eos" else prompt + gen.tokens
            in_cache = in_cache[: engine.n_past]
            messages.append({"role": "assistant", "content": gen.text})
            totals["answers"] += 1
            totals["tokens"] += len(gen.tokens)
            totals["decode_s"] += gen.decode_s
            footer = (f"[{len(gen.tokens)} tokens, {gen.decode_tok_s:.1f} tok/s, prompt {len(prompt) - keep} new tokens "
                      f"at {gen.prefill_tok_s:.1f} tok/s, stop: {gen.stop}")
            extra = cluster_stats(engine)
            if extra:
                footer += f", recall {extra['recall']:.3f}"
            print(footer + "]", file=sys.stderr)
    return 0

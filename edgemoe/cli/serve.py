"""`edgemoe serve`: an OpenAI-compatible HTTP server (edgemoe.serve) over one engine or cluster."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from edgemoe.cli.run import (add_engine_args, add_sampling_args, attention_from_args, check_engine_args, cluster_options,
                             repack_from_args, sampling_from_args)
from edgemoe.errors import UserError

HELP = "serve the model over an OpenAI-compatible HTTP API, with a chat page and Prometheus metrics"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=HELP, description=HELP + ". Up to --parallel sequences are generated "
                       "together (their tokens share each engine step); further requests wait in a bounded queue. "
                       "The sampling options are the defaults of requests that do not set their own.")
    p.add_argument("model", metavar="MODEL", help="converted model directory (edgemoe convert), or a dense GGUF file")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1/*; may be given several times")
    g.add_argument("--api-key-file", action="append", default=[], metavar="FILE",
                   help="read API keys from FILE, one a line (# comments); may be given several times")
    g.add_argument("--queue-size", type=int, default=8, metavar="N",
                   help="requests that may wait for the engine; more are answered 503 with Retry-After (default 8)")
    g.add_argument("--parallel", "-np", type=int, default=1, metavar="N",
                   help="sequences decoded together, each with the whole --ctx-size (llama-server's -np divides "
                   "it instead); their tokens go through the trunk together and each layer's experts are "
                   "loaded once for all of them (default 1)")
    g.add_argument("--alias", metavar="NAME", help="the model's name in /v1/models (default: the directory's name)")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--n-predict", "-n", type=int, default=512,
                   help="longest answer in tokens when a request sets no max_tokens (default 512)")
    add_sampling_args(p)
    add_engine_args(p)
    p.set_defaults(handler=run)


def read_api_keys(keys: list[str], files: list[str]) -> list[str]:
    """--api-key values and the keys in --api-key-file files (one a line, blank lines and # comments skipped)."""
    out = list(keys)
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--api-key-file {f}: {e}") from None
        found = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise UserError(f"--api-key-file {f}: no keys in it")
        out += found
    for k in out:
        if not k or any(c.isspace() for c in k):
            raise UserError("an API key must be non-empty and without spaces")
    return out


def run(args: argparse.Namespace) -> int:
    check_engine_args(args)
    if args.n_predict < 1:
        raise UserError("--n-predict must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: expected 0-65535")
    if args.queue_size < 1:
        raise UserError("--queue-size must be at least 1")
    if not 1 <= args.parallel <= 64:
        raise UserError(f"--parallel {args.parallel}: expected 1-64")
    defaults = sampling_from_args(args)
    keys = read_api_keys(args.api_key, args.api_key_file)
    if not Path(args.model).exists():
        raise UserError(f"{args.model}: no such model directory or file")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    import uvicorn

    from edgemoe.serve.app import Server, make_app
    from edgemoe.serve.runner import Runner

    opts = cluster_options(args)
    runner = Runner(args.model, opts, n_ctx=args.ctx_size, n_threads=args.threads,
                    resident_experts=args.resident_experts, attention=attention_from_args(args),
                    repack=repack_from_args(args, cluster=opts.enabled), queue_size=args.queue_size,
                    n_predict=args.n_predict, parallel=args.parallel)
    name = args.alias or Path(args.model).resolve().name.removesuffix(".gguf")
    server = Server(runner, model_name=name, api_keys=keys, defaults=defaults)
    config = uvicorn.Config(make_app(server), host=args.host, port=args.port, log_level=args.log_level.lower(),
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    http = uvicorn.Server(config)
    sock = listen_socket(args.host, args.port)  # before loading: a port in use is a user error, at once
    print(f"edgemoe serve: http://{args.host}:{sock.getsockname()[1]}/ (the model loads meanwhile; /health says "
          "when it is ready)", file=sys.stderr, flush=True)
    runner.start()  # the engine loads (and the workers join) while /health already answers "loading"
    try:
        http.run(sockets=[sock])  # returns on SIGINT/SIGTERM
    finally:
        runner.stop()
        sock.close()
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (which listens on it)."""
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then, and without
    # it a keep-alive client waits out a delayed ACK (~40 ms) on every response
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock

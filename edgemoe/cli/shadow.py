"""`edgemoe shadow`: the shadow predictor on its own node (the paper's shadow node)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from edgemoe.cli.keygen import add_client_key_args

HELP = "run the shadow predictor (SEP) on this node for a coordinator started with --shadow-node tcp://HOST:PORT"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shadow",
        help=HELP,
        description=HELP + ". It holds the model's trunk and shadow experts, decodes every token the main model "
        "starts and sends each layer's router choice back as soon as it has it. Runs until SIGTERM/SIGINT "
        "(exit 0); exits 2 on a user error or when the coordinator rejects it (e.g. another model).",
        epilog="example:\n"
        "  coordinator$ edgemoe chat models/model --bind tcp://0.0.0.0:5555 --wait-workers 8 --predictor shadow "
        "--shadow-node tcp://0.0.0.0:5556 --key keys/coordinator.key_secret --allow allowed-keys/\n"
        "  shadow$      edgemoe shadow --connect tcp://10.0.0.1:5556 --model models/model --key keys/shadow.key_secret "
        "--coordinator-key coordinator.key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--connect", required=True, metavar="tcp://HOST:PORT", help="the coordinator's shadow endpoint")
    p.add_argument("--model", required=True, metavar="DIR", help="converted model directory with shadow experts (--shadow-type)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="ggml threads of the shadow (default 1)")
    p.add_argument("--align-token", type=int, default=1, metavar="N",
                   help="decode the main model's token every N steps (0 = never; default 1)")
    p.add_argument("--align-kv", type=int, default=1, metavar="N",
                   help="overwrite the shadow's K/V with the main model's every N steps (0 = never; default 1)")
    p.add_argument("--shadow-trunk", action="store_true", help="run the requantized trunk (--shadow-trunk-type at conversion)")
    from edgemoe.cli.run import add_attention_args

    add_attention_args(p)  # the shadow's own KV cache (the main model's rows arrive as float32)
    p.add_argument("--name", metavar="ID", help="node name (default: HOSTNAME-shadow)")
    add_client_key_args(p)
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="default: INFO")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgemoe.cluster.keys import client_keys
    from edgemoe.cluster.local import die_with_parent
    from edgemoe.predict import PredictorOptions

    die_with_parent()

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    from edgemoe.cluster.shadow_node import ShadowNode
    from edgemoe.cluster.link import parse_endpoint

    parse_endpoint(args.connect)
    keys = client_keys(args.key, args.coordinator_key, args.connect, args.insecure)

    name = args.name or f"{socket.gethostname().split('.')[0]}-shadow"
    options = PredictorOptions(align_token=args.align_token, align_kv=args.align_kv, shadow_trunk=args.shadow_trunk,
                               shadow_threads=args.threads)
    from edgemoe.cli.run import attention_from_args

    return ShadowNode(args.connect, args.model, name, options, keys=keys, attention=attention_from_args(args)).run()

"""`edgemoe keygen DIR`: a CurveZMQ key pair for a coordinator, a worker or a shadow node."""

from __future__ import annotations

import argparse
import socket

HELP = "write a key pair (NAME.key public, NAME.key_secret mode 0600) for authenticated, encrypted cluster links"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keygen", help=HELP,
        description=HELP + ". Give the coordinator its .key_secret (--key) and the public .key files of its "
        "workers and shadow node (--allow FILE|DIR); give each worker its own .key_secret and the coordinator's "
        ".key (--key, --coordinator-key). See docs/SECURITY.md.",
        epilog="example:\n  edgemoe keygen /etc/edgemoe/keys --name coordinator",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="folder for the key files (created if missing)")
    p.add_argument("--name", help="file name stem (default: this host's name)")
    p.set_defaults(handler=run)


def add_client_key_args(p: argparse.ArgumentParser) -> None:
    """--key, --coordinator-key, --insecure for a node that connects to a coordinator."""
    g = p.add_argument_group("authentication (docs/SECURITY.md)")
    g.add_argument("--key", metavar="FILE.key_secret", help="this node's secret key (edgemoe keygen)")
    g.add_argument("--coordinator-key", metavar="KEY|FILE.key",
                   help="the coordinator's public key: a node refuses a coordinator that cannot prove it holds the secret")
    g.add_argument("--insecure", action="store_true",
                   help="connect to a non-loopback coordinator without keys (unauthenticated, unencrypted; logs a warning)")


def run(args: argparse.Namespace) -> int:
    from edgemoe.cluster.keys import KeyPair, write_keypair

    name = args.name or socket.gethostname().split(".")[0] or "edgemoe"
    pair = KeyPair.generate()
    public, secret = write_keypair(args.dir, name, pair)
    print(f"wrote {public} (public) and {secret} (secret, mode 0600)")
    print(f"public key: {pair.public.decode()}")
    return 0

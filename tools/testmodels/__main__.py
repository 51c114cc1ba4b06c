"""python -m tools.testmodels OUT_DIR [--only NAME ...]"""

from __future__ import annotations

import argparse
import sys
import time

from edgemoe.errors import UserError

from .archs import ARCHS
from .generate import MODELS, build_all


def main(argv: list[str] | None = None) -> int:
    names = list(ARCHS)
    stems = [stem for stem, _, _ in MODELS]
    ap = argparse.ArgumentParser(
        prog="python -m tools.testmodels",
        description="Write deterministic random-weight MoE GGUF test models and fixtures.json.",
    )
    ap.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"build only these models ({', '.join(names)}) or files ({', '.join(stems)})",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        written = build_all(args.out_dir, only=args.only, log=print)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(written)} files in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

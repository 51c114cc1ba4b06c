"""python -m tools.realmodels OUT_DIR [--only demo-moe|sparse-moe] [--force] [cut-down options]"""

from __future__ import annotations

import argparse
import sys
import time

from edgemoe.errors import UserError

from .build import MODEL_NAMES, BuildConfig, update


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.realmodels",
        description="Build demo-moe and sparse-moe from SmolLM2-135M-Instruct (deterministic; "
        "skipped when OUT_DIR/models.json is current, only reconverted when just the converter changed).",
    )
    ap.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    ap.add_argument("--only", choices=MODEL_NAMES, action="append", help="build only this model (repeatable)")
    ap.add_argument("--force", action="store_true", help="rebuild even if models.json is current")
    ap.add_argument("--layers", type=int, default=None, metavar="N",
                    help="cut-down build: only SmolLM2's first N layers (tests)")
    ap.add_argument("--calib-chunks", type=int, default=BuildConfig.calib_chunks, metavar="N",
                    help=f"calibration chunks of 512 tokens (default {BuildConfig.calib_chunks})")
    ap.add_argument("--demo-calib-chunks", type=int, default=BuildConfig.demo_calib_chunks, metavar="N",
                    help=f"of those, the first N fit demo-moe's router (default {BuildConfig.demo_calib_chunks})")
    ap.add_argument("--no-convert", action="store_true", help="do not write the converted OUT_DIR/<name>/")
    ap.add_argument("-t", "--threads", type=int, default=2, help="CPU threads (default 2)")
    args = ap.parse_args(argv)
    config = BuildConfig(n_layers=args.layers, calib_chunks=args.calib_chunks, demo_calib_chunks=args.demo_calib_chunks,
                         convert=not args.no_convert,
                         n_threads=args.threads)
    names = tuple(args.only) if args.only else MODEL_NAMES
    t0 = time.perf_counter()
    try:
        state = update(args.out_dir, config, names, force=args.force, log=lambda m: print(m, file=sys.stderr))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if state == "fresh":
        print(f"{args.out_dir}: up to date ({', '.join(names)}); --force rebuilds", file=sys.stderr)
        return 0
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""python -m tools.fullsize OUT_DIR [--model NAME] [--layers N] [--experts N]"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import time

from edgemoe.errors import UserError

from .generate import MODELS, build_model


def _sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through generate's cleanup (temp file removed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.fullsize",
        description="Write a random-weight Q4_0 MoE GGUF with the exact shapes of a real model, "
        "streamed to disk.",
    )
    ap.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    ap.add_argument("--model", choices=list(MODELS), default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, metavar="N", help="scaled-down model: N layers")
    ap.add_argument("--experts", type=int, metavar="N", help="scaled-down model: N experts")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    old = signal.signal(signal.SIGTERM, _sigterm)
    t0 = time.perf_counter()
    try:
        path = build_model(
            args.out_dir,
            args.model,
            n_layer=args.layers,
            n_expert=args.experts,
            progress=not args.no_progress,
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{path} {size} bytes ({size / 1e9:.2f} GB)")
    print(f"{dt:.1f} s, {size / 1e6 / dt:.0f} MB/s, peak RSS {rss:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`edgemoe imatrix`: an importance matrix of a MoE GGUF's routed experts, for a better shadow."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from edgemoe.errors import UserError

HELP = "collect the routed experts' importance matrix (llama.cpp's imatrix GGUF) over calibration text"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "imatrix",
        help=HELP,
        description=HELP + ". llama.cpp runs SRC over the text chunk by chunk and sums the squared inputs of "
        "every expert's matmuls; `edgemoe convert --shadow-type TYPE --shadow-imatrix FILE` then weighs the "
        "shadow's rounding error by them.",
        epilog="example:\n  edgemoe imatrix model.gguf --text calib.txt -o model.imatrix.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC.gguf", help="MoE model in llama.cpp's GGUF layout (the one you convert)")
    p.add_argument("--text", required=True, metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the imatrix GGUF")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: the whole text)")
    p.add_argument("--threads", "-t", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.threads < 1 or (args.chunks is not None and args.chunks < 1):
        raise UserError("--threads and --chunks must be at least 1")
    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; name the imatrix file to write")
    from edgemoe.format.gguf_io import get_str, open_gguf
    from edgemoe.format.imatrix import write_imatrix
    from edgemoe.convert.imatrix import collect_imatrix, read_text

    arch = get_str(open_gguf(args.src), "general.architecture") or ""
    text = read_text(args.text)
    with tqdm(total=None, unit="chunk", disable=args.quiet, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        im = collect_imatrix(args.src, text, dataset=Path(args.text).name, chunk_size=args.chunk_size,
                             max_chunks=args.chunks, n_threads=args.threads, progress=progress)
    write_imatrix(out, im, arch)
    if not args.quiet:
        print(f"wrote {out}: {len(im.sums)} expert tensors, {im.chunk_count} chunks of {im.chunk_size} tokens")
    return 0

"""`edgemoe convert`: split a MoE GGUF into a trunk and per-expert shards, or verify a converted model."""

from __future__ import annotations

import argparse
import errno
import sys

from tqdm import tqdm

from edgemoe.errors import UserError

HELP = "split a MoE GGUF into trunk.gguf + one GGUF per (layer, expert), or verify a converted model"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help=HELP,
        description=HELP + ". The output appears only when complete; a failed run leaves nothing behind.",
        epilog="examples:\n  edgemoe convert model.gguf models/model\n  edgemoe convert --dry-run model.gguf models/model\n"
        "  edgemoe convert model.gguf models/model --shadow-type q4_k   (also the shadow predictor's experts)\n"
        "  edgemoe imatrix model.gguf --text calib.txt -o model.imatrix.gguf\n"
        "  edgemoe convert model.gguf models/model --shadow-type iq4_nl --shadow-imatrix model.imatrix.gguf\n"
        "  edgemoe convert --verify models/model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", nargs="?", metavar="SRC.gguf", help="MoE model in llama.cpp's GGUF layout")
    p.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="directory to create (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (only once the new one is complete)")
    p.add_argument("--dry-run", action="store_true", help="print the files and sizes that would be written; write nothing")
    p.add_argument("--verify", metavar="DIR", help="re-check size and sha256 of every file in DIR against its manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no file listing")
    p.add_argument("--shadow-type", metavar="TYPE", help="also write every routed expert requantized to TYPE "
                   "(f16, q8_0, q6_k, q5_k, q5_0, q4_k, iq4_nl, q4_0, q3_k, q2_k) as OUT_DIR/shadow-TYPE.gguf, for the shadow predictor")
    p.add_argument("--shadow-fallback-type", metavar="TYPE", help="with --shadow-type: the type of the expert tensors "
                   "whose rows it cannot take (e.g. q4_k with iq4_nl: K-quants need rows of a multiple of 256)")
    p.add_argument("--shadow-imatrix", metavar="FILE", help="with --shadow-type: weight the requantization by this importance "
                   "matrix (from `edgemoe imatrix`, or llama.cpp's llama-imatrix GGUF)")
    p.add_argument("--shadow-trunk-type", metavar="TYPE", help="with --shadow-type: also a trunk requantized to TYPE "
                   "(OUT_DIR/shadow-trunk-TYPE.gguf), so the shadow is a whole quantized model")
    p.set_defaults(handler=run)


def _fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def run(args: argparse.Namespace) -> int:
    if args.verify:
        if args.src or args.out_dir or args.dry_run or args.force:
            raise UserError("--verify DIR takes no other arguments")
        return _verify(args.verify, args.quiet)
    if not args.src or not args.out_dir:
        raise UserError("convert needs SRC.gguf and OUT_DIR (or --verify DIR)")

    from edgemoe.convert import plan_conversion, write_model

    plan = plan_conversion(args.src, shadow_type=args.shadow_type, shadow_trunk_type=args.shadow_trunk_type,
                           shadow_fallback_type=args.shadow_fallback_type, shadow_imatrix=args.shadow_imatrix)
    files = plan.files()
    n_shards = len(plan.moe_layers) * plan.n_experts
    shadow_files = files[1 + n_shards:]
    if args.dry_run or not args.quiet:
        print(
            f"{plan.src.name}: {plan.arch.name} ({plan.arch.description}), {plan.n_layers} layers, "
            f"{plan.n_experts} experts, top-{plan.n_experts_used}, expert tensors {'/'.join(plan.expert_parts)}"
        )
    if args.dry_run:
        print(f"would write {args.out_dir}/ ({len(files) + 1} files, {_fmt_size(plan.total_nbytes())} of tensors):")
        print(f"  {'trunk.gguf':<40} {_fmt_size(files[0][1]):>10}  ({len(plan.trunk_tensors)} tensors)")
        per_layer = plan.expert_nbytes(plan.moe_layers[0])
        print(f"  {'experts/blk.LLL.expert.EEE.gguf':<40} {_fmt_size(per_layer):>10}  each, x {n_shards}")
        for rel, size in shadow_files:
            print(f"  {rel:<40} {_fmt_size(size):>10}")
        print(f"  {'manifest.json':<40}")
        return 0
    try:
        manifest = write_model(plan, args.out_dir, force=args.force, progress=not args.quiet)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # the free-space check passed, but the disk filled meanwhile (another writer): the partial output is gone
        raise UserError(f"writing {args.out_dir} failed: {e.strerror or e} (the disk filled during the conversion)") from None
    if not args.quiet:
        total = sum(f.size for f in manifest.files.values())
        shadow = "".join(f", {rel} {_fmt_size(manifest.files[rel].size)}" for rel, _ in shadow_files)
        print(f"wrote {args.out_dir}/: trunk.gguf {_fmt_size(manifest.files['trunk.gguf'].size)}, "
              f"{n_shards} expert shards{shadow}, {_fmt_size(total)} in all, manifest.json")
    return 0


def _verify(model_dir: str, quiet: bool) -> int:
    from edgemoe.format.manifest import load_manifest, verify_model_dir

    manifest = load_manifest(model_dir)
    total = sum(f.size for f in manifest.files.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=quiet, leave=False) as bar:
        problems = verify_model_dir(model_dir, bar.update)
    for p in problems:
        print(f"mismatch: {p}", file=sys.stderr)
    if problems:
        raise UserError(f"{model_dir}: {len(problems)} of {len(manifest.files)} files do not match the manifest")
    if not quiet:
        print(f"{model_dir}: all {len(manifest.files)} files match the manifest")
    return 0

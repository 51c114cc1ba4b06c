"""The KV cache and the attention mode, as llama.cpp has them: cache types, flash attention, layouts.

llama.cpp's options (`-ctk/-ctv f32|f16|q8_0|q4_0`, `-fa on|off|auto`) decide three things that
change the numbers, so edgemoe must make the same decisions to produce the same tokens:

- the storage type of K and V (F16 by default; K/V rows are rounded to it when stored);
- whether attention is one ggml_flash_attn_ext or kq = K*Q, softmax, V*kq (without flash
  attention the V cache is stored transposed, one row per channel, as llama.cpp's v_trans);
- for a quantized K (V) cache with head sizes that are multiples of 64, a Walsh-Hadamard rotation of
  Q and K (V and the attention output) around the cache (llama-kv-cache.cpp attn_rot_k/attn_rot_v),
  which spreads outliers before quantization.

What llama.cpp accepts (llama_init_from_model, src/llama-context.cpp): any of these types for K
and V with flash attention; a quantized V cache only with flash attention (`auto` turns it on); a
quantized type only where its block size divides the head size. `auto` resolves to on for a CPU-only
context (the fused-op probe finds flash attention on the layer's own device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from edgemoe.errors import UserError
from edgemoe.ggml import Context, GGMLType, TensorPtr, lib
from edgemoe.ggml.context import aligned_empty
from edgemoe.model.config import ModelConfig

CACHE_TYPES: dict[str, GGMLType] = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}
FLASH_ATTN_MODES = ("on", "off", "auto")
_QUANTIZED = {GGMLType.Q8_0, GGMLType.Q4_0}
_NP_TYPES = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}
_ROT_DISABLE_ENV = "LLAMA_ATTN_ROT_DISABLE"  # llama.cpp's switch; honoured so both sides agree

WORKING = ("every K/V type (f32, f16, q8_0, q4_0) with --flash-attn on or auto; "
           "with --flash-attn off only V types f32 and f16")


@dataclass(frozen=True)
class AttentionOptions:
    """What the user asked for (llama.cpp's defaults: F16 cache, flash attention auto)."""

    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"

    def resolve(self, cfg: ModelConfig) -> "Attention":
        """The attention as llama.cpp would run it for this model, or UserError where llama.cpp refuses."""
        for flag, name in (("--cache-type-k", self.cache_type_k), ("--cache-type-v", self.cache_type_v)):
            if name not in CACHE_TYPES:
                raise UserError(f"{flag} {name}: unknown cache type (choose from {', '.join(CACHE_TYPES)})")
        if self.flash_attn not in FLASH_ATTN_MODES:
            raise UserError(f"--flash-attn {self.flash_attn}: expected one of {', '.join(FLASH_ATTN_MODES)}")
        type_k, type_v = CACHE_TYPES[self.cache_type_k], CACHE_TYPES[self.cache_type_v]
        flash = self.flash_attn != "off"  # auto: on, as llama.cpp resolves it on the CPU
        latent = cfg.mla is not None and cfg.mla.absorbed
        if latent and type_k != type_v:
            raise UserError(f"--cache-type-k {self.cache_type_k} --cache-type-v {self.cache_type_v}: multi-head "
                            "latent attention (deepseek2) keeps V in the K cache, so both types must be the same, "
                            "as llama.cpp requires")
        if type_v in _QUANTIZED and not flash:
            raise UserError(f"--cache-type-v {self.cache_type_v} needs flash attention, as in llama.cpp "
                            f"(--flash-attn on or auto); llama.cpp accepts {WORKING}")
        for flag, name, t, head in (("--cache-type-k", self.cache_type_k, type_k, cfg.head_dim),
                                    ("--cache-type-v", self.cache_type_v, type_v, cfg.head_v)):
            blck = int(lib.ggml_blck_size(int(t)))
            if head % blck:
                raise UserError(f"{flag} {name}: its block size {blck} does not divide the head size {head} "
                                "of this model, which llama.cpp refuses; use f32 or f16")
        rot_off = bool(int(os.environ.get(_ROT_DISABLE_ENV, "0") or "0"))
        if latent:  # one latent "head" per token, V a view of K (llama.cpp's MLA cache)
            # never rotated: llama.cpp's K-only attention input (build_attn_inp_k, which deepseek2's MLA
            # uses) has no Hadamard matrix, so even a quantized cache of a latent head that is a multiple
            # of 64 (DeepSeek-V2's 512 + 64) stores Q and K as they are (the cache's attn_rot_k flag only
            # matters to a context shift, which edgemoe does not do)
            return Attention(type_k, type_k, flash, mla=True)
        rot_k = _hadamard_size_k(cfg.head_dim) if type_k in _QUANTIZED and cfg.head_dim % 64 == 0 and not rot_off else 0
        rot_v = 64 if type_v in _QUANTIZED and cfg.head_v % 64 == 0 and not rot_off else 0
        return Attention(type_k, type_v, flash, rot_k, rot_v)


@dataclass(frozen=True)
class Attention:
    """The resolved mode: cache types, flash attention, Hadamard rotation sizes (0 = none)."""

    type_k: GGMLType
    type_v: GGMLType
    flash: bool
    rot_k: int = 0
    rot_v: int = 0
    mla: bool = False  # no V cache: V is a view of K (deepseek2)

    @property
    def v_trans(self) -> bool:
        """llama.cpp stores V transposed (one row per channel) when attention is not flash."""
        return not self.flash and not self.mla

    def describe(self) -> str:
        return (f"K {self.type_k.name.lower()}, V {self.type_v.name.lower()}, "
                f"flash attention {'on' if self.flash else 'off'}")


def _hadamard_size_k(head_dim: int) -> int:
    """llama.cpp's K rotation size: the largest power of two (>= 64) dividing the head size."""
    n = 64
    while head_dim % (2 * n) == 0:
        n *= 2
    return n


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix llama.cpp builds (ggml_gen_hadamard), float32 [n, n]."""
    h = aligned_empty((n, n), zero=True)  # a graph input: ggml wants 32-byte aligned data
    h[0, 0] = np.float32(1.0 / float(np.sqrt(np.float32(n))))  # 1.0 / sqrtf(n), stored as float
    s = 1
    while s < n:
        blk = h[:s, :s].copy()
        h[s:2 * s, :s] = blk
        h[:s, s:2 * s] = blk
        h[s:2 * s, s:2 * s] = -blk
        s *= 2
    return h


def _row_bytes(t: GGMLType, n: int) -> int:
    return int(lib.ggml_row_size(int(t), n))


class KVCache:
    """K and V per layer in llama.cpp's layout for the resolved attention.

    k[il]: [n_ctx, row] of the cache type (float32/float16, or uint8 bytes of quantized rows).
    v[il]: the same with n_embd_v values a row, or, without flash attention, transposed
    [n_embd_v, n_ctx] (f32/f16 only). n_embd_v == n_embd_kv except for deepseek2's legacy layout.
    read_rows/write_rows give token rows in either layout; nbytes is the memory the cache holds.
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int, attn: Attention | None = None) -> None:
        self.attn = attn or AttentionOptions().resolve(cfg)
        self.n_ctx = n_ctx
        self.n_embd_kv = cfg.n_embd_kv  # a K row
        self.n_embd_v = cfg.n_embd_v  # a V row
        # zero-filled and lazily backed: a long context costs memory only as far as it is used
        self.k = [self._alloc(self.attn.type_k, False, self.n_embd_kv) for _ in range(cfg.n_layer)]
        # MLA: V is K's first values; the same arrays keep read/write/copy of token rows uniform
        self.v = list(self.k) if self.attn.mla else [self._alloc(self.attn.type_v, self.attn.v_trans, self.n_embd_v)
                                                   for _ in range(cfg.n_layer)]
        self.used = 0  # rows written so far (high-water mark)

    def _alloc(self, t: GGMLType, transposed: bool, width: int) -> np.ndarray:
        if t in _NP_TYPES:
            shape = (width, self.n_ctx) if transposed else (self.n_ctx, width)
            return aligned_empty(shape, _NP_TYPES[t], zero=True)
        return aligned_empty((self.n_ctx, _row_bytes(t, width)), np.uint8, zero=True)

    def mark_used(self, n_rows: int) -> None:
        self.used = max(self.used, n_rows)

    def clear(self) -> None:
        """Zero the rows ever written, as llama.cpp's cleared cache (unused cells are never read unmasked)."""
        for a in self.k:
            a[: self.used].fill(0)
        for a in self.v:
            (a[:, : self.used] if self.attn.v_trans else a[: self.used]).fill(0)
        self.used = 0

    @property
    def nbytes(self) -> int:
        """Bytes of K and V storage for the whole context (what llama.cpp allocates for n_ctx cells)."""
        return sum(a.nbytes for a in (*self.k, *([] if self.attn.mla else self.v)))

    # ggml views ------------------------------------------------------------------------------
    def tensor(self, ctx: Context, il: int, which: str) -> TensorPtr:
        """The layer's whole K or V buffer as a ggml tensor [n_embd_kv or n_embd_v, n_ctx] (llama.cpp's layers[il].k/v)."""
        arr = self.k[il] if which == "k" else self.v[il]
        t = self.attn.type_k if which == "k" else self.attn.type_v
        return ctx.external(arr.ctypes.data, int(t), self.n_embd_kv if which == "k" else self.n_embd_v, self.n_ctx, owner=arr)

    # token rows ------------------------------------------------------------------------------
    def read_rows(self, il: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of rows [lo, hi) of layer il's K and V in the storage type, one row per token."""
        v = self.v[il][:, lo:hi].T if self.attn.v_trans else self.v[il][lo:hi]
        return self.k[il][lo:hi].copy(), np.ascontiguousarray(v)

    def write_rows(self, il: int, lo: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store token rows (as read_rows returns them) at positions lo.. of layer il."""
        n = k.shape[0]
        self.k[il][lo:lo + n] = k
        if self.attn.v_trans:
            self.v[il][:, lo:lo + n] = v.T
        else:
            self.v[il][lo:lo + n] = v

    def copy_rows(self, src: "KVCache", lo: int, hi: int) -> None:
        """Rows [lo, hi) of every layer from another cache: bytes when both store the same types,
        otherwise through float32 (rounded to this cache's types, as storing fresh K/V would)."""
        if hi <= lo:
            return
        same = (src.attn.type_k, src.attn.type_v) == (self.attn.type_k, self.attn.type_v)
        for il in range(len(self.k)):
            if same:
                self.write_rows(il, lo, *src.read_rows(il, lo, hi))
            else:
                self.write_f32(il, lo, *src.read_f32(il, lo, hi))
        self.mark_used(hi)

    def read_f32(self, il: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [lo, hi) of K and V as float32 [n, n_embd_kv] and [n, n_embd_v] (dequantized where stored quantized)."""
        k, v = self.read_rows(il, lo, hi)
        return self._to_f32(k, self.attn.type_k, self.n_embd_kv), self._to_f32(v, self.attn.type_v, self.n_embd_v)

    @property
    def row_width(self) -> int:
        """The width of K and V rows stacked as one array (the shadow link's kv_rows): the wider of the
        two, the narrower V (deepseek2's legacy layout) padded with zeros."""
        return max(self.n_embd_kv, self.n_embd_v)

    def read_f32_stacked(self, il: int, lo: int, hi: int) -> np.ndarray:
        """read_f32's K and V as one float32 array [2, n, row_width]."""
        k, v = self.read_f32(il, lo, hi)
        out = np.zeros((2, hi - lo, self.row_width), np.float32)
        out[0, :, : k.shape[1]], out[1, :, : v.shape[1]] = k, v
        return out

    def write_f32_stacked(self, il: int, lo: int, rows: np.ndarray) -> None:
        """Store rows as read_f32_stacked gives them."""
        self.write_f32(il, lo, rows[0, :, : self.n_embd_kv], rows[1, :, : self.n_embd_v])

    def write_f32(self, il: int, lo: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store float32 rows, converted to the cache types."""
        self.write_rows(il, lo, self._from_f32(k, self.attn.type_k), self._from_f32(v, self.attn.type_v))

    def _to_f32(self, rows: np.ndarray, t: GGMLType, width: int) -> np.ndarray:
        if t in _NP_TYPES:
            return rows.astype(np.float32)
        return dequantize(rows, GGMLQuantizationType(int(t))).reshape(rows.shape[0], width).astype(np.float32)

    def _from_f32(self, rows: np.ndarray, t: GGMLType) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32)
        if t in _NP_TYPES:
            return rows.astype(_NP_TYPES[t])
        return quantize(rows, GGMLQuantizationType(int(t)))


__all__ = ["Attention", "AttentionOptions", "CACHE_TYPES", "FLASH_ATTN_MODES", "KVCache", "hadamard"]

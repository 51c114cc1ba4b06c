"""Plumbing shared by every user of llama-cpp-python's low-level ctypes API.

Every llama.cpp model load of the project (engine, tools, tests, benchmarks) goes through
`model_params` and `load_model` here, so that one place decides llama.cpp's extra buffer types
(weight repacking, AMX): on only where a probe showed this machine can run them
(`edgemoe.util.extra_bufts`). `tests/test_llamacpp_loads.py` fails on a load anywhere else.

The backend is initialised once and its logging silenced (set EDGEMOE_LLAMA_LOG=1 to keep it).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import llama_cpp

from edgemoe.errors import UserError
from edgemoe.util.extra_bufts import extra_bufts_usable


@llama_cpp.llama_log_callback
def _log_quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Drop every llama.cpp / ggml log line."""


@llama_cpp.llama_log_callback
def _log_stderr(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Forward every llama.cpp / ggml log line to stderr unchanged."""
    sys.stderr.write(text.decode("utf-8", errors="replace"))
    sys.stderr.flush()


_initialised = False


def init_llama() -> None:
    """Initialise the llama.cpp backend and install the log callback (idempotent)."""
    global _initialised
    if _initialised:
        return
    restore_log()
    llama_cpp.llama_backend_init()
    _initialised = True


def restore_log() -> None:
    """Install edgemoe's llama.cpp log callback (quiet unless EDGEMOE_LLAMA_LOG=1); also what code that
    swapped in a callback of its own for a while puts back."""
    # The callbacks are module globals: llama.cpp keeps the raw pointer, so they must never be
    # garbage-collected. llama_log_set also sets ggml's logger.
    verbose = os.environ.get("EDGEMOE_LLAMA_LOG", "") not in ("", "0")
    llama_cpp.llama_log_set(_log_stderr if verbose else _log_quiet, ctypes.c_void_p(0))


def model_params(*, extra_bufts: bool | None = None, vocab_only: bool = False) -> llama_cpp.llama_model_params:
    """llama.cpp model parameters for a CPU load, memory-mapped.

    extra_bufts: None for llama.cpp's default (repacked weights) where this machine can run it,
    True to ask for it (granted only where it can run), False for plain CPU buffers, which run the
    same ggml kernels edgemoe calls itself. A vocab-only load has no weights and never probes.
    """
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    # This version replaced `use_mmap`/`use_mlock` with `load_mode`.
    mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
    mp.vocab_only = vocab_only
    mp.use_extra_bufts = bool(not vocab_only and extra_bufts is not False and extra_bufts_usable())
    return mp


def load_model(path: str | os.PathLike[str], params: llama_cpp.llama_model_params) -> int:
    """llama_model_load_from_file, raising UserError for a missing or unreadable file."""
    init_llama()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"model file not found: {p}")
    model = llama_cpp.llama_model_load_from_file(str(p).encode(), params)
    if not model:
        raise UserError(
            f"llama.cpp could not load {p} (not a GGUF, or an architecture/tensor it does not "
            "know; set EDGEMOE_LLAMA_LOG=1 to see why)"
        )
    return model


def meta_str(model: int, key: str) -> str | None:
    """A GGUF metadata value rendered as a string by llama.cpp, or None if the key is absent."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1


def tokenize(vocab: int, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """llama_tokenize over a vocab, growing the output buffer as llama.cpp asks."""
    data = text.encode("utf-8")
    n_max = len(data) + 8
    while True:
        out = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), out, n_max, add_special, parse_special)
        if n >= 0:
            return list(out[:n])
        if n == -(2**31):
            raise ValueError("tokenization result does not fit in int32")
        n_max = -n  # negative: the number of tokens it needs


def token_to_piece(vocab: int, token: int, special: bool = False) -> bytes:
    """The raw bytes of one token (may be an incomplete UTF-8 sequence)."""
    size = 32
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n


__all__ = ["init_llama", "load_model", "meta_str", "model_params", "token_to_piece", "tokenize"]

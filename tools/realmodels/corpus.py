"""Calibration and evaluation text: docstrings of Python standard-library modules.

English written by people and present, offline, on every machine that runs this project (no
download, no extra package). Two disjoint, fixed, sorted module lists:

- CALIB_MODULES: the text the routers and experts are fitted on;
- EVAL_MODULES: held-out text for perplexity and routing statistics (never seen by a fit).

A module's text is its own docstring, then, in sorted name order, the docstrings of the public
classes and functions it defines and of their public methods and properties (``obj.__doc__``
itself, not inherited text; each distinct docstring once), separated by blank lines.

The text depends on the Python version (docstrings change between releases): the build records
``sys.version`` and a hash of the text in models.json, and the fingerprint includes both.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from functools import lru_cache

# fitted on (28 modules, about 270k characters)
CALIB_MODULES: tuple[str, ...] = (
    "argparse", "collections", "contextlib", "dataclasses", "datetime", "decimal", "difflib",
    "functools", "heapq", "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle",
    "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "typing", "zipfile",
)  # fmt: skip

# held out: chunk i of the evaluation is the first CHUNK tokens of EVAL_MODULES[i]
EVAL_MODULES: tuple[str, ...] = (
    "configparser", "csv", "doctest", "ipaddress", "optparse", "pdb", "smtplib", "urllib.parse",
)  # fmt: skip

assert not set(CALIB_MODULES) & set(EVAL_MODULES)
assert list(CALIB_MODULES) == sorted(CALIB_MODULES) and list(EVAL_MODULES) == sorted(EVAL_MODULES)

CHUNK = 512  # tokens per chunk: one llama_decode, positions 0..511


@lru_cache(maxsize=None)
def module_text(modname: str) -> str:
    """The docstrings of one standard-library module (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module(modname)
        own = {modname, "_" + modname.rsplit(".", 1)[-1]}  # C accelerators: _json, _pickle, ...
        docs: list[str] = []
        seen: set[str] = set()

        def add(obj: object) -> None:
            d = getattr(obj, "__doc__", None)
            if isinstance(d, str) and d.strip():
                d = inspect.cleandoc(d)
                if d not in seen:
                    seen.add(d)
                    docs.append(d)

        add(mod)
        members = vars(mod)
        for name in sorted(members):
            obj = members[name]
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if getattr(obj, "__module__", None) not in own:
                continue
            add(obj)
            if inspect.isclass(obj):
                attrs = vars(obj)
                for an in sorted(attrs):
                    a = attrs[an]
                    a = getattr(a, "__func__", a)  # classmethod / staticmethod
                    if not an.startswith("_") and (inspect.isroutine(a) or isinstance(a, property)):
                        add(a)
    return "\n\n".join(docs) + "\n"


def _chunks(tokens: list[int], size: int) -> list[list[int]]:
    return [tokens[i : i + size] for i in range(0, len(tokens) - size + 1, size)]


def calibration_chunks(tokenize, n_chunks: int, size: int = CHUNK) -> list[list[int]]:
    """n_chunks chunks of `size` tokens from CALIB_MODULES, taken round robin over the modules
    (chunk 0 of every module, then chunk 1, ...) so that even a few chunks cover many modules.

    tokenize: text -> token ids (no BOS: SmolLM2 adds none).
    """
    per_module = [_chunks(tokenize(module_text(m)), size) for m in CALIB_MODULES]
    out: list[list[int]] = []
    depth = 0
    while len(out) < n_chunks:
        row = [c[depth] for c in per_module if depth < len(c)]
        if not row:
            raise ValueError(f"the calibration text has only {len(out)} chunks of {size} tokens")
        out.extend(row)
        depth += 1
    return out[:n_chunks]


def eval_chunks(tokenize, n_chunks: int = len(EVAL_MODULES), size: int = CHUNK) -> list[list[int]]:
    """Chunk i: the first `size` tokens of EVAL_MODULES[i]."""
    out = []
    for m in EVAL_MODULES[:n_chunks]:
        toks = tokenize(module_text(m))
        if len(toks) < size:
            raise ValueError(f"{m}: only {len(toks)} tokens of docstrings, {size} needed")
        out.append(toks[:size])
    return out


def corpus_hash() -> str:
    """sha256 of every module's text, calibration then evaluation."""
    h = hashlib.sha256()
    for m in CALIB_MODULES + EVAL_MODULES:
        h.update(m.encode() + b"\0" + module_text(m).encode() + b"\0")
    return h.hexdigest()


__all__ = [
    "CALIB_MODULES",
    "CHUNK",
    "EVAL_MODULES",
    "calibration_chunks",
    "corpus_hash",
    "eval_chunks",
    "module_text",
]

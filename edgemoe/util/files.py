"""Files: writing so that an interrupted writer never leaves a half-written one behind, letting go
of a file's cached pages, and asking the kernel how much of a file is still cached."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path
from typing import Iterator

from edgemoe.errors import UserError


@contextlib.contextmanager
def atomic_path(out_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to out_path; it replaces out_path only if the block succeeds."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def drop_page_cache(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to forget a file's cached pages (under systemd's MemoryMax they count);
    silently nothing where the file is gone or the file system ignores the advice."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


_libc = None


def _mincore():
    """libc's mincore(2), or None where there is none (not Linux, no libc to load)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        except (OSError, AttributeError):
            _libc = False
    return _libc.mincore if _libc else None


def cached_share(paths: list[str | os.PathLike[str]]) -> float | None:
    """Share of these files' pages in the page cache (bytes-weighted), as mincore(2) reports it on a
    fresh private mapping (which faults nothing in); None where the kernel cannot tell. Tells whether
    drop_page_cache took: some file systems ignore the advice (gVisor's did on a lent machine). Linux
    reports the page cache only for files the caller owns or may write (else only pages it has mapped in:
    none here, so 0)."""
    mincore = _mincore()
    if mincore is None:
        return None
    page = mmap.PAGESIZE
    cached = total = 0
    for path in paths:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                continue
            # a private mapping: writable to ctypes (for its address) yet nothing is written or faulted in
            with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
                n_pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n_pages)()
                anchor = ctypes.c_char.from_buffer(m)
                rc = mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
                del anchor  # the mapping cannot close while a ctypes object points into it
                if rc != 0:
                    return None
                cached += sum(v & 1 for v in bytes(vec)) * page  # the low bit: the page is resident
                total += n_pages * page
    return cached / total if total else None


def read_user_text(path: str | os.PathLike[str], what: str) -> str:
    """A UTF-8 text file a user named; UserError saying which `what` (e.g. "prompts file") is wrong."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: no such {what}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: the {what} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read the {what} ({e.strerror or e})") from None

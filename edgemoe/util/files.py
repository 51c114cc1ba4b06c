"""Files: writing so that an interrupted writer never leaves a half-written one behind, and
letting go of a file's cached pages."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


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

"""Files: writing so that an interrupted writer never leaves a half-written one behind, and
letting go of a file's cached pages."""

from __future__ import annotations

import contextlib
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

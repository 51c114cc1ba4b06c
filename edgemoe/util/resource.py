"""A base for objects that own native resources: `with` support and a safety-net finaliser."""

from __future__ import annotations

from typing import Any


class Owned:
    """Subclasses implement an idempotent close(); `with` and garbage collection call it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the native library may already be gone
            pass

"""Stop strings over streamed text: hold back what could be the start of one, cut at the first match.

OpenAI's semantics: the answer ends before the stop string, which is not part of it.
"""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back the text that is safe to emit, and whether a stop string matched."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Text that can be emitted now (possibly ""); after a match, self.stopped is True and
        everything from the stop string on is dropped."""
        if self.stopped:
            return ""
        buf = self._held + piece
        if not self.stops:
            return buf
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buf[:cut]
        # the longest tail of buf that is a proper prefix of some stop string may still become one
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """End of generation: whatever was held back (it never became a stop string)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

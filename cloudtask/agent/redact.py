"""The values of a run's secrets, cut out of what the run writes: ``***`` in their place.

A run's output arrives in chunks, and a value may straddle two of them, so :class:`Redactor`
holds back the last ``longest value - 1`` bytes of what it was fed until the next chunk (or
:meth:`Redactor.flush` at the end) shows whether they begin a value. Everything the agent
keeps of a run's output goes through one: the daily log file, the output tail stored in
MongoDB (and mailed), and the run's error text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = b"***"
MIN_REDACTED = 3  # shorter values would mask ordinary text everywhere; they are not secret


class Redactor:
    """Replaces every occurrence of ``values`` in a byte stream with ``***``."""

    def __init__(self, values: Iterable[str]) -> None:
        encoded = sorted(
            {v.encode("utf-8") for v in values if len(v) >= MIN_REDACTED}, key=len, reverse=True
        )
        self._pattern = re.compile(b"|".join(re.escape(v) for v in encoded)) if encoded else None
        self._hold = max((len(v) for v in encoded), default=1) - 1
        self._pending = b""

    @property
    def active(self) -> bool:
        return self._pattern is not None

    def feed(self, chunk: bytes) -> bytes:
        """What of ``chunk`` (after what was held back) can be written now, redacted."""
        if self._pattern is None:
            return chunk
        data = self._pending + chunk
        # a value beginning before ``safe`` ends within ``data``: it is matched whole (the
        # longest first); one beginning later may go on in the next chunk, so it waits
        safe = len(data) - self._hold
        out = []
        pos = 0
        for match in self._pattern.finditer(data):
            if match.start() >= safe:
                break
            out.append(data[pos : match.start()])
            out.append(MASK)
            pos = match.end()
        cut = max(pos, safe)
        out.append(data[pos:cut])
        self._pending = data[cut:]
        return b"".join(out)

    def flush(self) -> bytes:
        """What was held back, at the end of the stream."""
        rest, self._pending = self._pending, b""
        return self.text(rest)

    def text(self, data: bytes) -> bytes:
        """``data`` redacted as a whole (a tail, an error message)."""
        if self._pattern is None:
            return data
        return self._pattern.sub(MASK, data)

    def string(self, text: str) -> str:
        return self.text(text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")

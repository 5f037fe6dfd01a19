"""Durations as people write them: ``"30s"``, ``"10m"``, ``"1h30m"``, ``"2d"``, ``"250ms"``.

A bare number means seconds.
"""

from __future__ import annotations

import functools
import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")


def parse_duration(value: object) -> float:
    """Return the duration in seconds, or raise ValueError with a message fit for a user."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s', '10m' or '1h', got {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, int) and value > 10**15:  # float() of a huge int overflows
            raise ValueError("the duration is far too long (a number of seconds over 10^15)")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a duration must be a non-negative number of seconds, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as '30s', '10m' or '1h', got {value!r}")
    return _parse_text(value)


@functools.lru_cache(maxsize=1024)
def _parse_text(value: str) -> float:
    """A written duration in seconds, remembered (every task spells a few; a ValueError is
    not remembered)."""
    text = value.strip().lower().replace(" ", "")
    if not text or not _WHOLE.fullmatch(text):
        raise ValueError(
            f"{value!r} is not a duration: write a number with a unit, "
            "ms, s, m, h, d or w, such as '30s', '10m', '1h30m'"
        )
    total = sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
    if not math.isfinite(total) or total > 1e15:
        raise ValueError(f"{value[:40]!r} is far too long a duration")
    return total


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration: 90 -> '1m30s', 0.25 -> '250ms'."""
    if seconds < 1 and seconds != 0:
        return f"{round(seconds * 1000)}ms"
    rest = round(seconds, 3)
    parts = []
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if rest >= size:
            n = int(rest // size)
            parts.append(f"{n}{unit}")
            rest = round(rest - n * size, 3)
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)

"""Time as CloudTask stores and shows it: timezone-aware UTC, truncated to BSON's milliseconds.

Every stored time is a UTC ``datetime`` with milliseconds (BSON keeps no more: a time kept in
memory at microseconds would not compare equal to the stored one) and, where it is ranged or
sorted, the same instant as epoch seconds (a number compares alike on every server; the
embedded wire server compares dates by its own rules). These are the only helpers for that.

>>> from datetime import datetime, timezone
>>> t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
>>> bson_time(t).isoformat()
'2026-01-02T03:04:05.678000+00:00'
>>> from_epoch(epoch(t)) == t
True
"""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    """Now, in UTC (aware)."""
    return datetime.now(timezone.utc)


def as_utc(t: datetime) -> datetime:
    """``t`` in UTC; a naive ``t`` is taken to be UTC already."""
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def bson_time(t: datetime | None = None) -> datetime:
    """``t`` (default now) in UTC truncated to the millisecond, as it reads back once stored."""
    t = as_utc(t) if t is not None else utcnow()
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def to_bson_time(t: datetime) -> datetime:
    """``t`` truncated to the millisecond BSON keeps (its time zone kept)."""
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def epoch(t: datetime) -> float:
    """``t`` as epoch seconds."""
    return as_utc(t).timestamp()


def from_epoch(seconds: float) -> datetime:
    """Epoch seconds as an aware UTC ``datetime``."""
    return datetime.fromtimestamp(seconds, timezone.utc)


def stored_time(value: object) -> datetime | None:
    """A stored time as an aware ``datetime``: a datetime (naive ones are UTC), ISO text (the
    embedded wire server answers a date nested in a document as text) or epoch seconds; None
    when there is none or it cannot be read.

    >>> stored_time("2026-01-02T03:04:05Z").isoformat()
    '2026-01-02T03:04:05+00:00'
    >>> stored_time(0).year, stored_time("no"), stored_time(None)
    (1970, None, None)
    """
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        moment = from_epoch(value)
    elif isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment

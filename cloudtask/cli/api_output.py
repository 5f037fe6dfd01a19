"""What the API commands print for people: aligned tables, times in the local time zone with
its name, durations, schedules in a few words, and long values trimmed to fit the terminal.
(Scripts use ``--json``, which prints the API's JSON as it came.)"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import click

from ..durations import format_duration

CELL_LIMIT = 60  # characters of one cell at most
MIN_FLEX = 12  # the flexible column is not squeezed below this
ELLIPSIS = "…"


def trim(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters (the end replaced by …)."""
    one = " ".join(str(text).split())
    if len(one) <= width:
        return one
    return one[: max(0, width - 1)] + ELLIPSIS


def local_time(value: Any, seconds: bool = True) -> str:
    """An ISO 8601 time (or epoch seconds) from the API in the local time zone, with the
    zone's name: ``2026-12-05 00:38:01 CET``; ``-`` for nothing."""
    if value in (None, ""):
        return "-"
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            moment = datetime.fromtimestamp(value, timezone.utc)
        else:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return str(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # the API's times are UTC
    here = moment.astimezone()
    zone = here.tzname() or here.strftime("%z")
    return here.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") + f" {zone}"


def duration(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        return "-"
    if value >= 60:
        value = round(value)
    elif value >= 1:
        value = round(value, 1)
    return format_duration(value)


def schedule_text(schedule: Any) -> str:
    """A task's schedule in a few words: ``cron 0 3 * * * Europe/Berlin``, ``every 5m``,
    ``at 2026-12-24T18:00:00Z``, ``keepalive``, ``after a, b``."""
    if isinstance(schedule, list):
        return " + ".join(schedule_text(s) for s in schedule) or "-"
    if not isinstance(schedule, dict):
        return "-" if schedule is None else str(schedule)
    zone = schedule.get("timezone")
    suffix = f" {zone}" if zone and zone != "UTC" else ""
    if "cron" in schedule:
        return f"cron {schedule['cron']}{suffix}"
    if "every" in schedule:
        return f"every {schedule['every']}"
    if "at" in schedule:
        return f"at {schedule['at']}"
    if schedule.get("keepalive"):
        return "keepalive"
    if "after" in schedule:
        parents = schedule["after"]
        names = [p if isinstance(p, str) else json.dumps(p) for p in parents or []]
        return "after " + ", ".join(names)
    return json.dumps(schedule, sort_keys=True)


def yes_no(value: Any) -> str:
    return "yes" if value else "no"


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return yes_no(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _width() -> int | None:
    """The terminal's width when standard output is one; None (no squeezing) otherwise."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((120, 24)).columns


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    flex: int | None = None,
    width: int | None = None,
) -> str:
    """The rows under the headers, columns aligned and two spaces apart. Each cell is trimmed
    to ``CELL_LIMIT`` characters; on a terminal narrower than the table, column ``flex`` (by
    index; the last one by default) is trimmed further."""
    cells = [[trim(cell(v), CELL_LIMIT) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    width = width if width is not None else _width()
    flex = len(headers) - 1 if flex is None else flex
    if width is not None:
        total = sum(widths) + 2 * (len(widths) - 1)
        if total > width:
            widths[flex] = max(MIN_FLEX, len(headers[flex]), widths[flex] - (total - width))
    lines = []
    for row in [list(headers), *cells]:
        parts = [trim(text, widths[i]).ljust(widths[i]) for i, text in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def facts(pairs: Sequence[tuple[str, Any]]) -> str:
    """``name: value`` lines, the values aligned; None values are left out."""
    shown = [(k, cell(v)) for k, v in pairs if v is not None]
    pad = max((len(k) for k, _ in shown), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(pad)} {v}" for k, v in shown)


def echo_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    what: str,
    flex: int | None = None,
    page: dict[str, Any] | None = None,
) -> None:
    """Print a table of ``what`` (``tasks``), or say there are none (on standard error, so
    standard output holds only rows); with the API's ``page`` facts, say when there are
    more than shown."""
    if not rows:
        click.echo(f"no {what}", err=True)
        return
    click.echo(table(headers, rows, flex=flex))
    if page and page.get("total", 0) > page.get("page", 1) * page.get("per_page", len(rows)):
        total = page["total"]
        more = f"{total}+" if page.get("capped") else str(total)
        first = (page["page"] - 1) * page["per_page"] + 1
        click.echo(
            f"{what} {first}-{first + len(rows) - 1} of {more}; see more with --page "
            f"{page['page'] + 1} or --limit",
            err=True,
        )

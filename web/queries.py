"""The list queries behind the pages and the API, built to stay fast at 10,000 tasks and
100,000s of runs: every filter maps to an index, pages are bounded, and counts are capped.

Filters come from query arguments, checked here; a bad one raises ValidationError naming the
argument, so the page shows it and the API answers 422 with the same detail.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from cloudtask import events
from cloudtask.exceptions import Problem, ValidationError
from cloudtask.runmodel import FINISHED_STATUSES, STATUSES

TASK_STATES = ("enabled", "paused", "done")
LAST_RESULTS = (*FINISHED_STATUSES, "never")
RUN_STATUSES = STATUSES
MAX_PER_PAGE = 500


def int_arg(args: Any, name: str, default: int, low: int, high: int, problems: list) -> int:
    raw = args.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        problems.append(Problem(name, f"expected a whole number, got {raw!r}"))
        return default
    if not low <= value <= high:
        problems.append(Problem(name, f"expected a number from {low} to {high}, got {value}"))
        return default
    return value


def choice_arg(args: Any, name: str, choices: tuple[str, ...], problems: list) -> str | None:
    raw = args.get(name)
    if raw in (None, ""):
        return None
    if raw not in choices:
        problems.append(Problem(name, f"expected one of {', '.join(choices)}, got {raw!r}"))
        return None
    return raw


EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9000, 1, 1, tzinfo=timezone.utc)


def parse_time(raw: Any) -> datetime:
    """A time typed in a filter (ISO 8601; UTC without an offset), from 1970 to 9000 so that
    it converts to UTC and to BSON anywhere. Raises ValueError with a message for the user."""
    text = str(raw).strip()
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected a time such as 2026-11-24T08:00 (UTC), got {raw!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    try:
        in_range = EARLIEST <= value.astimezone(timezone.utc) < LATEST
    except OverflowError:
        in_range = False
    if not in_range:
        raise ValueError(f"expected a time from 1970 to 9000, got {raw!r}")
    return value


def time_arg(args: Any, name: str, problems: list) -> datetime | None:
    raw = args.get(name)
    if raw in (None, ""):
        return None
    try:
        return parse_time(raw)
    except ValueError as e:
        problems.append(Problem(name, str(e)))
        return None


def text_arg(args: Any, name: str, problems: list, limit: int = 200) -> str | None:
    raw = args.get(name)
    if raw in (None, ""):
        return None
    raw = str(raw).strip()
    if len(raw) > limit:
        problems.append(Problem(name, f"at most {limit} characters"))
        return None
    return raw or None


def lenient(check: Any, args: Any) -> tuple[dict[str, Any], list[Problem]]:
    """``check(args)``'s filters and their problems: a page shows each bad filter's message at
    its field and still applies the others (each bad one left out)."""
    try:
        return check(args), []
    except ValidationError as e:
        bad = {p.path for p in e.problems}
        return check({k: v for k, v in args.items() if k not in bad}), list(e.problems)


def task_filters(args: Any) -> dict[str, Any]:
    """Checked task-list filters: q, group, state, owner, last, page, per_page."""
    problems: list[Problem] = []
    filters = {
        "q": text_arg(args, "q", problems),
        "group": text_arg(args, "group", problems),
        "state": choice_arg(args, "state", TASK_STATES, problems),
        "owner": text_arg(args, "owner", problems),
        "last": choice_arg(args, "last", LAST_RESULTS, problems),
        "page": int_arg(args, "page", 1, 1, 1_000_000, problems),
        "per_page": int_arg(args, "per_page", 50, 1, MAX_PER_PAGE, problems),
    }
    if problems:
        raise ValidationError(problems, source="the filters")
    return filters


def run_filters(args: Any) -> dict[str, Any]:
    """Checked run-list filters: task (id), status, agent, since, until, page, per_page."""
    problems: list[Problem] = []
    filters = {
        "task": text_arg(args, "task", problems),
        "status": choice_arg(args, "status", RUN_STATUSES, problems),
        "agent": text_arg(args, "agent", problems),
        "since": time_arg(args, "since", problems),
        "until": time_arg(args, "until", problems),
        "page": int_arg(args, "page", 1, 1, 1_000_000, problems),
        "per_page": int_arg(args, "per_page", 50, 1, MAX_PER_PAGE, problems),
    }
    if problems:
        raise ValidationError(problems, source="the filters")
    return filters


EVENT_KINDS = events.KINDS
EVENT_SEVERITIES = tuple(dict.fromkeys(events.SEVERITIES.values()))  # error, warning, info


def event_filters(args: Any) -> dict[str, Any]:
    """Checked event-list filters: kind (or a prefix such as ``run.``), severity, task (id),
    agent, group, since, until, page, per_page."""
    problems: list[Problem] = []
    kind = text_arg(args, "kind", problems, limit=40)
    if (
        kind
        and kind not in EVENT_KINDS
        and not (kind.endswith(".") and any(k.startswith(kind) for k in EVENT_KINDS))
    ):
        prefixes = sorted({k.split(".")[0] + "." for k in EVENT_KINDS})
        problems.append(
            Problem(
                "kind",
                f"expected one of {', '.join(EVENT_KINDS)} or a prefix "
                f"({', '.join(prefixes)}), got {kind!r}",
            )
        )
        kind = None
    filters = {
        "kind": kind,
        "severity": choice_arg(args, "severity", EVENT_SEVERITIES, problems),
        "task": text_arg(args, "task", problems),
        "agent": text_arg(args, "agent", problems),
        "group": text_arg(args, "group", problems),
        "since": time_arg(args, "since", problems),
        "until": time_arg(args, "until", problems),
        "page": int_arg(args, "page", 1, 1, 1_000_000, problems),
        "per_page": int_arg(args, "per_page", 50, 1, MAX_PER_PAGE, problems),
    }
    if problems:
        raise ValidationError(problems, source="the filters")
    return filters

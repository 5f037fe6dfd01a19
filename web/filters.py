"""Jinja filters and globals shared by every template."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from flask import Flask, request, url_for

from cloudtask.clock import from_epoch
from cloudtask.durations import format_duration

STATUS_CLASS = {
    "succeeded": "ok",
    "running": "run",
    "queued": "run",
    "claimed": "run",
    "failed": "bad",
    "timed_out": "bad",
    "lost": "bad",
    "killed": "warn",
    "missed": "warn",
    "skipped": "muted",
}


def when(value: Any) -> str:
    """A stored time as ``2026-11-24 03:50:12`` (UTC); epoch seconds and ISO text too."""
    if value is None or value == "":
        return "–"
    if isinstance(value, (int, float)):
        value = from_epoch(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: Any) -> str:
    """A duration in seconds as ``4 ms``, ``3.10 s``, ``4m12s`` or ``2h``."""
    if value is None:
        return "–"
    value = float(value)
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
    return format_duration(round(value))


def datetime_local(value: datetime | None) -> str:
    """A filter time as a datetime-local input shows it (UTC, to the minute or second)."""
    if value is None:
        return ""
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S" if value.second else "%Y-%m-%dT%H:%M")


def status_class(status: Any) -> str:
    return STATUS_CLASS.get(str(status), "muted")


def page_url(**changes: Any) -> str:
    """The current page's URL with some query arguments changed (None removes one)."""
    args = request.args.to_dict()
    for key, value in changes.items():
        if value is None:
            args.pop(key, None)
        else:
            args[key] = value
    return url_for(request.endpoint, **(request.view_args or {}), **args)


def register_filters(app: Flask) -> None:
    app.jinja_env.filters["when"] = when
    app.jinja_env.filters["seconds"] = seconds
    app.jinja_env.filters["status_class"] = status_class
    app.jinja_env.globals["page_url"] = page_url

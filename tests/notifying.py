"""What the notifier's tests share: an SMTP server and a webhook receiver on free ports
(fixtures ``smtp`` and ``receiver`` of conftest.py), a config pointing at them, and stored tasks, runs and
events. ``from notifying import ...``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import helpers

from cloudtask import events
from cloudtask.config import Config, load_config
from cloudtask.store import Store

T0 = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
BASE = "https://ct.example.com"
SECRET = "s3cret-shared"


# --- configuration, tasks and events -----------------------------------------------------------


def config(port: int | None, **alerts: Any) -> Config:
    cfg = load_config(None, environ={}).with_section("web", base_url=BASE)
    values: dict[str, Any] = dict(
        smtp_host="127.0.0.1" if port else "",
        smtp_port=port or 587,
        smtp_security="none",
        smtp_timeout=5.0,
        mail_from="CloudTask <alerts@example.com>",
        operators=("ops@example.com",),
        alert_interval=900.0,
    )
    values.update(alerts)
    return cfg.with_section("alerts", **values)


def make_task(store: Store, name: str = "nightly-cleanup", **spec: Any) -> dict[str, Any]:
    spec = {"group": "batch", "schedule": {"cron": "0 3 * * *"}, "command": "./cleanup.sh", **spec}
    return helpers.make_task(store, name, **spec)


def finished_run(
    store: Store,
    task: dict[str, Any],
    at: datetime,
    *,
    status: str = "failed",
    exit_code: int | None = 2,
    output: str = "",
    attempt: int = 0,
) -> dict[str, Any]:
    """A run of ``task`` scheduled at ``at`` that finished with ``status`` (stored)."""
    run = helpers.run_document(task, at, agent="a1", attempt=attempt)
    run.update(
        status=status,
        started_at=at,
        finished_at=at + timedelta(seconds=2),
        duration=2.0,
        exit_code=exit_code if status == "failed" else (0 if status == "succeeded" else None),
        output_tail=output,
        error=None if status != "timed_out" else "killed after the timeout of 2s",
    )
    store.runs.insert_one(run)
    return run


def run_event(
    store: Store,
    task: dict[str, Any],
    at: datetime,
    *,
    status: str = "failed",
    exit_code: int | None = 2,
    output: str = "",
    attempt: int = 0,
    record: bool = True,
) -> dict[str, Any]:
    """A finished run of ``task`` scheduled at ``at`` (stored), and its event (recorded)."""
    run = finished_run(
        store, task, at, status=status, exit_code=exit_code, output=output, attempt=attempt
    )
    if status == "succeeded":
        event = events.recovered_event(run, 3, "failed")
    else:
        event = events.run_event(run)
    assert event is not None
    if record:
        assert store.record_event(event)
    return event


def ts(moment: datetime, plus: float = 0) -> float:
    return moment.timestamp() + plus

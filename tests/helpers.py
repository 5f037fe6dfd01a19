"""Helpers shared by the tests: ``from helpers import wait_for``.

``tests/`` has no ``__init__.py``, so pytest (default "prepend" import mode) puts this folder
on ``sys.path`` when it loads ``tests/conftest.py``; test modules import this file by name.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TypeVar

from cloudtask.agent.executor import Executor, RunContext
from cloudtask.store import Store, new_run_document
from cloudtask.task import parse_task

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value.

    Returns that value. Raises AssertionError (with ``message``) after ``timeout`` seconds;
    the predicate is always called once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f": {message}" if message else ""
            raise AssertionError(
                f"condition not met within {timeout:g} s{detail} (last value: {value!r})"
            )
        time.sleep(interval)


def start(store: Store, executor: Executor, task: dict, attempt: int = 0) -> RunContext:
    """Claim a run of a task (given as spec fields) and hand it to ``executor``."""
    spec = parse_task({"name": "t", "schedule": {"every": "1h"}, **task})
    task_id = f"task-{secrets.token_hex(4)}"  # runs started in the same millisecond stay apart
    now = datetime.now(timezone.utc)
    doc = new_run_document(
        task_id=task_id,
        task_name=spec.name,
        group=spec.group,
        revision=1,
        scheduled_for=now,
        slot="one",
        attempt=attempt,
        trigger="manual",
        agent="a1",
        status="queued",
        now=now,
    )
    assert store.claim_runs([doc]) == [True]
    ctx = RunContext(
        run_id=doc["_id"],
        task_id=task_id,
        revision=1,
        spec=spec,
        scheduled_for=doc["scheduled_for"],
        attempt=attempt,
        trigger="manual",
        token=secrets.token_hex(8),
        agent="a1",
    )
    executor.submit(ctx, doc)
    return ctx


def finished(store: Store, run_id: str, timeout: float = 20.0) -> dict:
    """The run's document once it is no longer queued or running."""
    return wait_for(
        lambda: (d := store.get_run(run_id)) and d["status"] not in ("queued", "running") and d,
        timeout=timeout,
        message=f"run {run_id} did not finish",
    )

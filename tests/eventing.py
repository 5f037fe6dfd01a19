"""What the event tests share: the event contract's fields, and runs claimed, finished and
recorded on a store. ``from eventing import ...``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from helpers import run_document

from cloudtask.clock import to_bson_time
from cloudtask.zkpaths import ZkPaths

PATHS = ZkPaths("/cloudtask")
NOW = to_bson_time(datetime.now(timezone.utc) - timedelta(minutes=5))
CONTRACT_FIELDS = {
    "_id",
    "version",
    "kind",
    "severity",
    "at",
    "ts",
    "message",
    "task_id",
    "task_name",
    "group",
    "run_id",
    "agent",
    "details",
    "delivery",
}
RUN_DETAILS = {
    "status",
    "trigger",
    "attempt",
    "scheduled_for",
    "started_at",
    "finished_at",
    "duration",
    "exit_code",
    "http_status",
    "error",
    "output_tail_lines",
}


def events(store, **query) -> list[dict]:
    """Events, oldest first (ids made in one process sort in order within a millisecond)."""
    return list(store.events.find(query).sort([("ts", 1), ("_id", 1)]))


def claimed(store, task, when=NOW, status="running", agent="a1") -> dict:
    doc = run_document(task, when, status=status, agent=agent)
    assert store.claim_runs([doc]) == [True]
    return doc


def finish(doc, status, *, exit_code=None, seconds=3.0, **more) -> dict:
    started = doc["claimed_at"]
    return {
        **doc,
        "status": status,
        "started_at": started,
        "finished_at": to_bson_time(started + timedelta(seconds=seconds)),
        "duration": seconds,
        "exit_code": exit_code,
        **more,
    }


def run_once(store, task, status, when, **more) -> dict:
    """A run of ``task`` scheduled at ``when`` that finishes with ``status``, written as the
    agent writes it (claim, then the final state through save_runs)."""
    done = finish(claimed(store, task, when), status, **more)
    store.save_runs([done])
    return done

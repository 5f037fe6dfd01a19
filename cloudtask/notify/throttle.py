"""Throttling of a failing task's mail, per task and recipient (its state stored by
:mod:`cloudtask.store.alerts`, collection ``alert_state``).

Each recipient gets the first failure of a task at once. Failures after it are *held* for
that recipient, and once ``alert_interval`` has passed since the recipient's last mail about
the task, one digest lists them. A failure that comes when the interval has passed and nothing
is held is mailed at once again. ``run.recovered`` sends one recovery mail to everyone told of
the failures (listing what was still held for them) and deletes the state. Per recipient,
because recipients differ per kind (a task's ``notify.on``, ``operators_by_kind``): someone who
was never told of a failure gets their first one at once.

Missed fires (``run.missed``) are throttled the same way but on a state of their own
(``_id`` ``<task id>:missed``, ``kind`` "missed"): a fire missed while the cluster was down or
restarting is no failure of the task, so it never starts a failing streak (no
``failing_since_ts``), is never counted in a failure digest, never holds back the mail of a
real failure, and is not what a recovery ends. Its digest says "missed N more fires".

State document (written whole; lists of objects, as addresses have dots)::

    {_id: task id (or "<task id>:missed"), task_id, kind: "failing" | "missed", task_name,
     failing_since_ts (None for missed fires),
     recipients: [{address, last_alert_ts, last_alert_event, held: [event ids], more: n,
                   digests: n}],
     summaries: [what digests list of each held event], digest_due_ts}

Planning an event twice (a crash before it was marked planned) is a no-op: a recipient whose
``last_alert_event`` is the event gets the same delivery id again, one holding it holds it
once. ``digests`` numbers a recipient's digests, so a digest planned twice has the same id.
"""

from __future__ import annotations

from typing import Any

from ..runmodel import SCHEMA_VERSION
from ..store import Store
from .content import DIGEST_ITEMS_SHOWN

NEVER = 1e18  # digest_due_ts when nothing is held (a number: null ranges differ by server)
MAX_HELD_IDS = 10_000  # per recipient; more are counted, not kept
MAX_SUMMARIES = 500

# the run outcomes that make a task "failing" (and are throttled)
FAILURE_KINDS = ("run.failed", "run.timed_out", "run.lost")
# fires nobody ran: throttled too, but on a state of their own (no failure of the task)
MISSED_KIND = "run.missed"
THROTTLED_KINDS = (*FAILURE_KINDS, MISSED_KIND)


def state_id(event: dict[str, Any]) -> str:
    """The alert state an event is throttled on: its task's, or its task's missed fires'."""
    if event.get("kind") == MISSED_KIND:
        return f"{event['task_id']}:missed"
    return str(event["task_id"])


def is_missed(state: dict[str, Any]) -> bool:
    return state.get("kind") == "missed"


def task_of(state: dict[str, Any]) -> str:
    """The task an alert state is about (states written before ``task_id`` was: the id)."""
    return str(state.get("task_id") or state["_id"])


def merge(addresses: list[str], more: list[str] | tuple[str, ...]) -> list[str]:
    """``addresses`` plus those of ``more`` not in it yet (compared without case)."""
    seen = {a.lower() for a in addresses}
    out = list(addresses)
    for address in more:
        if address.lower() not in seen:
            seen.add(address.lower())
            out.append(address)
    return out


def summary(event: dict[str, Any]) -> dict[str, Any]:
    """What a digest lists of one held failure."""
    details = event.get("details") if isinstance(event.get("details"), dict) else {}
    return {
        "event_id": event["_id"],
        "kind": event.get("kind"),
        "ts": event.get("ts"),
        "run_id": event.get("run_id"),
        "agent": event.get("agent"),
        "exit_code": details.get("exit_code"),
        "http_status": details.get("http_status"),
        "scheduled_for": details.get("scheduled_for"),
    }


def new_state(event: dict[str, Any]) -> dict[str, Any]:
    missed = event.get("kind") == MISSED_KIND
    return {
        "_id": state_id(event),
        "version": SCHEMA_VERSION,
        "task_id": event["task_id"],
        "kind": "missed" if missed else "failing",
        "task_name": event.get("task_name"),
        "failing_since_ts": None if missed else event.get("ts"),
        "recipients": [],
        "summaries": [],
        "digest_due_ts": NEVER,
    }


def _entry(state: dict[str, Any], address: str) -> dict[str, Any] | None:
    key = address.lower()
    return next((r for r in state["recipients"] if r["address"].lower() == key), None)


def held_count(entry: dict[str, Any]) -> int:
    return len(entry.get("held") or []) + int(entry.get("more") or 0)


def held_summaries(state: dict[str, Any], entry: dict[str, Any]) -> list[dict[str, Any]]:
    by_id = {s["event_id"]: s for s in state.get("summaries") or []}
    ids = entry.get("held") or []
    return [by_id[i] for i in ids if i in by_id][:DIGEST_ITEMS_SHOWN]


def _due(state: dict[str, Any], interval: float) -> float:
    due = [
        r["last_alert_ts"] + interval
        for r in state["recipients"]
        if held_count(r) and r.get("last_alert_ts") is not None
    ]
    return min(due, default=NEVER)


def _prune_summaries(state: dict[str, Any]) -> None:
    wanted = {i for r in state["recipients"] for i in r.get("held") or []}
    state["summaries"] = [s for s in state["summaries"] if s["event_id"] in wanted]


def plan_failure(
    state: dict[str, Any] | None,
    event: dict[str, Any],
    recipients: list[str],
    now: float,
    interval: float,
) -> tuple[dict[str, Any], list[str]]:
    """Decide for each recipient of a failure (or of a missed fire, on its own state): mailed
    now, or held. Returns the new state and the recipients to mail now."""
    state = dict(state) if state else new_state(event)
    state["recipients"] = [dict(r) for r in state["recipients"]]
    state["task_name"] = event.get("task_name") or state.get("task_name")
    now_list: list[str] = []
    held_any = False
    for address in recipients:
        entry = _entry(state, address)
        if entry is not None and entry.get("last_alert_event") == event["_id"]:
            now_list.append(entry["address"])  # planned before: the same delivery again
        elif entry is not None and event["_id"] in (entry.get("held") or []):
            continue
        elif entry is None or (not held_count(entry) and now - entry["last_alert_ts"] >= interval):
            if entry is None:
                entry = {"address": address, "held": [], "more": 0, "digests": 0}
                state["recipients"].append(entry)
            entry.update(last_alert_ts=float(now), last_alert_event=event["_id"])
            now_list.append(entry["address"])
        else:
            held = list(entry.get("held") or [])
            if len(held) < MAX_HELD_IDS:
                entry["held"] = [*held, event["_id"]]
            else:
                entry["more"] = int(entry.get("more") or 0) + 1
            held_any = True
    summaries = state.get("summaries") or []
    fresh = all(s["event_id"] != event["_id"] for s in summaries)
    if held_any and fresh and len(summaries) < MAX_SUMMARIES:
        state["summaries"] = [*summaries, summary(event)]
    state["digest_due_ts"] = _due(state, interval)
    return state, now_list


def plan_digests(
    state: dict[str, Any], now: float, interval: float
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], str]]]:
    """The digests due: (recipient entry as it was, digest id) each, and the new state."""
    state = {**state, "recipients": [dict(r) for r in state["recipients"]]}
    due = []
    for entry in state["recipients"]:
        last = entry.get("last_alert_ts")
        if held_count(entry) and last is not None and now - last >= interval:
            number = int(entry.get("digests") or 0) + 1
            due.append((dict(entry), f"digest:{state['_id']}:{number}"))
            entry.update(
                last_alert_ts=float(now), last_alert_event=None, held=[], more=0, digests=number
            )
    _prune_summaries(state)
    state["digest_due_ts"] = _due(state, interval)
    return state, due


class AlertStates:
    """The alert throttle states of the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def ensure_indexes(self) -> None:
        self.store.ensure_alert_indexes()

    def get(self, task_id: str) -> dict[str, Any] | None:
        return self.store.get_alert_state(task_id)

    def save(self, state: dict[str, Any]) -> None:
        self.store.save_alert_state(state)

    def delete(self, task_id: str) -> None:
        self.store.delete_alert_state(task_id)

    def digests_due(self, now: float, limit: int) -> list[dict[str, Any]]:
        return self.store.alert_digests_due(now, limit)

"""A fire on its way to being claimed, and the rule for fires that wait: pure, no I/O.

The agent makes a :class:`Claim` for each fire the scheduler gives it, with the run's token.
Its run document (``doc``) is built when the claim is written; a claim whose write may have
landed keeps its document (the same ``_id``), so that it is recognised as ours when it is
written again (see the agent: claims in doubt are settled by writing them again).

The run document that claims a fire (:func:`build_documents`) is final at once for a fire to
be recorded (``missed``; ``skipped`` when ``forbid`` finds a run of its task going, checked
now); a fire given ahead of its due time is claimed ``claimed`` (armed.py: checked and started
at its time); of the fires to run now, as many as there are free slots are claimed
``running``, the rest ``queued`` (moved to ``running`` by a conditional write just before
their process starts).

Fires that could not be claimed (MongoDB did not answer, or the agent's fence did not hold)
wait for the next step, collapsed per task by :func:`collapse`, the rule of a late tick (for
the fires already due; one given ahead waits as it is): the newest fire runs if it is on
time, is caught up within ``misfire_grace`` (``run_once``), or else is recorded ``missed``;
every older one is recorded ``missed``. Retries and keepalive starts are kept as they are.
No fire is dropped without a record: beyond ``MAX_MISSED_RECORDS`` missed fires of one task,
the oldest kept record also counts the ones not recorded one by one. Claims are written in
each task's time order, so wherever the writes stop, a task's stored fires never skip one of
its earlier fires (a claim made ahead is written after its task's due fires, never before).

A claim written without an answer (MongoDB did not answer in time) is in doubt: it may have
landed, or may still land. It is settled by writing it again as it was: it is then stored under
its own id and ours, or the fire is another agent's. A claim that landed is not started, and
is recorded ``missed`` (:func:`too_late`), when a newer fire of its task waits too, or when it
is now too late by the rule of a late tick.

Each run has a token (:func:`run_tokens`), given to its process or request so that it can
prove which run it is (an HTTP callback); only its hash (:func:`token_hash`) is stored.

Example::

    claims = [Claim(fire, spec, revision, token) for fire, token in zip(fires, run_tokens(n))]
    claims = collapse(claims, now, scheduler.late_verdict, "not claimed in time: ...")
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from ..runmodel import RUNNING_STATUSES, new_run_document
from ..task import TaskSpec
from .scheduler import Fire

TOKEN_BYTES = 24  # per-run token: 192 random bits
MAX_MISSED_RECORDS = 1000  # per task and backlog: older missed fires are summed up in one


def run_tokens(n: int) -> list[str]:
    """``n`` per-run tokens from one read of the system's randomness (each read would let the
    busy run threads take the GIL from the scheduling loop)."""
    raw = secrets.token_bytes(TOKEN_BYTES * n)
    return [
        base64.urlsafe_b64encode(raw[i : i + TOKEN_BYTES]).decode().rstrip("=")
        for i in range(0, len(raw), TOKEN_BYTES)
    ]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Claim:
    """A fire on its way to being claimed. ``doc`` is built when it is written; a claim whose
    write may have landed keeps its document (same ``_id``), so it is recognised as ours."""

    fire: Fire
    spec: TaskSpec
    revision: int
    token: str
    doc: dict | None = None
    reason: str | None = None  # why a fire is recorded rather than run

    def record_only(self, status: str, reason: str) -> None:
        """Record this fire with ``status`` (missed, skipped) rather than run it."""
        self.fire = replace(self.fire, status=status)
        self.reason = self.reason or reason


def given_ahead(trigger: str, scheduled_for: datetime, spec: TaskSpec, now: datetime) -> bool:
    """Whether a fire is a schedule's fire not due yet at ``now``: claimed ahead, and started
    at its time (armed.py)."""
    return trigger == "schedule" and scheduled_for > now and not spec.schedule.keepalive


def build_documents(
    claims: list[Claim],
    now: datetime,
    *,
    free: int,
    busy: Callable[[str], bool],
    slot_of: Callable[[TaskSpec], str],
    agent_id: str,
    session: Callable[[], str | None],
) -> None:
    """Build each claim's run document (see the module docstring): ``free`` slots, ``busy(task
    id)`` whether a run of the task is going (here or on its former owner), ``slot_of(spec)``
    the claim's slot, ``session()`` the session it is made under. A claim that has a document
    already (a keepalive start's lease was taken for its id) keeps its ``_id``."""
    for claim in claims:
        fire, spec = claim.fire, claim.spec
        status, reason = fire.status or "run", claim.reason
        if status == "run" and given_ahead(fire.trigger, fire.scheduled_for, spec, now):
            status = "claimed"  # forbid and slots are looked at when it is due
        elif (
            status == "run"
            and spec.concurrency == "forbid"
            and not spec.schedule.keepalive
            and fire.trigger != "retry"
            and busy(fire.task_id)
        ):
            status, reason = "skipped", "the previous run was still running (concurrency: forbid)"
        if status == "run":
            status = "running" if free > 0 else "queued"
            free -= 1
        run_id = claim.doc["_id"] if claim.doc else None
        claim.doc = new_run_document(
            task_id=fire.task_id,
            task_name=spec.name,
            group=spec.group,
            revision=claim.revision,
            scheduled_for=fire.scheduled_for,
            slot=slot_of(spec),
            attempt=fire.attempt,
            trigger=fire.trigger,
            agent=agent_id,
            status=status,
            now=now,
            token_hash=token_hash(claim.token),
            session=session(),
        )
        if run_id is not None:
            claim.doc["_id"] = run_id
        if reason and status in ("missed", "skipped"):
            claim.doc["error"] = reason


def collapse(
    claims: list[Claim],
    now: datetime,
    late_verdict: Callable[[TaskSpec, datetime, datetime], str],
    why_late: str,
) -> list[Claim]:
    """The rule of a late tick, per task, for fires waiting to be claimed (see the module
    docstring). ``late_verdict(spec, scheduled_for, now)`` is the scheduler's rule for one
    fire (``run``, ``catch-up`` or ``missed``); ``why_late`` is the record's reason.

    The order returned is the order the claims are written in (chunk after chunk, stopping
    at the first that fails): retries and keepalive starts first, then each task's schedule
    fires together, oldest first, the ones given ahead after its due ones. So a task's fires
    are stored in time order: whatever stops the writes (MongoDB, kill -9 of the agent) and
    wherever a chunk ends, a stored fire has every earlier fire of its task stored before it
    (or in the same write). A task's next owner takes its latest recorded fire as the point up
    to which its fires were handled (handover.py); a claim made ahead written before an earlier
    due fire would hide that fire from it, unrecorded (the chaos run's 15:11:48 fire)."""
    by_task: dict[str, list[Claim]] = {}
    out: list[Claim] = []
    for c in claims:
        if c.fire.trigger in ("schedule", "catch-up") and not c.spec.schedule.keepalive:
            by_task.setdefault(c.fire.task_id, []).append(c)
        else:
            out.append(c)
    for group in by_task.values():
        group.sort(key=lambda c: c.fire.scheduled_for)
        due = [c for c in group if c.fire.scheduled_for <= now]  # a fire given ahead is not late
        ahead = group[len(due) :]
        if due:
            out.extend(_late_tick(due, now, late_verdict, why_late))
        out.extend(ahead)
    return out


def _late_tick(
    due: list[Claim],
    now: datetime,
    late_verdict: Callable[[TaskSpec, datetime, datetime], str],
    why_late: str,
) -> list[Claim]:
    """One task's due fires, oldest first, by the rule of a late tick (see :func:`collapse`)."""
    *older, newest = due
    for c in older:
        c.record_only("missed", c.reason or why_late)
    if newest.fire.status is None:
        verdict = late_verdict(newest.spec, newest.fire.scheduled_for, now)
        if verdict == "catch-up":
            newest.fire = replace(newest.fire, trigger="catch-up")
        elif verdict == "missed":
            newest.record_only("missed", why_late)
    if len(older) > MAX_MISSED_RECORDS:
        dropped = older[: len(older) - MAX_MISSED_RECORDS]
        older = older[len(dropped) :]
        first = dropped[0].fire.scheduled_for
        older[0].reason = (
            f"{older[0].reason}; {len(dropped)} earlier fires from {first.isoformat()} "
            f"were missed too (not recorded one by one)"
        )
    return [*older, newest]


def too_late(
    landed: list[Claim],
    waiting: list[Claim],
    now: datetime,
    late_verdict: Callable[[TaskSpec, datetime, datetime], str],
) -> tuple[list[Claim], list[Claim]]:
    """Claims in doubt that landed: ``(too late, to start)``. One to run (not a retry, not a
    keepalive start) is too late when a newer fire of its task is due too (``waiting``, or
    another of the ``landed``), or when ``late_verdict`` calls it ``missed`` now."""
    newest: dict[str, datetime] = {}
    for c in [*waiting, *landed]:
        if (
            c.fire.trigger != "retry"
            and c.fire.status is None  # a fire to run, not one to record
            and c.fire.scheduled_for <= now
            and not c.spec.schedule.keepalive
        ):
            t = newest.get(c.fire.task_id)
            newest[c.fire.task_id] = max(t, c.fire.scheduled_for) if t else c.fire.scheduled_for
    late, start = [], []
    for c in landed:
        if (
            c.doc["status"] in RUNNING_STATUSES
            and not c.spec.schedule.keepalive
            and c.fire.trigger != "retry"
            and (
                newest.get(c.fire.task_id, c.fire.scheduled_for) > c.fire.scheduled_for
                or late_verdict(c.spec, c.fire.scheduled_for, now) == "missed"
            )
        ):
            late.append(c)
        else:
            start.append(c)
    return late, start

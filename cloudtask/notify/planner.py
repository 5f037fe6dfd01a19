"""Planning: which deliveries an event (or a due digest) makes, and who gets them.

Recipients of an event, deduplicated without regard to case:

* the task's ``notify.emails`` when ``notify.on`` names the outcome (``failure`` is
  run.failed, ``timeout`` run.timed_out, ``missed`` run.missed, ``lost`` run.lost,
  ``recovered`` run.recovered, ``success`` run.succeeded: recorded only for the tasks
  whose ``notify.on`` names it, and mailed unthrottled, one mail per success);
* the task's ``notify.emails`` for the alerts of its ``warn_after``, ``deadline`` and
  ``expect_every`` and their ends (setting the field asks for them; ``LATENESS_KINDS``);
* ``alerts.operators`` (what went wrong and its recovery: see ``events.OPERATOR_KINDS``),
  ``alerts.operators_by_kind[kind]`` (any kind),
  ``alerts.operators_by_group[group]`` (the event's agent group);
* for run.recovered also everyone mailed about the failures it ends.

An agent's clean stop (``agent.left`` with reason "stopped") and its return after one are no
alerts: they mail nobody (not even ``operators_by_kind`` or ``operators_by_group``); webhooks
still get them when they ask for the kind, as they get every other info event.

Mail of failures is throttled per task (:mod:`.throttle`), and so is mail of missed fires, on
a state of their own: a fire missed while the cluster was down or restarting is no failure
(no "failing since", not in a failure digest, nothing a recovery ends). Webhooks get every
event they ask for, unthrottled. The order is always: deliveries inserted (pending), then the state, then
the event marked planned, so a crash anywhere plans again without sending anything twice.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import email_problem
from ..events import LATENESS_KINDS, OPERATOR_KINDS, clean_stop
from ..store import Store
from ..task import DEFAULT_NOTIFY_ON
from . import content, throttle
from .deliveries import Deliveries, new_delivery
from .settings import AlertSettings
from .throttle import THROTTLED_KINDS, AlertStates

log = logging.getLogger(__name__)

# a task's notify.on outcome -> the event kind
KIND_OF_OUTCOME = {
    "failure": "run.failed",
    "timeout": "run.timed_out",
    "missed": "run.missed",
    "lost": "run.lost",
    "recovered": "run.recovered",
    "success": "run.succeeded",
}
OUTCOME_OF_KIND = {kind: outcome for outcome, kind in KIND_OF_OUTCOME.items()}


def task_recipients(task: dict[str, Any] | None, kind: str) -> list[str]:
    """The task's own recipients of an event of ``kind``."""
    # the alerts of a task's warn_after, deadline and expect_every (and their ends): the task
    # set the field to hear of them, so its notify.emails get them whatever notify.on says
    if task is None or (kind not in OUTCOME_OF_KIND and kind not in LATENESS_KINDS):
        return []
    notify = (task.get("spec") or {}).get("notify") or {}
    on = notify.get("on", list(DEFAULT_NOTIFY_ON))
    if kind in OUTCOME_OF_KIND and OUTCOME_OF_KIND[kind] not in on:
        return []
    return [e for e in notify.get("emails") or [] if isinstance(e, str)]


def recipients(event: dict[str, Any], task: dict[str, Any] | None, s: AlertSettings) -> list[str]:
    if clean_stop(event):
        return []  # an agent stopped (or is back) on purpose: nobody is mailed
    kind = str(event.get("kind"))
    details = event.get("details") if isinstance(event.get("details"), dict) else {}
    group = event.get("group") or details.get("group")
    candidates = [
        *task_recipients(task, kind),
        *(s.operators if kind in OPERATOR_KINDS else ()),
        *s.by_kind(kind),
        *s.by_group(group),
    ]
    good = []
    for address in candidates:
        if problem := email_problem(address):
            log.warning("not mailing %s about event %s: %s", address, event.get("_id"), problem)
        else:
            good.append(address)
    return throttle.merge([], good)


def mail_id(source_id: str, address: str) -> str:
    return f"{source_id}:mail:{address.lower()}"


class Planner:
    def __init__(self, store: Store, deliveries: Deliveries, states: AlertStates) -> None:
        self.store = store
        self.deliveries = deliveries
        self.states = states
        self._tasks: dict[str, dict[str, Any] | None] = {}

    def forget_tasks(self) -> None:
        """Tasks are read once per pass (their notify and schedule)."""
        self._tasks.clear()

    def task(self, task_id: str | None) -> dict[str, Any] | None:
        if not task_id:
            return None
        if task_id not in self._tasks:
            self._tasks[task_id] = self.store.find_task(task_id)
        return self._tasks[task_id]

    # --- deliveries -------------------------------------------------------------------------

    def _mails(
        self,
        source_id: str,
        kind: str,
        to: list[str],
        subject: str,
        body: str,
        s: AlertSettings,
        now: float,
        task_id: str | None,
    ) -> list[dict[str, Any]]:
        if not s.mail_enabled or not to:
            return []
        return [
            new_delivery(
                mail_id(source_id, address),
                event_id=source_id,
                kind=kind,
                channel="mail",
                target=address,
                now=now,
                task_id=task_id,
                subject=subject,
                body=body,
            )
            for address in to
        ]

    def _webhooks(self, event: dict[str, Any], s: AlertSettings, now: float) -> list[dict]:
        out = []
        for n, hook in enumerate(s.webhooks):
            if not hook.wants(str(event.get("kind"))):
                continue
            delivery_id = f"{event['_id']}:webhook:{n}"
            out.append(
                new_delivery(
                    delivery_id,
                    event_id=event["_id"],
                    kind=str(event.get("kind")),
                    channel="webhook",
                    target=hook.label,  # never the URL when it is a stored secret
                    now=now,
                    task_id=event.get("task_id"),
                    webhook=n,
                    body=content.webhook_body(event, delivery_id, s.base_url),
                )
            )
        return out

    # --- events -----------------------------------------------------------------------------

    def plan_event(self, event: dict[str, Any], s: AlertSettings, now: float) -> dict[str, int]:
        """Record the deliveries of one event (and update its task's alert state). Returns
        counts: deliveries (new), held (recipients whose mail waits for a digest)."""
        kind = str(event.get("kind"))
        task = self.task(event.get("task_id"))
        to = recipients(event, task, s) if s.mail_enabled else []
        docs = self._webhooks(event, s, now)  # webhooks are not throttled
        if kind in THROTTLED_KINDS and event.get("task_id"):
            before = self.states.get(throttle.state_id(event))
            state, mail_now = throttle.plan_failure(before, event, to, now, s.alert_interval)
            docs += self._event_mails(event, task, mail_now, s, now)
            new = self.deliveries.insert(docs)
            self.states.save(state)
            return {"deliveries": new, "held": len(to) - len(mail_now)}
        if kind == "run.recovered" and event.get("task_id"):
            state = self.states.get(event["task_id"])
            docs += self._recovery_mails(event, task, state, to, s, now)
            new = self.deliveries.insert(docs)
            if state:
                self.states.delete(event["task_id"])
            return {"deliveries": new, "held": 0}
        docs += self._event_mails(event, task, to, s, now)
        return {"deliveries": self.deliveries.insert(docs), "held": 0}

    def _recovery_mails(
        self,
        event: dict[str, Any],
        task: dict[str, Any] | None,
        state: dict[str, Any] | None,
        to: list[str],
        s: AlertSettings,
        now: float,
    ) -> list[dict[str, Any]]:
        """One recovery mail to the event's recipients and to everyone told of (or owed) the
        failures, each listing what was still held for them."""
        entries = {r["address"].lower(): r for r in (state or {}).get("recipients") or []}
        to = throttle.merge(to, [r["address"] for r in entries.values()])
        subject = content.event_subject(event)
        since = (state or {}).get("failing_since_ts")
        docs = []
        for address in to:
            entry = entries.get(address.lower())
            count = throttle.held_count(entry) if entry else 0
            held = throttle.held_summaries(state, entry) if state and entry else []
            body = content.recovery_body(event, task, since, count, held, s.base_url)
            docs += self._mails(
                event["_id"], "run.recovered", [address], subject, body, s, now, event["task_id"]
            )
        return docs

    def _event_mails(
        self,
        event: dict[str, Any],
        task: dict[str, Any] | None,
        to: list[str],
        s: AlertSettings,
        now: float,
    ) -> list[dict[str, Any]]:
        subject = content.event_subject(event)
        body = content.event_body(self._with_output(event), task, s.base_url)
        kind = str(event.get("kind"))
        return self._mails(event["_id"], kind, to, subject, body, s, now, event.get("task_id"))

    def _with_output(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event, with the run's output tail when the event carries none (an event recorded
        before its run's output was)."""
        details = event.get("details") if isinstance(event.get("details"), dict) else {}
        if "output_tail_lines" in details or not event.get("run_id"):
            return event
        if str(event.get("kind")) not in ("run.failed", "run.timed_out"):
            return event
        run = self.store.run_fields(event["run_id"], {"output_tail": 1})
        tail = (run or {}).get("output_tail") or ""
        lines = "\n".join(str(tail).rstrip("\n").split("\n")[-content.OUTPUT_LINES :])
        return {**event, "details": {**details, "output_tail_lines": lines}}

    # --- digests ----------------------------------------------------------------------------

    def plan_digests(self, state: dict[str, Any], s: AlertSettings, now: float) -> int:
        """Record the digests due of one task (one per recipient with failures held); returns
        how many deliveries are new."""
        new_state, due = throttle.plan_digests(state, now, s.alert_interval)
        task_id = throttle.task_of(state)
        missed = throttle.is_missed(state)
        docs = []
        for entry, digest_id in due:
            count = throttle.held_count(entry)
            subject = content.digest_subject(state.get("task_name") or task_id, count, missed)
            held = throttle.held_summaries(state, entry)
            body = content.digest_body(
                state, entry["last_alert_ts"], count, held, s.alert_interval, s.base_url
            )
            docs += self._mails(
                digest_id, "digest", [entry["address"]], subject, body, s, now, task_id
            )
        new = self.deliveries.insert(docs)
        self.states.save(new_state)
        return new

"""Plan callbacks: every state change of a plan's items POSTed to its ``callback_url``.

The leading center's notifier calls :meth:`PlanCallbacks.run_once` after each pass of its
alerts. The changes are not recorded as they happen, by whichever process makes them (the
web site, an agent, the leader): they are **derived** from the items' attempts as stored,
which every process already writes, and each item's delivered position is kept in
``plan_callbacks`` (``{_id: item_id, plan_id, seq}``). So a change cannot be lost by a
process that dies after making it, nor sent out of order, and a leader that takes over
carries on from the last position delivered.

An item's changes, in order, each with its ``seq``: for attempt ``k``, ``10k`` is
``queued`` (k = 0) or ``retried`` (k > 0), ``10k + 1`` is ``started``, ``10k + 2`` is the
attempt's end (``succeeded``, ``failed``, ``timed_out``, ``killed``, ``lost`` ...). A POST
carries the changes not delivered yet, several items' at once (at most BATCH), each item's
in order::

    {"plan_id": "...", "name": "...", "events": [
        {"item_id": "...", "external_id": "42", "name": "load-eu", "type": "etl",
         "seq": 1, "state": "started", "attempt": 0, "at": "2026-12-04T21:00:01.234Z",
         "run_id": "...", "agent": "a1", "exit_code": null, "error": null, "final": false},
        ...],
     "completed": null}

and the last one, once every item is final and every change delivered, has ``completed``:
``{"counts": {"succeeded": 297, "failed": 3}, "total": 300}``. The headers and the signature
are the alert webhooks' (:mod:`cloudtask.notify.webhook`), signed with the plan's
``callback_secret`` (a stored secret, opened with the leader's key ring);
``X-CloudTask-Event: plan.items`` (``plan.completed`` for the last). Any 2xx is delivery; a
failure is tried again after 1, 2, 5, 10, 30, 60, then every 300 seconds, with the same
changes and more (at least once: a receiver drops a repeat by ``(item_id, seq)``). The
network policy of the alerts applies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from ..clock import stored_time
from ..exceptions import StoreError
from ..netpolicy import NetworkPolicy
from ..runmodel import FINISHED_STATUSES
from ..secretbox import SecretBox, SecretError
from ..store import Store
from ..store.plans import retried
from .mail import DeliveryError
from .webhook import post_event

log = logging.getLogger(__name__)

BATCH = 500  # changes per POST
TIMEOUT = 10.0  # seconds for one POST
BACKOFF = (1, 2, 5, 10, 30, 60, 300)  # seconds before the next try after 1, 2, ... failures
PLANS_PER_PASS = 100


def item_changes(attempts: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """An item's state changes so far, in order: ``(seq, change)`` (see the module notes)."""
    out: list[tuple[int, dict[str, Any]]] = []
    last = max((a["attempt"] for a in attempts), default=0)
    for a in sorted(attempts, key=lambda d: d["attempt"]):
        k = a["attempt"]
        base = dict(
            item_id=a["task_id"],
            external_id=a.get("external_id"),
            name=a.get("task_name"),
            type=a.get("group"),
            attempt=k,
            run_id=a["_id"],
        )
        out.append(
            (
                10 * k,
                {**base, "state": "queued" if k == 0 else "retried", "at": a.get("claimed_at")},
            )
        )
        if a.get("started_at"):
            out.append(
                (
                    10 * k + 1,
                    {**base, "state": "started", "at": a["started_at"], "agent": a.get("agent")},
                )
            )
        if a["status"] in FINISHED_STATUSES:
            again = k < last or (retried(a) and k + 1 < a.get("max_attempts", 1))
            out.append(
                (
                    10 * k + 2,
                    {
                        **base,
                        "state": a["status"],
                        "at": a.get("finished_at"),
                        "agent": a.get("agent"),
                        "exit_code": a.get("exit_code"),
                        "error": a.get("error"),
                        "final": not again,
                    },
                )
            )
    for _, change in out:
        change.setdefault("final", False)
        change.setdefault("agent", None)
        change.setdefault("exit_code", None)
        change.setdefault("error", None)
        at = change.get("at")
        change["at"] = _iso(stored_time(at)) if at else None
    return out


def _iso(t: Any) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PlanCallbacks:
    """Delivers the plans' state changes (see the module notes)."""

    def __init__(self, store: Store, box: Callable[[], tuple[SecretBox | None, str]]) -> None:
        self.store = store
        self.box = box  # the leader's key ring, and why it cannot be read

    def run_once(
        self,
        now: float | None = None,
        *,
        policy: NetworkPolicy | None = None,
        keep_going: Callable[[], bool] = lambda: True,
    ) -> dict[str, int]:
        """One pass over the plans with changes to deliver. Returns counts: posts, changes,
        failed."""
        now = time.time() if now is None else now
        counts = {"posts": 0, "changes": 0, "failed": 0}
        for plan in self.store.plans_to_call_back(limit=PLANS_PER_PASS):
            if not keep_going():
                break
            if float(plan.get("callback_next_ts") or 0.0) > now or not plan.get("callback_url"):
                continue
            try:
                self._deliver(plan, now, policy, counts)
            except StoreError as e:
                log.warning("cannot call back plan %s yet: %s", plan["_id"], e)
        return counts

    def _deliver(
        self, plan: dict[str, Any], now: float, policy: NetworkPolicy | None, counts: dict[str, int]
    ) -> None:
        attempts, sent = self.store.callback_state(plan["_id"])
        by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in attempts:
            by_item[a["task_id"]].append(a)
        batch: list[dict[str, Any]] = []
        reached: dict[str, int] = {}
        all_final, all_sent = True, True
        states: Counter[str] = Counter()
        for item_id in sorted(by_item, key=lambda i: (by_item[i][0].get("item_index", 0), i)):
            changes = item_changes(by_item[item_id])
            final = bool(changes) and changes[-1][1]["final"]
            all_final = all_final and final
            if final:
                states[changes[-1][1]["state"]] += 1
            new = [(seq, c) for seq, c in changes if seq > sent.get(item_id, -1)]
            room = BATCH - len(batch)
            if len(new) > room:
                all_sent = False
                new = new[:room]
            if new:
                batch.extend({**c, "seq": seq} for seq, c in new)
                reached[item_id] = new[-1][0]
        completed = None
        if all_final and all_sent and by_item:
            completed = {"counts": dict(sorted(states.items())), "total": len(by_item)}
        if not batch and completed is None:
            return
        body = json.dumps(
            {
                "plan_id": plan["_id"],
                "name": plan.get("name") or "",
                "events": batch,
                "completed": completed,
            },
            separators=(",", ":"),
        ).encode("utf-8")
        keys = ",".join(f"{c['item_id']}:{c['seq']}" for c in batch) + (
            ":done" if completed else ""
        )
        delivery_id = hashlib.sha256(f"{plan['_id']}|{keys}".encode()).hexdigest()[:32]
        try:
            secret = self._secret(plan)
            post_event(
                plan["callback_url"],
                body,
                secret=secret,
                kind="plan.completed" if completed else "plan.items",
                delivery_id=delivery_id,
                timeout=TIMEOUT,
                policy=policy,
                name=f"the callback of plan {plan['_id']}",
            )
        except (DeliveryError, SecretError) as e:
            failures = int(plan.get("callback_failures") or 0) + 1
            wait = BACKOFF[min(failures, len(BACKOFF)) - 1]
            self.store.callback_failed(plan["_id"], failures, now + wait, str(e))
            counts["failed"] += 1
            log.warning(
                "callback of plan %s failed (%d in a row, next in %ds): %s",
                plan["_id"],
                failures,
                wait,
                e,
            )
            return
        self.store.callbacks_delivered(plan["_id"], reached, done=completed is not None)
        counts["posts"] += 1
        counts["changes"] += len(batch)

    def _secret(self, plan: dict[str, Any]) -> str:
        name = plan.get("callback_secret")
        if not name:
            raise SecretError("the plan names no callback_secret to sign its callbacks with")
        box, problem = self.box()
        if box is None and problem:
            raise SecretError(f"the leader's key ring cannot be read: {problem}")
        return self.store.secret_values(box, [name])[name]

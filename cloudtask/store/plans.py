"""Plans: work submitted by other systems, queued per type, run once each by a free agent.

A plan (``plans`` collection: ``{_id, name, submitter, callback_url, created_at, items,
cancelled_at, cancelled_by}``) holds items; each item is a queue of one: its attempts are
run documents in ``runs`` (``trigger: "plan"``, ``task_id``: the item's id, ``slot: "plan"``,
``attempt`` 0, 1, ...), so the claim index (task, time, slot, attempt) keeps each attempt to
one document whoever writes it, and the once-only machinery of every run (the take by one
conditional write, the journal, the lost verdicts) is the item's too. An attempt carries the
item: ``plan_id``, ``item`` (its canonical JSON, what the agent runs), ``item_index``,
``priority``, ``not_before_ts`` (epoch seconds, as numbers compare fast everywhere),
``max_attempts`` (1 + retries), ``external_id`` and ``submitter``.

An attempt that waits is ``queued`` with no agent. An agent of its group (the item's type)
with a free slot takes the first by priority, then age (:meth:`PlanRecords.queued_items`,
then ``take_pending_run``). An attempt that ends ``failed``, ``timed_out`` or ``lost`` with
attempts left is followed by the next one, ``queued`` again for any agent
(:meth:`PlanRecords.follow_item`): written by the agent that saw it end and, as the safety
net, by the leader's upkeep (:meth:`PlanRecords.unfollowed_ends`); either write is the same
document, so it exists once. ``followed: true`` marks an attempt whose follow-up is written
(or that has none).

Idempotent submission: an item with an ``external_id`` has a key in ``plan_keys``
(``_id``: submitter and external id), inserted before the item. The same key again gives the
item it names, and the item's first attempt is written again if a crash left the key alone
(the same document: its time is kept in the key).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import BulkWriteError, DuplicateKeyError

from ..clock import stored_time, to_bson_time, utcnow
from ..exceptions import NotFound
from ..runmodel import (
    FINISHED_STATUSES,
    SCHEMA_VERSION,
    new_id,
    new_run_document,
    next_attempt_document,
)
from .base import DUPLICATE_KEY, StoreBase, guard, indexed, read_all

PLAN_SLOT = "plan"
PLAN_TRIGGER = "plan"
# an attempt that ends so, with attempts left, is followed by the next one (and one ``killed``
# because its agent died or went silent: ``ended_by: "agent"``, see agent/journal.py)
RETRIED_STATUSES = ("failed", "timed_out", "lost")


def retried(doc: dict[str, Any]) -> bool:
    """Whether an attempt that ended so is tried again (when it has attempts left)."""
    status = doc.get("status")
    return status in RETRIED_STATUSES or (status == "killed" and doc.get("ended_by") == "agent")


ITEM_FIELDS = {
    "task_id": 1,
    "task_name": 1,
    "group": 1,
    "attempt": 1,
    "status": 1,
    "agent": 1,
    "item_index": 1,
    "external_id": 1,
    "max_attempts": 1,
    "priority": 1,
    "started_at": 1,
    "finished_at": 1,
    "exit_code": 1,
    "error": 1,
    "claimed_at": 1,
    "ended_by": 1,
}


def key_id(submitter: str, external_id: str) -> str:
    return f"{submitter}\n{external_id}"


class PlanRecords(StoreBase):
    """Plans and their items."""

    @property
    def plans(self) -> Any:
        return self.db["plans"]

    @property
    def plan_keys(self) -> Any:
        return self.db["plan_keys"]

    def ensure_plan_indexes(self) -> None:
        self.runs.create_index(
            [
                ("trigger", ASCENDING),
                ("status", ASCENDING),
                ("group", ASCENDING),
                ("priority", DESCENDING),
                ("queued_ts", ASCENDING),
            ],
            name="plan_queue",
        )
        self.runs.create_index([("plan_id", ASCENDING)], name="plan", sparse=True)
        self.plans.create_index([("created_at", DESCENDING)], name="created")
        self.plans.create_index([("callbacks_done", ASCENDING)], name="callbacks_done")
        self.db["plan_callbacks"].create_index([("plan_id", ASCENDING)], name="plan")

    # --- submitting -----------------------------------------------------------------------------

    def submit_plan(self, plan: Any, submitter: str, now: datetime | None = None) -> dict[str, Any]:
        """Store ``plan`` (a validated :class:`cloudtask.plans.Plan`) and its items' first
        attempts, ``queued``. Returns the receipt: ``{plan_id, accepted, existing, items:
        [{index, item_id, plan_id, name, type, external_id, existing}]}``. An item whose
        ``(submitter, external_id)`` was submitted before is not stored again: the receipt
        names the item that was (``existing: true``)."""
        now = now or utcnow()
        plan_id = new_id()
        ids = [new_id() for _ in plan.items]
        born = [now] * len(plan.items)
        existing: dict[int, dict[str, Any]] = {}
        keyed = [(i, it) for i, it in enumerate(plan.items) if it.external_id]
        if keyed:
            docs = [
                {
                    "_id": key_id(submitter, it.external_id),
                    "item_id": ids[i],
                    "plan_id": plan_id,
                    "created_at": to_bson_time(now),
                }
                for i, it in keyed
            ]
            taken = self._insert_keys(docs)
            if taken:
                known = {
                    d["_id"]: d
                    for d in read_all(
                        self.plan_keys.find({"_id": {"$in": sorted(taken)}}), "read plan keys"
                    )
                }
                for i, it in keyed:
                    key = known.get(key_id(submitter, it.external_id))
                    if key is not None:
                        existing[i] = key
                        ids[i] = key["item_id"]
                        born[i] = stored_time(key["created_at"])
        guard(
            self.plans.insert_one,
            "store the plan",
            {
                "_id": plan_id,
                "version": SCHEMA_VERSION,
                "name": plan.name,
                "submitter": submitter,
                "callback_url": plan.callback_url,
                "callback_secret": plan.callback_secret,
                # every state change POSTed to callback_url (cloudtask/notify/plancallbacks.py)
                "callbacks_done": plan.callback_url is None,
                "callback_failures": 0,
                "callback_next_ts": 0.0,
                "callback_error": None,
                "created_at": to_bson_time(now),
                "items": len(plan.items) - len(existing),
                "cancelled_at": None,
                "cancelled_by": None,
            },
        )
        firsts = []
        for i, item in enumerate(plan.items):
            key = existing.get(i)
            owner = key["plan_id"] if key is not None else plan_id
            if key is not None and self._has_item(ids[i]):
                continue
            firsts.append(self._attempt(item, ids[i], owner, submitter, born[i], 0, now))
        self._insert_attempts(firsts)
        items = [
            {
                "index": i,
                "item_id": ids[i],
                "plan_id": existing[i]["plan_id"] if i in existing else plan_id,
                "name": item.name,
                "type": item.type,
                "external_id": item.external_id,
                "existing": i in existing,
            }
            for i, item in enumerate(plan.items)
        ]
        return {
            "plan_id": plan_id,
            "accepted": len(plan.items) - len(existing),
            "existing": len(existing),
            "items": items,
        }

    def _insert_keys(self, docs: list[dict[str, Any]]) -> set[str]:
        """Insert idempotency keys; the ids of those that were there already."""
        try:
            guard(self.plan_keys.insert_many, "store plan keys", docs, ordered=False)
        except BulkWriteError as e:
            return {
                docs[err["index"]]["_id"]
                for err in e.details.get("writeErrors", [])
                if err.get("code") == DUPLICATE_KEY
            }
        return set()

    def _has_item(self, item_id: str) -> bool:
        found = guard(
            self.runs.find_one, "read a plan item", indexed({"task_id": item_id}), {"_id": 1}
        )
        return found is not None

    def _insert_attempts(self, docs: list[dict[str, Any]]) -> int:
        """Insert attempts; one that exists already (the same item and attempt) is skipped.
        Returns how many were new."""
        if not docs:
            return 0
        try:
            guard(self.runs.insert_many, "store plan items", docs, ordered=False)
        except BulkWriteError as e:
            return len(docs) - len(e.details.get("writeErrors", []))
        return len(docs)

    @staticmethod
    def _attempt(
        item: Any,
        item_id: str,
        plan_id: str,
        submitter: str,
        born: datetime,
        attempt: int,
        now: datetime,
    ) -> dict[str, Any]:
        not_before = item.not_before or now
        doc = new_run_document(
            task_id=item_id,
            task_name=item.name,
            group=item.type,
            revision=0,
            scheduled_for=born,
            slot=PLAN_SLOT,
            attempt=attempt,
            trigger=PLAN_TRIGGER,
            agent=None,
            status="queued",
            now=now,
        )
        doc.update(
            plan_id=plan_id,
            item=item.stored,
            item_index=item.index,
            priority=item.priority,
            not_before_ts=not_before.timestamp(),
            queued_ts=now.timestamp(),
            max_attempts=1 + item.spec.retries,
            retry_delay_s=item.spec.retry_delay,
            external_id=item.external_id,
            submitter=submitter,
            followed=False,
        )
        return doc

    # --- the queue ------------------------------------------------------------------------------

    def queued_items(self, group: str, now: datetime, limit: int) -> list[dict[str, Any]]:
        """Attempts of ``group`` waiting for an agent and due, the first by priority then age."""
        cursor = (
            self.runs.find(
                {
                    "trigger": {"$eq": PLAN_TRIGGER},
                    "status": {"$eq": "queued"},
                    "group": {"$eq": group},
                    # (both bounds: the embedded server uses the index only so)
                    "not_before_ts": {"$gte": 0, "$lte": now.timestamp()},
                }
            )
            .sort([("priority", DESCENDING), ("queued_ts", ASCENDING)])
            .limit(limit)
        )
        return [d for d in read_all(cursor, "read the queued plan items") if d.get("agent") is None]

    def follow_item(self, doc: dict[str, Any], now: datetime | None = None) -> bool:
        """After an attempt that ended ``failed``, ``timed_out`` or ``lost``: its next
        attempt, ``queued`` after the item's retry delay, if it has attempts left (and its
        plan was not cancelled). True when the next attempt was written now (False: none is
        due, or it was there already). The attempt is marked ``followed`` either way."""
        now = now or utcnow()
        wrote = False
        attempts_left = doc["attempt"] + 1 < doc.get("max_attempts", 1)
        if retried(doc) and attempts_left and not self._plan_cancelled(doc.get("plan_id")):
            nxt = {k: v for k, v in doc.items() if k in _CARRIED}
            delay = float(doc.get("retry_delay_s") or 0.0)
            fresh = next_attempt_document(doc, PLAN_TRIGGER, now)
            fresh.update(nxt)
            fresh.update(
                not_before_ts=(now + timedelta(seconds=delay)).timestamp(),
                queued_ts=now.timestamp(),
                followed=False,
                previous=doc["_id"],
            )
            try:
                guard(self.runs.insert_one, "queue the next attempt", fresh)
                wrote = True
            except DuplicateKeyError:
                pass
        guard(
            self.runs.update_one,
            "mark the attempt followed",
            {"_id": doc["_id"]},
            {"$set": {"followed": True}},
        )
        return wrote

    def unfollowed_ends(self, limit: int = 500) -> list[dict[str, Any]]:
        """Attempts that ended and whose follow-up is not written yet (the leader's net)."""
        cursor = self.runs.find(
            {
                "trigger": {"$eq": PLAN_TRIGGER},
                "status": {"$in": [*RETRIED_STATUSES, "killed"]},
                "followed": {"$eq": False},
            }
        ).limit(limit)
        return [d for d in read_all(cursor, "read the ended plan items") if retried(d)]

    def _plan_cancelled(self, plan_id: str | None) -> bool:
        if plan_id is None:
            return False
        plan = guard(self.plans.find_one, "read the plan", {"_id": plan_id}, {"cancelled_at": 1})
        return bool(plan and plan.get("cancelled_at"))

    # --- reading ----------------------------------------------------------------------------

    def get_plan(self, plan_id: str) -> dict[str, Any]:
        """The plan, with ``counts`` by item state and ``done`` (every item final)."""
        plan = guard(self.plans.find_one, "read the plan", {"_id": plan_id})
        if plan is None:
            raise NotFound(f"no plan {plan_id!r}")
        items = self._latest_attempts(plan_id)
        counts = Counter(item["state"] for item in items)
        plan["counts"] = dict(sorted(counts.items()))
        plan["total"] = len(items)
        plan["done"] = bool(items) and all(item["final"] for item in items)
        plan["created_at"] = stored_time(plan["created_at"])
        return plan

    def plan_items(self, plan_id: str, state: str | None = None) -> list[dict[str, Any]]:
        """Every item of the plan (its latest attempt), in plan order; ``state`` filters."""
        plan = guard(self.plans.find_one, "read the plan", {"_id": plan_id}, {"_id": 1})
        if plan is None:
            raise NotFound(f"no plan {plan_id!r}")
        items = self._latest_attempts(plan_id)
        return [i for i in items if state is None or i["state"] == state]

    def _latest_attempts(self, plan_id: str) -> list[dict[str, Any]]:
        docs = read_all(
            self.runs.find(indexed({"plan_id": plan_id}), ITEM_FIELDS), "read the plan's items"
        )
        latest: dict[str, dict[str, Any]] = {}
        for doc in docs:
            have = latest.get(doc["task_id"])
            if have is None or doc["attempt"] > have["attempt"]:
                latest[doc["task_id"]] = doc
        out = [_item_view(d) for d in latest.values()]
        return sorted(out, key=lambda i: (i["index"], i["item_id"]))

    def list_plans(self, limit: int = 100) -> list[dict[str, Any]]:
        docs = read_all(
            self.plans.find({}).sort("created_at", DESCENDING).limit(limit), "list plans"
        )
        for doc in docs:
            doc["created_at"] = stored_time(doc["created_at"])
        return docs

    def cancel_plan(self, plan_id: str, by: str, now: datetime | None = None) -> dict[str, Any]:
        """Cancel the plan: no attempt is queued after this, waiting ones are ``killed``.
        Returns ``{cancelled: n, running: [run documents]}``: the running ones are for the
        caller to kill (through their agents)."""
        now = now or utcnow()
        result = guard(
            self.plans.update_one,
            "cancel the plan",
            {"_id": plan_id},
            {"$set": {"cancelled_at": to_bson_time(now), "cancelled_by": by}},
        )
        if result.matched_count == 0:
            raise NotFound(f"no plan {plan_id!r}")
        docs = read_all(
            self.runs.find(indexed({"plan_id": plan_id}), {"_id": 1, "status": 1, "agent": 1}),
            "read the plan's items",
        )
        cancelled, running = 0, []
        for doc in docs:
            if (
                doc["status"] == "queued"
                and doc.get("agent") is None
                and self.cancel_pending_run(doc["_id"], f"plan cancelled by {by}", now)
            ):
                cancelled += 1
                continue
            if doc["status"] not in FINISHED_STATUSES:
                running.append(doc)
        return {"cancelled": cancelled, "running": running}

    # --- callbacks (the leader's notifier, cloudtask/notify/plancallbacks.py) ----------------

    @property
    def plan_callbacks(self) -> Any:
        return self.db["plan_callbacks"]

    def plans_to_call_back(self, limit: int = 100) -> list[dict[str, Any]]:
        """Plans with a callback_url whose state changes are not all delivered yet."""
        return read_all(
            self.plans.find({"callbacks_done": {"$eq": False}}).limit(limit),
            "read the plans to call back",
        )

    def callback_state(self, plan_id: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The plan's attempts (what their callbacks are made of) and, per item, the sequence
        number of the last state change delivered."""
        attempts = read_all(
            self.runs.find(
                indexed({"plan_id": plan_id}),
                {
                    **ITEM_FIELDS,
                    "claimed_at": 1,
                    "finished_at": 1,
                    "started_at": 1,
                    "followed": 1,
                },
            ),
            "read the plan's items",
        )
        sent = {
            d["_id"]: int(d.get("seq", -1))
            for d in read_all(
                self.plan_callbacks.find(indexed({"plan_id": plan_id})),
                "read the plan's delivered callbacks",
            )
        }
        return attempts, sent

    def callbacks_delivered(
        self, plan_id: str, sent: dict[str, int], done: bool, now: datetime | None = None
    ) -> None:
        """Record what a callback delivered: per item, the last sequence number; ``done``:
        every change of the plan, and its completion, was delivered."""
        from pymongo import UpdateOne

        if sent:
            guard(
                self.plan_callbacks.bulk_write,
                "record the delivered callbacks",
                [
                    UpdateOne(
                        {"_id": item_id},
                        {"$set": {"plan_id": plan_id, "seq": seq}},
                        upsert=True,
                    )
                    for item_id, seq in sent.items()
                ],
                ordered=False,
            )
        guard(
            self.plans.update_one,
            "record the delivered callbacks",
            {"_id": plan_id},
            {
                "$set": {
                    # (only ever set to true: the embedded server reads a boolean written with
                    # $set back as 0 or 1, and the query looks for the false it was stored with)
                    **({"callbacks_done": True} if done else {}),
                    "callback_failures": 0,
                    "callback_next_ts": 0.0,
                    "callback_error": None,
                    "callback_last_ts": (now or utcnow()).timestamp(),
                }
            },
        )

    def callback_failed(self, plan_id: str, failures: int, next_ts: float, error: str) -> None:
        guard(
            self.plans.update_one,
            "record a failed callback",
            {"_id": plan_id},
            {
                "$set": {
                    "callback_failures": failures,
                    "callback_next_ts": next_ts,
                    "callback_error": error[:500],
                }
            },
        )

    def item_attempts(self, item_id: str) -> list[dict[str, Any]]:
        return read_all(
            self.runs.find(indexed({"task_id": item_id})).sort("attempt", ASCENDING),
            "read the item's attempts",
        )

    def items_of(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        return read_all(
            self.runs.find({"task_id": {"$in": sorted(set(ids))}}, ITEM_FIELDS), "read items"
        )


# what the next attempt keeps of the one before
_CARRIED = (
    "plan_id",
    "item",
    "item_index",
    "priority",
    "max_attempts",
    "retry_delay_s",
    "external_id",
    "submitter",
)


def _item_view(doc: dict[str, Any]) -> dict[str, Any]:
    """An item as the API shows it: its state is its latest attempt's status, ``retrying``
    while a failed attempt waits for its follow-up."""
    status = doc["status"]
    attempts_left = doc["attempt"] + 1 < doc.get("max_attempts", 1)
    final = status in FINISHED_STATUSES and not (retried(doc) and attempts_left)
    state = status
    if status in FINISHED_STATUSES and not final:
        state = "retrying"
    return {
        "item_id": doc["task_id"],
        "index": doc.get("item_index", 0),
        "name": doc.get("task_name"),
        "type": doc.get("group"),
        "external_id": doc.get("external_id"),
        "state": state,
        "final": final,
        "attempt": doc["attempt"],
        "run_id": doc["_id"],
        "agent": doc.get("agent"),
        "started_at": stored_time(doc["started_at"]) if doc.get("started_at") else None,
        "finished_at": stored_time(doc["finished_at"]) if doc.get("finished_at") else None,
        "exit_code": doc.get("exit_code"),
        "error": doc.get("error"),
    }

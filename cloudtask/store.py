"""MongoDB store: tasks, runs, events, users, audit, and files in GridFS.

The store accepts a URI or a ready :class:`pymongo.MongoClient`, creates its indexes when it
is opened, and closes only a client it created itself. Every stored document carries a schema
``version``. Times are timezone-aware UTC (the client is opened with ``tz_aware=True``).

The unique index on ``(task_id, scheduled_for, slot, attempt)`` is the once-only claim: an
agent inserts a run document *before* it starts anything, and a duplicate key means some other
process already has that fire.

Example::

    store = Store("mongodb://127.0.0.1:27017", "cloudtask")
    task = store.create_task({"name": "hello", "schedule": {"every": "10s"}, "command": "true"})
    claimed = store.claim_runs([new_run_document(task, scheduled_for, trigger="schedule", ...)])
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import gridfs
import pymongo
from bson import ObjectId
from pymongo import (
    ASCENDING,
    DESCENDING,
    MongoClient,
    ReadPreference,
    ReplaceOne,
    ReturnDocument,
    UpdateOne,
    WriteConcern,
)
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.read_concern import ReadConcern

from . import events as ev
from .config import Config
from .events import event_document  # noqa: F401  (part of the store's API: see events.md)
from .exceptions import Conflict, NotFound, Problem, StoreError, ValidationError
from .task import TaskSpec, file_name_problem, parse_task

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DUPLICATE_KEY = 11000
OUTPUT_TAIL_BYTES = 64 * 1024

# seconds between an agent's heartbeats of its unfinished runs (see Store.beat_runs)
BEAT_INTERVAL = 2.0

# Run statuses. `queued` is a claimed fire waiting for a free slot (max_parallel).
RUNNING_STATUSES = ("queued", "running")
FINISHED_STATUSES = (
    "succeeded",
    "failed",
    "timed_out",
    "killed",
    "skipped",
    "missed",
    "lost",
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def to_bson_time(t: datetime) -> datetime:
    """BSON keeps milliseconds: truncate so a stored time compares equal to the one we keep."""
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def indexed(query: dict[str, Any]) -> dict[str, Any]:
    """``query`` with each plain equality on a string or number written as ``$eq``.

    MongoDB reads the two alike. The embedded server (nx-27017) lets a plain value match
    inside arrays too, a condition no index serves, so it scans the whole collection: 0.5 s a
    query over 126,000 runs, against 3 ms with ``$eq`` (and a long query holds that
    single-threaded server for everyone). Dates are left alone (nx-27017 compares them by
    its own rules), as are ``None`` and operators.
    """
    return {
        key: {"$eq": value}
        if not key.startswith("$") and key != "_id" and isinstance(value, (str, int, float))
        else value
        for key, value in query.items()
    }


def new_id() -> str:
    return str(ObjectId())


def nest_dotted(doc: dict[str, Any]) -> dict[str, Any]:
    """A document read with a dotted projection (``spec.owner``), nested as MongoDB returns it:
    nx-27017 answers such a projection with flat dotted keys instead. Changes ``doc``."""
    for key in [k for k in doc if "." in k]:
        value = doc.pop(key)
        parts = key.split(".")
        target = doc
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return doc


def _count_failures(
    last_run: dict[str, Any], runs: list[dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """Walk a task's newly finished ``runs`` (oldest first) from its stored ``last_run``: how
    many failing runs since the last success after them, and the ``run.recovered`` events
    (a success that ends failing runs). Killed, skipped and missed runs neither count nor end
    it: a fire recorded missed (the cluster was down or restarting) is no failure of the task,
    and is not the status a recovery comes after either."""
    status = last_run.get("status")
    failures = last_run.get("failures")
    if not isinstance(failures, int):  # noted by an older version: at least its last status
        failures = 1 if status in ev.FAILING_STATUSES else 0
    events = []
    for d in runs:
        if d["_id"] == last_run.get("id"):
            continue  # the same final write again: counted when it was written first
        if d["status"] == "missed":
            continue
        if d["status"] in ev.FAILING_STATUSES:
            failures += 1
        elif d["status"] == "succeeded":
            if failures:
                events.append(ev.recovered_event(d, failures, status))
            failures = 0
        status = d["status"]
    return failures, events


class Store:
    """All of CloudTask's persistent state, behind one object."""

    def __init__(
        self,
        mongo: str | MongoClient,
        database: str = "cloudtask",
        *,
        run_retention_days: int = 90,
        server_selection_timeout_ms: int = 10000,
        claim_write_concern: str = "auto",
    ) -> None:
        if isinstance(mongo, MongoClient):
            self.client: MongoClient = mongo
            self._owns_client = False
        else:
            if not mongo:
                raise StoreError(
                    "no MongoDB URI configured: set mongodb.uri or CLOUDTASK_MONGO_URI"
                )
            self.client = MongoClient(
                mongo,
                tz_aware=True,
                tzinfo=timezone.utc,
                serverSelectionTimeoutMS=server_selection_timeout_ms,
                connect=False,
            )
            self._owns_client = True
        self.db = self.client[database]
        self.tasks = self.db["tasks"]
        self.runs = self.db["runs"]
        self.events = self.db["events"]
        self.users = self.db["users"]
        self.audit = self.db["audit"]
        self.leases = self.db["leases"]
        self.agents = self.db["agents"]
        self.reports = self.db["run_reports"]  # what http-task services report (callbacks)
        self.fs = gridfs.GridFS(self.db, collection="files")
        self.run_retention_days = run_retention_days
        self.claim_write_concern = claim_write_concern
        # runs as claims are written and read: see _use_claim_concern (set with the indexes)
        self.claims = self.runs
        # called after every task change (the cluster sets it to bump /signals/tasks)
        self.on_task_change: Callable[[], None] | None = None
        self._guard(self.ensure_indexes, "create indexes")

    @classmethod
    def from_config(cls, cfg: Config) -> Store:
        return cls(
            cfg.mongodb.uri,
            cfg.mongodb.database,
            run_retention_days=cfg.runs.retention_days,
            claim_write_concern=cfg.mongodb.claim_write_concern,
        )

    # --- plumbing ---------------------------------------------------------------------------

    def _guard(self, fn: Any, what: str, *args: Any, **kwargs: Any) -> Any:
        """Run a pymongo call, turning connection failures into a StoreError that says what to do."""
        try:
            return fn(*args, **kwargs)
        except DuplicateKeyError:
            raise
        except BulkWriteError as e:
            if all(err.get("code") == DUPLICATE_KEY for err in e.details.get("writeErrors", [])):
                raise  # the caller tells claims lost to another process from other errors
            raise StoreError(f"MongoDB refused to {what}: {e.details.get('writeErrors')}") from e
        except PyMongoError as e:
            raise StoreError(
                f"MongoDB failed to {what} ({type(e).__name__}: {e}); "
                "check that it runs and that mongodb.uri points at it"
            ) from e

    def _read(self, cursor: Any, what: str) -> list[dict[str, Any]]:
        """Every document of ``cursor``, read under :meth:`_guard` (a cursor talks to the server
        while it is read, not when it is made)."""
        return self._guard(lambda: list(cursor), what)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def _use_claim_concern(self) -> None:
        """Claims and every change of a run's owner or state that once-only rests on (start,
        release, lost) are written with ``claim_write_concern``: on a replica set "auto" means
        ``majority``, so an election cannot roll a claim back and let a fire be claimed again;
        the reads that decide a claim (is this duplicate ours? what ran last?) read from the
        primary at ``majority``, so they see such writes. A single server (and the wire server
        used on one machine) has nothing to roll back: the server's default is kept."""
        wanted = self.claim_write_concern
        if wanted == "auto":
            hello = self.client.admin.command("hello")
            wanted = "majority" if hello.get("setName") else ""
        if not wanted:
            self.claims = self.runs
            return
        w: int | str = int(wanted) if wanted.isdigit() else wanted
        self.claims = self.runs.with_options(
            write_concern=WriteConcern(w=w, wtimeout=10000),
            read_concern=ReadConcern("majority"),
            read_preference=ReadPreference.PRIMARY,
        )

    def ensure_indexes(self) -> None:
        self._use_claim_concern()
        self.tasks.create_index([("name", ASCENDING)], unique=True, name="name_unique")
        self.tasks.create_index(
            [("group", ASCENDING), ("enabled", ASCENDING)], name="group_enabled"
        )
        self.runs.create_index(
            [
                ("task_id", ASCENDING),
                ("scheduled_for", ASCENDING),
                ("slot", ASCENDING),
                ("attempt", ASCENDING),
            ],
            unique=True,
            name="claim",
        )
        self.runs.create_index(
            [("task_id", ASCENDING), ("scheduled_for", DESCENDING)], name="task_time"
        )
        self.runs.create_index([("status", ASCENDING), ("agent", ASCENDING)], name="status_agent")
        self.runs.create_index([("scheduled_for", DESCENDING)], name="time")
        self._ensure_ttl()
        self.runs.create_index(
            [("trigger", ASCENDING), ("status", ASCENDING), ("group", ASCENDING)],
            name="pending_manual",
        )
        self.tasks.create_index([("last_run.status", ASCENDING)], name="last_status")
        self.tasks.create_index([("spec.owner", ASCENDING)], name="owner")
        self.tasks.create_index([("name_lc", ASCENDING)], name="name_lc")
        # a single-field index: the wire server used on one machine sorts a task's runs by
        # time fast with it, and 100 times slower through the compound ones
        self.runs.create_index([("task_id", ASCENDING)], name="task")
        for doc in self.tasks.find({"name_lc": {"$in": [None]}}, {"name": 1}):
            self.tasks.update_one({"_id": doc["_id"]}, {"$set": {"name_lc": doc["name"].lower()}})
        self.runs.create_index(
            [("agent", ASCENDING), ("scheduled_for", DESCENDING)], name="agent_time"
        )
        self.runs.create_index(
            [("status", ASCENDING), ("scheduled_for", DESCENDING)], name="status_time"
        )
        self.audit.create_index([("actor", ASCENDING), ("at", DESCENDING)], name="actor_at")
        self.audit.create_index([("target", ASCENDING), ("at", DESCENDING)], name="target_at")
        self.audit.create_index([("action", ASCENDING), ("at", DESCENDING)], name="action_at")
        self._ensure_event_indexes()
        self.users.create_index([("username", ASCENDING)], unique=True, name="username_unique")
        # the web's login throttle (web.security.LoginThrottle): MongoDB drops a pair's failures
        # once they are too old to count
        self.db["login_failures"].create_index(
            [("expires_at", ASCENDING)], expireAfterSeconds=0, name="expire"
        )
        self.audit.create_index([("at", DESCENDING)], name="at")
        self.db["files.files"].create_index([("metadata.sha256", ASCENDING)], name="sha256")
        self.db["files.files"].create_index(
            [("filename", ASCENDING), ("uploadDate", DESCENDING)], name="name_date"
        )

    def _ensure_event_indexes(self) -> None:
        """Events are ranged and sorted by ``ts`` (a number), never by the date: the notifier
        reads "new, oldest first", the site filters by kind, task or agent. The indexes on
        ``at`` of an older version are dropped (nothing queries them; each costs inserts)."""
        existing = self.events.index_information()
        for old in ("at", "kind_at"):
            if old in existing:
                self.events.drop_index(old)
        self.events.create_index([("delivery", ASCENDING), ("ts", ASCENDING)], name="delivery_ts")
        self.events.create_index([("ts", DESCENDING)], name="ts")
        self.events.create_index([("kind", ASCENDING), ("ts", DESCENDING)], name="kind_ts")
        self.events.create_index([("task_id", ASCENDING), ("ts", DESCENDING)], name="task_ts")
        self.events.create_index([("agent", ASCENDING), ("ts", DESCENDING)], name="agent_ts")
        # the events page also filters by severity and by group
        self.events.create_index([("severity", ASCENDING), ("ts", DESCENDING)], name="severity_ts")
        self.events.create_index([("group", ASCENDING), ("ts", DESCENDING)], name="group_ts")

    def _ensure_ttl(self) -> None:
        """Finished runs are deleted by :meth:`purge_runs` (the leading center, or a standalone
        agent, calls it hourly), not by a TTL index: the MongoDB wire server used on one machine
        checks a TTL index on every query of the collection, which made every run query cost
        100-200 ms at 100,000 runs. A TTL index left by an older version is dropped."""
        for name, info in self.runs.index_information().items():
            if info.get("expireAfterSeconds") is not None:
                self.runs.drop_index(name)
        self.runs.create_index([("finished_at", ASCENDING)], name="finished")
        self.runs.create_index([("ts", DESCENDING)], name="ts")

    def purge_runs(self, now: datetime | None = None) -> int:
        """Delete the runs that finished more than ``run_retention_days`` ago. Returns how many."""
        cutoff = to_bson_time((now or utcnow()) - timedelta(days=self.run_retention_days))
        result = self._guard(
            self.runs.delete_many, "delete old runs", {"finished_at": {"$lt": cutoff}}
        )
        if result.deleted_count:
            log.info(
                "deleted %d runs finished before %s (runs.retention_days = %s)",
                result.deleted_count,
                cutoff.date(),
                self.run_retention_days,
            )
        return result.deleted_count

    def _task_changed(self) -> None:
        if self.on_task_change is None:
            return
        try:
            self.on_task_change()
        except Exception as e:  # the change is stored; centers also resync periodically
            log.warning("cannot signal the task change (centers pick it up on resync): %s", e)

    def ping(self) -> None:
        self._guard(self.client.admin.command, "answer a ping", "ping")

    # --- tasks ------------------------------------------------------------------------------

    @staticmethod
    def _task_document(
        spec: TaskSpec, task_id: str, revision: int, now: datetime
    ) -> dict[str, Any]:
        return {
            "_id": task_id,
            "version": SCHEMA_VERSION,
            "name": spec.name,
            "name_lc": spec.name.lower(),  # case-insensitive name search (a prefix range)
            "group": spec.group,
            "enabled": bool(spec.enabled),
            "spec": spec.to_dict(),
            "revision": revision,
            "updated_at": to_bson_time(now),
        }

    def create_task(
        self, data: dict[str, Any] | TaskSpec, now: datetime | None = None
    ) -> dict[str, Any]:
        """Validate and insert a task; raises ValidationError or Conflict (name taken)."""
        now = now or utcnow()
        spec = data if isinstance(data, TaskSpec) else parse_task(data, now=now)
        doc = self._task_document(spec, new_id(), 1, now)
        doc["created_at"] = doc["updated_at"]
        doc["done_at"] = None
        try:
            self._guard(self.tasks.insert_one, "store the task", doc)
        except DuplicateKeyError:
            raise Conflict(f"a task named {spec.name!r} already exists") from None
        self._task_changed()
        return doc

    def replace_task(
        self,
        task_id: str,
        data: dict[str, Any] | TaskSpec,
        now: datetime | None = None,
        expected_revision: int | None = None,
    ) -> dict[str, Any]:
        """Replace a task's spec and bump its revision (optimistic when expected_revision is given)."""
        now = now or utcnow()
        spec = data if isinstance(data, TaskSpec) else parse_task(data, now=now)
        current = self.get_task(task_id)
        if expected_revision is not None and current["revision"] != expected_revision:
            raise Conflict(
                f"task {current['name']!r} changed meanwhile (revision {current['revision']}, "
                f"you edited {expected_revision}); reload it and apply your change again"
            )
        doc = self._task_document(spec, task_id, current["revision"] + 1, now)
        doc["created_at"] = current.get("created_at")
        doc["done_at"] = None
        if "last_run" in current:
            doc["last_run"] = current["last_run"]
        try:
            result = self._guard(
                self.tasks.replace_one,
                "update the task",
                {"_id": task_id, "revision": current["revision"]},
                doc,
            )
        except DuplicateKeyError:
            raise Conflict(f"a task named {spec.name!r} already exists") from None
        if result.matched_count == 0:
            raise Conflict(f"task {current['name']!r} changed meanwhile; reload it and try again")
        self._task_changed()
        return doc

    def apply_task(
        self, data: dict[str, Any], now: datetime | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Create or update the task with this name. Returns ("created"|"updated"|"unchanged", doc)."""
        now = now or utcnow()
        name = data.get("name") if isinstance(data, dict) else None
        current = self.tasks.find_one({"name": name}) if isinstance(name, str) else None
        if current is None:
            return "created", self.create_task(data, now)
        spec = parse_task(
            data
        )  # compare canonical forms; the past-instant check applies to changes
        if spec.to_dict() == current["spec"]:
            return "unchanged", current
        return "updated", self.replace_task(current["_id"], data, now)

    def get_task(self, task_id: str) -> dict[str, Any]:
        doc = self._guard(self.tasks.find_one, "read the task", {"_id": task_id})
        if doc is None:
            raise NotFound(f"no task with id {task_id!r}")
        return doc

    def get_task_by_name(self, name: str) -> dict[str, Any]:
        doc = self._guard(self.tasks.find_one, "read the task", {"name": name})
        if doc is None:
            raise NotFound(f"no task named {name!r}")
        return doc

    def list_tasks(
        self, groups: Iterable[str] | None = None, enabled: bool | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if groups is not None:
            query["group"] = {"$in": list(groups)}
        if enabled is not None:
            query["enabled"] = enabled
        return self._read(self.tasks.find(query), "list tasks")

    def get_tasks(self, task_ids: Iterable[str]) -> list[dict[str, Any]]:
        return self._read(self.tasks.find({"_id": {"$in": list(task_ids)}}), "read tasks")

    def task_revisions(self, groups: Iterable[str] | None = None) -> dict[str, tuple[int, bool]]:
        """task id -> (revision, done), cheaply, so a poller can tell whether anything changed."""
        query: dict[str, Any] = {} if groups is None else {"group": {"$in": list(groups)}}
        docs = self._read(self.tasks.find(query, {"revision": 1, "done_at": 1}), "list tasks")
        return {d["_id"]: (d["revision"], bool(d.get("done_at"))) for d in docs}

    def set_task_enabled(
        self, task_id: str, enabled: bool, now: datetime | None = None
    ) -> dict[str, Any]:
        now = now or utcnow()
        current = self.get_task(task_id)
        spec = dict(current["spec"], enabled=enabled)
        return self.replace_task(task_id, parse_task(spec), now)

    def delete_task(self, task_id: str) -> None:
        result = self._guard(self.tasks.delete_one, "delete the task", {"_id": task_id})
        if result.deleted_count == 0:
            raise NotFound(f"no task with id {task_id!r}")
        self._task_changed()

    def mark_tasks_done(self, done: Sequence[tuple[str, int]], now: datetime | None = None) -> int:
        """One-shot (`at`) tasks have run: record it so no agent schedules them again.

        ``done`` holds ``(task id, revision that ran)``; only that revision is marked, so an
        edit made meanwhile is not lost. One read and one write for all. Returns how many.
        """
        if not done:
            return 0
        when = to_bson_time(now or utcnow())
        ran = dict(done)
        docs = self._read(self.tasks.find({"_id": {"$in": list(ran)}}), "read tasks")
        ops = []
        for doc in docs:
            if doc["revision"] == ran[doc["_id"]] and not doc.get("done_at"):
                doc["done_at"] = when
                ops.append(ReplaceOne({"_id": doc["_id"], "revision": doc["revision"]}, doc))
        if not ops:
            return 0
        result = self._guard(self.tasks.bulk_write, "mark tasks done", ops, ordered=False)
        self._task_changed()
        return result.modified_count

    # --- runs -------------------------------------------------------------------------------

    def claim_runs(self, docs: Sequence[dict[str, Any]]) -> list[bool]:
        """Insert run documents as claims, in one batch. Returns, per document, whether we won it.

        A duplicate key means another process claimed that fire first, unless the stored
        document has the very same ``_id``: then an earlier try of this same claim landed (its
        answer was lost with the connection) and the fire is ours. Any other write error is
        raised, because then we do not know whether the fire is ours.

        A fire recorded ``missed`` is final at once: its ``run.missed`` event is recorded here
        (by the claim that won it; a retried claim finds the event recorded).
        """
        if not docs:
            return []
        try:
            self._guard(self.claims.insert_many, "claim runs", list(docs), ordered=False)
            won = [True] * len(docs)
        except BulkWriteError as e:
            duplicates: set[int] = set()
            for err in e.details.get("writeErrors", []):
                if err.get("code") != DUPLICATE_KEY:
                    raise StoreError(f"MongoDB refused a run claim: {err.get('errmsg')}") from e
                duplicates.add(err["index"])
            ids = [docs[i]["_id"] for i in duplicates]
            ours = {
                d["_id"]
                for d in self._read(
                    self.claims.find({"_id": {"$in": ids}}, {"_id": 1}), "check claims"
                )
            }
            won = [i not in duplicates or docs[i]["_id"] in ours for i in range(len(docs))]
        missed = [ev.run_event(d) for d, ok in zip(docs, won) if ok and d["status"] == "missed"]
        if missed:
            self._record_events_quietly([e for e in missed if e], "missed fires")
        return won

    def save_runs(self, docs: Sequence[dict[str, Any]], owner: str | None = None) -> None:
        """Write the current state of many runs in one round trip (the run's agent writes).

        Whole documents are replaced rather than ``$set``: every field keeps its BSON type on
        every server (nx-27017 stores a date written with ``$set`` as a string). A run is
        replaced only while it is still its agent's (``owner``, else the document's own
        ``agent``: a claim released to another agent is no longer ours) and not finished, or
        marked ``lost`` by the leader: "lost" means its agent could not be heard from, and the
        agent that ran it after all records the real outcome. A run another process finished
        is never overwritten by a late write.
        """
        if not docs:
            return
        ops = [
            ReplaceOne(
                {
                    "_id": d["_id"],
                    "status": {"$in": [*RUNNING_STATUSES, "lost"]},
                    "agent": owner if owner is not None else d["agent"],
                },
                d,
            )
            for d in docs
        ]
        self._guard(self.claims.bulk_write, "write runs", ops, ordered=False)
        self.note_last_runs(docs)

    def beat_runs(self, agent: str, run_ids: Sequence[str], beat: float) -> int:
        """The heartbeat of an agent's unfinished runs: ``beat`` (its clock, epoch seconds) on
        each. The leader marks a run ``lost`` only once its agent's session is gone *and* it
        has seen this value stay the same for a grace period. Returns how many were beaten."""
        if not run_ids:
            return 0
        result = self._guard(
            self.claims.update_many,
            "beat runs",
            {
                "_id": {"$in": list(run_ids)},
                "agent": agent,
                "status": {"$in": [*RUNNING_STATUSES, "lost"]},
            },
            {"$set": {"beat": float(beat)}},
        )
        return result.modified_count

    def start_queued_run(self, run_id: str, agent: str) -> bool:
        """Move a claim that waited for a slot from ``queued`` to ``running``, before its
        process starts: one conditional write, so a claim released to (or taken over by)
        another agent meanwhile is never started here too. Only a string is ``$set``."""
        result = self._guard(
            self.claims.update_one,
            "start a queued run",
            {"_id": run_id, "status": "queued", "agent": agent},
            {"$set": {"status": "running"}},
        )
        return result.matched_count == 1

    def runs_by_id(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The whole documents of these runs (the ones that exist)."""
        cursor = self.runs.find({"_id": {"$in": list(run_ids)}})
        return self._read(cursor, "read runs")

    def run_states(self, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """run id -> its ``status``, ``attempt`` and ``finished_at`` (runs that exist)."""
        cursor = self.runs.find(
            {"_id": {"$in": list(run_ids)}}, {"status": 1, "attempt": 1, "finished_at": 1}
        )
        return {d["_id"]: d for d in self._read(cursor, "read runs")}

    def unfinished_runs(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """Runs matching ``query`` that are still ``queued`` or ``running``.

        One query per status, an ``$eq`` (see :func:`indexed`): the embedded server then finds
        the few unfinished runs by its status index, whatever else ``query`` asks; with a
        status ``$in`` it scanned every run, longer than a pass's deadline past about 100,000."""
        found: list[dict[str, Any]] = []
        for status in RUNNING_STATUSES:
            cursor = self.runs.find(indexed({**query, "status": status}))
            found += self._read(cursor, "find unfinished runs")
        return found

    def finish_unheard_runs(
        self, docs: Sequence[dict[str, Any]], reason: str, now: datetime | None = None
    ) -> list[str]:
        """The leader's verdict on runs whose agent is gone and went silent: a run that was
        ``running`` becomes ``lost``; a claim still ``queued`` (it never started) is released:
        ``agent`` None, so the task's owner takes it over like a manual run and runs it (see
        :meth:`take_pending_run`). Each write applies only if the run is exactly as read (same
        status, agent and heartbeat): a run its agent touched meanwhile is left alone.
        Returns the ids written."""
        if not docs:
            return []
        now = to_bson_time(now or utcnow())
        ops, written = [], []
        for doc in docs:
            new = dict(doc)
            if doc["status"] == "queued":
                new.update(released_fields(doc["agent"], reason))
            else:
                new.update(lost_fields(doc, reason, now))
            beat = doc.get("beat")
            ops.append(
                ReplaceOne(
                    {
                        "_id": doc["_id"],
                        "status": doc["status"],
                        "agent": doc["agent"],
                        "beat": beat if beat is not None else {"$in": [None]},
                    },
                    new,
                )
            )
            written.append(new)
        self._guard(self.claims.bulk_write, "mark runs lost", ops, ordered=False)
        self.note_last_runs([d for d in written if d["status"] == "lost"])
        return [d["_id"] for d in written]

    def note_last_runs(self, docs: Sequence[dict[str, Any]]) -> None:
        """Copy each task's latest finished run (status, time, duration, and ``failures``: how
        many failed, timed out or lost runs since its last success) onto the task, so lists
        and filters by last result need no scan of the runs; and record the events of the
        finished runs (see :meth:`_record_run_events`). Times are epoch seconds: ``$set``
        keeps numbers as numbers on every server. Best effort: the runs are stored already,
        and nothing here raises.

        The tasks' previous ``last_run`` is read first, in one query: a success after failing
        runs is ``run.recovered``. The run that is the stored last run (the same final write
        again) is not counted twice. The same query reads the tasks' ``notify.on``: a success
        is ``run.succeeded`` for the tasks that name ``success`` there.
        """
        by_task: dict[str, list[dict[str, Any]]] = {}
        for d in docs:
            if d.get("status") in FINISHED_STATUSES and d.get("finished_at"):
                by_task.setdefault(d["task_id"], []).append(d)
        if not by_task:
            return
        previous = self._previous_last_runs(list(by_task))
        events: list[dict[str, Any]] = []
        ops = []
        for task_id, runs in by_task.items():
            runs.sort(key=lambda d: d["finished_at"])
            last_run: dict[str, Any] = {
                "id": runs[-1]["_id"],
                "status": runs[-1]["status"],
                "finished": runs[-1]["finished_at"].timestamp(),
                "duration": runs[-1].get("duration"),
                "trigger": runs[-1].get("trigger"),
            }
            if previous is not None:
                failures, recovered = _count_failures(
                    (previous.get(task_id) or {}).get("last_run") or {}, runs
                )
                last_run["failures"] = failures
                events += recovered
            ops.append(UpdateOne({"_id": task_id}, {"$set": {"last_run": last_run}}))
            success = previous is not None and self._wants_success(previous.get(task_id))
            events += [e for d in runs if (e := ev.run_event(d, success=success))]
        if events:
            self._record_run_events(events)
        try:
            self._guard(self.tasks.bulk_write, "note last runs", ops, ordered=False)
        except (StoreError, BulkWriteError) as e:
            log.warning("cannot note the last runs on their tasks: %s", e)

    def _previous_last_runs(self, task_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """task id -> its stored ``last_run`` and ``spec.notify.on``; None if MongoDB did not
        answer."""
        try:
            cursor = self.tasks.find(
                {"_id": {"$in": task_ids}}, {"last_run": 1, "spec.notify.on": 1}
            )
            found = self._read(cursor, "read the tasks' last runs")
        except (StoreError, BulkWriteError) as e:
            log.warning("cannot read the last runs of the tasks (no recovery events): %s", e)
            return None
        return {d["_id"]: nest_dotted(d) for d in found}

    @staticmethod
    def _wants_success(task: dict[str, Any] | None) -> bool:
        notify = ((task or {}).get("spec") or {}).get("notify")
        on = notify.get("on") if isinstance(notify, dict) else None
        return isinstance(on, list) and "success" in on

    def _record_run_events(self, events: list[dict[str, Any]]) -> None:
        """Record run events, only for runs stored in the status the event is about: a late
        write that did not land (the run was marked lost meanwhile, say) records nothing.
        One read and one insert_many; the event ids make a repeated write record nothing."""
        try:
            ids = list({e["run_id"] for e in events})
            cursor = self.runs.find({"_id": {"$in": ids}}, {"status": 1})
            stored = {d["_id"]: d.get("status") for d in cursor}
            landed = [e for e in events if stored.get(e["run_id"]) == e["details"]["status"]]
            if landed:
                self.record_events(landed)
        except Exception as e:  # never fail a run write for its events
            log.warning("cannot record the events of %d runs: %s", len(events), e)

    def released_claims(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Claims released by the leader (never started, waiting for the task's owner)."""
        docs = self._waiting_runs(
            {
                "agent": 1,
                "task_id": 1,
                "scheduled_for": 1,
                "trigger": 1,
                "status": 1,
                "claimed_at": 1,
            }
        )
        return [d for d in docs if d.get("trigger") != "manual"][:limit]

    def _waiting_runs(self, projection: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """Runs ``queued`` with no agent (manual runs, released claims), oldest claim first.
        Read by status alone (there are few) and picked here: a plain match on ``agent`` None
        misses stored nulls on nx-27017, and ``$in: [None]`` is a scan there."""
        cursor = self.runs.find({"status": {"$eq": "queued"}}, projection)
        docs = [
            d
            for d in self._read(cursor, "read the runs waiting for an agent")
            if d.get("agent") is None
        ]
        return sorted(docs, key=lambda d: d["claimed_at"])

    def finish_released_claims(self, verdicts: Sequence[tuple[dict[str, Any], str, str]]) -> None:
        """Record released claims no agent took: ``(doc, status, reason)`` each, written only
        while the claim still waits (an agent that took it meanwhile wins)."""
        now = to_bson_time(utcnow())
        finished = []
        for doc, status, reason in verdicts:
            full = self._guard(
                self.claims.find_one,
                "read a released claim",
                {"_id": doc["_id"], "status": "queued", "agent": {"$in": [None]}},
            )
            if full is None:
                continue
            full.update(status=status, error=f"{full.get('error') or 'released'}; {reason}")
            full.update(finished_at=now, duration=0.0)
            result = self._guard(
                self.claims.replace_one,
                "record a released claim",
                {"_id": doc["_id"], "status": "queued", "agent": {"$in": [None]}},
                full,
            )
            if result.matched_count:
                finished.append(full)
        self.note_last_runs(finished)

    # --- manual runs ("run now") --------------------------------------------------------------

    def request_manual_run(
        self, task: dict[str, Any], requested_by: str, now: datetime | None = None
    ) -> dict[str, Any]:
        """Record a manual run of ``task``, waiting for an agent of its group to take it.

        The run is stored first (``queued``, no agent), so it is never silently lost: the agent
        that owns the task takes it with one conditional write (see :meth:`take_pending_run`),
        which only one agent can win.
        """
        now = now or utcnow()
        doc = new_run_document(
            task_id=task["_id"],
            task_name=task["name"],
            group=task["group"],
            revision=task["revision"],
            scheduled_for=now,
            slot="manual",
            attempt=0,
            trigger="manual",
            agent=None,
            status="queued",
            now=now,
        )
        doc["requested_by"] = requested_by
        self._guard(self.runs.insert_one, "record the manual run", doc)
        return doc

    def pending_runs(self, group: str, limit: int = 100) -> list[dict[str, Any]]:
        """Runs of ``group`` waiting for an agent to take them, oldest first: manual runs
        ("run now") and claims released by the leader after their agent left before starting
        them."""
        return [d for d in self._waiting_runs() if d.get("group") == group][:limit]

    def take_pending_run(
        self,
        run_id: str,
        agent: str,
        session: str | None,
        token_hash: str,
        trigger: str | None = None,
    ) -> dict[str, Any] | None:
        """Take a pending run for ``agent``: the whole run document, or None if another agent
        took it first (or it was cancelled). Only strings are written with ``$set``;
        ``trigger`` (a released claim run late is a ``catch-up``) is set too when given."""
        fields = {"agent": agent, "session": session, "token_hash": token_hash}
        if trigger is not None:
            fields["trigger"] = trigger
        return self._guard(
            self.claims.find_one_and_update,
            "take a pending run",
            {"_id": run_id, "status": "queued", "agent": {"$in": [None]}},
            {"$set": fields},
            return_document=ReturnDocument.AFTER,
        )

    def cancel_pending_run(
        self, run_id: str, reason: str, now: datetime | None = None, agent: str | None = None
    ) -> bool:
        """Finish a run that has not started as ``killed``: a manual run no agent has taken
        yet (``agent`` None), or a claim of ``agent`` still waiting for a slot (its agent is
        asked to kill a run it does not run). False if it started or someone else has it."""
        now = to_bson_time(now or utcnow())
        query = {
            "_id": run_id,
            "status": "queued",
            "agent": agent if agent is not None else {"$in": [None]},
        }
        doc = self._guard(self.claims.find_one, "read the run", query)
        if doc is None:
            return False
        doc.update(status="killed", error=reason, finished_at=now, duration=0.0)
        result = self._guard(self.claims.replace_one, "cancel the run", query, doc)
        if result.matched_count:
            self.note_last_runs([doc])
        return bool(result.matched_count)

    # --- agents as the leading center saw them ------------------------------------------------

    def record_agents(self, live: dict[str, dict[str, Any]], now: datetime | None = None) -> None:
        """The leader's view of the live agents (id -> registration info): each is stored
        ``online`` with its info; any other agent stored online becomes ``offline`` (kept, so
        the site can show agents that went away and when they were last seen).

        The changes are events, recorded before the agents are written: ``agent.joined`` (never
        seen before), ``agent.left`` (stored online, now gone) and ``agent.returned`` (stored
        offline, now live; or live again under a new registration, ``czxid`` in its info, that
        no leader saw go: then it left too). Their ids name the stored state they change, so
        a second leader that sees the same change (the first one stopped before writing the
        agents) records nothing twice.

        A departure is a clean stop (``agent.left`` "stopped", no alert) when the registration
        said ``leaving``, or when the agent recorded that departure itself as it stopped
        (:func:`events.agent_stopped`, the same id): the recorded reason wins, so a leader
        that never saw ``leaving`` does not report a crash. The reason is kept on the offline
        agent (``left_reason``): its return after a clean stop is no alert either.
        """
        now = to_bson_time(now or utcnow())
        known = {d["_id"]: d for d in self._read(self.agents.find({}, {"info": 0}), "read agents")}
        ops = []
        events: list[dict[str, Any]] = []
        restarted: list[str] = []
        for agent_id, info in live.items():
            stored = known.get(agent_id)
            doc = {
                "_id": agent_id,
                "version": SCHEMA_VERSION,
                "group": info.get("group", ""),
                "status": "online",
                "czxid": info.get("czxid"),  # its registration: a restart changes it
                "info": info,
                "first_seen": (stored or {}).get("first_seen", now),
                "last_seen": now,
            }
            ops.append(ReplaceOne({"_id": agent_id}, doc, upsert=True))
            if stored is None:
                events.append(ev.agent_joined(agent_id, info, now))
            elif stored.get("status") != "online":
                events.append(ev.agent_returned(agent_id, info, stored, now))
            elif None not in (stored.get("czxid"), info.get("czxid")) and stored.get(
                "czxid"
            ) != info.get("czxid"):
                # restarted between two looks: it left (a moment before now), and is back
                restarted.append(agent_id)
        gone = [a for a, d in known.items() if a not in live and d.get("status") == "online"]
        departures = []  # (stored agent, its agent.left)
        for agent_id in gone + restarted:
            full = self._guard(self.agents.find_one, "read an agent", {"_id": agent_id})
            if full is not None:
                at = now if agent_id in gone else now - timedelta(milliseconds=1)
                departures.append((full, ev.agent_left(full, at)))
        recorded: dict[str, Any] = {}  # departures recorded already: the agent's own clean stop
        if departures:
            ids = [left["_id"] for _, left in departures]
            cursor = self.events.find({"_id": {"$in": ids}}, {"details": 1})
            recorded = {d["_id"]: d for d in self._read(cursor, "read events")}
        for full, left in departures:
            reason = (recorded.get(left["_id"], left).get("details") or {}).get("reason")
            events.append(left)
            agent_id = full["_id"]
            if agent_id in gone:
                full.update(status="offline", last_seen=now, left_reason=reason)
                ops.append(ReplaceOne({"_id": agent_id}, full))
            else:
                before = {**known[agent_id], "left_reason": reason}
                events.append(ev.agent_returned(agent_id, live[agent_id], before, now))
        if events:
            self._record_events_quietly(events, "agent changes")
        if ops:
            self._guard(self.agents.bulk_write, "record agents", ops, ordered=False)

    def list_agents(self) -> list[dict[str, Any]]:
        return self._read(self.agents.find({}), "list agents")

    def mark_runs_lost(
        self,
        query: dict[str, Any],
        reason: str,
        now: datetime | None = None,
        free_leases: bool = False,
    ) -> list[str]:
        """Mark the unfinished runs matching ``query`` as ``lost``. Returns their ids.

        For tests and tools; the leader decides with :meth:`finish_unheard_runs`, a restarted
        agent with :meth:`left_runs` and its run journal.
        ``free_leases`` also frees the keepalive leases they held: only for a caller that knows
        their processes are gone.
        """
        now = to_bson_time(now or utcnow())
        docs = self.unfinished_runs(query)
        for doc in docs:
            doc.update(lost_fields(doc, reason, now))
        by_agent: dict[Any, list[dict[str, Any]]] = {}
        for doc in docs:
            by_agent.setdefault(doc["agent"], []).append(doc)
        for agent, group in by_agent.items():
            self.save_runs(group, owner=agent)
        ids = [d["_id"] for d in docs]
        if free_leases:
            self.free_leases(ids)
        return ids

    def left_runs(
        self, agent: str, own: set[str], known: set[str], now: datetime
    ) -> list[dict[str, Any]]:
        """The runs an earlier life of ``agent`` left: still ``queued`` or ``running`` and not
        among ``own`` (the claims of this life, from its journal), and the ones in ``known``
        (its run journal) that the leader has marked ``lost`` meanwhile (fires of the last
        day before ``now``).

        Told apart by the journal, not by time: a claim's time is the earlier life's clock,
        which may have run ahead (a run claimed by a life whose clock was 5 s fast was taken
        for this life's own, and its journal deleted unread), and the embedded server
        compares dates to the second."""
        left = [d for d in self.unfinished_runs({"agent": agent}) if d["_id"] not in own]
        if known:
            since = (now - timedelta(days=1)).timestamp()  # ts: the fire's time, a number
            cursor = self.runs.find(
                indexed({"agent": agent, "status": "lost", "ts": {"$gte": since, "$lte": 1e12}})
            )
            lost = self._read(cursor, "find lost runs")
            left += [d for d in lost if d["_id"] in known]
        return left

    def free_leases(self, holders: Sequence[str]) -> None:
        """Free the keepalive leases these runs held (for a caller that knows their processes
        are gone)."""
        if holders:
            self._guard(self.leases.delete_many, "free leases", {"holder": {"$in": list(holders)}})

    def last_fire(self, task_id: str, slot: str) -> dict[str, Any] | None:
        """The latest run recorded for a task's slot (its last attempt of its latest fire),
        with ``scheduled_for``, ``attempt``, ``status`` and ``finished_at``; or None."""
        return self._guard(
            self.claims.find_one,
            "read the run history",
            indexed({"task_id": task_id, "slot": slot}),
            {"scheduled_for": 1, "attempt": 1, "status": 1, "finished_at": 1},
            sort=[("scheduled_for", DESCENDING), ("attempt", DESCENDING)],
        )

    def owed_retries(
        self,
        task_id: str,
        slot: str,
        retries: int,
        since: datetime,
        statuses: Sequence[str],
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Runs of a task's slot scheduled since ``since`` that ended in ``statuses`` with
        attempts left (``attempt`` < ``retries``) and whose next attempt is not recorded: the
        retries their agent still owed when it died or stopped. Oldest first."""
        cursor = (
            self.claims.find(
                indexed(
                    {
                        "task_id": task_id,
                        "slot": slot,
                        "ts": {"$gte": since.timestamp(), "$lte": 1e12},
                    }
                ),
                {"scheduled_for": 1, "attempt": 1, "status": 1, "finished_at": 1},
            )
            .sort("ts", DESCENDING)
            .limit(limit * (retries + 1))
        )
        docs = self._read(cursor, "read the run history")
        attempts = {(d["scheduled_for"], d["attempt"]) for d in docs}
        owed = [
            d
            for d in docs
            if d["status"] in statuses
            and d["attempt"] < retries
            and (d["scheduled_for"], d["attempt"] + 1) not in attempts
        ]
        return sorted(owed, key=lambda d: d["scheduled_for"])[-limit:]

    def get_run(self, run_id: str) -> dict[str, Any]:
        doc = self._guard(self.runs.find_one, "read the run", {"_id": run_id})
        if doc is None:
            raise NotFound(f"no run with id {run_id!r}")
        return doc

    def list_runs(
        self,
        task_id: str | None = None,
        status: str | Sequence[str] | None = None,
        agent: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if task_id is not None:
            query["task_id"] = task_id
        if isinstance(status, str):
            query["status"] = status
        elif status is not None:
            query["status"] = {"$in": list(status)}
        if agent is not None:
            query["agent"] = agent
        cursor = self.runs.find(query).sort("scheduled_for", pymongo.DESCENDING).limit(limit)
        return self._read(cursor, "list runs")

    # --- reports of http-task services (callbacks) ---------------------------------------------

    def get_report(self, run_id: str) -> dict[str, Any] | None:
        """What the service of an http run reported: ``percent``, ``message``, ``updated_at``
        and ``result`` (None, or ``{"status": "succeeded"|"failed", "message", "at"}``)."""
        return self._guard(self.reports.find_one, "read the run's report", {"_id": run_id})

    def report_progress(
        self, run_id: str, percent: float | None, message: str, now: datetime | None = None
    ) -> dict[str, Any]:
        """Record a progress report of a run. Written whole (never ``$set``), and refused with
        Conflict once the run's result is in. The agent, the run's only writer, copies the
        latest report into the run document."""
        now = to_bson_time(now or utcnow())
        current = self.get_report(run_id)
        if current is not None and current.get("result"):
            raise Conflict(f"run {run_id} already reported its result")
        doc = {
            "_id": run_id,
            "version": SCHEMA_VERSION,
            "percent": percent,
            "message": message,
            "updated_at": now,
            "result": None,
        }
        if current is None:
            try:
                self._guard(self.reports.insert_one, "record the progress", doc)
                return doc
            except DuplicateKeyError:
                current = self.get_report(run_id) or {}
                if current.get("result"):
                    raise Conflict(f"run {run_id} already reported its result") from None
        self._guard(
            self.reports.replace_one,
            "record the progress",
            {"_id": run_id, "result": {"$in": [None]}},
            doc,
        )
        return doc

    def report_result(
        self, run_id: str, status: str, message: str, now: datetime | None = None
    ) -> dict[str, Any]:
        """Record the result of a run (``succeeded`` or ``failed``); only the first counts:
        a second raises Conflict. The agent waiting for it finishes the run."""
        now = to_bson_time(now or utcnow())
        current = self.get_report(run_id)
        if current is not None and current.get("result"):
            raise Conflict(f"run {run_id} already reported its result")
        result = {"status": status, "message": message, "at": now}
        doc = {
            "_id": run_id,
            "version": SCHEMA_VERSION,
            "percent": current.get("percent") if current else None,
            "message": current.get("message", "") if current else "",
            "updated_at": now,
            "result": result,
        }
        if current is None:
            try:
                self._guard(self.reports.insert_one, "record the result", doc)
                return doc
            except DuplicateKeyError:
                pass
        outcome = self._guard(
            self.reports.replace_one,
            "record the result",
            {"_id": run_id, "result": {"$in": [None]}},
            doc,
        )
        if not outcome.matched_count:
            raise Conflict(f"run {run_id} already reported its result")
        return doc

    # --- leases -----------------------------------------------------------------------------

    def acquire_lease(
        self, name: str, holder: str, ttl: float, now: datetime | None = None
    ) -> bool:
        """Take the lease ``name`` for ``holder`` if it is free. Returns whether we hold it.

        A lease is a document whose ``_id`` is its name: the insert is the acquisition, as with
        run claims. A lease held by someone else is never judged expired by this process's
        clock (clocks of two machines may disagree by seconds): a taker that has watched it
        stay unrenewed for its whole life on its own monotonic clock takes it over with
        :meth:`take_over_lease`. ``expires_at`` is informative.
        """
        now = to_bson_time(now or utcnow())
        doc = {
            "_id": name,
            "version": SCHEMA_VERSION,
            "holder": holder,
            "acquired_at": now,
            "expires_at": to_bson_time(now + timedelta(seconds=ttl)),
        }
        try:
            self._guard(self.leases.insert_one, "take a lease", doc)
            return True
        except DuplicateKeyError:
            current = self.read_lease(name)
            if current is not None and current["holder"] == holder:
                return self.renew_lease(name, holder, ttl, now)
            return False

    def read_lease(self, name: str) -> dict[str, Any] | None:
        return self._guard(self.leases.find_one, "read a lease", {"_id": name})

    def take_over_lease(
        self,
        name: str,
        holder: str,
        ttl: float,
        seen: dict[str, Any],
        now: datetime | None = None,
    ) -> bool:
        """Take over a lease its holder stopped renewing: ``seen`` is the lease as the caller
        read it at least a whole lease life ago and again now. It is deleted only if it is
        still exactly that (holder and expiry), so a holder that renewed meanwhile keeps it
        and two takers cannot both win; then it is acquired as usual."""
        self._guard(
            self.leases.delete_one,
            "clear an unrenewed lease",
            {"_id": name, "holder": seen["holder"], "expires_at": seen["expires_at"]},
        )
        return self.acquire_lease(name, holder, ttl, now)

    def renew_lease(self, name: str, holder: str, ttl: float, now: datetime | None = None) -> bool:
        """Extend our lease; False if it is no longer ours (it expired and someone took it)."""
        now = to_bson_time(now or utcnow())
        current = self._guard(self.leases.find_one, "read a lease", {"_id": name, "holder": holder})
        if current is None:
            return False
        current["expires_at"] = to_bson_time(now + timedelta(seconds=ttl))
        result = self._guard(
            self.leases.replace_one, "renew a lease", {"_id": name, "holder": holder}, current
        )
        return result.matched_count == 1

    def release_lease(self, name: str, holder: str) -> None:
        self._guard(self.leases.delete_one, "release a lease", {"_id": name, "holder": holder})

    # --- events and audit -------------------------------------------------------------------
    #
    # Events (see cloudtask/events.py for their shape) are written whole, once: an event whose
    # ``_id`` is taken is already recorded. Recording one never breaks the write it hangs on:
    # the callers in this store log and swallow a failure (``_record_events_quietly``).

    def record_event(self, doc: dict[str, Any]) -> bool:
        """Insert one event. False if its ``_id`` is recorded already; StoreError if MongoDB
        refused it otherwise (a duplicate on another unique index is a refusal too)."""
        try:
            self._guard(self.events.insert_one, "record an event", doc)
        except DuplicateKeyError as e:
            if self._events_recorded([doc["_id"]]):
                return False
            raise StoreError(f"MongoDB refused the event {doc['_id']}: {e}") from e
        return True

    def record_events(self, docs: Sequence[dict[str, Any]]) -> int:
        """Insert events in one unordered ``insert_many``; those whose ``_id`` is recorded
        already are skipped. Returns how many were new. Other refusals raise StoreError
        (after the others were inserted)."""
        if not docs:
            return 0
        docs = list(docs)
        try:
            result = self._guard(self.events.insert_many, "record events", docs, ordered=False)
        except BulkWriteError as e:  # duplicate keys only: _guard raised anything else
            errors = e.details.get("writeErrors", [])
            failed = [docs[err["index"]]["_id"] for err in errors]
            refused = set(failed) - self._events_recorded(failed)
            if refused:
                raise StoreError(
                    f"MongoDB refused {len(refused)} events (a unique index other than _id?): "
                    f"{errors[0].get('errmsg')}"
                ) from e
            return int(e.details.get("nInserted", len(docs) - len(errors)))
        return len(result.inserted_ids)

    def _events_recorded(self, ids: list[str]) -> set[str]:
        """Which of these event ids are stored (a duplicate key on ``_id``, not on another
        index: servers word that error differently, so ask)."""
        cursor = self.events.find({"_id": {"$in": ids}}, {"_id": 1})
        return {d["_id"] for d in self._read(cursor, "read events")}

    def _record_events_quietly(self, docs: Sequence[dict[str, Any]], what: str) -> int:
        """:meth:`record_events`, for a path an event must not break: a failure is logged."""
        try:
            return self.record_events(docs)
        except Exception as e:
            log.warning("cannot record the events of %s (%d lost): %s", what, len(docs), e)
            return 0

    def new_events(self, limit: int = 100) -> list[dict[str, Any]]:
        """Events whose deliveries are not planned yet (``delivery`` "new"), oldest first."""
        cursor = self.events.find(indexed({"delivery": "new"})).sort("ts", ASCENDING).limit(limit)
        return self._read(cursor, "read new events")

    def set_event_delivery(self, event_id: str, state: str) -> bool:
        """Set an event's ``delivery`` (read, change, replace whole). False if it is gone."""
        doc = self._guard(self.events.find_one, "read an event", {"_id": event_id})
        if doc is None:
            return False
        doc["delivery"] = state
        result = self._guard(self.events.replace_one, "mark an event", {"_id": event_id}, doc)
        return bool(result.matched_count)

    def add_event(self, kind: str, message: str, **fields: Any) -> str:
        """Record an event of ``kind`` now (fields: see :func:`event_document`); its id."""
        doc = event_document(kind, message, **fields)
        self.record_event(doc)
        return doc["_id"]

    def add_audit(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any = None,
        after: Any = None,
        task_id: str | None = None,
    ) -> None:
        """Record who changed what. A change of a task (create, clone, update, pause, resume,
        delete) is also an event (``task.created``/``changed``/``deleted``) naming the actor;
        ``task_id`` is looked up by the task's name when not given."""
        doc = {
            "_id": new_id(),
            "version": SCHEMA_VERSION,
            "at": to_bson_time(utcnow()),
            "actor": actor,
            "action": action,
            "target": target,
            "before": before,
            "after": after,
        }
        self._guard(self.audit.insert_one, "record an audit entry", doc)
        if action in ev.AUDIT_KINDS:
            self._record_audit_event(doc, task_id)

    def _record_audit_event(self, entry: dict[str, Any], task_id: str | None) -> None:
        try:
            event = ev.audit_event(entry, task_id)
            if event is None:
                return
            if task_id is None and event["task_name"] and entry["action"] != "task.delete":
                found = self.tasks.find_one({"name": event["task_name"]}, {"_id": 1})
                event["task_id"] = found["_id"] if found else None
            self.record_event(event)
        except Exception as e:  # the change and its audit entry are stored: never fail them
            log.warning(
                "cannot record the event of %s on %s: %s", entry["action"], entry["target"], e
            )

    # --- files (GridFS) ---------------------------------------------------------------------
    #
    # Every upload of a name is a version: a GridFS file whose ``filename`` is the name, with
    # metadata {version (schema), sha256, size, uploaded_by, rolled_back_from}. The newest
    # upload is the latest version (``uploadDate``, then ``_id`` for uploads in the same
    # millisecond). A task follows the latest version of its ``spec.file`` or pins one by
    # sha256 (``spec.file_version``). Each upload prunes the name down to the newest ``keep``
    # versions, keeping the bytes of every version a task pins.

    def ensure_file_indexes(self) -> None:
        """The indexes of the file queries (GridFS creates the first one on its first write
        only; a web process that only reads needs it too). nx-27017 keeps GridFS files in a
        table of its own, indexed by name; the sha256 index is for MongoDB."""
        files = self.db["files.files"]
        files.create_index([("filename", ASCENDING), ("uploadDate", ASCENDING)])
        files.create_index([("metadata.sha256", ASCENDING)], name="sha256")
        self.tasks.create_index([("spec.file", ASCENDING)], name="file")

    def _file_docs(self) -> Any:
        """The GridFS files collection, with its indexes made once per store."""
        if not getattr(self, "_file_indexes_ready", False):
            self._guard(self.ensure_file_indexes, "create the file indexes")
            self._file_indexes_ready = True
        return self.db["files.files"]

    @staticmethod
    def _file_meta(doc: dict[str, Any]) -> dict[str, Any]:
        meta = doc.get("metadata") or {}
        return {
            "id": str(doc["_id"]),
            "name": doc["filename"],
            "version": meta.get("version", SCHEMA_VERSION),
            "sha256": meta.get("sha256", ""),
            "size": meta.get("size", doc.get("length", 0)),
            "uploaded_by": meta.get("uploaded_by", ""),
            "uploaded_at": doc.get("uploadDate"),
            "rolled_back_from": meta.get("rolled_back_from"),
        }

    def _versions_of(self, name: str) -> list[dict[str, Any]]:
        """The stored versions (GridFS file documents) of ``name``, newest first."""
        files = self._file_docs()
        return self._guard(
            lambda: list(
                files.find({"filename": name}).sort(
                    [("uploadDate", DESCENDING), ("_id", DESCENDING)]
                )
            ),
            "read the file's versions",
        )

    def file_pins(self, name: str) -> dict[str, list[str]]:
        """The versions of ``name`` tasks pin: sha256 -> the names of the tasks pinning it."""
        cursor = self.tasks.find(
            {"spec.file": name, "spec.file_version": {"$nin": [None]}},
            {"name": 1, "spec.file_version": 1},
        )
        pins: dict[str, list[str]] = {}
        for doc in self._read(cursor, "read the tasks pinning the file"):
            sha256 = (nest_dotted(doc).get("spec") or {}).get("file_version")
            if sha256:
                pins.setdefault(sha256, []).append(doc["name"])
        for names in pins.values():
            names.sort()
        return pins

    def file_tasks(self, name: str | None, limit: int = 1000) -> list[dict[str, Any]]:
        """The tasks that use the file ``name`` (None: any file), by task name, at most
        ``limit``: ``{"id", "name", "file", "file_version"}`` (``file_version`` None: the
        task follows the latest version)."""
        # every task naming a file is an index range; nx-27017 answers $in with a full scan
        query = {"spec.file": name if name is not None else {"$gt": ""}}
        cursor = (
            self.tasks.find(query, {"name": 1, "spec.file": 1, "spec.file_version": 1})
            .sort("name", ASCENDING)
            .limit(limit)
        )
        out = []
        for doc in self._read(cursor, "read the tasks using files"):
            spec = nest_dotted(doc).get("spec") or {}
            out.append(
                {
                    "id": doc["_id"],
                    "name": doc["name"],
                    "file": spec.get("file"),
                    "file_version": spec.get("file_version"),
                }
            )
        return out

    def file_task_counts(self, name: str | None = None) -> dict[str, int]:
        """How many tasks use each file (only ``name``, if given): file name -> count, in one
        aggregation over the ``spec.file`` index."""
        match = {"spec.file": name if name is not None else {"$gt": ""}}
        pipeline = [{"$match": match}, {"$group": {"_id": "$spec.file", "n": {"$sum": 1}}}]
        rows = self._guard(  # aggregate talks to the server when called
            lambda: list(self.tasks.aggregate(pipeline)), "count the files' tasks"
        )
        return {row["_id"]: int(row["n"]) for row in rows if isinstance(row.get("_id"), str)}

    def _upload_problems(self, name: str, data: bytes, max_bytes: int | None) -> list[Problem]:
        if problem := file_name_problem(name):
            return [Problem("name", problem)]
        if max_bytes is not None and len(data) > max_bytes:
            return [
                Problem(
                    "file",
                    f"{len(data)} bytes is more than the upload limit of {max_bytes} bytes "
                    "(web.max_upload_bytes)",
                )
            ]
        from .agent.files import TaskFileError, check_archive  # the agent unpacks with these

        try:
            check_archive(name, data)
        except TaskFileError as e:
            return [Problem("file", str(e))]
        return []

    def put_file(
        self,
        name: str,
        data: bytes,
        uploaded_by: str = "",
        *,
        keep: int = 20,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Store ``data`` as the new latest version of the file ``name``; returns its metadata
        (id, name, version, sha256, size, uploaded_by, uploaded_at, rolled_back_from, and
        ``created``: False when the bytes equal the latest version's, which is then returned
        and no version is added).

        Refused with a ValidationError: a bad name (``name``), more than ``max_bytes``
        (``file``), an archive (.zip, .tar.gz, .tgz, .tar) that does not open or holds an
        unsafe member (``file``, naming the member). Versions beyond the newest ``keep`` are
        deleted, except those a task pins.
        """
        if problems := self._upload_problems(name, data, max_bytes):
            raise ValidationError(problems, source=f"the file {name!r}")
        return self._add_file_version(name, data, uploaded_by, keep)

    def _add_file_version(
        self,
        name: str,
        data: bytes,
        uploaded_by: str,
        keep: int,
        rolled_back_from: str | None = None,
    ) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        versions = self._versions_of(name)
        if versions and (versions[0].get("metadata") or {}).get("sha256") == sha256:
            return {**self._file_meta(versions[0]), "created": False}
        meta: dict[str, Any] = {
            "version": SCHEMA_VERSION,
            "sha256": sha256,
            "size": len(data),
            "uploaded_by": uploaded_by,
        }
        if rolled_back_from:
            meta["rolled_back_from"] = rolled_back_from
        file_id = self._guard(self.fs.put, "store the file", data, filename=name, metadata=meta)
        versions = self._prune_file_versions(name, keep)
        self._write_file_head(name, versions)
        doc = next((d for d in versions if d["_id"] == file_id), None) or self._guard(
            self._file_docs().find_one, "read the stored file", {"_id": file_id}
        )
        return {**self._file_meta(doc), "created": True}

    def _prune_file_versions(self, name: str, keep: int) -> list[dict[str, Any]]:
        """Delete the versions of ``name`` beyond the newest ``keep``, except one copy of each
        version a task pins (a pinned sha256 also among the newest needs no older copy).
        Returns the versions left, newest first."""
        versions = self._versions_of(name)
        if len(versions) <= keep:
            return versions
        pinned = self.file_pins(name)
        kept = {(d.get("metadata") or {}).get("sha256") for d in versions[:keep]}
        left = versions[:keep]
        for doc in versions[keep:]:
            sha256 = (doc.get("metadata") or {}).get("sha256")
            if sha256 in pinned and sha256 not in kept:
                kept.add(sha256)
                left.append(doc)
                continue
            self._guard(self.fs.delete, "delete an old file version", doc["_id"])
        if len(left) < len(versions):
            log.info("pruned %d old version(s) of file %s", len(versions) - len(left), name)
        return left

    # The list of files reads one summary document per name (collection ``file_heads``: the
    # latest version's metadata and how many versions are kept), written whole after every
    # change made through the store: nx-27017 keeps GridFS files in a table of its own that
    # aggregations cannot group, and reading every version of every file is too slow.

    _FILE_HEADS_BUILT = "\x00built"  # no file name has a control character

    def _write_file_head(self, name: str, versions: list[dict[str, Any]]) -> None:
        heads = self.db["file_heads"]
        if not versions:
            self._guard(heads.delete_one, "forget the file", {"_id": name})
            return
        doc = {
            "_id": name,
            "version": SCHEMA_VERSION,
            "latest": self._file_meta(versions[0]),
            "versions": len(versions),
        }
        self._guard(
            heads.replace_one, "record the file's latest version", {"_id": name}, doc, upsert=True
        )

    def rebuild_file_heads(self) -> int:
        """Write the summary of every stored file again from GridFS (done by itself when the
        summaries are missing: files stored by an older version). Returns how many files."""
        cursor = (
            self._file_docs()
            .find({})
            .sort([("filename", ASCENDING), ("uploadDate", DESCENDING), ("_id", DESCENDING)])
        )
        by_name: dict[str, list[dict[str, Any]]] = {}
        for doc in self._read(cursor, "list files"):
            by_name.setdefault(doc["filename"], []).append(doc)
        for name, versions in by_name.items():
            self._write_file_head(name, versions)
        for head in self._read(self.db["file_heads"].find({}, {"_id": 1}), "list"):
            if head["_id"] not in by_name and head["_id"] != self._FILE_HEADS_BUILT:
                self._write_file_head(head["_id"], [])  # its versions were deleted
        marker = {"_id": self._FILE_HEADS_BUILT, "version": SCHEMA_VERSION}
        self._guard(
            self.db["file_heads"].replace_one,
            "mark the file summaries built",
            {"_id": self._FILE_HEADS_BUILT},
            marker,
            upsert=True,
        )
        return len(by_name)

    def get_file_by_hash(self, sha256: str) -> bytes:
        doc = self._guard(self._file_docs().find_one, "find the file", {"metadata.sha256": sha256})
        if doc is None:
            raise NotFound(f"no stored file with sha256 {sha256}")
        return self._guard(lambda: self.fs.get(doc["_id"]).read(), "read the file")

    def file_version(self, name: str, sha256: str) -> dict[str, Any]:
        """The metadata of the version ``sha256`` of the file ``name`` (its newest upload)."""
        doc = self._guard(
            lambda: self._file_docs().find_one(
                {"filename": name, "metadata.sha256": sha256},
                sort=[("uploadDate", DESCENDING), ("_id", DESCENDING)],
            ),
            "find the file version",
        )
        if doc is None:
            raise NotFound(f"file {name!r} has no stored version {sha256}")
        return self._file_meta(doc)

    def read_file_version(self, name: str, sha256: str) -> tuple[dict[str, Any], bytes]:
        """The metadata and the bytes of the version ``sha256`` of the file ``name``."""
        meta = self.file_version(name, sha256)
        data = self._guard(lambda: self.fs.get(ObjectId(meta["id"])).read(), "read the file")
        return meta, data

    def list_files(self) -> list[dict[str, Any]]:
        """The latest version of every stored file, by name, with ``versions`` (how many
        versions of it are stored)."""
        heads = self.db["file_heads"]
        docs = self._read(heads.find({}).sort("_id", ASCENDING), "list files")
        if not any(d["_id"] == self._FILE_HEADS_BUILT for d in docs):
            self.rebuild_file_heads()
            docs = self._read(heads.find({}).sort("_id", ASCENDING), "list files")
        out = []
        for doc in docs:
            if doc["_id"] == self._FILE_HEADS_BUILT:
                continue
            head = {**doc["latest"], "versions": doc["versions"]}
            when = head.get("uploaded_at")
            if isinstance(when, str):  # nx-27017 returns a nested date as ISO text
                when = datetime.fromisoformat(when)
                head["uploaded_at"] = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
            out.append(head)
        return out

    def latest_file(self, name: str) -> dict[str, Any]:
        doc = self._guard(
            lambda: self._file_docs().find_one(
                {"filename": name}, sort=[("uploadDate", DESCENDING), ("_id", DESCENDING)]
            ),
            "find the file",
        )
        if doc is None:
            raise NotFound(f"no stored file named {name!r}; upload it first")
        return self._file_meta(doc)

    def file_reference_problems(self, name: str | None, sha256: str | None) -> list[Problem]:
        """What is wrong with a task naming the file ``name`` (pinned to ``sha256``, if given):
        no such file is stored, or not that version. [] when it can run."""
        if not name:
            return []
        versions = self._versions_of(name)
        if not versions:
            return [
                Problem(
                    "file",
                    f"no file named {name!r} is stored; upload it first (the Files page, "
                    f"POST /api/v1/files or `cloudtask file put`)",
                )
            ]
        hashes = [(d.get("metadata") or {}).get("sha256") for d in versions]
        if sha256 and sha256 not in hashes:
            shown = ", ".join(h[:12] for h in dict.fromkeys(hashes) if h)
            return [
                Problem(
                    "file_version",
                    f"file {name!r} has no version {sha256[:12]}…; its stored versions, newest "
                    f"first: {shown}",
                )
            ]
        return []

    def list_file_versions(self, name: str) -> list[dict[str, Any]]:
        """The stored versions of the file ``name``, newest first: the metadata of each, plus
        ``latest`` (the first) and ``pinned_by`` (the names of the tasks pinning its sha256).
        The same bytes appear twice after a rollback. NotFound when none is stored."""
        versions = self._versions_of(name)
        if not versions:
            raise NotFound(f"no stored file named {name!r}; upload it first")
        pins = self.file_pins(name)
        out = []
        for i, doc in enumerate(versions):
            meta = self._file_meta(doc)
            meta.update(latest=i == 0, pinned_by=pins.get(meta["sha256"], []))
            out.append(meta)
        return out

    def rollback_file(self, name: str, sha256: str, by: str, *, keep: int = 20) -> dict[str, Any]:
        """Make the stored version ``sha256`` of ``name`` the latest again: its bytes are stored
        as a new upload by ``by`` (marked ``rolled_back_from`` the version that was latest),
        so the latest stays the newest upload and the history shows the rollback. Returns the
        new version's metadata. NotFound: no such version; Conflict: it is the latest already."""
        versions = self._versions_of(name)
        if not versions:
            raise NotFound(f"no stored file named {name!r}; upload it first")
        current = (versions[0].get("metadata") or {}).get("sha256")
        if current == sha256:
            raise Conflict(f"version {sha256[:12]} is already the latest version of {name!r}")
        target = next(
            (d for d in versions if (d.get("metadata") or {}).get("sha256") == sha256), None
        )
        if target is None:
            raise NotFound(
                f"file {name!r} has no stored version {sha256}; "
                "list them with `cloudtask file versions NAME`"
            )
        data = self._guard(lambda: self.fs.get(target["_id"]).read(), "read the file")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"the stored bytes of {name!r} {sha256[:12]} do not match its sha256")
        return self._add_file_version(name, data, by, keep, rolled_back_from=current)


def released_fields(by: str | None, reason: str) -> dict[str, Any]:
    """What a claim handed back unstarted carries: still ``queued``, with no agent, for the
    task's owner to take over (see :meth:`Store.take_pending_run`)."""
    return {
        "status": "queued",
        "agent": None,
        "session": None,
        "token_hash": None,
        "released_by": by,
        "error": f"released: {reason}; not started there",
    }


def lost_fields(doc: dict[str, Any], reason: str, now: datetime) -> dict[str, Any]:
    """What a run whose agent went silent while it ran carries: ``lost``, finished ``now``."""
    now = to_bson_time(now)
    started = doc.get("started_at") or doc.get("claimed_at") or now
    return {
        "status": "lost",
        "error": reason,
        "finished_at": now,
        "duration": round(max(0.0, (now - started).total_seconds()), 3),
    }


def new_run_document(
    *,
    task_id: str,
    task_name: str,
    group: str,
    revision: int,
    scheduled_for: datetime,
    slot: str,
    attempt: int,
    trigger: str,
    agent: str | None,
    status: str,
    now: datetime,
    token_hash: str | None = None,
    session: str | None = None,
) -> dict[str, Any]:
    """A run document as an agent inserts it to claim a fire (see :meth:`Store.claim_runs`).

    A fire recorded without running (``skipped``, ``missed``) is finished at once, so it
    expires with the other finished runs.
    """
    claimed_at = to_bson_time(now)
    scheduled_for = to_bson_time(scheduled_for)
    done = status in FINISHED_STATUSES
    return {
        "_id": new_id(),
        "version": SCHEMA_VERSION,
        "task_id": task_id,
        "task_name": task_name,
        "group": group,
        "revision": revision,
        "scheduled_for": scheduled_for,
        # the same instant in epoch seconds: ranges over numbers are fast on every server
        # (the dashboard's and the lists' counts use it)
        "ts": scheduled_for.timestamp(),
        "slot": slot,
        "attempt": attempt,
        "trigger": trigger,
        "agent": agent,
        "session": session,
        "status": status,
        "claimed_at": claimed_at,
        "started_at": None,
        "finished_at": claimed_at if done else None,
        "duration": 0.0 if done else None,
        "exit_code": None,
        "output_tail": "",
        "error": None,
        "token_hash": token_hash,
    }

"""MongoDB store: all of CloudTask's persistent state, behind one object.

:class:`Store` is a thin facade: each concern lives in a module of its own, as a mixin over
:class:`~cloudtask.store.base.StoreBase` (the connection, the collections, the error guard):

==============  ==========================================================================
``schema``      indexes of every collection, and the changes older data needs
``tasks``       task specs and revisions
``runs``        claims and run writes (the once-only protocol), run reads, retention
``waiting``     manual runs and released claims, waiting for an agent
``history``     what finished runs leave on their tasks (``last_run``, failure streaks)
``reports``     progress and results posted by http-task services
``leases``      named leases (the keepalive protocol)
``events``      events and the audit log
``agents``      agents as the leading center saw them
``files``       task files in GridFS, in versions
``users``       user accounts and API tokens (the rules are :mod:`cloudtask.users`')
``queries``     the list and count queries of the pages and the API
``alerts``      the notifier's state: deliveries, alert throttles, notification settings
``plans``       plans from other systems: their items, queued per type, and idempotency keys
``pools``       concurrency pools: their sizes (the places are in ZooKeeper)
``calendars``   calendars (dates, weekdays) and blackout windows, and their change counter
==============  ==========================================================================

Nothing outside this package touches a collection (``tests/test_layout.py`` checks it). The
pure rules the store applies live below it: :mod:`cloudtask.runmodel` (statuses, the run
document, what a finished run means), :mod:`cloudtask.clock` (stored times) and
:mod:`cloudtask.archives` (what an uploaded archive may hold).

The store accepts a URI or a ready :class:`pymongo.MongoClient`, creates its indexes when it
is opened, and closes only a client it created itself. Every stored document carries a schema
``version``. Times are timezone-aware UTC (the client is opened with ``tz_aware=True``).

Example::

    store = Store("mongodb://127.0.0.1:27017", "cloudtask")
    task = store.create_task({"name": "hello", "schedule": {"every": "10s"}, "command": "true"})
    claimed = store.claim_runs([new_run_document(task_id=task["_id"], ...)])
"""

from __future__ import annotations

from ..clock import to_bson_time, utcnow
from ..config import Config
from ..events import event_document
from ..runmodel import (
    BEAT_INTERVAL,
    FINISHED_STATUSES,
    OUTPUT_TAIL_BYTES,
    RUNNING_STATUSES,
    SCHEMA_VERSION,
    lost_fields,
    new_id,
    new_run_document,
    released_fields,
)
from .agents import AgentRecords
from .alerts import AlertRecords
from .base import DUPLICATE_KEY, StoreBase, guard, indexed, nest_dotted, read_all
from .calendars import CalendarRecords
from .events import EventRecords
from .files import FileRecords
from .history import RunHistory
from .leases import Leases
from .plans import PlanRecords
from .pools import PoolRecords
from .queries import Page, PageQueries
from .reports import RunReports
from .runs import RunRecords
from .schema import Schema
from .secrets import SecretRecords
from .tasks import TaskRecords, all_revisions, first_call_budget, scan_tasks, task_pages
from .users import UserRecords
from .waiting import WaitingRuns

__all__ = [
    "BEAT_INTERVAL",
    "DUPLICATE_KEY",
    "FINISHED_STATUSES",
    "OUTPUT_TAIL_BYTES",
    "Page",
    "RUNNING_STATUSES",
    "SCHEMA_VERSION",
    "Store",
    "all_revisions",
    "event_document",
    "first_call_budget",
    "guard",
    "indexed",
    "lost_fields",
    "nest_dotted",
    "new_id",
    "new_run_document",
    "read_all",
    "released_fields",
    "scan_tasks",
    "task_pages",
    "to_bson_time",
    "utcnow",
]


class Store(
    TaskRecords,
    RunRecords,
    WaitingRuns,
    RunHistory,
    RunReports,
    Leases,
    EventRecords,
    AgentRecords,
    FileRecords,
    UserRecords,
    AlertRecords,
    SecretRecords,
    PlanRecords,
    PoolRecords,
    CalendarRecords,
    PageQueries,
    Schema,
    StoreBase,
):
    """All of CloudTask's persistent state, behind one object."""

    def _opened(self) -> None:
        guard(self.ensure_indexes, "create indexes")

    @classmethod
    def from_config(cls, cfg: Config) -> Store:
        return cls(
            cfg.mongodb.uri,
            cfg.mongodb.database,
            run_retention_days=cfg.runs.retention_days,
            claim_write_concern=cfg.mongodb.claim_write_concern,
        )

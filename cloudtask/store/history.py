"""What finished runs leave on their tasks and in the events: each task's ``last_run`` and
failure streak, and the run events (the rules are :mod:`cloudtask.runmodel`'s; this module
reads and writes what they need). Best effort: the runs are stored already, nothing here
raises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pymongo import UpdateOne
from pymongo.errors import BulkWriteError

from ..exceptions import StoreError
from ..runmodel import (
    finished_run_events,
    is_finished,
)
from .base import StoreBase, guard, nest_dotted, read_all

log = logging.getLogger("cloudtask.store")


class RunHistory(StoreBase):
    """Finished runs noted on their tasks, and their events."""

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
            if is_finished(d):
                by_task.setdefault(d["task_id"], []).append(d)
        if not by_task:
            return
        previous = self._previous_last_runs(list(by_task))
        events: list[dict[str, Any]] = []
        ops = []
        for task_id, runs in by_task.items():
            known = None if previous is None else previous.get(task_id) or {}
            last_run, made = finished_run_events(known, runs)
            events += made
            ops.append(UpdateOne({"_id": task_id}, {"$set": {"last_run": last_run}}))
        if events:
            self._record_run_events(events)
        try:
            guard(self.tasks.bulk_write, "note last runs", ops, ordered=False)
        except (StoreError, BulkWriteError) as e:
            log.warning("cannot note the last runs on their tasks: %s", e)

    def _previous_last_runs(self, task_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """task id -> its stored ``last_run`` and ``spec.notify.on``; None if MongoDB did not
        answer."""
        try:
            cursor = self.tasks.find(
                {"_id": {"$in": task_ids}}, {"last_run": 1, "spec.notify.on": 1}
            )
            found = read_all(cursor, "read the tasks' last runs")
        except (StoreError, BulkWriteError) as e:
            log.warning("cannot read the last runs of the tasks (no recovery events): %s", e)
            return None
        return {d["_id"]: nest_dotted(d) for d in found}

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

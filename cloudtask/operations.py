"""Changes made by people, the same from the web site, the REST API and the CLI.

Every change goes through :class:`Operations`, which validates it (the task model), stores it,
signals the cluster (ZooKeeper, when there is one) and writes an audit entry: who, what, when,
and the task's definition before and after.

``actor`` names who acts: a user name for the web site and the API, ``cli:<login>`` for the
command line.
"""

from __future__ import annotations

import copy
from typing import Any

from .exceptions import Conflict, NotFound, Problem, ValidationError
from .runmodel import RUNNING_STATUSES
from .store import Store
from .task import TaskSpec, parse_task
from .zkpaths import ZkPaths, request_kill, run_signal


def find_task(store: Store, name_or_id: str) -> dict[str, Any]:
    try:
        return store.get_task_by_name(name_or_id)
    except NotFound:
        return store.get_task(name_or_id)


class Operations:
    """Validated, audited changes. ``zk`` is None without a cluster (standalone agents):
    then a running run cannot be killed, everything else works the same."""

    def __init__(self, store: Store, zk: Any = None, paths: ZkPaths | None = None) -> None:
        self.store = store
        self.zk = zk
        self.paths = paths or ZkPaths()

    # --- tasks ------------------------------------------------------------------------------

    def _checked(self, data: dict[str, Any], before: dict[str, Any] | None) -> TaskSpec:
        """The task ``data`` parsed, and its file reference checked when it is new or changed
        (``before``: the stored spec): a task never saved pointing at a file or a version that
        is not stored. A task whose file went away later can still be changed otherwise."""
        spec = parse_task(data)
        old = (before or {}).get("spec") or {}
        changed = (spec.file, spec.file_version) != (old.get("file"), old.get("file_version"))
        if spec.file and changed:
            problems = self.store.file_reference_problems(spec.file, spec.file_version)
            if problems:
                raise ValidationError(problems)
        return spec

    def create_task(self, actor: str, data: dict[str, Any]) -> dict[str, Any]:
        doc = self.store.create_task(self._checked(data, None))
        self.store.add_audit(
            actor, "task.create", _target(doc), None, doc["spec"], task_id=doc["_id"]
        )
        return doc

    def replace_task(
        self,
        actor: str,
        task_id: str,
        data: dict[str, Any],
        expected_revision: int | None = None,
    ) -> dict[str, Any]:
        before = self.store.get_task(task_id)
        spec = self._checked(data, before)
        doc = self.store.replace_task(task_id, spec, expected_revision=expected_revision)
        self.store.add_audit(
            actor, "task.update", _target(doc), before["spec"], doc["spec"], task_id=doc["_id"]
        )
        return doc

    def patch_task(
        self,
        actor: str,
        task_id: str,
        changes: dict[str, Any],
        expected_revision: int | None = None,
    ) -> dict[str, Any]:
        """Change some top-level keys of a task's definition (a JSON merge of one level)."""
        if not isinstance(changes, dict):
            raise ValidationError(
                [Problem("", "a patch is a JSON object of the keys to change")], source="the patch"
            )
        current = self.store.get_task(task_id)
        spec = copy.deepcopy(current["spec"])
        spec.pop("version", None)
        spec.update(changes)
        return self.replace_task(actor, task_id, spec, expected_revision)

    def _named(self, data: dict[str, Any]) -> dict[str, Any] | None:
        name = data.get("name") if isinstance(data, dict) else None
        if isinstance(name, str):
            try:
                return self.store.get_task_by_name(name)
            except NotFound:
                pass
        return None

    def check_apply(self, data: dict[str, Any]) -> None:
        """Raise ValidationError if :meth:`apply_task` would refuse ``data`` (checks every task
        of an ``apply`` before any is stored)."""
        self._checked(data, self._named(data))

    def apply_task(self, actor: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Create or update the task named in ``data`` (``cloudtask apply``)."""
        before = self._named(data)
        self._checked(data, before)
        outcome, doc = self.store.apply_task(data)
        if outcome != "unchanged":
            self.store.add_audit(
                actor,
                "task.create" if outcome == "created" else "task.update",
                _target(doc),
                before["spec"] if before else None,
                doc["spec"],
                task_id=doc["_id"],
            )
        return outcome, doc

    def set_enabled(self, actor: str, task_id: str, enabled: bool) -> dict[str, Any]:
        before = self.store.get_task(task_id)
        if bool(before.get("enabled")) == enabled:
            return before
        doc = self.store.set_task_enabled(task_id, enabled)
        action = "task.resume" if enabled else "task.pause"
        self.store.add_audit(
            actor, action, _target(doc), before["spec"], doc["spec"], task_id=doc["_id"]
        )
        return doc

    def clone_task(self, actor: str, task_id: str, new_name: str) -> dict[str, Any]:
        """A copy of a task under a new name, created paused so it does not fire twice."""
        source = self.store.get_task(task_id)
        spec = copy.deepcopy(source["spec"])
        spec.pop("version", None)
        spec.update(name=new_name, enabled=False)
        doc = self.store.create_task(spec)
        self.store.add_audit(
            actor,
            "task.clone",
            _target(doc),
            {"from": source["name"]},
            doc["spec"],
            task_id=doc["_id"],
        )
        return doc

    def delete_task(
        self, actor: str, task_id: str, kill_running: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """Delete a task. Its running runs finish, or are killed with ``kill_running``.
        Returns the deleted task and the ids of the runs asked to be killed."""
        task = self.store.get_task(task_id)
        running = self.store.list_runs(
            task_id=task["_id"], status=list(RUNNING_STATUSES), limit=10_000
        )
        self.store.delete_task(task["_id"])
        self.store.add_audit(
            actor, "task.delete", _target(task), task["spec"], None, task_id=task["_id"]
        )
        killed = []
        if kill_running:
            for run in running:
                try:
                    self._kill(run, f"the task was deleted by {actor}")
                except Conflict:
                    continue
                killed.append(run["_id"])
        return task, killed

    # --- runs -------------------------------------------------------------------------------

    def run_now(self, actor: str, task_id: str) -> dict[str, Any]:
        """Ask for one run of the task now. The run is stored at once (``queued``, no agent);
        the agent that owns the task (or, for a paused task, any agent of its group) takes it."""
        task = self.store.get_task(task_id)
        spec = parse_task(task["spec"])
        if spec.schedule.keepalive:
            raise Conflict(
                f"task {task['name']!r} is a keepalive service: it runs all the time; "
                "pause and resume it to restart it"
            )
        run = self.store.request_manual_run(task, requested_by=actor)
        self.store.add_audit(actor, "task.run", _target(task), None, {"run_id": run["_id"]})
        if self.zk is not None:
            try:
                run_signal(self.zk, self.paths)()
            except Exception:  # agents also look every poll_interval
                pass
        return run

    def kill_run(self, actor: str, run_id: str) -> dict[str, Any]:
        """Kill a run (its whole process tree), or cancel a manual run no agent took yet."""
        run = self.store.get_run(run_id)
        self._kill(run, f"killed by {actor}")
        self.store.add_audit(
            actor, "run.kill", f"run:{run_id}", {"status": run["status"]}, {"requested": True}
        )
        return run

    def _kill(self, run: dict[str, Any], reason: str) -> None:
        if run["status"] not in RUNNING_STATUSES:
            raise Conflict(f"run {run['_id']} is not running (it is {run['status']})")
        if run.get("agent") is None:
            if self.store.cancel_pending_run(run["_id"], reason):
                return
            run = self.store.get_run(run["_id"])  # an agent took it meanwhile
            if run["status"] not in RUNNING_STATUSES:
                raise Conflict(f"run {run['_id']} is not running (it is {run['status']})")
        if self.zk is None:
            raise Conflict(
                "killing a running run needs the cluster (ZooKeeper): "
                "this web site or command has no zookeeper.hosts configured"
            )
        request_kill(self.zk, self.paths, run["agent"], run["_id"], reason)


def _target(task: dict[str, Any]) -> str:
    return f"task:{task['name']}"

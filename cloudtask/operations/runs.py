"""Run requests: run a task now, kill a run (its whole process tree) or cancel one no agent
has taken yet."""

from __future__ import annotations

from typing import Any

from ..exceptions import Conflict
from ..runmodel import RUNNING_STATUSES
from ..task import parse_task
from ..zkpaths import request_kill
from .base import OperationsBase, task_target


class RunOperations(OperationsBase):
    def run_now(self, actor: str, task_id: str) -> dict[str, Any]:
        """Ask for one run of the task now. The run is stored at once (``queued``, no agent);
        the agent that owns the task (or, for a paused task, any agent of its group) takes it."""
        task = self.store.get_task(task_id)
        if parse_task(task["spec"]).schedule.keepalive:
            raise Conflict(
                f"task {task['name']!r} is a keepalive service: it runs all the time; "
                "pause and resume it to restart it"
            )
        run = self.store.request_manual_run(task, requested_by=actor)
        self.audit(actor, "task.run", task_target(task), None, {"run_id": run["_id"]})
        self._signal("runs")
        return run

    def kill_run(self, actor: str, run_id: str) -> dict[str, Any]:
        """Kill a run (its whole process tree), or cancel a manual run no agent took yet."""
        run = self.store.get_run(run_id)
        self._kill(run, f"killed by {actor}")
        self.audit(
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

"""Run requests: run a task now, kill a run (its whole process tree) or cancel one no agent
has taken yet."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ..clock import utcnow
from ..exceptions import Conflict, Problem, ValidationError
from ..runmodel import RUNNING_STATUSES
from ..schedules import parse_instant
from ..store.calendars import preview_fires
from ..task import parse_task
from ..zkpaths import request_kill
from .base import OperationsBase, task_target


class RunOperations(OperationsBase):
    def run_now(
        self, actor: str, task_id: str, env: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Ask for one run of the task now. The run is stored at once (``queued``, no agent);
        the agent that owns the task (or, for a paused task, any agent of its group) takes it.
        ``env``: the run's parameters, environment values on top of the task's own (checked
        like the task's env: ValidationError at ``env.NAME``)."""
        task = self.store.get_task(task_id)
        spec = parse_task(task["spec"])
        if spec.schedule.keepalive:
            raise Conflict(
                f"task {task['name']!r} is a keepalive service: it runs all the time; "
                "pause and resume it to restart it"
            )
        params = _params(task["spec"], env, http=spec.http is not None) if env else None
        run = self.store.request_manual_run(task, requested_by=actor, env=params)
        after = {"run_id": run["_id"], **({"env": params} if params else {})}
        self.audit(actor, "task.run", task_target(task), None, after)
        self._signal("runs")
        return run

    def backfill(self, actor: str, task_id: str, start: Any, end: Any) -> dict[str, Any]:
        """Queue a run for each of the task's fire times from ``start`` to ``end`` (both
        included; at most MAX_BACKFILL), each under its own fire time, so a fire that ran
        already is not run again. Returns ``{queued, existing, first, last}``."""
        task = self.store.get_task(task_id)
        spec = parse_task(task["spec"])
        problems = []
        if spec.schedule.keepalive or spec.schedule.after is not None:
            problems.append(Problem("schedule", "backfill takes a task with fire times"))
        if spec.mode == "all":
            problems.append(Problem("mode", "backfill runs tasks of mode one (one run a fire)"))
        first = last = None
        for key, value in (("start", start), ("end", end)):
            try:
                moment = parse_instant(value)
            except ValueError as e:
                problems.append(Problem(key, str(e)))
                continue
            first, last = (moment, last) if key == "start" else (first, moment)
        if first is not None and last is not None and last < first:
            problems.append(Problem("end", "must not be before start"))
        if last is not None and last > utcnow():
            problems.append(Problem("end", "is in the future: the schedule runs those fires"))
        if problems:
            raise ValidationError(problems)
        assert first is not None and last is not None
        since = first - timedelta(microseconds=1)  # (a calendar rule's dates left out)
        fires = [
            f for f, _ in preview_fires(self.store, spec, since, MAX_BACKFILL + 1) if f <= last
        ]
        if len(fires) > MAX_BACKFILL:
            raise ValidationError(
                [Problem("end", f"more than {MAX_BACKFILL} fires: backfill a shorter range")]
            )
        queued, existing = self.store.backfill_runs(task, fires, requested_by=actor)
        result = {
            "queued": queued,
            "existing": existing,
            "first": fires[0] if fires else None,
            "last": fires[-1] if fires else None,
        }
        self.audit(
            actor,
            "task.backfill",
            task_target(task),
            None,
            {"start": first.isoformat(), "end": last.isoformat(), "queued": queued},
        )
        if queued:
            self._signal("runs")
        return result

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


MAX_BACKFILL = 1000  # fires one backfill may queue


def _params(spec: dict[str, Any], env: Any, *, http: bool) -> dict[str, str]:
    """A manual run's parameters, checked like the task's env (paths ``env.NAME``)."""
    if http:
        raise ValidationError(
            [Problem("env", "an http task has no environment: parameters are for commands")]
        )
    if not isinstance(env, dict):
        raise ValidationError([Problem("env", "expected an object of NAME: value strings")])
    problems = [
        Problem(f"env.{name}", "expected a string (a parameter is a plain value)")
        for name, value in env.items()
        if not isinstance(value, str)
    ]
    if problems:
        raise ValidationError(problems)
    merged = dict(spec, env={**(spec.get("env") or {}), **env})
    merged.pop("version", None)
    try:
        parse_task(merged)
    except ValidationError as e:
        mine = [p for p in e.problems if p.path == "env" or p.path.startswith("env.")]
        raise ValidationError(mine or e.problems) from None
    return dict(env)

"""Fan-in dependencies, as people see them: what an after task waits for, its parents and
children, and the check that refuses a cycle when a task is saved. The firing itself is the
leader's (cloudtask/center/fanin.py)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from .clock import stored_time, utcnow
from .exceptions import Problem
from .schedules import AfterSchedule, parse_schedule

LOOKBACK = timedelta(days=2)  # parent runs read back this far


def after_schedule(spec: dict[str, Any]) -> AfterSchedule | None:
    """The after schedule of a stored spec, or None."""
    raw = spec.get("schedule") if isinstance(spec, dict) else None
    if not isinstance(raw, dict) or "after" not in raw:
        return None
    schedule, problems = parse_schedule(raw)
    return schedule.after if schedule is not None and not problems else None


def cycle_problems(
    name: str, parents: tuple[str, ...], others: dict[str, tuple[str, ...]], known: set[str]
) -> list[Problem]:
    """Why task ``name`` may not run after ``parents``: a parent that is no task, or a cycle
    through the other tasks' after schedules (``others``: name -> its parents)."""
    problems = [
        Problem(f"schedule.after[{i}]", f"no task named {p!r}")
        for i, p in enumerate(parents)
        if p not in known and p != name
    ]
    graph = {**others, name: parents}
    for i, parent in enumerate(parents):
        path = _path(parent, name, graph)
        if path is not None:
            chain = " -> ".join([name, *path])
            problems.append(Problem(f"schedule.after[{i}]", f"a cycle: {chain}"))
    return problems


def _path(start: str, goal: str, graph: dict[str, tuple[str, ...]]) -> list[str] | None:
    """The chain of parents from ``start`` up to ``goal`` (start waits for ... waits for
    goal), or None."""
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        if node == goal:
            return path
        if node in seen:
            continue
        seen.add(node)
        for parent in graph.get(node, ()):
            stack.append((parent, [*path, parent]))
    return None


def dependency_status(store: Any, spec: dict[str, Any], now: datetime | None = None) -> dict:
    """What an after task waits for, for people: ``{"parents": [{name, state, run_id}],
    "date": the latest logical date any parent ran for, "summary": "waiting for B" | "held:
    B failed" | "every parent succeeded"}``; ``{}`` for a task without an after schedule."""
    after = after_schedule(spec)
    if after is None:
        return {}
    now = now or utcnow()
    found = store.tasks_by_names(list(after.parents))
    ids = {name: found[name]["_id"] for name in after.parents if name in found}
    runs = store.parent_runs(list(ids.values()), now - LOOKBACK, now) if ids else []
    days = [after.logical_date(stored_time(r["scheduled_for"])) for r in runs]
    latest = max(days, default=None)
    parents = []
    for name in after.parents:
        if name not in found:
            parents.append({"name": name, "task_id": None, "state": "gone", "run_id": None})
            continue
        state = "paused" if not found[name].get("enabled", True) else "waiting"
        mine = [
            r for r, d in zip(runs, days, strict=True) if r["task_id"] == ids[name] and d == latest
        ]
        mine.sort(key=lambda r: (stored_time(r["scheduled_for"]), r.get("attempt", 0)))
        run_id = None
        if any(r["status"] == "succeeded" for r in mine):
            state, run_id = "succeeded", next(r["_id"] for r in mine if r["status"] == "succeeded")
        elif mine:
            state, run_id = mine[-1]["status"], mine[-1]["_id"]
        parents.append({"name": name, "task_id": ids[name], "state": state, "run_id": run_id})
    failing = [p["name"] for p in parents if p["state"] in ("failed", "timed_out", "lost")]
    waiting = [p["name"] for p in parents if p["state"] != "succeeded"]
    if failing:
        summary = "held: " + ", ".join(f"{n} failed" for n in failing)
    elif waiting:
        summary = "waiting for " + ", ".join(waiting)
    else:
        summary = "every parent succeeded"
    return {
        "parents": parents,
        "date": latest.isoformat() if latest else None,
        "summary": summary,
        "within": after.within,
    }

"""Task changes: create, replace, patch, apply (by name), pause and resume, clone, delete.

A task's definition is parsed once, here (:func:`~cloudtask.task.parse_task`), and the store
is handed the parsed spec. A new or changed file reference is checked against the stored files,
so no task is saved pointing at a file or a version that is not stored (a task whose file went
away later can still be changed otherwise). A new or changed reference to a stored secret
(``{"secret": NAME}`` in ``env``, ``http.headers``, ``http.body``) is checked the same way:
a name that is not stored is refused at its path (``env.PGPASSWORD: no secret named 'x'``),
from the site, the API and ``cloudtask apply`` alike. :func:`task_warnings` says what is
stored but should not be (a credential-named header given in clear).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

from ..clock import utcnow
from ..dependencies import cycle_problems
from ..exceptions import Conflict, NotFound, Problem, ValidationError
from ..runmodel import GOING_STATUSES
from ..schedules import parse_schedule
from ..task import TaskSpec, clear_credentials, parse_task, secret_ref
from ..taskdiff import APPLY_SOURCE, after_parents, parents_first, stored_canonical
from .base import task_target
from .calendars import calendar_problems
from .runs import RunOperations

Applied = Literal["created", "updated", "unchanged"]


def secret_paths(spec: TaskSpec) -> dict[str, str]:
    """Where a spec names stored secrets: path (``env.X``, ``http.headers.H``, ``http.body``)
    -> the secret's name."""
    out = {f"env.{var}": name for var, name in spec.secret_env.items()}
    if spec.http is not None:
        out.update({f"http.headers.{h}": name for h, name in spec.http.secret_headers.items()})
        if spec.http.body_secret:
            out["http.body"] = spec.http.body_secret
    return out


def stored_secret_paths(spec: dict[str, Any]) -> dict[str, str]:
    """:func:`secret_paths` of a stored (canonical) spec, read without parsing it."""
    out: dict[str, str] = {}
    http = spec.get("http") if isinstance(spec.get("http"), dict) else {}
    places = (("env", spec.get("env")), ("http.headers", http.get("headers")))
    for where, values in places:
        for key, value in (values or {}).items() if isinstance(values, dict) else ():
            if name := secret_ref(value):
                out[f"{where}.{key}"] = name
    if name := secret_ref(http.get("body")):
        out["http.body"] = name
    return out


def task_warnings(spec: dict[str, Any] | TaskSpec) -> list[Problem]:
    """What a task holds that it should not (not errors: it is stored): headers named like
    credentials given in clear, which every viewer of the task sees."""
    try:
        return clear_credentials(spec if isinstance(spec, TaskSpec) else parse_task(spec))
    except ValidationError:
        return []


class TaskOperations(RunOperations):
    """Task changes (deleting one may kill its runs: a run operation)."""

    def _checked(
        self,
        data: dict[str, Any] | TaskSpec,
        before: dict[str, Any] | None,
        batch: dict[str, tuple[str, ...]] | None = None,
    ) -> TaskSpec:
        """``data`` parsed, once. When its schedule is new or changed (``before``: the stored
        task), an instant already past is refused; when its file reference is, the file (and
        the pinned version) must be stored. ``batch``: the tasks applied with it (name -> the
        parents it runs after), taken as stored for its after schedule."""
        spec = data if isinstance(data, TaskSpec) else parse_task(data)
        old = stored_canonical(before["spec"]) if before and before.get("spec") else {}
        schedule = spec.to_dict().get("schedule")
        problems = []
        if schedule != old.get("schedule"):
            problems += parse_schedule(schedule, "schedule", now=utcnow())[1]
        if spec.file and (spec.file, spec.file_version) != (
            old.get("file"),
            old.get("file_version"),
        ):
            problems += self.store.file_reference_problems(spec.file, spec.file_version)
        problems += self._secret_problems(spec, old)
        problems += self._after_problems(spec, old, batch)
        problems += calendar_problems(self.store, spec, old)
        if spec.pool and spec.pool != old.get("pool") and not self.store.pool_names([spec.pool]):
            problems.append(
                Problem("pool", f"no pool named {spec.pool!r} (cloudtask pool set NAME SIZE)")
            )
        if problems:
            raise ValidationError(problems)
        return spec

    def _after_problems(
        self, spec: TaskSpec, old: dict[str, Any], batch: dict[str, tuple[str, ...]] | None = None
    ) -> list[Problem]:
        """An after schedule (fan-in) new or changed: each parent must be a task (or one of
        ``batch``), and no parent may wait (through others) for this task."""
        after = spec.schedule.after
        if after is None or spec.to_dict().get("schedule") == old.get("schedule"):
            return []
        graph = self.store.after_graph()
        for name, parents in (batch or {}).items():  # the batch's schedules replace the stored
            graph[name] = parents
        graph.pop(old.get("name", spec.name), None)
        known = set(self.store.tasks_by_names(list(after.parents))) | set(batch or ())
        return cycle_problems(spec.name, after.parents, graph, known)

    def _secret_problems(self, spec: TaskSpec, old: dict[str, Any]) -> list[Problem]:
        """A problem at each new or changed reference to a secret that is not stored."""
        before = stored_secret_paths(old)
        new = {p: n for p, n in secret_paths(spec).items() if before.get(p) != n}
        if not new:
            return []
        stored = self.store.stored_secret_names(new.values())
        return [
            Problem(
                path,
                f"no secret named {name!r} (store it first: the Secrets page, "
                "PUT /api/v1/secrets/NAME or cloudtask secrets set)",
            )
            for path, name in sorted(new.items())
            if name not in stored
        ]

    def create_task(self, actor: str, data: dict[str, Any] | TaskSpec) -> dict[str, Any]:
        """Store a new task; ValidationError, or Conflict (with the problem at ``name``)
        when the name is taken."""
        doc = self.store.create_task(self._checked(data, None))
        self._signal("tasks")  # the change is stored: tell the leader first
        self.audit(actor, "task.create", task_target(doc), None, doc["spec"], doc["_id"])
        return doc

    def replace_task(
        self,
        actor: str,
        task_id: str,
        data: dict[str, Any] | TaskSpec,
        expected_revision: int | None = None,
        *,
        current: dict[str, Any] | None = None,
        action: str = "task.update",
    ) -> dict[str, Any]:
        """Replace a task's definition (``current``: the task as just read, to spare a read);
        Conflict when it changed meanwhile (``expected_revision``) or the name is taken."""
        before = current if current is not None else self.store.get_task(task_id)
        spec = self._checked(data, before)
        doc = self.store.replace_task(
            task_id, spec, expected_revision=expected_revision, current=before
        )
        self._signal("tasks")  # the change is stored: tell the leader first
        self.audit(actor, action, task_target(doc), before["spec"], doc["spec"], doc["_id"])
        return doc

    def _mark_source(self, doc: dict[str, Any], source: str) -> None:
        """Record what wrote a task (``apply``: ``cloudtask apply --prune`` may delete it).
        A second write: a process that dies before it leaves the task unmarked, so never
        pruned, the safe side."""
        if self.store.set_task_source(doc["_id"], doc["revision"], source):
            doc["source"] = source

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
        return self.replace_task(actor, task_id, spec, expected_revision, current=current)

    def _named(self, data: Any) -> dict[str, Any] | None:
        name = data.get("name") if isinstance(data, dict) else None
        if isinstance(name, str):
            try:
                return self.store.get_task_by_name(name)
            except NotFound:
                pass
        return None

    def check_apply(
        self, data: dict[str, Any], batch: dict[str, tuple[str, ...]] | None = None
    ) -> None:
        """Raise ValidationError if :meth:`apply_task` would refuse ``data`` once the tasks
        of ``batch`` (:func:`~cloudtask.taskdiff.after_parents`) are applied before it."""
        self._checked(data, self._named(data), batch)

    def apply_task(self, actor: str, data: dict[str, Any]) -> tuple[Applied, dict[str, Any]]:
        """Create or update the task named in ``data`` (a task file): ``created``, ``updated``
        or ``unchanged`` (the same definition, both sides in canonical form: nothing is
        written), and the task. A task it creates or changes is marked ``source: "apply"``
        (:mod:`cloudtask.taskdiff`: ``cloudtask apply --prune`` deletes only such tasks)."""
        before = self._named(data)
        spec = self._checked(data, before)
        if before is None:
            doc = self.create_task(actor, spec)
            self._mark_source(doc, APPLY_SOURCE)
            return "created", doc
        if spec.to_dict() == stored_canonical(before["spec"]):
            return "unchanged", before
        doc = self.replace_task(actor, before["_id"], spec, current=before)
        if doc.get("source") != APPLY_SOURCE:
            self._mark_source(doc, APPLY_SOURCE)
        return "updated", doc

    def apply_tasks(
        self, actor: str, tasks: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[tuple[Applied, str]]:
        """Apply task files (``(source, data)`` each): all are checked first, so one bad
        file stores none (its problems name the file); a task runs after parents of the
        batch is applied after them. Returns (outcome, task name) each."""
        batch = after_parents(data for _, data in tasks)
        for source, data in tasks:
            try:
                self.check_apply(data, batch)
            except ValidationError as e:
                raise ValidationError(e.problems, source=source) from None
        results = []
        for source, data in parents_first(tasks, batch, lambda t: t[1]["name"]):
            try:
                outcome, doc = self.apply_task(actor, data)
            except ValidationError as e:
                raise ValidationError(e.problems, source=source) from None
            results.append((outcome, doc["name"]))
        return results

    def set_enabled(self, actor: str, task_id: str, enabled: bool) -> dict[str, Any]:
        """Pause or resume a task (a no-op when it is so already)."""
        before = self.store.get_task(task_id)
        if bool(before.get("enabled")) == enabled:
            return before
        spec = parse_task(dict(before["spec"], enabled=enabled))
        action = "task.resume" if enabled else "task.pause"
        return self.replace_task(actor, task_id, spec, current=before, action=action)

    def clone_task(
        self, actor: str, task_id: str, new_name: str, changes: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A copy of a task under a new name, created paused so it does not fire twice
        (unless ``changes``, top-level keys of the spec to change as a patch does, says
        ``enabled``)."""
        if changes is not None and not isinstance(changes, dict):
            raise ValidationError(
                [Problem("changes", "a JSON object of the keys to change")], source="the clone"
            )
        source = self.store.get_task(task_id)
        spec = copy.deepcopy(source["spec"])
        spec.pop("version", None)
        spec["enabled"] = False
        spec.update(changes or {})
        spec["name"] = new_name
        doc = self.store.create_task(self._checked(spec, None))  # a clone is a new task
        self._signal("tasks")  # the change is stored: tell the leader first
        self.audit(
            actor, "task.clone", task_target(doc), {"from": source["name"]}, doc["spec"], doc["_id"]
        )
        return doc

    def delete_task(
        self, actor: str, task_id: str, kill_running: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """Delete a task. Its running runs finish, or are killed with ``kill_running``.
        Returns the deleted task and the ids of the runs asked to be killed."""
        task = self.store.get_task(task_id)
        running = self.store.list_runs(
            task_id=task["_id"], status=list(GOING_STATUSES), limit=10_000
        )
        self.store.delete_task(task["_id"])
        self._signal("tasks")  # the change is stored: tell the leader first
        self.audit(actor, "task.delete", task_target(task), task["spec"], None, task["_id"])
        killed = []
        if kill_running:
            for run in running:
                try:
                    self._kill(run, f"the task was deleted by {actor}")
                except Conflict:
                    continue
                killed.append(run["_id"])
        return task, killed

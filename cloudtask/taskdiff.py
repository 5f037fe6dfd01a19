"""Tasks as code: what ``cloudtask apply`` would do with task files, and field-level diffs.

A plan compares each task of the files with the stored task of the same name, both in the
task model's canonical form (:func:`canonical`: parsed, then written back by
:meth:`~cloudtask.task.TaskSpec.to_dict`), so a key left out of a file and the same key
stored at its default compare equal, and a stored spec written before a field existed gains
that field at its default. Only the spec is compared: ids, revisions, timestamps and what
runs record (``last_run``, ``done_at``) are the task's state, not its definition.

Each task of the files is ``create`` (no task has its name), ``change`` (with the fields that
differ, by path: ``schedule.cron``, ``env.PGHOST``, ``http.headers.Accept``) or
``unchanged``. With prune, a stored task that the files do not name is ``delete`` when
``cloudtask apply`` (or ``cloudtask up``) created or last changed it (the task document's
``source`` is ``"apply"``, :data:`APPLY_SOURCE`) and its group is one the files use or one
named with ``--prune-group``; a task made on the site, through the API or with
``cloudtask task`` commands, and any task of another group, is never deleted (they are
listed as ``kept``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .exceptions import ValidationError
from .task import parse_task

APPLY_SOURCE = "apply"  # a task document's ``source`` when apply created or changed it
ACTIONS = ("create", "change", "unchanged", "delete")
_ABSENT: Any = object()
T = TypeVar("T")


def canonical(spec: Any) -> dict[str, Any]:
    """A task spec (a file's task, or a stored spec) in canonical form; ValidationError if it
    does not parse. No instant is refused for being past: a stored one-shot that ran is still
    the same definition."""
    return parse_task(spec).to_dict()


def stored_canonical(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored spec in canonical form, or as stored when this version cannot read it (a
    newer version wrote it): it then differs from any file, and applying replaces it."""
    try:
        return canonical(spec)
    except ValidationError:
        return dict(spec)


def after_parents(tasks: Iterable[Any]) -> dict[str, tuple[str, ...]]:
    """name -> the parents it runs after (``()`` for a task without an after schedule), of
    valid task specs applied together."""
    out = {}
    for data in tasks:
        spec = parse_task(data)
        out[spec.name] = spec.schedule.after.parents if spec.schedule.after else ()
    return out


def parents_first(items: Sequence[T], graph: dict[str, tuple[str, ...]], name: Any) -> list[T]:
    """``items`` in their order, except that one comes after those of its after parents
    that are among them (``name(item)``: its task name); a cycle keeps the given order."""
    by_name = {name(item): item for item in items}
    out: list[T] = []
    placed: set[str] = set()

    def place(item: T, path: frozenset[str]) -> None:
        key = name(item)
        if key in placed or key in path:
            return
        for parent in graph.get(key, ()):
            if parent in by_name:
                place(by_name[parent], path | {key})
        if key not in placed:
            placed.add(key)
            out.append(item)

    for item in items:
        place(item, frozenset())
    return out


@dataclass(frozen=True)
class FieldChange:
    """One field that differs: its path (``schedule[1].every``) and both values (old or new
    is :data:`_ABSENT` when the key is on one side only)."""

    path: str
    old: Any
    new: Any

    def show(self, width: int = 72) -> str:
        return f"{self.path}: {show_value(self.old, width)} → {show_value(self.new, width)}"

    def to_json(self) -> dict[str, Any]:
        """``{"path", "old", "new"}``, without ``old`` or ``new`` where the key is absent."""
        sides = (("old", self.old), ("new", self.new))
        return {"path": self.path, **{k: v for k, v in sides if v is not _ABSENT}}


def show_value(value: Any, width: int = 72) -> str:
    """A value as JSON on one line, trimmed to ``width`` characters with an ellipsis."""
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, ensure_ascii=False, sort_keys=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def field_changes(old: Any, new: Any, path: str = "") -> list[FieldChange]:
    """The fields that differ between two JSON values, nested objects by their keys' paths,
    lists of objects of the same length by index; any other list is one value."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[FieldChange] = []
        for key in [*old, *(k for k in new if k not in old)]:
            where = f"{path}.{key}" if path else str(key)
            out += field_changes(old.get(key, _ABSENT), new.get(key, _ABSENT), where)
        return out
    if (
        isinstance(old, list)
        and isinstance(new, list)
        and len(old) == len(new)
        and all(isinstance(v, dict) for v in (*old, *new))
    ):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += field_changes(a, b, f"{path}[{i}]")
        return out
    return [FieldChange(path, old, new)]


def shown_changes(before: dict[str, Any], after: dict[str, Any]) -> list[FieldChange]:
    """:func:`field_changes` of two canonical specs as people may see them: credentials
    (a header or variable named like one, a URL's password) masked as the audit log masks
    them, a changed one reading ``*** (changed)``."""
    from .operations.audit import mask_pair

    shown_before, shown_after = mask_pair(before, after)
    changes = field_changes(shown_before, shown_after)
    if not changes:  # a credential changed and nothing else: still say where
        raw = field_changes(before, after)
        changes = [FieldChange(c.path, "***", "*** (changed)") for c in raw]
    return changes


@dataclass
class PlanItem:
    """What apply does with one task."""

    action: str  # one of ACTIONS
    name: str
    group: str
    source: str | None = None  # the file that names the task (None: a task to delete)
    data: dict[str, Any] | None = None  # the file's task, as written
    stored: dict[str, Any] | None = None  # the stored task document, if any
    changes: list[FieldChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what else it affects

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "name": self.name,
            "group": self.group,
            "changes": [c.to_json() for c in self.changes],
            "notes": list(self.notes),
        }


@dataclass
class Plan:
    """Every task the files name, in their order, then the tasks to delete (by name)."""

    items: list[PlanItem]
    kept: list[str] = field(default_factory=list)  # not named, not deleted (not apply's)
    prune_groups: tuple[str, ...] = ()

    def of(self, action: str) -> list[PlanItem]:
        return [i for i in self.items if i.action == action]

    @property
    def pending(self) -> list[PlanItem]:
        """The items that write, in the order they are applied: creates and changes in the
        files' order (a task after the parents it runs after), then deletes."""
        writes = [i for i in self.items if i.action in ("create", "change")]
        graph = after_parents(i.data for i in writes)
        ordered = parents_first(writes, graph, lambda i: i.name)
        return ordered + [i for i in self.items if i.action == "delete"]

    def summary(self) -> str:
        counts = {a: len(self.of(a)) for a in ACTIONS}
        words = [
            f"{counts['create']} to create",
            f"{counts['change']} to change",
            f"{counts['unchanged']} unchanged",
        ]
        if self.prune_groups:
            words.append(f"{counts['delete']} to delete")
        return "Plan: " + ", ".join(words)

    def lines(self, width: int = 72) -> list[str]:
        """The plan for people: a line per task, the changed fields under a change."""
        marks = {"create": "+", "change": "~", "unchanged": "=", "delete": "-"}
        out = []
        for item in self.items:
            where = f"  ({item.source})" if item.source and item.action == "create" else ""
            out.append(f"{marks[item.action]} {item.action:9} {item.name}{where}")
            out += [f"      {c.show(width)}" for c in item.changes]
            out += [f"      ! {note}" for note in item.notes]
        if self.kept:
            groups = ", ".join(self.prune_groups)
            out.append(
                f"  not deleted, though no file names them (not created or changed by apply; "
                f"group {groups}): {', '.join(self.kept)}"
            )
        out.append(self.summary())
        return out


def make_plan(
    store: Any,
    tasks: Sequence[tuple[str, dict[str, Any]]],
    *,
    prune: bool = False,
    prune_groups: Iterable[str] = (),
) -> Plan:
    """The plan for task files (``(source, data)`` each, already valid): one read of the
    stored tasks they name, and with ``prune`` one read of the groups in scope."""
    names = [data["name"] for _, data in tasks]
    ids = {name: doc["_id"] for name, doc in store.tasks_by_names(names).items()}
    stored = {doc["name"]: doc for doc in store.get_tasks(list(ids.values()))} if ids else {}
    items = []
    for source, data in tasks:
        wanted = canonical(data)
        doc = stored.get(data["name"])
        item = PlanItem("create", wanted["name"], wanted["group"], str(source), data, doc)
        if doc is not None:
            before = stored_canonical(doc["spec"])
            if before == wanted:
                item.action = "unchanged"
            else:
                item.action = "change"
                item.changes = shown_changes(before, wanted)
        items.append(item)
    plan = Plan(items)
    if prune:
        scope = sorted({i.group for i in items} | set(prune_groups))
        plan.prune_groups = tuple(scope)
        named = set(names)
        for doc in sorted(store.list_tasks(groups=scope), key=lambda d: d["name"]):
            if doc["name"] in named:
                continue
            if doc.get("source") == APPLY_SOURCE:
                plan.items.append(PlanItem("delete", doc["name"], doc["group"], stored=doc))
            else:
                plan.kept.append(doc["name"])
        _note_orphans(store, plan, tasks)
    return plan


def _note_orphans(store: Any, plan: Plan, tasks: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """A task to delete that others still run after (fan-in) says so."""
    deletes = plan.of("delete")
    if not deletes:
        return
    graph = store.after_graph()
    graph.update(after_parents(data for _, data in tasks))
    gone = {i.name for i in deletes}
    for item in deletes:
        children = sorted(c for c, ps in graph.items() if item.name in ps and c not in gone)
        if children:
            item.notes.append(
                f"{', '.join(children)} run(s) after it: it would wait for a task that is gone"
            )


def apply_item(ops: Any, actor: str, item: PlanItem) -> tuple[str, str | None]:
    """Apply one item of a plan: (``created``, ``updated``, ``unchanged``, ``deleted`` or
    ``skipped``, why it was skipped). A task to delete that was deleted or changed since the
    plan was made is skipped. ValidationError names the item's file."""
    if item.action != "delete":
        try:
            return ops.apply_task(actor, item.data)[0], None
        except ValidationError as e:
            raise ValidationError(e.problems, source=item.source) from None
    planned = item.stored or {}
    now = ops.store.find_task(planned["_id"])
    if now is None:
        return "skipped", "deleted meanwhile"
    if now["revision"] != planned["revision"]:
        return "skipped", "changed since the plan; not deleted"
    ops.delete_task(actor, planned["_id"])
    return "deleted", None

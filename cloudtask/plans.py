"""Plans: work an upstream system submits, a set of items each run once, queued per type.

A plan's items are tasks without a schedule: each runs once, as soon as an agent of its
*type* (the CloudTask agent group that runs it) is free, higher ``priority`` first, not
before its ``not_before``. This module is the model only (no store, no servers):

* :func:`parse_plan` reads the JSON form into a :class:`Plan`, or raises a
  :class:`~cloudtask.exceptions.ValidationError` listing every problem at its path
  (``items[3].command``, ``items[0].priority``, ``items``, ``callback_url``, ``name``);
* :func:`item_task_spec` rebuilds an item's :class:`~cloudtask.task.TaskSpec` from the
  canonical form kept in :attr:`PlanItem.stored` (what an agent does before a run);
* :func:`plan_from_xml` reads the XML form into that same JSON form.

The JSON form::

    {"name": "nightly", "callback_url": "https://up.example/cb",
     "items": [
       {"type": "etl", "name": "load-eu", "external_id": "42", "priority": 5,
        "not_before": "2026-12-05T02:00:00Z", "command": "./load.sh --region eu",
        "timeout": "10m", "retries": 2, "retry_delay": "30s",
        "env": {"LEVEL": "info", "DB_PASSWORD": {"secret": "db.password"}}},
       {"type": "notify", "http": {"url": "https://svc.example/hook", "method": "POST"}}]}

An item takes ``type`` (required: the agent group), ``name`` (a task name; ``<type>-<n>``
when not given, n counting from 1), ``priority`` (0 to 1000, default 0, higher first),
``not_before`` (ISO 8601 with an offset or ``Z``; one already past makes the item due at
once), ``external_id`` (the submitter's own id, 1 to 200 printable characters, unique within
the plan) and these keys of a task spec, read by :func:`cloudtask.task.parse_task` with the
same meaning and rules: command, shell, file, file_version, http, timeout, retries,
retry_delay, env (``{"secret": NAME}`` values too), cwd, run_as, description. Nothing that
only makes sense for a scheduled task (schedule, mode, concurrency, misfire, notify, enabled,
owner) is taken. A plan has 1 to :data:`MAX_ITEMS` items.

The XML form says the same with attributes for the one-value fields and elements for the rest
(``<task>`` is taken as another word for ``<item>``)::

    <plan name="nightly" callback_url="https://up.example/cb">
      <item type="etl" name="load-eu" external_id="42" priority="5"
            not_before="2026-12-05T02:00:00Z" timeout="10m" retries="2" retry_delay="30s"
            shell="true" cwd="/srv" run_as="etl">
        <command>./load.sh --region eu</command>
        <env name="LEVEL">info</env>
        <env name="DB_PASSWORD" secret="db.password"/>
      </item>
      <task type="etl" file="jobs.zip" description="argv form">
        <arg>python</arg><arg>run.py</arg><arg>--day</arg><arg>2026-12-05</arg>
      </task>
      <item type="notify">
        <http url="https://svc.example/hook" method="POST" timeout="30s" expect_status="200,202">
          <header name="X-Team">ops</header>
          <header name="Authorization" secret="hook.token"/>
          <body>{"a": 1}</body>
        </http>
      </item>
    </plan>

* ``<plan>`` takes the attributes name and callback_url, and holds ``<item>``/``<task>``.
* ``<item>`` takes the attributes type, name, external_id, priority, not_before, command,
  shell, file, file_version, timeout, retries, retry_delay, cwd, run_as and description, and
  holds either one ``<command>`` (a command line; the whitespace around it is dropped) or
  ``<arg>`` elements (the arguments, each taken exactly), ``<env name="N">value</env>`` or
  ``<env name="N" secret="S"/>``, and at most one ``<http>``.
* ``<http>`` takes the attributes url, method, timeout, strategy, callback and expect_status
  (one status or several separated by commas or spaces), and holds ``<url>`` elements (a
  list of URLs, instead of the attribute), ``<header name="H">value</header>`` or
  ``<header name="H" secret="S"/>``, and one ``<body>`` (text, or ``<body secret="S"/>``).
* Attribute values are strings: shell and callback take true/false (or 1/0), priority and
  retries whole numbers, durations are written as in JSON ("10m"). A value that does not
  convert is passed on as written, and refused at its path by :func:`parse_plan`.

The XML is parsed with defusedxml: a DOCTYPE, an entity declaration or an external reference
is refused (never expanded, never fetched), so a billion-laughs or XXE document is an error
like any other; so is a document over :data:`MAX_XML_BYTES`. What is not part of the form (an
element, an attribute, loose text) is refused with its line, such as ``xml: line 7: <foo> is
not part of a plan item``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from xml.parsers import expat

from defusedxml import DefusedXmlException, DTDForbidden, EntitiesForbidden
from defusedxml.ElementTree import DefusedXMLParser, ParseError

from .exceptions import Problem, ValidationError
from .jsonlimits import MAX_JSON_DEPTH, depth_problem
from .schedules import format_instant, parse_instant, show_value
from .task import (
    NAME_PATTERN,
    NAME_RULE,
    SECRET_NAME_PATTERN,
    SECRET_NAME_RULE,
    TaskSpec,
    _is_web_url,
    parse_task,
    text_problem,
)

MAX_ITEMS = 10_000  # items per plan
MAX_PRIORITY = 1000
MAX_PLAN_NAME = 200  # characters of a plan's label
MAX_EXTERNAL_ID = 200  # characters of an item's external_id
MAX_CALLBACK_URL = 2048  # characters
MAX_XML_BYTES = 16 * 1024 * 1024  # an XML plan, refused before it is parsed
MAX_XML_PROBLEMS = 100  # an XML document stops being read after this many problems

# Every item is read by parse_task, which needs a schedule: this one, never used (an item runs
# once). item_task_spec gives the same, so a spec rebuilt from PlanItem.stored is equal.
PLACEHOLDER_SCHEDULE: dict[str, Any] = {"every": "24h"}

PLAN_KEYS = ("name", "callback_url", "callback_secret", "items")
# the keys of a task spec an item takes, read by parse_task
ITEM_TASK_KEYS = (
    "command",
    "shell",
    "file",
    "file_version",
    "http",
    "timeout",
    "retries",
    "retry_delay",
    "env",
    "cwd",
    "run_as",
    "pool",
    "pool_wait",
    "description",
)
ITEM_KEYS = ("type", "name", "priority", "not_before", "external_id", *ITEM_TASK_KEYS)
# keys of a task spec an item does not take, each with why
_NOT_FOR_ITEMS = {
    "schedule": "an item runs once, as soon as it can (not_before delays it): it has no schedule",
    "group": "an item's agent group is its type",
}

# The JSON a plan is nested in around an item (the plan object, its items list): an item
# that parse_task takes is never too deep for a plan.
_PLAN_DEPTH = MAX_JSON_DEPTH + 2


@dataclass(frozen=True)
class PlanItem:
    """One item of a plan: a task that runs once, on an agent of the group ``type``."""

    index: int  # its position in the plan
    name: str  # a task name; f"{type}-{index + 1}" when not given
    type: str  # the agent group that runs it
    spec: TaskSpec  # what runs (its schedule is PLACEHOLDER_SCHEDULE, never used)
    stored: dict[str, Any]  # the item's canonical JSON: item_task_spec(stored) == spec
    priority: int  # 0 to MAX_PRIORITY, higher first
    not_before: datetime | None  # aware UTC; the item waits until then
    external_id: str | None  # the submitter's own id of the item, unique in the plan


@dataclass(frozen=True)
class Plan:
    """A validated plan; build one with :func:`parse_plan`."""

    name: str  # a label, "" when not given
    callback_url: str | None  # where state changes are POSTed
    items: tuple[PlanItem, ...]
    # the stored secret the callbacks are signed with (HMAC-SHA256, like the alert webhooks)
    callback_secret: str | None = None


# --- the JSON form ------------------------------------------------------------------------------


def parse_plan(data: Any, now: datetime | None = None) -> Plan:
    """A :class:`Plan` from its JSON form; raises ValidationError listing every problem.

    ``now`` is passed on to :func:`~cloudtask.task.parse_task`; a ``not_before`` already past
    is taken (the item is due at once), so that a submitter retrying a plan is not refused.
    """
    if not isinstance(data, dict):
        got = "a list" if isinstance(data, list) else show_value(data)
        message = f'expected a plan object such as {{"items": [...]}}, got {got}'
        raise ValidationError([Problem("", message)], source="plan")
    if (deep := depth_problem(data, _PLAN_DEPTH)) is not None:  # nothing else is read
        message = f"nested more than {_PLAN_DEPTH} levels deep (objects and lists)"
        raise ValidationError([Problem(deep, message)], source="plan")
    problems: list[Problem] = []
    for key in data:
        if key not in PLAN_KEYS:
            problems.append(Problem(str(key), f"unknown key; a plan takes {', '.join(PLAN_KEYS)}"))
    name = _read_label(data.get("name"), problems)
    callback_url = _read_callback_url(data.get("callback_url"), problems)
    callback_secret = _read_callback_secret(data.get("callback_secret"), callback_url, problems)
    items: list[PlanItem] = []
    raw_items = data.get("items")
    if raw_items is None:
        problems.append(Problem("items", "required: a list of the items to run"))
    elif not isinstance(raw_items, list):
        problems.append(Problem("items", f"expected a list of items, got {show_value(raw_items)}"))
    elif not raw_items:
        problems.append(Problem("items", "a plan needs at least one item"))
    elif len(raw_items) > MAX_ITEMS:
        message = f"{len(raw_items):,} items; at most {MAX_ITEMS:,} are taken per plan"
        problems.append(Problem("items", message))
    else:
        seen_ids: dict[str, int] = {}
        for index, raw in enumerate(raw_items):
            item = _read_item(index, raw, now, problems)
            if item is not None:
                items.append(item)
            external_id = raw.get("external_id") if isinstance(raw, dict) else None
            if isinstance(external_id, str):
                if external_id in seen_ids:
                    message = (
                        f"the same external_id as items[{seen_ids[external_id]}]: "
                        "each item of a plan needs its own"
                    )
                    problems.append(Problem(f"items[{index}].external_id", message))
                else:
                    seen_ids[external_id] = index
    if problems:
        raise ValidationError(problems, source="plan")
    return Plan(
        name=name, callback_url=callback_url, items=tuple(items), callback_secret=callback_secret
    )


def item_task_spec(stored: dict[str, Any]) -> TaskSpec:
    """The :class:`TaskSpec` of an item from its :attr:`PlanItem.stored` form (keys other
    than an item's are ignored); raises ValidationError when it does not parse."""
    if not isinstance(stored, dict):
        message = f"expected a stored plan item (an object), got {show_value(stored)}"
        raise ValidationError([Problem("", message)], source="plan item")
    task = _task_data(stored, stored.get("name"), stored.get("type"))
    try:
        return parse_task(task)
    except ValidationError as exc:
        problems = [_moved(p, "") for p in exc.problems]
        raise ValidationError(problems, source="plan item") from None


def _task_data(item: dict[str, Any], name: Any, type_: Any) -> dict[str, Any]:
    """What parse_task reads for an item: its task keys, its name, its type as the group."""
    task = {key: item[key] for key in ITEM_TASK_KEYS if key in item}
    task["name"] = name
    if type_ is not None:
        task["group"] = type_
    task["schedule"] = dict(PLACEHOLDER_SCHEDULE)
    return task


def _moved(problem: Problem, prefix: str) -> Problem:
    """A problem of parse_task at its place in a plan: the group is the item's type."""
    path = problem.path
    if path == "group" or path.startswith("group."):
        path = "type" + path[len("group") :]
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    return Problem(path, problem.message)


def _read_item(
    index: int, raw: Any, now: datetime | None, problems: list[Problem]
) -> PlanItem | None:
    where = f"items[{index}]"
    if not isinstance(raw, dict):
        message = (
            'expected an item object such as {"type": "etl", "command": "./run.sh"}, '
            f"got {show_value(raw)}"
        )
        problems.append(Problem(where, message))
        return None
    before = len(problems)
    for key in raw:
        if key not in ITEM_KEYS:
            why = _NOT_FOR_ITEMS.get(key, "unknown key")
            message = f"{why}; an item takes {', '.join(ITEM_KEYS)}"
            problems.append(Problem(f"{where}.{key}", message))

    type_ = raw.get("type")
    if type_ is None:
        problems.append(Problem(f"{where}.type", f"required: the agent group, {NAME_RULE}"))
    name = raw.get("name")
    if name is None:  # the default: <type>-<n>, cut to fit a name when the type is long
        suffix = f"-{index + 1}"
        valid_type = isinstance(type_, str) and NAME_PATTERN.fullmatch(type_)
        base = type_[: 128 - len(suffix)] if valid_type else "item"  # (type's own problem)
        name = f"{base}{suffix}"

    priority = raw.get("priority")
    if priority is None:
        priority = 0
    elif type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
        message = f"expected a whole number from 0 to {MAX_PRIORITY}, got {show_value(priority)}"
        problems.append(Problem(f"{where}.priority", message))

    not_before = raw.get("not_before")
    if not_before is not None:
        try:
            not_before = parse_instant(not_before)
        except ValueError as exc:
            problems.append(Problem(f"{where}.not_before", str(exc)))

    external_id = raw.get("external_id")
    if external_id is not None and (why := _external_id_problem(external_id)):
        problems.append(Problem(f"{where}.external_id", why))

    try:
        spec = parse_task(_task_data(raw, name, type_), now)
    except ValidationError as exc:
        problems.extend(_moved(p, where) for p in exc.problems)
        return None
    if len(problems) > before:
        return None
    stored = _stored(spec, priority, not_before, external_id)
    return PlanItem(
        index=index,
        name=spec.name,
        type=spec.group,
        spec=spec,
        stored=stored,
        priority=priority,
        not_before=not_before,
        external_id=external_id,
    )


def _stored(
    spec: TaskSpec, priority: int, not_before: datetime | None, external_id: str | None
) -> dict[str, Any]:
    """The item's canonical JSON: a valid item itself, which item_task_spec reads back."""
    task = spec.to_dict()
    stored: dict[str, Any] = {
        "type": spec.group,
        "name": spec.name,
        "priority": priority,
        "not_before": format_instant(not_before) if not_before is not None else None,
        "external_id": external_id,
    }
    stored.update((key, task[key]) for key in ITEM_TASK_KEYS)
    return stored


def _external_id_problem(value: Any) -> str | None:
    rule = f"1 to {MAX_EXTERNAL_ID} printable characters"
    if not isinstance(value, str):
        return f"expected a string of {rule}, got {show_value(value)}"
    if not value or len(value) > MAX_EXTERNAL_ID:
        return f"expected {rule}, got {len(value):,} characters"
    if problem := text_problem(value):
        return problem
    if not value.isprintable():
        return f"expected {rule}: no line breaks, tabs or other control characters"
    return None


def _read_label(value: Any, problems: list[Problem]) -> str:
    if value is None:
        return ""
    rule = f"at most {MAX_PLAN_NAME} printable characters"
    if not isinstance(value, str):
        problems.append(Problem("name", f"expected a label of {rule}, got {show_value(value)}"))
    elif len(value) > MAX_PLAN_NAME:
        problems.append(Problem("name", f"{len(value):,} characters; {rule} are taken"))
    elif problem := text_problem(value):
        problems.append(Problem("name", problem))
    elif not value.isprintable():
        problems.append(Problem("name", f"expected {rule}: no line breaks or control characters"))
    else:
        return value
    return ""


def _read_callback_url(value: Any, problems: list[Problem]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        message = f"expected an http:// or https:// URL, got {show_value(value)}"
        problems.append(Problem("callback_url", message))
    elif len(value) > MAX_CALLBACK_URL:
        message = f"{len(value):,} characters; at most {MAX_CALLBACK_URL:,} are taken"
        problems.append(Problem("callback_url", message))
    elif problem := text_problem(value):
        problems.append(Problem("callback_url", problem))
    elif not _is_web_url(value):
        message = f"{show_value(value)} is not an http:// or https:// URL with a host"
        problems.append(Problem("callback_url", message))
    else:
        return value
    return None


def _read_callback_secret(
    value: Any, callback_url: str | None, problems: list[Problem]
) -> str | None:
    """The name of the stored secret that signs the callbacks: required with a callback_url
    (an unsigned callback could be forged by anyone who can reach the upstream system)."""
    if value is None:
        if callback_url is not None:
            problems.append(
                Problem(
                    "callback_secret",
                    "required with callback_url: the name of a stored secret the callbacks "
                    "are signed with (cloudtask secrets set NAME)",
                )
            )
        return None
    if not isinstance(value, str) or not SECRET_NAME_PATTERN.fullmatch(value):
        problems.append(Problem("callback_secret", f"{SECRET_NAME_RULE}, got {show_value(value)}"))
        return None
    if callback_url is None:
        problems.append(Problem("callback_secret", "signs the callbacks: give callback_url too"))
        return None
    return value


# --- the XML form -------------------------------------------------------------------------------

_PLAN_ATTRS = ("name", "callback_url", "callback_secret")
_ITEM_ATTRS = (
    "type",
    "name",
    "external_id",
    "priority",
    "not_before",
    "command",
    "shell",
    "file",
    "file_version",
    "timeout",
    "retries",
    "retry_delay",
    "cwd",
    "run_as",
    "description",
)
_HTTP_ATTRS = ("url", "method", "timeout", "strategy", "callback", "expect_status")
_ITEM_TAGS = ("item", "task")
# what each kind of element holds, element -> kind, and the attributes it takes
_CHILDREN: dict[str, dict[str, str]] = {
    "root": {"plan": "plan"},
    "plan": {"item": "item", "task": "item"},
    "item": {"command": "command", "arg": "arg", "env": "env", "http": "http"},
    "http": {"url": "url", "header": "header", "body": "body"},
}
_ATTRS: dict[str, tuple[str, ...]] = {
    "plan": _PLAN_ATTRS,
    "item": _ITEM_ATTRS,
    "http": _HTTP_ATTRS,
    "command": (),
    "arg": (),
    "url": (),
    "env": ("name", "secret"),
    "header": ("name", "secret"),
    "body": ("secret",),
}
_WHAT = {"plan": "a plan", "item": "a plan item", "http": "an <http> call"}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
_MAX_SKIPPED_DEPTH = 32  # elements inside one that is not part of a plan, before reading stops
_WHOLE_NUMBER = re.compile(r"\s*[+-]?\d{1,9}\s*")


class _Stop(Exception):
    """Stops reading the XML: the problems gathered so far are what is raised."""


@dataclass
class _Element:
    kind: str  # plan, item, http, command, arg, env, url, header, body; or skip
    tag: str
    line: int
    attrs: dict[str, str]
    text: list[str]
    value: dict[str, Any]  # plan, item, http: the JSON being built
    skipped: int = 0  # skip: the depth of unknown elements inside this one


class _PlanBuilder:
    """The target of the XML parser: builds the plan's JSON form as the parser goes, without
    a tree, recording a problem (with its line) for what is not part of the form."""

    def __init__(self) -> None:
        self.expat: Any = None  # the parser's expat parser, for line numbers
        self.stack: list[_Element] = []
        self.problems: list[Problem] = []
        self.lines: list[int] = []  # the line of each problem refuse() recorded
        self.plan: dict[str, Any] | None = None
        self.items = 0

    def line(self) -> int:
        return int(self.expat.CurrentLineNumber) if self.expat is not None else 0

    def refuse(self, line: int, message: str) -> None:
        self.problems.append(Problem("xml", f"line {line}: {message}"))
        self.lines.append(line)
        if len(self.problems) >= MAX_XML_PROBLEMS:
            self.problems.append(Problem("xml", "too many problems: the rest was not read"))
            self.lines.append(self.line() + 1)
            raise _Stop

    def sorted_problems(self) -> list[Problem]:
        lines = self.lines + [self.line() + 1] * (len(self.problems) - len(self.lines))
        order = sorted(range(len(self.problems)), key=lambda i: lines[i])
        return [self.problems[i] for i in order]

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        line = self.line()
        parent = self.stack[-1] if self.stack else None
        if parent is not None and parent.kind == "skip":  # inside an element refused already
            parent.skipped += 1
            if parent.skipped > _MAX_SKIPPED_DEPTH:  # (expat would keep every open tag)
                message = f"elements nested more than {_MAX_SKIPPED_DEPTH} levels deep"
                self.refuse(line, f"{message} inside <{parent.tag}>: the rest was not read")
                raise _Stop
            return
        context = parent.kind if parent is not None else "root"
        kind = _CHILDREN.get(context, {}).get(tag)
        if kind is None:
            self.refuse(line, self._misplaced(tag, context, parent))
            self.stack.append(_Element("skip", tag, line, {}, [], {}))
            return
        element = _Element(kind, tag, line, dict(attrs), [], {})
        for name in attrs:
            if name not in _ATTRS[kind]:
                takes = f"it takes {', '.join(_ATTRS[kind])}" if _ATTRS[kind] else "it takes none"
                self.refuse(line, f"<{tag}> takes no attribute {name!r} ({takes})")
        if kind == "item":
            self.items += 1
            if self.items > MAX_ITEMS:
                message = f"more than {MAX_ITEMS:,} items; at most {MAX_ITEMS:,} are taken per plan"
                self.problems.append(Problem("items", message))
                raise _Stop
        self.stack.append(element)

    def _misplaced(self, tag: str, context: str, parent: _Element | None) -> str:
        if parent is None:
            return f"the document must be a <plan>, not <{tag}>"
        if context in _WHAT:
            takes = ", ".join(f"<{t}>" for t in _CHILDREN[context])
            return f"<{tag}> is not part of {_WHAT[context]} (it holds {takes})"
        return f"<{tag}> is not part of <{parent.tag}>, which holds text only"

    def data(self, text: str) -> None:
        if self.stack and self.stack[-1].kind != "skip":
            self.stack[-1].text.append(text)

    def end(self, tag: str) -> None:
        element = self.stack[-1]
        if element.kind == "skip":
            if element.skipped:
                element.skipped -= 1
            else:
                self.stack.pop()
            return
        self.stack.pop()
        parent = self.stack[-1] if self.stack else None
        text = "".join(element.text)
        if element.kind in ("plan", "item", "http"):
            if text.strip():
                shown = show_value(text.strip())
                hint = " (a command goes in <command>)" if element.kind == "item" else ""
                self.refuse(element.line, f"text {shown} is not part of <{element.tag}>{hint}")
            getattr(self, f"_end_{element.kind}")(element, parent)
        elif element.kind in ("env", "header", "body") and "secret" in element.attrs:
            if text.strip():
                self.refuse(
                    element.line,
                    f"<{element.tag} secret=...> takes no text: its value is the stored secret",
                )
            self._end_text(element, parent, {"secret": element.attrs["secret"]})
        else:
            self._end_text(element, parent, text)

    def _end_plan(self, element: _Element, parent: _Element | None) -> None:
        plan = {key: element.attrs[key] for key in _PLAN_ATTRS if key in element.attrs}
        plan["items"] = element.value.get("items", [])
        self.plan = plan

    def _end_item(self, element: _Element, parent: _Element | None) -> None:
        item: dict[str, Any] = {}
        for key in _ITEM_ATTRS:
            if key in element.attrs:
                item[key] = _converted(key, element.attrs[key])
        for key, value in element.value.items():
            if key == "command" and "command" in item:
                message = "the command is given twice: as an attribute and as an element"
                self.refuse(element.line, message)
            item[key] = value
        assert parent is not None  # an item is always inside a plan
        parent.value.setdefault("items", []).append(item)

    def _end_http(self, element: _Element, parent: _Element | None) -> None:
        http: dict[str, Any] = {}
        for key in _HTTP_ATTRS:
            if key in element.attrs:
                http[key] = _converted(key, element.attrs[key])
        http.update(element.value)
        assert parent is not None
        if "http" in parent.value:
            self.refuse(element.line, f"a second <http> in <{parent.tag}>: an item makes one call")
        parent.value["http"] = http

    def _end_text(self, element: _Element, parent: _Element | None, value: Any) -> None:
        assert parent is not None
        into, kind, line = parent.value, element.kind, element.line
        if kind == "command":
            if "command" in into:
                self.refuse(line, "give the command once: one <command>, or <arg> elements")
            into["command"] = value.strip()
        elif kind == "arg":
            if isinstance(into.get("command"), str):
                self.refuse(line, "give the command once: one <command>, or <arg> elements")
            else:
                into.setdefault("command", []).append(value)
        elif kind == "url":
            into.setdefault("urls", []).append(value.strip())
        elif kind == "body":
            if "body" in into:
                self.refuse(line, "a second <body> in <http>")
            into["body"] = value
        else:  # env, header: named values
            name = element.attrs.get("name")
            key = "env" if kind == "env" else "headers"
            if name is None:
                self.refuse(line, f'<{element.tag}> needs a name, such as <{element.tag} name="N">')
            elif name in into.get(key, {}):
                self.refuse(line, f"<{element.tag} name={name!r}> is given twice")
            else:
                into.setdefault(key, {})[name] = value

    def close(self) -> dict[str, Any] | None:
        return self.plan


def _converted(key: str, value: str) -> Any:
    """An attribute's value as the JSON form takes it; as written when it does not convert
    (parse_plan then refuses it at its path)."""
    if key in ("shell", "callback"):
        return _BOOLEANS.get(value.strip().lower(), value)
    if key in ("priority", "retries"):
        return int(value) if _WHOLE_NUMBER.fullmatch(value) else value
    if key == "expect_status":
        parts = value.replace(",", " ").split()
        if parts and all(_WHOLE_NUMBER.fullmatch(p) for p in parts):
            return int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
    return value


def plan_from_xml(body: bytes | str) -> dict[str, Any]:
    """The JSON form of a plan (for :func:`parse_plan`) from its XML form; raises
    ValidationError, at the path ``xml`` with the line, for XML that is malformed, too large,
    has a DOCTYPE or entities, or holds what is not part of a plan."""
    if isinstance(body, str):
        if len(body) > MAX_XML_BYTES:  # (more bytes still once encoded)
            raise _xml_error(_too_large(f"{len(body):,} characters"))
        try:
            raw = body.encode("utf-8")
        except UnicodeEncodeError as exc:
            message = f"not valid text: it holds a lone surrogate ({body[exc.start]!a})"
            raise _xml_error(message) from None
        encoding: str | None = "utf-8"  # whatever the XML declaration says: it was text
    elif isinstance(body, (bytes, bytearray, memoryview)):
        raw, encoding = bytes(body), None
    else:
        raise _xml_error(f"expected the XML text of a plan, got {type(body).__name__}")
    if len(raw) > MAX_XML_BYTES:
        raise _xml_error(_too_large(f"{len(raw):,} bytes"))

    builder = _PlanBuilder()
    parser = DefusedXMLParser(
        target=builder,
        encoding=encoding,
        forbid_dtd=True,
        forbid_entities=True,
        forbid_external=True,
    )
    builder.expat = parser.parser
    try:
        parser.feed(raw)
        plan = parser.close()
    except _Stop:
        raise ValidationError(builder.sorted_problems(), source="plan") from None
    except ParseError as exc:
        line, column = getattr(exc, "position", (0, 0))
        code = getattr(exc, "code", None)
        reason = expat.ErrorString(code) if isinstance(code, int) else str(exc)
        problem = f"line {line}, column {column + 1}: not well-formed XML ({reason})"
        raise _xml_error(problem) from None
    except DefusedXmlException as exc:
        raise _xml_error(f"line {builder.line()}: {_forbidden(exc)}") from None
    if builder.problems:  # in the order of their lines (loose text is found at the end tag)
        raise ValidationError(builder.sorted_problems(), source="plan")
    if plan is None:  # (expat refuses a document without a root element first)
        raise _xml_error("no <plan> element")
    return plan


def _forbidden(exc: DefusedXmlException) -> str:
    if isinstance(exc, DTDForbidden):
        what = "a DOCTYPE (document type declaration)"
    elif isinstance(exc, EntitiesForbidden):
        what = "an entity declaration"
    else:
        what = "an external reference"
    return (
        f"{what} is not accepted: a plan is plain XML, and its entities and external "
        "references are never expanded or fetched; send it without one"
    )


def _too_large(size: str) -> str:
    return (
        f"the document is {size}; at most {MAX_XML_BYTES:,} bytes "
        f"({MAX_XML_BYTES // (1024 * 1024)} MiB) are taken"
    )


def _xml_error(message: str) -> ValidationError:
    return ValidationError([Problem("xml", message)], source="plan")

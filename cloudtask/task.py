"""Task specs: the JSON a user writes (files, REST API, web forms) and its validated form.

:func:`validate_task` returns every problem at once, each with its path (``schedule[1].every``,
``http.urls[0]``, ``env.PATH``); :func:`parse_task` raises them together as a
:class:`~cloudtask.exceptions.ValidationError` or returns a :class:`TaskSpec`.
:meth:`TaskSpec.to_dict` writes the canonical form, which parses back to an equal spec.
:data:`TASK_FIELDS` declares the top-level keys once (type, required, default, a line of
description, the choices) for those who describe a task: the web form and the API's OpenAPI
document derive theirs from it; the reading itself is written out in :func:`_read_task`.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from .containerspec import ContainerSpec, read_container
from .deadlines import DeadlineSpec, deadline_problems
from .durations import format_duration, parse_duration
from .exceptions import Problem, ValidationError
from .jsonlimits import MAX_JSON_DEPTH, depth_problem
from .schedules import ScheduleSet, parse_schedule, show_value
from .taskenv import RUN_AS_PATTERN, RUN_AS_RULE

SPEC_VERSION = 1
HTTP_KEYS = (
    "url",
    "urls",
    "strategy",
    "method",
    "headers",
    "body",
    "expect_status",
    "timeout",
    "callback",
)
NOTIFY_KEYS = ("emails", "on")
MODES = ("one", "all")
CONCURRENCY_POLICIES = ("forbid", "allow", "replace")
MISFIRE_POLICIES = ("run_once", "skip")
# a run lost with its agent (killed or cut off mid-run): recorded lost, or run again
LOST_POLICIES = ("record", "rerun")
HTTP_STRATEGIES = ("first", "random", "failover")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
NOTIFY_EVENTS = ("failure", "timeout", "missed", "lost", "recovered", "success")
DEFAULT_NOTIFY_ON = ("failure", "timeout", "missed", "lost")
MAX_RETRIES = 100

# Limits, each refused with its path: a spec is stored, written into ZooKeeper (whose nodes
# hold at most 1 MB) and read by every agent, and its command and environment must fit an
# exec (Linux takes at most 128 KiB per argument or variable, 2 MiB in all).
MAX_SCHEDULES = 100  # a list of schedules; each fire computes the earliest of them
MAX_COMMAND_BYTES = 64 * 1024  # the command, its arguments joined by spaces, in UTF-8
MAX_ENV_VALUE_BYTES = 64 * 1024  # one environment value
MAX_ENV_BYTES = 256 * 1024  # every NAME=value of the env, together
MAX_HTTP_BODY_BYTES = 64 * 1024
MAX_HTTP_HEADERS_BYTES = 64 * 1024  # every "Name: value" of http.headers, together
MAX_CWD_BYTES = 4096  # PATH_MAX
MAX_SPEC_DEPTH = MAX_JSON_DEPTH  # objects and lists inside each other (an http.body's own)
MAX_REQUIRES = 16  # labels an agent must have to run the task
MAX_LABEL_VALUE = 255
# a label's name in a task's requires (an agent's labels: agent.labels)
LABEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,62}")
LABEL_NAME_RULE = "1 to 63 letters, digits, '_', '.', '/' or '-', beginning with a letter or digit"

from .schedules import NAME_PATTERN, NAME_RULE  # noqa: E402  (one rule for names)

ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_MISSING: Any = object()

# --- the top-level fields, declared once --------------------------------------------------------

# The types of the field table: the JSON each takes. A name follows NAME_RULE, a duration is
# written like "10m" or given in seconds, a schedule is one object or a list of them.
FIELD_TYPES: dict[str, tuple[str, ...]] = {
    "string": ("string",),
    "name": ("string",),
    "sha256": ("string",),
    "integer": ("integer",),
    "boolean": ("boolean",),
    "duration": ("string", "number"),
    "schedule": ("object", "array"),
    "command": ("string", "array"),
    "http": ("object",),
    "env": ("object",),
    "notify": ("object",),
    "deadline": ("string", "object"),
    "requires": ("object",),
    "container": ("object",),
}


@dataclass(frozen=True)
class TaskField:
    """One top-level key of a task spec, as the form, the API's document and the docs tell
    it. This is a description: how the model reads the key is :func:`_read_task`, and
    ``tests/test_task_fields.py`` checks that the two agree."""

    name: str
    type: str  # a key of FIELD_TYPES
    description: str  # one line
    required: bool = False
    default: Any = None  # as TaskSpec.to_dict writes it (shared: copy it to change it)
    enum: tuple[Any, ...] = ()  # the values taken, when they are a fixed few
    nullable: bool = False  # null is taken too, and means the default

    @property
    def json_types(self) -> tuple[str, ...]:
        types = FIELD_TYPES[self.type]
        return (*types, "null") if self.nullable else types


TASK_FIELDS: tuple[TaskField, ...] = (
    TaskField(
        "version",
        "integer",
        "The spec's format version",
        default=SPEC_VERSION,
        enum=(SPEC_VERSION,),
    ),
    TaskField("name", "name", "Unique; it names the task's log folder", required=True),
    TaskField("group", "name", "Which agents run it", default="default"),
    TaskField(
        "schedule",
        "schedule",
        "One schedule, or a list of them (the earliest next fire wins)",
        required=True,
    ),
    TaskField(
        "command",
        "command",
        "A string (split like a shell would) or a list of arguments; or give http",
        nullable=True,
    ),
    TaskField("shell", "boolean", "Run the command string through /bin/sh -c", default=False),
    TaskField("file", "string", "A stored task file, laid out afresh for each run", nullable=True),
    TaskField(
        "file_version",
        "sha256",
        "Pins a version of the file (its sha256); null follows the latest",
        nullable=True,
    ),
    TaskField("http", "http", "A web service call made instead of a command", nullable=True),
    TaskField(
        "container",
        "container",
        "An image run through the Docker engine instead of a command: image, args, env, "
        "volumes, cpus, memory",
        nullable=True,
    ),
    TaskField(
        "mode",
        "string",
        "one: one agent runs each fire; all: every agent of the group does",
        default="one",
        enum=MODES,
    ),
    TaskField(
        "requires",
        "requires",
        "Labels an agent of the group must have to run it (agent.labels), all of them",
        default={},
    ),
    TaskField(
        "timeout",
        "duration",
        "Kill the run's whole process tree after this long; null: no limit",
        nullable=True,
    ),
    TaskField(
        "retries", "integer", f"Attempts after a failure or timeout (0 to {MAX_RETRIES})", default=0
    ),
    TaskField("retry_delay", "duration", "The pause before each retry", default="0s"),
    TaskField(
        "concurrency",
        "string",
        "A fire while the previous run runs: forbid (skipped), allow, replace (kill it)",
        default="forbid",
        enum=CONCURRENCY_POLICIES,
    ),
    TaskField(
        "misfire",
        "string",
        "A fire found late: run_once runs it as a catch-up, skip records it missed",
        default="run_once",
        enum=MISFIRE_POLICIES,
    ),
    TaskField("misfire_grace", "duration", "How late a fire may still be caught up", default="1h"),
    TaskField(
        "on_lost",
        "string",
        "A run lost with its agent: record (lost, alerted) or rerun (its fire runs again as "
        "the next attempt, up to retries, at least once)",
        default="record",
        enum=LOST_POLICIES,
    ),
    TaskField("enabled", "boolean", "False: paused", default=True),
    TaskField("env", "env", "Environment variables of the command", default={}),
    TaskField("cwd", "string", "The command's working folder", nullable=True),
    TaskField(
        "pool",
        "string",
        "A concurrency pool: at most its size of runs at once in the cluster, the rest wait",
        nullable=True,
    ),
    TaskField(
        "pool_wait",
        "duration",
        "How long a run waits for a place in its pool before it is skipped (10m if not given)",
        nullable=True,
    ),
    TaskField(
        "run_as",
        "string",
        "The user (or user:group) the command runs as, if its agent allows it",
        nullable=True,
    ),
    TaskField(
        "notify",
        "notify",
        "Who is emailed, and on which run outcomes",
        default={"emails": [], "on": list(DEFAULT_NOTIFY_ON)},
    ),
    TaskField(
        "warn_after",
        "duration",
        "Alert (run.slow) when a run is still going after this long; it is not killed",
        nullable=True,
    ),
    TaskField(
        "deadline",
        "deadline",
        "Alert (task.deadline_missed) when no run fired in the 24 h before this local time "
        'has succeeded by it: "06:00", "06:00 mon-fri" or {"at", "days", "timezone"}',
        nullable=True,
    ),
    TaskField(
        "expect_every",
        "duration",
        "Alert (task.overdue) when the task has not succeeded for this long",
        nullable=True,
    ),
    TaskField("description", "string", "What the task is for", default=""),
    TaskField("owner", "string", "A person or team", default=""),
)
TASK_KEYS = tuple(f.name for f in TASK_FIELDS)
TASK_FIELD = {f.name: f for f in TASK_FIELDS}


@dataclass(frozen=True)
class HttpSpec:
    """A web service call made instead of a command."""

    urls: tuple[str, ...]
    strategy: str = "first"
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    expect_status: tuple[int, ...] | None = None  # None: any 2xx
    timeout: float | None = None
    # the service answers at once and reports its result later (POST /api/v1/runs/<id>/result);
    # the run stays running until then, or until the task's timeout
    callback: bool = False
    # headers whose value is a stored secret (header -> secret name), and a body that is one:
    # opened by the agent just before the call (see cloudtask/secretbox.py)
    secret_headers: dict[str, str] = field(default_factory=dict)
    body_secret: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "urls": list(self.urls),
            "strategy": self.strategy,
            "method": self.method,
            "headers": {**self.headers, **_refs(self.secret_headers)},
            "body": {"secret": self.body_secret} if self.body_secret else self.body,
            "expect_status": list(self.expect_status) if self.expect_status else None,
            "timeout": _format_optional(self.timeout),
            "callback": self.callback,
        }


@dataclass(frozen=True)
class NotifySpec:
    """Who is emailed, and on which run outcomes."""

    emails: tuple[str, ...] = ()
    on: tuple[str, ...] = DEFAULT_NOTIFY_ON

    def to_dict(self) -> dict[str, Any]:
        return {"emails": list(self.emails), "on": list(self.on)}


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A validated task. Durations are float seconds; build one with :func:`parse_task`."""

    name: str
    group: str = "default"
    schedule: ScheduleSet
    command: str | tuple[str, ...] | None = None
    shell: bool = False
    file: str | None = None
    file_version: str | None = None  # a pinned version (sha256); None follows the latest
    http: HttpSpec | None = None
    container: ContainerSpec | None = None
    mode: str = "one"
    requires: dict[str, str] = field(default_factory=dict)  # label -> value, sorted by label
    timeout: float | None = None
    retries: int = 0
    retry_delay: float = 0.0
    concurrency: str = "forbid"
    misfire: str = "run_once"
    misfire_grace: float = 3600.0
    on_lost: str = "record"
    enabled: bool = True
    env: dict[str, str] = field(default_factory=dict)
    # variables whose value is a stored secret (variable -> secret name), opened by the agent
    # just before the run and never written anywhere else
    secret_env: dict[str, str] = field(default_factory=dict, metadata={"within": "env"})
    cwd: str | None = None
    run_as: str | None = None  # user[:group]; the agent checks it against agent.run_as_allowed
    pool: str | None = None  # a concurrency pool's name (cloudtask/agent/pools.py)
    pool_wait: float | None = None  # seconds a run waits for its pool (None: 10 minutes)
    notify: NotifySpec = field(default_factory=NotifySpec)
    warn_after: float | None = None  # seconds a run may run before run.slow
    deadline: DeadlineSpec | None = None  # cloudtask/deadlines.py
    expect_every: float | None = None  # seconds without a success before task.overdue
    description: str = ""
    owner: str = ""

    def secrets_used(self) -> set[str]:
        """The names of the stored secrets this task refers to."""
        used = set(self.secret_env.values())
        if self.http is not None:
            used |= set(self.http.secret_headers.values())
            used |= {self.http.body_secret} if self.http.body_secret else set()
        return used

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form: every field present, durations spelled like '10m'."""
        command = list(self.command) if isinstance(self.command, tuple) else self.command
        return {
            "version": SPEC_VERSION,
            "name": self.name,
            "group": self.group,
            "schedule": self.schedule.to_dict(),
            "command": command,
            "shell": self.shell,
            "file": self.file,
            "file_version": self.file_version,
            "http": self.http.to_dict() if self.http is not None else None,
            "container": self.container.to_dict() if self.container is not None else None,
            "mode": self.mode,
            "requires": dict(self.requires),
            "timeout": _format_optional(self.timeout),
            "retries": self.retries,
            "retry_delay": format_duration(self.retry_delay),
            "concurrency": self.concurrency,
            "misfire": self.misfire,
            "misfire_grace": format_duration(self.misfire_grace),
            "on_lost": self.on_lost,
            "enabled": self.enabled,
            "env": {**self.env, **_refs(self.secret_env)},
            "cwd": self.cwd,
            "run_as": self.run_as,
            "pool": self.pool,
            "pool_wait": _format_optional(self.pool_wait),
            "notify": self.notify.to_dict(),
            "warn_after": _format_optional(self.warn_after),
            "deadline": self.deadline.to_value() if self.deadline is not None else None,
            "expect_every": _format_optional(self.expect_every),
            "description": self.description,
            "owner": self.owner,
        }


def _refs(named: dict[str, str]) -> dict[str, dict[str, str]]:
    return {key: {"secret": name} for key, name in named.items()}


SECRET_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
SECRET_NAME_RULE = (
    "a secret's name is 1 to 64 letters, digits, '_', '.' or '-', beginning with a letter"
)
# header names that carry credentials: given in clear, they get a warning (use a secret)
_CREDENTIAL_HEADER = re.compile(r"authorization|.*(token|secret|password|api-?key).*", re.I)


def secret_ref(value: Any) -> str | None | bool:
    """The secret's name when ``value`` is ``{"secret": NAME}``, False when it is not a
    reference at all, None when it is one that is malformed."""
    if not isinstance(value, dict) or "secret" not in value:
        return False
    name = value.get("secret")
    if len(value) != 1 or not isinstance(name, str) or not SECRET_NAME_PATTERN.fullmatch(name):
        return None
    return name


def clear_credentials(spec: TaskSpec) -> list[Problem]:
    """Warnings (not errors) for headers named like credentials whose value is given in clear:
    every viewer of the task sees it; a stored secret (``{"secret": NAME}``) is shown to none."""
    if spec.http is None:
        return []
    return [
        Problem(
            f"http.headers.{name}",
            "looks like a credential given in clear: every viewer of the task sees it; "
            'store it as a secret and give {"secret": "NAME"}',
        )
        for name in spec.http.headers
        if _CREDENTIAL_HEADER.fullmatch(name)
    ]


MAX_TASK_DURATION = 366 * 86400.0  # timeouts, delays and graces: a year is plenty, and safe to add


@functools.lru_cache(maxsize=4096)
def _split(command: str) -> tuple[str, ...]:
    """``shlex.split``, remembered: a leader parses every task's spec when it takes over, and
    commands repeat (ValueError, for bad quoting, is not remembered)."""
    return tuple(shlex.split(command))


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a task file (it becomes a path on agents), or None if it can."""
    if not name or len(name) > 255 or any(c in name for c in "/\\\0") or ".." in name:
        return f"{name!r} is not a plain file name (no '/', '\\' or '..', at most 255)"
    if name.startswith(".") or any(ord(c) < 32 for c in name):
        return f"{name!r} is not a plain file name (no leading '.', no control characters)"
    return None


def _size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (a lone surrogate, refused on its own, counts 3)."""
    return len(text.encode("utf-8", "surrogatepass"))


def _kib(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} bytes"


def too_large(what: str, size: int, limit: int) -> str:
    return f"{what} is {size:,} bytes; at most {limit:,} bytes ({_kib(limit)}) are taken"


def text_problem(value: str) -> str | None:
    """Why a string of a spec cannot be used as text (a NUL byte, a lone surrogate), or None."""
    if "\0" in value:
        return "must not contain NUL characters (\\0)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid text: it holds a lone surrogate ({value[e.start]!a})"
    return None


def _text_problems(data: dict[str, Any], problems: list[Problem]) -> None:
    """A problem for every string of the spec, key or value, that is not usable text. No
    recursion: the depth was checked first."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if problem := text_problem(value):
                problems.append(Problem(path, problem))
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and (problem := text_problem(key)):
                    problems.append(Problem(where, f"the key {problem}"))
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def validate_task(data: object, now: datetime | None = None) -> list[Problem]:
    """Every problem in a task spec. With ``now``, instants already past are refused too."""
    return _read_task(data, now)[1]


def parse_task(data: object, now: datetime | None = None) -> TaskSpec:
    """A :class:`TaskSpec` from its JSON form; raises ValidationError listing every problem."""
    spec, problems = _read_task(data, now)
    if problems or spec is None:
        raise ValidationError(problems)
    return spec


def _format_optional(seconds: float | None) -> str | None:
    return None if seconds is None else format_duration(seconds)


class _Fields:
    """Reads the keys of one JSON object, recording a problem for each bad value."""

    def __init__(self, data: dict[str, Any], prefix: str, problems: list[Problem]) -> None:
        self.data, self.prefix, self.problems = data, prefix, problems

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def refuse(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.path(key), message))

    def unknown_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                self.refuse(str(key), f"unknown key; expected one of {', '.join(allowed)}")

    def given(self, key: str) -> bool:
        return self.data.get(key) is not None

    def string(self, key: str, default: Any = "", *, nullable: bool = False) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING or (value is None and nullable):
            return default
        if not isinstance(value, str):
            self.refuse(key, f"expected a string, got {show_value(value)}")
            return default
        return value

    def name(self, key: str, default: str | None) -> str:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is None:
                self.refuse(key, f"required: a name of {NAME_RULE}")
            return default or ""
        if not isinstance(value, str):
            self.refuse(key, f"expected a string, got {show_value(value)}")
        elif not NAME_PATTERN.fullmatch(value):
            self.refuse(key, f"{value!r} is not a valid name: use {NAME_RULE}")
        return value if isinstance(value, str) else ""

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if value not in choices:
            self.refuse(key, f"expected one of {', '.join(choices)}, got {show_value(value)}")
            return default
        return str(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.refuse(key, f"expected true or false, got {show_value(value)}")
            return default
        return value

    def duration(self, key: str, default: float | None, *, nullable: bool = False) -> Any:
        """Seconds rounded to the millisecond; ``nullable`` durations must be more than 0."""
        value = self.data.get(key, _MISSING)
        if value is _MISSING or (value is None and nullable):
            return default
        try:
            seconds = round(parse_duration(value), 3)
        except ValueError as exc:
            self.refuse(key, str(exc))
            return default
        if nullable and seconds <= 0:
            self.refuse(key, "must be more than 0 (or null for no limit)")
            return default
        if seconds > MAX_TASK_DURATION:
            self.refuse(key, f"must be at most {format_duration(MAX_TASK_DURATION)}")
            return default
        return seconds

    def string_map(
        self,
        key: str,
        key_pattern: re.Pattern[str],
        rule: str,
        *,
        one_line: bool = False,
        secrets: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """An object of strings; with ``secrets``, a value may also be ``{"secret": NAME}``
        (collected there, name -> secret name, instead of in the result)."""
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return {}
        if not isinstance(value, dict):
            self.refuse(key, f"expected an object of strings, got {show_value(value)}")
            return {}
        out: dict[str, str] = {}
        for name, item in value.items():
            where = f"{key}.{name}"
            ref = secret_ref(item) if secrets is not None else False
            if not isinstance(name, str) or not key_pattern.fullmatch(name):
                self.refuse(where, f"{name!r} is not allowed: {rule}")
            elif ref is None:
                self.refuse(where, f'expected {{"secret": "NAME"}}: {SECRET_NAME_RULE}')
            elif ref:
                secrets[name] = ref  # type: ignore[index]
            elif not isinstance(item, str):
                self.refuse(where, f"expected a string, got {show_value(item)}")
            elif one_line and any(c in item for c in "\r\n"):
                self.refuse(where, "must not contain line breaks")
            else:
                out[name] = item
        return out

    def string_list(self, key: str, *, empty: bool = False) -> list[tuple[str, str]] | None:
        """A list of strings (non-empty unless ``empty``) as (path, value) pairs, or None."""
        value = self.data[key]
        if not isinstance(value, list) or not (value or empty):
            kind = "a list" if empty else "a non-empty list"
            self.refuse(key, f"expected {kind} of strings, got {show_value(value)}")
            return None
        pairs = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                pairs.append((f"{key}[{i}]", item))
            else:
                self.refuse(f"{key}[{i}]", f"expected a string, got {show_value(item)}")
        return pairs if len(pairs) == len(value) else None


def _read_task(data: object, now: datetime | None) -> tuple[TaskSpec | None, list[Problem]]:
    problems: list[Problem] = []
    if not isinstance(data, dict):
        return None, [Problem("", f"expected a task object, got {show_value(data)}")]
    if (deep := depth_problem(data, MAX_SPEC_DEPTH)) is not None:  # nothing else is read
        message = f"nested more than {MAX_SPEC_DEPTH} levels deep (objects and lists)"
        return None, [Problem(deep, message)]
    unusable: list[Problem] = []  # NUL bytes, lone surrogates: added below where nothing else is
    _text_problems(data, unusable)
    f = _Fields(data, "", problems)
    f.unknown_keys(TASK_KEYS)
    version = data.get("version", SPEC_VERSION)
    if type(version) is not int or version != SPEC_VERSION:
        f.refuse("version", f"unsupported version {show_value(version)}; expected {SPEC_VERSION}")
    name = f.name("name", None)
    group = f.name("group", "default")
    if "schedule" not in data:
        f.refuse("schedule", 'required, such as {"cron": "0 3 * * *"} or {"every": "30s"}')
        schedule = None
    elif isinstance(data["schedule"], list) and len(data["schedule"]) > MAX_SCHEDULES:
        count = len(data["schedule"])
        f.refuse("schedule", f"{count:,} schedules; at most {MAX_SCHEDULES} are taken per task")
        schedule = None
    else:
        schedule, schedule_problems = parse_schedule(data["schedule"], "schedule", now=now)
        problems.extend(schedule_problems)

    command = _read_command(f)
    http = _read_http(data["http"], problems) if f.given("http") else None
    container = read_container(data["container"], problems) if f.given("container") else None
    kinds = [k for k in ("command", "http", "container") if f.given(k)]
    if len(kinds) > 1:
        f.refuse(
            kinds[1],
            f"a task runs one of a command, an http call or a container: {kinds[0]} or "
            f"{kinds[1]}, not both",
        )
    elif not kinds:
        f.refuse("command", "required: give a command to run (or an http call, or a container)")
    if f.given("container"):
        for key in ("shell", "file", "cwd", "run_as"):
            if data.get(key) not in (None, False, ""):
                f.refuse(key, f"{key} only applies to a command, not to a container")
    shell = f.boolean("shell", False)
    if shell and f.given("http"):
        f.refuse("shell", "shell only applies to a command, not to an http call")
    elif shell and isinstance(data.get("command"), list):
        f.refuse("shell", "with shell true, command must be one string, not a list")
    elif not shell and isinstance(command, str) and _size(command) <= MAX_COMMAND_BYTES:
        try:  # (shlex takes seconds over a long string: one too long is refused unsplit)
            _split(command)
        except ValueError as exc:
            f.refuse("command", f"cannot be split into arguments ({exc}); fix the quoting")
    file = f.string("file", None, nullable=True)
    if file is not None:
        if f.given("http"):
            f.refuse("file", "file only applies to a command, not to an http call")
        elif problem := file_name_problem(file):
            f.refuse("file", problem)
    file_version = f.string("file_version", None, nullable=True)
    if file_version is not None:
        if file is None:
            f.refuse("file_version", "pins a version of the task's file: give file too")
        elif not re.fullmatch(r"[0-9a-f]{64}", file_version):
            f.refuse("file_version", "expected the sha256 of a stored version (64 hex digits)")

    retries = data.get("retries", 0)
    if type(retries) is not int or not 0 <= retries <= MAX_RETRIES:
        f.refuse("retries", f"expected a whole number from 0 to 100, got {show_value(retries)}")
        retries = 0
    cwd = f.string("cwd", None, nullable=True)
    if cwd is not None and (size := _size(cwd)) > MAX_CWD_BYTES:
        f.refuse("cwd", too_large("the folder", size, MAX_CWD_BYTES))
    pool = f.string("pool", None, nullable=True)
    if pool is not None and pool and not NAME_PATTERN.fullmatch(pool):
        f.refuse("pool", f"a pool's name: {NAME_RULE}")
    run_as = f.string("run_as", None, nullable=True)
    if run_as is not None and run_as and not RUN_AS_PATTERN.fullmatch(run_as):
        f.refuse("run_as", f"{RUN_AS_RULE}, got {show_value(run_as)}")
    secret_env: dict[str, str] = {}
    env = f.string_map(
        "env",
        ENV_NAME_PATTERN,
        "a variable name has letters, digits and '_', no leading digit",
        secrets=secret_env,
    )
    _check_env(env, f)
    values: dict[str, Any] = dict(
        mode=f.choice("mode", MODES, "one"),
        requires=_read_requires(f),
        timeout=f.duration("timeout", None, nullable=True),
        retries=retries,
        retry_delay=f.duration("retry_delay", 0.0),
        concurrency=f.choice("concurrency", CONCURRENCY_POLICIES, "forbid"),
        misfire=f.choice("misfire", MISFIRE_POLICIES, "run_once"),
        misfire_grace=f.duration("misfire_grace", 3600.0),
        on_lost=f.choice("on_lost", LOST_POLICIES, "record"),
        enabled=f.boolean("enabled", True),
        env=env,
        secret_env=secret_env,
        cwd=cwd or None,
        run_as=run_as or None,
        pool=pool or None,
        pool_wait=f.duration("pool_wait", None, nullable=True),
        notify=_read_notify(data["notify"], problems) if "notify" in data else NotifySpec(),
        **_read_lateness(f),
        description=f.string("description"),
        owner=f.string("owner"),
    )
    seen = {p.path for p in problems}  # a field that said what is wrong with it already
    problems.extend(p for p in unusable if p.path not in seen)
    if problems or schedule is None:
        return None, problems
    spec = TaskSpec(
        name=name,
        group=group,
        schedule=schedule,
        command=command,
        shell=shell,
        file=file,
        file_version=file_version,
        http=http,
        container=container,
        **values,
    )
    return spec, []


def _read_requires(f: _Fields) -> dict[str, str]:
    """``requires``: label -> value, every one an agent must have (sorted by label)."""
    value = f.data.get("requires", _MISSING)
    if value is _MISSING or value is None:
        if value is None:
            f.refuse("requires", 'expected an object such as {"os": "windows"}, got null')
        return {}
    if not isinstance(value, dict):
        f.refuse(
            "requires", f'expected an object such as {{"os": "windows"}}, got {show_value(value)}'
        )
        return {}
    if len(value) > MAX_REQUIRES:
        f.refuse("requires", f"{len(value)} labels; at most {MAX_REQUIRES} are taken")
        return {}
    out: dict[str, str] = {}
    for name, item in value.items():
        where = f"requires.{name}"
        if not isinstance(name, str) or not LABEL_NAME_PATTERN.fullmatch(name):
            f.problems.append(Problem(where, f"{name!r} is not a label name: {LABEL_NAME_RULE}"))
        elif not isinstance(item, str):
            f.problems.append(Problem(where, f"expected a string, got {show_value(item)}"))
        elif len(item) > MAX_LABEL_VALUE or any(ord(c) < 32 or ord(c) == 127 for c in item):
            message = f"at most {MAX_LABEL_VALUE} characters, no control characters"
            f.problems.append(Problem(where, message))
        else:
            out[name] = item
    return dict(sorted(out.items()))


def _read_lateness(f: _Fields) -> dict[str, Any]:
    """``warn_after``, ``deadline`` and ``expect_every`` (the leader's lateness alerts,
    cloudtask/center/lateness.py)."""
    warn_after = f.duration("warn_after", None, nullable=True)
    timeout = f.data.get("timeout")
    try:
        limit = parse_duration(timeout) if timeout is not None else None
    except ValueError:
        limit = None  # refused as the timeout's own problem
    if warn_after is not None and limit and warn_after >= limit:
        f.refuse(
            "warn_after",
            f"must be shorter than the timeout ({format_duration(limit)}): the run is killed "
            "before it would alert",
        )
    deadline = None
    if f.given("deadline"):
        deadline, found = deadline_problems(f.data["deadline"])
        for sub, message in found:
            f.refuse(f"deadline.{sub}" if sub else "deadline", message)
    expect_every = f.duration("expect_every", None, nullable=True)
    if expect_every is not None and expect_every < 1:
        f.refuse("expect_every", "must be at least 1s")
    return {"warn_after": warn_after, "deadline": deadline, "expect_every": expect_every}


def _check_env(env: dict[str, str], f: _Fields) -> None:
    total = 0
    for name, value in env.items():
        size = _size(value)
        total += _size(name) + size + 2  # NAME=value and its NUL, as exec passes it
        if size > MAX_ENV_VALUE_BYTES:
            f.refuse(f"env.{name}", too_large("the value", size, MAX_ENV_VALUE_BYTES))
    if total > MAX_ENV_BYTES:
        f.refuse("env", too_large("the environment (every NAME=value)", total, MAX_ENV_BYTES))


def _read_command(f: _Fields) -> str | tuple[str, ...] | None:
    value = f.data.get("command")
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            f.refuse("command", "must not be empty")
        elif (size := _size(value)) > MAX_COMMAND_BYTES:
            f.refuse("command", too_large("the command", size, MAX_COMMAND_BYTES))
        return value
    if isinstance(value, list):
        pairs = f.string_list("command")
        if pairs is not None and not pairs[0][1].strip():
            f.refuse("command[0]", "the program to run must not be empty")
        elif pairs is not None:
            size = sum(_size(arg) for _, arg in pairs) + len(pairs) - 1
            if size > MAX_COMMAND_BYTES:
                what = "the command (its arguments joined by spaces)"
                f.refuse("command", too_large(what, size, MAX_COMMAND_BYTES))
        return tuple(value)
    f.refuse("command", f"expected a string or a list of strings, got {show_value(value)}")
    return None


def _read_http(value: object, problems: list[Problem]) -> HttpSpec | None:
    if not isinstance(value, dict):
        problems.append(Problem("http", f"expected an object with a url, got {show_value(value)}"))
        return None
    before = len(problems)
    f = _Fields(value, "http", problems)
    f.unknown_keys(HTTP_KEYS)
    urls: list[tuple[str, str]] = []
    if f.given("url") and f.given("urls"):
        f.refuse("urls", "give url or urls, not both")
    elif f.given("url"):
        url = f.string("url", None)
        urls = [("http.url", url)] if url is not None else []
    elif f.given("urls"):
        urls = [(f"http.{where}", u) for where, u in f.string_list("urls") or []]
    else:
        problems.append(Problem("http", "required: a url (or a list of urls)"))
    for where, url in urls:
        if not _is_web_url(url):
            problems.append(
                Problem(where, f"{url!r} is not an http:// or https:// URL with a host")
            )
    method = value.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        f.refuse("method", f"expected one of {', '.join(HTTP_METHODS)}, got {show_value(method)}")
    body = value.get("body")
    body_secret = secret_ref(body)
    if body_secret is None:
        f.refuse("body", f'expected {{"secret": "NAME"}}: {SECRET_NAME_RULE}')
        body = None
    elif body_secret:
        body = None
    elif isinstance(body, (dict, list)):
        body = json.dumps(body)
    elif body is not None and not isinstance(body, str):
        f.refuse("body", f"expected a string or a JSON object or list, got {show_value(body)}")
    if isinstance(body, str) and (size := _size(body)) > MAX_HTTP_BODY_BYTES:
        f.refuse("body", too_large("the body", size, MAX_HTTP_BODY_BYTES))
    expect = value.get("expect_status")
    statuses = expect if isinstance(expect, list) else [expect]
    if expect is not None and (
        not statuses or any(type(s) is not int or not 100 <= s <= 599 for s in statuses)
    ):
        message = "expected an HTTP status from 100 to 599 or a list of them"
        f.refuse("expect_status", f"{message}, got {show_value(expect)}")
    secret_headers: dict[str, str] = {}
    headers = f.string_map(
        "headers",
        _HEADER_NAME,
        "a header name has letters, digits and '-'",
        one_line=True,
        secrets=secret_headers,
    )
    size = sum(_size(name) + _size(item) + 4 for name, item in headers.items())  # "N: v\r\n"
    if size > MAX_HTTP_HEADERS_BYTES:
        f.refuse(
            "headers", too_large("the headers (every Name: value)", size, MAX_HTTP_HEADERS_BYTES)
        )
    spec = HttpSpec(
        urls=tuple(url for _, url in urls),
        strategy=f.choice("strategy", HTTP_STRATEGIES, "first"),
        method=method.upper() if isinstance(method, str) else "GET",
        headers=headers,
        body=body if isinstance(body, str) else None,
        expect_status=tuple(statuses) if expect is not None else None,
        timeout=f.duration("timeout", None, nullable=True),
        callback=f.boolean("callback", False),
        secret_headers=secret_headers,
        body_secret=body_secret or None,
    )
    return spec if len(problems) == before else None


def _read_notify(value: object, problems: list[Problem]) -> NotifySpec:
    if not isinstance(value, dict):
        message = (
            f'expected an object such as {{"emails": [...], "on": [...]}}, got {show_value(value)}'
        )
        problems.append(Problem("notify", message))
        return NotifySpec()
    f = _Fields(value, "notify", problems)
    f.unknown_keys(NOTIFY_KEYS)
    emails: list[str] = []
    for where, email in (f.string_list("emails", empty=True) or []) if "emails" in value else []:
        if not _EMAIL.fullmatch(email):
            problems.append(Problem(f"notify.{where}", f"{email!r} is not an email address"))
        emails.append(email)
    on = [] if "on" in value else list(DEFAULT_NOTIFY_ON)
    for where, event in (f.string_list("on", empty=True) or []) if "on" in value else []:
        if event not in NOTIFY_EVENTS:
            message = f"expected one of {', '.join(NOTIFY_EVENTS)}, got {event!r}"
            problems.append(Problem(f"notify.{where}", message))
        elif event not in on:
            on.append(event)
    return NotifySpec(emails=tuple(emails), on=tuple(on))


def _is_web_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host_ok = bool(parts.hostname) and not any(c.isspace() for c in url)
        return parts.scheme in ("http", "https") and host_ok
    except ValueError:
        return False

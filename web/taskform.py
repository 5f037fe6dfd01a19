"""The task form's translation: its fields <-> a task spec. Pure: no Flask, no store.

The form (``web/templates/tasks/form.html``) shows a task as fields, or as the whole spec in
JSON. :func:`form_spec` builds the spec the fields describe (the same JSON the API and
``cloudtask apply`` take), with the problems only the form can see (a header or env line
without its separator); the model (:mod:`cloudtask.task`) says the rest. :func:`spec_form`
is the inverse: the fields showing a stored (canonical) spec, or the JSON editor when the
fields cannot show it whole (:func:`fits_fields`). :func:`field_of` maps a problem's path
(``schedule.cron``, ``http.url``, ``env.X``) to the field that shows it; problems of no field
are shown at the top. :func:`read_form` reads the posted form as typed.

A stored secret is given in the fields as ``secret:NAME``: an env line ``PGPASSWORD=secret:db``,
a header line ``Authorization: secret:api-token``, or a body that is only ``secret:NAME``;
the spec holds ``{"secret": NAME}`` there, and the form shows it back the same way (never a
value: the web process has none). A plain value that itself begins with ``secret:`` cannot
be told from a reference in the fields, so a task holding one is edited as JSON.

A form is a dict: the text fields (``TEXT_FIELDS``) as typed, the checkboxes
(``CHECKBOXES``) as booleans, ``notify_on`` as a list of event names. Which field shows each
top-level key of the spec, and the keys' defaults, come from the model's field table
(:data:`cloudtask.task.TASK_FIELDS`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from cloudtask import jsonlimits
from cloudtask.exceptions import Problem
from cloudtask.schedules import timezone_problem
from cloudtask.task import TASK_FIELDS, TaskField, secret_ref

SECRET_PREFIX = "secret:"  # a value typed so is a stored secret's name: {"secret": NAME}

SCHEDULE_KINDS = ("cron", "every", "at", "keepalive", "after")

TEXT_FIELDS = (
    "name",
    "group",
    "description",
    "owner",
    "schedule_kind",
    "cron",
    "timezone",
    "every",
    "at",
    "after_parents",
    "within",
    "start",
    "end",
    "between_start",
    "between_end",
    "calendar_only",
    "calendar_skip",
    "run_kind",
    "command",
    "file",
    "file_version",
    "cwd",
    "run_as",
    "pool",
    "pool_wait",
    "url",
    "method",
    "headers",
    "body",
    "expect_status",
    "http_timeout",
    "timeout",
    "retries",
    "retry_delay",
    "concurrency",
    "misfire",
    "misfire_grace",
    "on_lost",
    "mode",
    "requires",
    "warn_after",
    "deadline",
    "expect_every",
    "env",
    "notify_emails",
    "spec_json",
    "editor",
    "revision",
)
CHECKBOXES = ("enabled", "shell", "callback")

# the fields that show problems: the text fields and checkboxes, the events of notify_on, and
# "between", the pair of fields of a time window
ERROR_FIELDS = (*TEXT_FIELDS, *CHECKBOXES, "notify_on", "between")
# A top-level key of the spec (the model's field table) is shown by the field of its name,
# but for these; and no field shows the version or a container (the JSON editor does: a spec
# with one opens in it, see fits_fields)
FIELD_OF_KEY = {"schedule": "schedule_kind", "http": "url", "notify": "notify_emails"}
NOT_IN_FIELDS = ("version", "container")
DEFAULTS = {f.name: f.default for f in TASK_FIELDS}


def key_fields(fields: tuple[TaskField, ...] = TASK_FIELDS) -> dict[str, str]:
    """The form field showing each top-level key of ``fields`` the fields show."""
    return {f.name: FIELD_OF_KEY.get(f.name, f.name) for f in fields if f.name not in NOT_IN_FIELDS}


# problem path (indices dropped) -> form field; a path not listed is tried without its last part
FIELD_OF_PATH = {
    **key_fields(),
    "schedule.keepalive": "schedule_kind",
    "schedule.cron": "cron",
    "schedule.timezone": "timezone",
    "schedule.every": "every",
    "schedule.at": "at",
    "schedule.start": "start",
    "schedule.end": "end",
    "schedule.between": "between",
    "schedule.calendar": "calendar_only",
    "schedule.calendar.only": "calendar_only",
    "schedule.calendar.skip": "calendar_skip",
    "http.url": "url",
    "http.urls": "url",
    "http.method": "method",
    "http.headers": "headers",
    "http.body": "body",
    "http.expect_status": "expect_status",
    "http.timeout": "http_timeout",
    "http.callback": "callback",
    "notify.emails": "notify_emails",
    "notify.on": "notify_on",
}
_INDEX = re.compile(r"\[\d+\]")
_NUMBER = re.compile(r"\d+(\.\d+)?", re.ASCII)


def field_of(path: str) -> str | None:
    """The form field that shows a problem at ``path``, or None (shown at the top)."""
    key = _INDEX.sub("", path)
    while key:
        if key in FIELD_OF_PATH:
            return FIELD_OF_PATH[key]
        key = key.rpartition(".")[0]
    return None


def group_problems(problems: list[Problem], editor: str) -> tuple[dict[str, list[str]], list[str]]:
    """Problems by form field, and those of no field (with their path, for the top)."""
    by_field: dict[str, list[str]] = {}
    top: list[str] = []
    for p in problems:
        if editor == "json":
            by_field.setdefault("spec_json", []).append(str(p))
            continue
        where = field_of(p.path)
        if where is None:
            top.append(str(p))
        else:
            by_field.setdefault(where, []).append(p.message)
    return by_field, top


def default_form() -> dict[str, Any]:
    form: dict[str, Any] = {name: "" for name in TEXT_FIELDS}
    form.update(
        schedule_kind="cron",
        cron="0 3 * * *",
        timezone="UTC",
        run_kind="command",
        method="GET",
        retries=str(DEFAULTS["retries"]),
        retry_delay=DEFAULTS["retry_delay"],
        concurrency=DEFAULTS["concurrency"],
        misfire=DEFAULTS["misfire"],
        misfire_grace=DEFAULTS["misfire_grace"],
        on_lost=DEFAULTS["on_lost"],
        mode=DEFAULTS["mode"],
        editor="fields",
        enabled=DEFAULTS["enabled"],
        shell=DEFAULTS["shell"],
        callback=False,
        notify_on=list(DEFAULTS["notify"]["on"]),
    )
    form["spec_json"] = json.dumps(
        {"name": "", "schedule": {"cron": "0 3 * * *", "timezone": "UTC"}, "command": ""},
        indent=2,
    )
    return form


def shown_value(value: Any) -> str:
    """An env, header or body value as its field shows it: ``secret:NAME`` for a reference."""
    name = secret_ref(value)
    return f"{SECRET_PREFIX}{name}" if name else str(value)


def typed_value(text: str) -> Any:
    """A value typed in the env, header or body field: ``secret:NAME`` is a reference."""
    if text.startswith(SECRET_PREFIX):
        return {"secret": text[len(SECRET_PREFIX) :].strip()}
    return text


def _looks_like_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SECRET_PREFIX)


def fits_fields(spec: dict[str, Any]) -> bool:
    """Whether the fields can show this spec without losing anything (else: edit as JSON)."""
    schedule = spec.get("schedule")
    if not isinstance(schedule, dict):
        return False
    if spec.get("command") is not None and not isinstance(spec["command"], str):
        return False
    if spec.get("container") is not None:
        return False  # no field shows it
    requires = spec.get("requires") or {}
    if any(not isinstance(v, str) or v != v.strip() for v in requires.values()):
        return False  # a label=value line is read stripped
    env = (spec.get("env") or {}).values()
    if any("\n" in str(v) or "\r" in str(v) or _looks_like_reference(v) for v in env):
        return False  # the env field holds one KEY=VALUE a line; secret:... is a reference
    if spec.get("deadline") is not None and not isinstance(spec["deadline"], str):
        return False  # a deadline in a time zone of its own: {"at", "days", "timezone"}
    http = spec.get("http")
    if http is not None:
        urls = http.get("urls") or ([http["url"]] if http.get("url") else [])
        body = http.get("body")
        if len(urls) != 1 or not (isinstance(body, (str, type(None))) or secret_ref(body)):
            return False
        if _looks_like_reference(body) or any(
            _looks_like_reference(v) for v in (http.get("headers") or {}).values()
        ):
            return False
    return True


def spec_form(spec: dict[str, Any]) -> dict[str, Any]:
    """The form's fields showing a stored (canonical) spec."""
    form = default_form()
    shown = {k: v for k, v in spec.items() if k != "version"}
    form["spec_json"] = json.dumps(shown, indent=2, ensure_ascii=False)
    if not fits_fields(spec):
        form["editor"] = "json"
    schedule = spec.get("schedule") if isinstance(spec.get("schedule"), dict) else {}
    kind = next((k for k in SCHEDULE_KINDS if k in schedule), "cron")
    between = schedule.get("between") or ["", ""]
    http = spec.get("http") or {}
    urls = http.get("urls") or ([http["url"]] if http.get("url") else [""])
    expect = http.get("expect_status")
    calendar = schedule.get("calendar") if isinstance(schedule.get("calendar"), dict) else {}
    form.update(
        name=spec.get("name", ""),
        group=spec.get("group", DEFAULTS["group"]),
        description=spec.get("description", DEFAULTS["description"]),
        owner=spec.get("owner", DEFAULTS["owner"]),
        enabled=bool(spec.get("enabled", DEFAULTS["enabled"])),
        schedule_kind=kind,
        cron=schedule.get("cron", "") if kind == "cron" else "",
        timezone=schedule.get("timezone", "UTC"),
        every=schedule.get("every", "") if kind == "every" else "",
        at=schedule.get("at", "") if kind == "at" else "",
        after_parents=", ".join(schedule.get("after") or []) if kind == "after" else "",
        within=schedule.get("within", "") if kind == "after" else "",
        start=schedule.get("start", ""),
        end=schedule.get("end", ""),
        between_start=between[0],
        between_end=between[1],
        calendar_only=", ".join(_names(calendar.get("only"))),
        calendar_skip=", ".join(_names(calendar.get("skip"))),
        run_kind="http" if spec.get("http") else "command",
        command=spec.get("command") if isinstance(spec.get("command"), str) else "",
        shell=bool(spec.get("shell")),
        file=spec.get("file") or "",
        file_version=spec.get("file_version") or "",
        cwd=spec.get("cwd") or "",
        run_as=spec.get("run_as") or "",
        pool=spec.get("pool") or "",
        pool_wait=spec.get("pool_wait") or "",
        url=urls[0] if urls else "",
        method=http.get("method", "GET"),
        headers="\n".join(f"{k}: {shown_value(v)}" for k, v in (http.get("headers") or {}).items()),
        body=shown_value(http["body"]) if http.get("body") else "",
        expect_status=", ".join(str(s) for s in expect) if expect else "",
        http_timeout=http.get("timeout") or "",
        callback=bool(http.get("callback")),
        timeout=spec.get("timeout") or "",
        retries=str(spec.get("retries", DEFAULTS["retries"])),
        retry_delay=spec.get("retry_delay", DEFAULTS["retry_delay"]),
        concurrency=spec.get("concurrency", DEFAULTS["concurrency"]),
        misfire=spec.get("misfire", DEFAULTS["misfire"]),
        misfire_grace=spec.get("misfire_grace", DEFAULTS["misfire_grace"]),
        on_lost=spec.get("on_lost", DEFAULTS["on_lost"]),
        mode=spec.get("mode", DEFAULTS["mode"]),
        requires="\n".join(f"{k}={v}" for k, v in (spec.get("requires") or {}).items()),
        warn_after=spec.get("warn_after") or "",
        deadline=spec["deadline"] if isinstance(spec.get("deadline"), str) else "",
        expect_every=spec.get("expect_every") or "",
        env="\n".join(f"{k}={shown_value(v)}" for k, v in (spec.get("env") or {}).items()),
        notify_emails=", ".join((spec.get("notify") or {}).get("emails") or []),
        notify_on=list((spec.get("notify") or {}).get("on") or []),
    )
    return form


def _names(value: Any) -> list[str]:
    """A calendar rule's side (a name or a list of names) as a list."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def name_list(text: str) -> Any:
    """Names typed with commas or spaces between: one is a string, more a list (as the model's
    canonical form writes a calendar rule's side)."""
    names = [n for n in re.split(r"[\s,]+", text) if n]
    return names[0] if len(names) == 1 else names


def read_form(data: Any) -> dict[str, Any]:
    """The posted form, as typed."""
    form = default_form()
    for name in TEXT_FIELDS:
        form[name] = str(data.get(name, ""))
    for name in CHECKBOXES:
        form[name] = data.get(name) in ("on", "true", "1", "yes")
    form["notify_on"] = [e for e in data.getlist("notify_on") if isinstance(e, str)]
    if form["editor"] not in ("fields", "json"):
        form["editor"] = "fields"
    return form


def small_number(text: str) -> bool:
    """Digits 0-9 only (``"²".isdigit()`` is true, but int() refuses it), at most 15 of them:
    anything else goes to the model as typed, which says what is wrong."""
    return text.isascii() and text.isdecimal() and len(text) <= 15


def duration_value(text: str) -> Any:
    """A duration field: a bare number means seconds; anything else goes to the model as typed."""
    text = text.strip()
    if len(text) <= 20 and _NUMBER.fullmatch(text):
        return float(text) if "." in text else int(text)
    return text


def instant_value(text: str, zone_name: str) -> str:
    """A time field: ISO 8601; without an offset, read in the form's time zone."""
    text = text.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text  # the model says why
    if parsed.tzinfo is not None or timezone_problem(zone_name or "UTC"):
        return text
    return parsed.replace(tzinfo=ZoneInfo(zone_name or "UTC")).isoformat()


def _lines(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _pairs(
    text: str, separator: str, path: str, shape: str, problems: list[Problem]
) -> list[tuple[str, str]]:
    """The ``name<separator>value`` lines of a field (the name stripped); a line without
    the separator or a name is a problem at ``path`` saying its number."""
    out = []
    for number, line in _lines(text):
        name, found, value = line.partition(separator)
        if not found or not name.strip():
            problems.append(Problem(path, f"line {number}: expected {shape}, got {line!r}"))
        else:
            out.append((name.strip(), value))
    return out


def form_spec(form: dict[str, Any]) -> tuple[Any, list[Problem]]:
    """The spec the form describes, and the problems only the form can see (bad lines).

    In JSON mode, the spec is the JSON text (a syntax error is a problem of ``spec_json``)."""
    problems: list[Problem] = []
    if form["editor"] == "json":
        try:  # never json.loads: 100,000 "[" would be a RecursionError (a 500)
            return jsonlimits.loads(form["spec_json"]), []
        except ValueError as e:
            return None, [Problem("", f"the JSON is not valid: {e}")]
    spec: dict[str, Any] = {}
    for key in ("name", "group"):
        if form[key].strip():
            spec[key] = form[key].strip()
    spec["description"] = form["description"]
    spec["owner"] = form["owner"].strip()
    spec["enabled"] = form["enabled"]

    kind = form["schedule_kind"] if form["schedule_kind"] in SCHEDULE_KINDS else "cron"
    tz = form["timezone"].strip()
    schedule: dict[str, Any] = {}
    if kind == "cron":
        schedule["cron"] = form["cron"].strip()
    elif kind == "every":
        schedule["every"] = duration_value(form["every"])
    elif kind == "at":
        schedule["at"] = instant_value(form["at"], tz)
    elif kind == "after":
        schedule["after"] = [p for p in re.split(r"[\s,]+", form["after_parents"]) if p]
        if form["within"].strip():
            schedule["within"] = duration_value(form["within"])
    else:
        schedule["keepalive"] = True
    if kind in ("cron", "every", "after") and tz:
        schedule["timezone"] = tz
    # the window fields a kind takes (the page hides the others, so they are ignored)
    for key in ("start", "end") if kind not in ("keepalive", "after") else ():
        if form[key].strip():
            schedule[key] = instant_value(form[key], tz)
    between = [form["between_start"].strip(), form["between_end"].strip()]
    if any(between) and kind in ("cron", "every"):
        schedule["between"] = between
    calendar = {
        side: name_list(form[f"calendar_{side}"])
        for side in ("only", "skip")
        if form[f"calendar_{side}"].strip()
    }
    if calendar and kind in ("cron", "every"):
        schedule["calendar"] = calendar
    spec["schedule"] = schedule

    if form["run_kind"] == "http":
        http: dict[str, Any] = {"url": form["url"].strip(), "method": form["method"] or "GET"}
        pairs = _pairs(form["headers"], ":", "http.headers", "'Name: value'", problems)
        headers = {name: typed_value(value.strip()) for name, value in pairs}
        if headers:
            http["headers"] = headers
        if form["body"]:
            body = form["body"].strip()
            one_line = "\n" not in body and body.startswith(SECRET_PREFIX)
            http["body"] = typed_value(body) if one_line else form["body"]
        statuses = [s for s in re.split(r"[,\s]+", form["expect_status"]) if s]
        if statuses:
            values = [int(s) if small_number(s) else s for s in statuses]
            http["expect_status"] = values[0] if len(values) == 1 else values
        if form["http_timeout"].strip():
            http["timeout"] = duration_value(form["http_timeout"])
        http["callback"] = form["callback"]
        spec["http"] = http
    else:
        if form["command"].strip():
            spec["command"] = form["command"]
        spec["shell"] = form["shell"]
        if form["file"].strip():
            spec["file"] = form["file"].strip()
        if form["file_version"].strip():
            spec["file_version"] = form["file_version"].strip()
        if form["cwd"].strip():
            spec["cwd"] = form["cwd"].strip()
        if form["run_as"].strip():
            spec["run_as"] = form["run_as"].strip()

    if form["timeout"].strip():
        spec["timeout"] = duration_value(form["timeout"])
    if form["pool"].strip():
        spec["pool"] = form["pool"].strip()
    if form["pool_wait"].strip():
        spec["pool_wait"] = duration_value(form["pool_wait"])
    retries = form["retries"].strip()
    if retries:
        spec["retries"] = int(retries) if small_number(retries) else retries
    for key in ("retry_delay", "misfire_grace"):
        if form[key].strip():
            spec[key] = duration_value(form[key])
    for key in ("concurrency", "misfire", "on_lost", "mode"):
        if form[key]:
            spec[key] = form[key]
    for key in ("warn_after", "expect_every"):
        if form[key].strip():
            spec[key] = duration_value(form[key])
    if form["deadline"].strip():
        spec["deadline"] = form["deadline"].strip()
    pairs = _pairs(form["requires"], "=", "requires", "label=value", problems)
    spec["requires"] = {label: value.strip() for label, value in pairs}
    pairs = _pairs(form["env"], "=", "env", "KEY=VALUE", problems)
    spec["env"] = {name: typed_value(value) for name, value in pairs}
    emails = [e for e in re.split(r"[,;\s]+", form["notify_emails"]) if e]
    spec["notify"] = {"emails": emails, "on": form["notify_on"]}
    return spec, problems

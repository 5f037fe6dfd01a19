"""The schemas of the REST API's bodies, as the OpenAPI document's ``components/schemas``
(``SCHEMAS``): what the API takes and gives. The task spec's mirrors the model
(:mod:`cloudtask.task`), whose names, choices and bounds it reads: its top-level keys are the
model's field table (``TASK_FIELDS``: type, required, default, description, choices), each
type given here in JSON Schema (``TYPE_SCHEMAS``). The machinery that builds
the document from the routes is :mod:`web.openapi`.
"""

from __future__ import annotations

from typing import Any

from cloudtask.runmodel import FINISHED_STATUSES, RESULT_STATUSES, STATUSES
from cloudtask.schedules import EVERY_MAX, EVERY_MIN
from cloudtask.task import (
    HTTP_METHODS,
    HTTP_STRATEGIES,
    LABEL_NAME_PATTERN,
    MAX_LABEL_VALUE,
    MAX_REQUIRES,
    MAX_RETRIES,
    MAX_TASK_DURATION,
    NAME_PATTERN,
    NOTIFY_EVENTS,
    SECRET_NAME_PATTERN,
    SECRET_NAME_RULE,
    TASK_FIELDS,
    TaskField,
)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STRING = {"type": "string"}
TIME = {"type": "string", "format": "date-time", "description": "ISO 8601, UTC"}
NAME = {
    "type": "string",
    "pattern": f"^{NAME_PATTERN.pattern}$",
    "description": "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
}
DURATION = {
    "description": "A duration such as '30s', '10m', '1h30m', '2d', or a number of seconds",
    "anyOf": [
        {"type": "string", "minLength": 1, "examples": ["30s", "10m"]},
        {"type": "number", "minimum": 0, "maximum": MAX_TASK_DURATION},
    ],
}
INSTANT = {
    "type": "string",
    "description": "ISO 8601 with a UTC offset, such as 2026-12-01T03:00:00Z",
    "examples": ["2026-12-01T03:00:00Z"],
}
WINDOW = {
    "start": INSTANT,
    "end": INSTANT,
    "between": {
        "type": "array",
        "items": {"type": "string", "pattern": "^([01]?[0-9]|2[0-3]):[0-5][0-9]$"},
        "minItems": 2,
        "maxItems": 2,
        "description": 'Local times ["08:00", "18:00"]: fires only inside (end exclusive)',
    },
    "calendar": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "description": "Stored calendars (cloudtask calendar set): fires only on the local dates "
        "of an `only` calendar and never on those of a `skip` one; a fire on another date does "
        "not exist",
        "properties": {
            side: {"anyOf": [NAME, {"type": "array", "items": NAME, "minItems": 1, "maxItems": 10}]}
            for side in ("only", "skip")
        },
        "examples": [{"only": "workdays", "skip": "de-holidays"}],
    },
}
TIMEZONE = {"type": "string", "description": "An IANA time zone (UTC)", "examples": ["UTC"]}
SECRET_NAME = {
    "type": "string",
    "pattern": f"^{SECRET_NAME_PATTERN.pattern}$",
    "description": SECRET_NAME_RULE,
}
SECRET_REF = {
    "type": "object",
    "description": 'A stored secret, by name: {"secret": "NAME"} (opened by the agent just '
    "before the run; the task shows only the name)",
    "required": ["secret"],
    "additionalProperties": False,
    "properties": {"secret": SECRET_NAME},
}
STRING_OR_SECRET = {"anyOf": [{"type": "string"}, SECRET_REF]}


def _schedule(kind: str, value: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [kind],
        "properties": {kind: value, **more},
        "additionalProperties": False,
    }


SCHEDULE_ONE = {
    "oneOf": [
        _schedule(
            "cron",
            {"type": "string", "description": "5 fields, or 6 with seconds first"},
            timezone=TIMEZONE,
            **WINDOW,
        ),
        _schedule(
            "every",
            {
                "description": f"From {EVERY_MIN:g}s to {EVERY_MAX / 86400:g}d",
                "anyOf": [
                    {"type": "string", "minLength": 1, "examples": ["30s"]},
                    {"type": "number", "minimum": EVERY_MIN, "maximum": EVERY_MAX},
                ],
            },
            timezone=TIMEZONE,
            **WINDOW,
        ),
        _schedule("at", INSTANT, start=INSTANT, end=INSTANT),
        _schedule("keepalive", {"const": True}),
    ]
}
STRINGS = {"type": "array", "items": STRING}
HTTP_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "description": "A web service call made instead of a command",
    "properties": {
        "url": {"type": "string", "description": "http:// or https:// with a host"},
        "urls": {**STRINGS, "minItems": 1},
        "strategy": {"enum": list(HTTP_STRATEGIES)},
        "method": {"enum": list(HTTP_METHODS)},
        "headers": {
            "type": "object",
            "additionalProperties": STRING_OR_SECRET,
            "description": 'A value may be a stored secret: {"secret": "NAME"}',
        },
        "body": {
            "description": 'Text, JSON (sent as JSON), or a stored secret: {"secret": "NAME"}',
            "anyOf": [STRING, SECRET_REF, {"type": "object"}, {"type": "array"}, {"type": "null"}],
        },
        "expect_status": {
            "anyOf": [
                {"type": "integer", "minimum": 100, "maximum": 599},
                {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "integer", "minimum": 100, "maximum": 599},
                },
                {"type": "null"},
            ]
        },
        "timeout": nullable(DURATION),
        "callback": {
            "type": "boolean",
            "description": "The service answers at once and reports later "
            "(POST /api/v1/runs/{run_id}/progress and /result)",
        },
    },
}
SCHEDULE = {"anyOf": [SCHEDULE_ONE, {"type": "array", "minItems": 1, "items": SCHEDULE_ONE}]}
COMMAND = {"anyOf": [{"type": "string", "minLength": 1}, {**STRINGS, "minItems": 1}]}
ENV = {
    "type": "object",
    "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
    "additionalProperties": STRING_OR_SECRET,
    "description": 'A value may be a stored secret: {"secret": "NAME"}',
}
NOTIFY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "emails": STRINGS,
        "on": {"type": "array", "items": {"enum": list(NOTIFY_EVENTS)}},
    },
}
REQUIRES = {
    "type": "object",
    "maxProperties": MAX_REQUIRES,
    "propertyNames": {"pattern": f"^{LABEL_NAME_PATTERN.pattern}$"},
    "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE},
    "examples": [{"os": "windows", "zone": "eu-1"}],
}
CONTAINER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "examples": ["alpine:3.20"]},
        "args": {"type": ["array", "null"], "items": STRING},
        "env": {"type": ["object", "null"], "additionalProperties": STRING},
        "volumes": {
            "type": ["array", "null"],
            "items": {"type": "string", "examples": ["/srv/data:/data:ro"]},
            "description": "host:container or host:container:ro, absolute paths",
        },
        "cpus": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1024},
        "memory": {
            "anyOf": [
                {"type": "string", "examples": ["512m", "2g"]},
                {"type": "integer"},
                {"type": "null"},
            ],
            "description": "512m, 2g, 65536k or bytes; at least 6m",
        },
    },
}
# a task's deadline (cloudtask/deadlines.py): "06:00", "06:00 mon-fri", or an object
DEADLINE = {
    "anyOf": [
        {"type": "string", "pattern": r"^([01]?\d|2[0-3]):[0-5]\d(\s.*)?$", "example": "06:00"},
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["at"],
            "properties": {
                "at": {"type": "string", "pattern": r"^([01]?\d|2[0-3]):[0-5]\d$"},
                "days": {"type": "string", "example": "mon-fri"},
                "timezone": {"type": "string", "example": "Europe/Berlin"},
            },
        },
    ]
}
# each type of the model's field table (cloudtask.task.FIELD_TYPES) in JSON Schema
TYPE_SCHEMAS: dict[str, dict[str, Any]] = {
    "string": STRING,
    "name": NAME,
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "integer": {"type": "integer"},
    "boolean": {"type": "boolean"},
    "duration": DURATION,
    "schedule": SCHEDULE,
    "command": COMMAND,
    "http": HTTP_SPEC,
    "env": ENV,
    "notify": NOTIFY,
    "deadline": DEADLINE,
    "requires": REQUIRES,
    "container": CONTAINER,
}
# the bounds a field has beyond its type
FIELD_BOUNDS: dict[str, dict[str, Any]] = {"retries": {"minimum": 0, "maximum": MAX_RETRIES}}


def or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or null: a plain type becomes a list of types, a choice gets one more."""
    if isinstance(schema.get("type"), str) and "properties" not in schema:
        return {**schema, "type": [schema["type"], "null"]}
    if "anyOf" in schema:
        return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}
    return nullable(schema)


def task_property(field: TaskField) -> dict[str, Any]:
    """The schema of one top-level key of a task spec, from the model's field table."""
    if field.enum:
        schema = {"const": field.enum[0]} if len(field.enum) == 1 else {"enum": list(field.enum)}
    else:
        schema = {**TYPE_SCHEMAS[field.type], **FIELD_BOUNDS.get(field.name, {})}
    note = schema.get("description")
    if field.nullable:
        schema = or_null(schema)
    schema["description"] = field.description
    if note and note != field.description:  # what the type says: a name's rule, a duration's
        schema["description"] += f" ({note[0].lower()}{note[1:]})"
    if not field.required:
        schema["default"] = field.default
    return schema


TASK_SPEC_PROPERTIES = {field.name: task_property(field) for field in TASK_FIELDS}
TASK_SPEC = {
    "type": "object",
    "description": "A task, as README.md 'A task' describes it. A task runs a command or an "
    "http call; every problem is reported at once, each with its path.",
    "required": [field.name for field in TASK_FIELDS if field.required],
    "additionalProperties": False,
    "properties": TASK_SPEC_PROPERTIES,
    "examples": [
        {
            "name": "nightly-cleanup",
            "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
            "command": ["python", "cleanup.py", "--days", "7"],
            "timeout": "10m",
        }
    ],
}
TASK_PATCH = {
    "type": "object",
    "description": "Top-level keys of the task spec to change (null removes a key)",
    "additionalProperties": False,
    "properties": {key: nullable(value) for key, value in TASK_SPEC_PROPERTIES.items()},
}
LAST_RUN = {
    "type": ["object", "null"],
    "description": "The task's latest finished run",
    "properties": {
        "id": STRING,
        "status": {"enum": list(FINISHED_STATUSES)},
        "finished": {"type": "number", "description": "epoch seconds"},
        "duration": {"type": ["number", "null"]},
        "trigger": {"type": ["string", "null"]},
    },
}
_TASK_FIELDS = {
    "id": STRING,
    "name": STRING,
    "group": STRING,
    "enabled": {"type": "boolean"},
    "done": {"type": "boolean", "description": "A one-shot task that has run"},
    "state": {"enum": ["enabled", "paused", "done"]},
    "revision": {"type": "integer", "minimum": 1},
    "created_at": nullable(TIME),
    "updated_at": nullable(TIME),
    "last_run": LAST_RUN,
    "owner_agent": {
        "type": ["string", "null"],
        "description": "The agent that owns the task now (null: none, or no cluster)",
    },
}
WARNINGS = {
    "type": "array",
    "description": "What was stored but looks wrong, such as a header named like a credential "
    'given in clear (store it as a secret and give {"secret": "NAME"}); only in the answer '
    "of a create, replace or patch",
    "items": {
        "type": "object",
        "required": ["path", "message"],
        "properties": {"path": STRING, "message": STRING},
    },
}
TASK = {
    "type": "object",
    "required": [*_TASK_FIELDS, "spec", "next_fires"],
    "properties": {
        **_TASK_FIELDS,
        "warnings": WARNINGS,
        "spec": {"type": "object", "description": "The canonical task spec (every key)"},
        "next_fires": {
            "type": "array",
            "items": TIME,
            "maxItems": 10,
            "description": "The next 10 fire times in UTC (none for keepalive or done tasks)",
        },
        "next_fires_skipped": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["at", "reason"],
                "properties": {"at": TIME, "reason": STRING},
            },
            "description": "Those of next_fires a blackout of the task's group will record "
            "skipped, with the reason ('blackout NAME'); absent when none",
        },
        "dependencies": {
            "type": "object",
            "description": "For a task that runs after others: what it waits for",
            "properties": {
                "summary": STRING,
                "date": nullable(STRING),
                "within": nullable({"type": "number"}),
                "parents": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": STRING,
                            "task_id": nullable(STRING),
                            "state": STRING,
                            "run_id": nullable(STRING),
                        },
                    },
                },
            },
        },
    },
}
TASK_SUMMARY = {
    "type": "object",
    "required": list(_TASK_FIELDS),
    "properties": {
        **_TASK_FIELDS,
        "spec": {
            "type": "object",
            "description": "Part of the spec: schedule, owner, description",
        },
    },
}


def _page(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items", "page", "per_page", "total", "capped"],
        "properties": {
            "items": {"type": "array", "items": ref(item)},
            "page": {"type": "integer", "minimum": 1},
            "per_page": {"type": "integer", "minimum": 1},
            "total": {"type": "integer", "minimum": 0},
            "capped": {"type": "boolean", "description": "total is a lower bound"},
        },
    }


RUN_STATUS = {"enum": list(STATUSES)}
RUN = {
    "type": "object",
    "description": "A run of a task (never its token; its output is at /output)",
    "required": ["id", "task_id", "task_name", "status", "trigger", "scheduled_for"],
    "properties": {
        "id": STRING,
        "task_id": STRING,
        "task_name": STRING,
        "group": STRING,
        "revision": {"type": "integer"},
        "scheduled_for": TIME,
        "ts": {"type": "number", "description": "scheduled_for in epoch seconds"},
        "slot": STRING,
        "attempt": {"type": "integer", "minimum": 0},
        "trigger": STRING,
        "agent": {"type": ["string", "null"]},
        "status": RUN_STATUS,
        "claimed_at": nullable(TIME),
        "started_at": nullable(TIME),
        "finished_at": nullable(TIME),
        "duration": {"type": ["number", "null"], "description": "seconds"},
        "exit_code": {"type": ["integer", "null"]},
        "http_status": {"type": ["integer", "null"]},
        "error": {"type": ["string", "null"]},
        "requested_by": {"type": ["string", "null"]},
        "shard": {
            "type": "object",
            "description": "A mode all run's place among its task's agents "
            "(CLOUDTASK_SHARD_INDEX, CLOUDTASK_SHARD_TOTAL)",
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "total": {"type": "integer", "minimum": 1},
            },
        },
    },
}
REPORT = {
    "type": ["object", "null"],
    "description": "What the service of an http task reported (null: nothing yet)",
    "required": ["percent", "message", "result"],
    "properties": {
        "percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
        "message": STRING,
        "updated_at": TIME,
        "result": {
            "type": ["object", "null"],
            "properties": {
                "status": {"enum": list(RESULT_STATUSES)},
                "message": STRING,
                "at": TIME,
            },
        },
    },
}
AGENT = {
    "type": "object",
    "required": ["agent_id", "group", "host", "pid", "status", "running", "tasks", "last_seen"],
    "properties": {
        "agent_id": STRING,
        "group": STRING,
        "host": {"type": ["string", "null"]},
        "pid": {"type": ["integer", "null"]},
        "status": {"enum": ["online", "leaving", "offline"]},
        "load": {
            "type": "object",
            "properties": {
                "cpu_percent": {
                    "type": ["number", "null"],
                    "description": "The machine's CPU use, all cores, to 5 %",
                },
                "memory_percent": {
                    "type": ["number", "null"],
                    "description": "The machine's memory in use, to 1 %",
                },
                "agent_cpu_percent": {
                    "type": ["number", "null"],
                    "description": "The agent process's own CPU use (100 = one core), to 1 %",
                },
                "agent_rss_mb": {
                    "type": ["number", "null"],
                    "description": "The agent process's resident memory, to 10 MB",
                },
            },
        },
        "running": {"type": "integer", "description": "Runs going on it now"},
        "tasks": {"type": "integer", "description": "Tasks assigned to it"},
        "last_seen": {
            "anyOf": [TIME, {"type": "null"}],
            "description": "null for a live agent (seen now)",
        },
    },
}
FILE_INFO = {
    "type": "object",
    "required": ["id", "name", "sha256", "size"],
    "properties": {
        "id": STRING,
        "name": STRING,
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "size": {"type": "integer", "minimum": 0},
        "uploaded_by": STRING,
        "uploaded_at": {"type": ["string", "null"], "description": "ISO 8601, UTC"},
        "versions": {"type": "integer", "minimum": 1},
        "created": {
            "type": "boolean",
            "description": "false: the bytes equal the latest version's; no version was added",
        },
    },
}


SECRET = {
    "type": "object",
    "description": "A stored secret: never its value. A viewer sees the name and the tasks "
    "using it; an operator also the rest.",
    "required": ["name", "used_by"],
    "not": {"anyOf": [{"required": ["value"]}, {"required": ["ciphertext"]}]},
    "properties": {
        "name": STRING,
        "description": STRING,
        "key_id": {"type": ["string", "null"], "description": "The key it is sealed under"},
        "revision": {"type": ["integer", "null"], "description": "How often its value was set"},
        "created_at": nullable(TIME),
        "created_by": {"type": ["string", "null"]},
        "updated_at": nullable(TIME),
        "updated_by": {"type": ["string", "null"]},
        "used_by": {
            "type": "array",
            "description": "The tasks whose definition names it",
            "items": {
                "type": "object",
                "required": ["id", "name"],
                "properties": {"id": STRING, "name": STRING},
            },
        },
    },
}


def _items(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": ref(item)}},
    }


EVENT = {
    "type": "object",
    "required": ["id", "kind", "severity", "at", "ts", "message"],
    "properties": {
        "id": STRING,
        "version": {"type": "integer"},
        "kind": STRING,
        "severity": {"enum": ["error", "warning", "info"]},
        "at": {"type": "string", "format": "date-time"},
        "ts": {"type": "number", "description": "at, in epoch seconds"},
        "message": STRING,
        "task_id": {"type": ["string", "null"]},
        "task_name": {"type": ["string", "null"]},
        "group": {"type": ["string", "null"]},
        "run_id": {"type": ["string", "null"]},
        "agent": {"type": ["string", "null"]},
        "details": {"type": "object", "description": "What the kind adds"},
    },
}


# --- plans (web/api/plans.py, cloudtask/plans.py) ---------------------------------------------

PLAN_ITEM_IN = {
    "type": "object",
    "required": ["type"],
    "description": "A task to run once: the task fields of a task spec (command, file or "
    "http; timeout, retries, retry_delay, env, cwd, run_as, description), without a schedule",
    "properties": {
        "type": {"type": "string", "description": "The agent group that runs it"},
        "name": STRING,
        "priority": {"type": "integer", "minimum": 0, "maximum": 1000},
        "not_before": INSTANT,
        "external_id": {"type": "string", "minLength": 1, "maxLength": 200},
    },
}
PLAN_ITEM = {
    "type": "object",
    "required": ["item_id", "index", "state", "attempt", "run_id"],
    "properties": {
        "item_id": STRING,
        "index": {"type": "integer"},
        "name": nullable(STRING),
        "type": nullable(STRING),
        "external_id": nullable(STRING),
        "state": {"type": "string", "enum": [*STATUSES, "retrying"]},
        "final": {"type": "boolean"},
        "attempt": {"type": "integer"},
        "run_id": STRING,
        "agent": nullable(STRING),
        "started_at": nullable(TIME),
        "finished_at": nullable(TIME),
        "exit_code": nullable({"type": "integer"}),
        "error": nullable(STRING),
    },
}
PLAN_SUMMARY = {
    "type": "object",
    "required": ["plan_id", "name", "total", "counts", "done"],
    "properties": {
        "plan_id": STRING,
        "name": STRING,
        "submitter": nullable(STRING),
        "callback_url": nullable(STRING),
        "created_at": nullable(TIME),
        "cancelled_at": nullable(TIME),
        "cancelled_by": nullable(STRING),
        "total": {"type": "integer"},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "done": {"type": "boolean"},
    },
}
PLAN_SCHEMAS: dict[str, Any] = {
    "PlanSubmit": {
        "type": "object",
        "required": ["items"],
        "properties": {
            "name": {"type": "string", "maxLength": 200},
            "callback_url": nullable(STRING),
            "items": {"type": "array", "minItems": 1, "items": PLAN_ITEM_IN},
        },
    },
    "PlanReceipt": {
        "type": "object",
        "required": ["plan_id", "accepted", "existing", "items"],
        "properties": {
            "plan_id": STRING,
            "accepted": {"type": "integer"},
            "existing": {"type": "integer"},
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "item_id", "plan_id", "existing"],
                    "properties": {
                        "index": {"type": "integer"},
                        "item_id": STRING,
                        "plan_id": STRING,
                        "name": STRING,
                        "type": STRING,
                        "external_id": nullable(STRING),
                        "existing": {"type": "boolean"},
                    },
                },
            },
        },
    },
    "PlanSummary": PLAN_SUMMARY,
    "PlanList": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": ref("PlanSummary")}},
    },
    "PlanItem": PLAN_ITEM,
    "Plan": {
        "allOf": [
            ref("PlanSummary"),
            {
                "type": "object",
                "required": ["items"],
                "properties": {"items": {"type": "array", "items": ref("PlanItem")}},
            },
        ]
    },
    "PlanItemList": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": ref("PlanItem")}},
    },
    "PlanCancelled": {
        "type": "object",
        "required": ["plan_id", "dropped", "killing"],
        "properties": {
            "plan_id": STRING,
            "dropped": {"type": "integer"},
            "killing": {"type": "integer"},
        },
    },
    "PlanItemCancelled": {
        "type": "object",
        "required": ["item_id", "dropped", "killing"],
        "properties": {
            "item_id": STRING,
            "dropped": {"type": "boolean"},
            "killing": {"type": "integer"},
        },
    },
}


# --- users and tokens, settings, the audit log, file versions (web/api/users.py ...) -------

TOKEN = {
    "type": "object",
    "description": "An API token as it may be shown: never the token itself",
    "required": ["id", "name", "scope", "expires_at", "expired"],
    "not": {"anyOf": [{"required": ["hash"]}, {"required": ["token"]}]},
    "properties": {
        "id": STRING,
        "name": STRING,
        "scope": {"enum": ["all", "read"], "description": "read: GET and HEAD only"},
        "created_at": nullable(TIME),
        "last_used_at": {"type": ["number", "null"], "description": "epoch seconds; null: never"},
        "expires_at": {"type": ["number", "null"], "description": "epoch seconds; null: never"},
        "expired": {"type": "boolean"},
    },
}
USER = {
    "type": "object",
    "description": "A user: never a password or a hash",
    "required": ["username", "role", "enabled", "source", "tokens"],
    "not": {"anyOf": [{"required": ["password"]}, {"required": ["password_hash"]}]},
    "properties": {
        "username": STRING,
        "role": {"enum": ["viewer", "operator", "admin"]},
        "enabled": {"type": "boolean"},
        "source": {
            "enum": ["local", "ldap", "oidc"],
            "description": "Who checks the password: CloudTask, the directory or the provider",
        },
        "refused": {"type": "boolean", "description": "The directory or provider refused it"},
        "created_at": nullable(TIME),
        "tokens": {"type": "array", "items": ref("Token")},
    },
}
PASSWORD = {"type": "string", "minLength": 10, "description": "At least 10 characters"}
SETTING = {
    "type": "object",
    "required": ["source"],
    "properties": {
        "source": {
            "enum": ["database", "file"],
            "description": "database: saved from the settings page or the API; file: the "
            "config file (or its environment overrides, or the default)",
        },
        "value": {"description": "The effective value (durations in seconds)"},
        "file_value": {"description": "The config file's value"},
        "set": {"type": "boolean", "description": "A secret: whether one is set"},
        "file_set": {"type": "boolean", "description": "A secret: whether the file sets one"},
    },
}
AUDIT_ENTRY = {
    "type": "object",
    "required": ["id", "at", "actor", "action", "target", "changes"],
    "properties": {
        "id": STRING,
        "at": nullable(TIME),
        "actor": {"type": ["string", "null"]},
        "action": {"type": ["string", "null"]},
        "target": {"type": ["string", "null"]},
        "before": {"description": "The state before (credentials masked); null: none"},
        "after": {"description": "The state after (credentials masked); null: none"},
        "changes": {
            "type": "array",
            "description": "What differs between before and after, as the audit page shows it",
            "items": {
                "type": "object",
                "required": ["key", "old", "new"],
                "properties": {"key": STRING, "old": STRING, "new": STRING},
            },
        },
    },
}
FILE_VERSION = {
    "type": "object",
    "required": ["id", "name", "sha256", "size", "latest"],
    "properties": {
        "id": STRING,
        "name": STRING,
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "size": {"type": "integer", "minimum": 0},
        "uploaded_by": STRING,
        "uploaded_at": nullable(TIME),
        "rolled_back_from": {
            "type": ["string", "null"],
            "description": "A rollback: the sha256 of the version it replaced",
        },
        "latest": {"type": "boolean"},
        "pinned_by": {"type": "array", "items": STRING, "description": "Tasks pinning it"},
        "created": {"type": "boolean"},
    },
}
ADMIN_SCHEMAS: dict[str, Any] = {
    "Token": TOKEN,
    "TokenList": _items("Token"),
    "TokenCreate": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "expires_in_days": {"type": "integer", "minimum": 1, "maximum": 3650},
            "read_only": {"type": "boolean", "description": "GET and HEAD only (false)"},
        },
    },
    "NewToken": {
        "type": "object",
        "required": ["id", "name", "scope", "token", "username"],
        "properties": {
            **TOKEN["properties"],
            "username": STRING,
            "token": {
                "type": "string",
                "description": "The token, shown this once: send it as Authorization: Bearer",
            },
        },
    },
    "TokenRevoked": {
        "type": "object",
        "required": ["revoked", "username"],
        "properties": {"revoked": ref("Token"), "username": STRING},
    },
    "User": USER,
    "UserList": _items("User"),
    "UserCreate": {
        "type": "object",
        "required": ["username", "password"],
        "additionalProperties": False,
        "properties": {
            "username": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"},
            "password": PASSWORD,
            "role": {"enum": ["viewer", "operator", "admin"], "default": "viewer"},
        },
    },
    "UserChange": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "role": {"enum": ["viewer", "operator", "admin"]},
            "enabled": {"type": "boolean"},
            "password": PASSWORD,
        },
    },
    "UserDeleted": {
        "type": "object",
        "required": ["deleted"],
        "properties": {"deleted": ref("User")},
    },
    "Settings": {
        "type": "object",
        "required": ["config_file", "settings"],
        "properties": {
            "config_file": {"type": "string", "description": "The config file read"},
            "updated_at": nullable(TIME),
            "updated_by": {"type": ["string", "null"]},
            "changed": {"type": "boolean", "description": "A change: whether anything changed"},
            "settings": {"type": "object", "additionalProperties": SETTING},
        },
    },
    "TestMail": {
        "type": "object",
        "required": ["to"],
        "additionalProperties": False,
        "properties": {"to": {"type": "string", "minLength": 1, "examples": ["you@example.com"]}},
    },
    "TestMailResult": {
        "type": "object",
        "required": ["sent", "to", "message"],
        "properties": {
            "sent": {"type": "boolean"},
            "to": {"type": "string"},
            "message": {"type": "string", "description": "What happened, as the page says it"},
        },
    },
    "SettingsChange": {
        "type": "object",
        "description": "Alert settings by key, as the config file's alerts section takes "
        "them (null: back to the file's value). Secrets are write-only: smtp_password, and "
        "a webhook's secret (left out: the current one of the webhook with the same URL)",
        "properties": {
            "smtp_host": {"type": ["string", "null"]},
            "smtp_port": {"description": "1 to 65535"},
            "smtp_security": {"enum": ["starttls", "ssl", "none", None]},
            "smtp_user": {"type": ["string", "null"]},
            "smtp_password": {"type": ["string", "null"], "description": "Write-only"},
            "smtp_password_env": {"type": ["string", "null"]},
            "smtp_password_secret": {"type": ["string", "null"]},
            "smtp_timeout": {"description": "A duration: '20s', or seconds"},
            "mail_from": {"type": ["string", "null"]},
            "operators": {"description": "A list of addresses (or one text, comma separated)"},
            "operators_by_kind": {"description": "Event kind -> a list of addresses"},
            "operators_by_group": {"description": "Agent group -> a list of addresses"},
            "alert_interval": {"description": "A duration: '15m', or seconds"},
            "webhooks": {
                "description": 'A list of {"url" or "url_secret", "secret" or "secret_secret", '
                '"kinds"}; a webhook without a secret keeps that of the one with the same URL'
            },
            "webhook_timeout": {"description": "A duration: '10s', or seconds"},
        },
    },
    "AuditEntry": AUDIT_ENTRY,
    "AuditPage": _page("AuditEntry"),
    "FileVersion": FILE_VERSION,
    "FileVersionList": _items("FileVersion"),
    "FileDetail": {
        "type": "object",
        "required": ["name", "latest", "versions", "tasks", "total_tasks"],
        "properties": {
            "name": STRING,
            "latest": ref("FileVersion"),
            "versions": {"type": "array", "items": ref("FileVersion")},
            "tasks": {
                "type": "array",
                "description": "The tasks using the file (at most 500), by name",
                "items": {
                    "type": "object",
                    "required": ["id", "name"],
                    "properties": {
                        "id": STRING,
                        "name": STRING,
                        "file_version": {
                            "type": ["string", "null"],
                            "description": "The version it pins; null: it follows the latest",
                        },
                    },
                },
            },
            "total_tasks": {"type": "integer", "minimum": 0},
        },
    },
    "Binary": {"type": "string", "format": "binary"},
    "Rollback": {
        "type": "object",
        "required": ["sha256"],
        "additionalProperties": False,
        "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}},
    },
    "Clone": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": NAME,
            "changes": {
                **TASK_PATCH,
                "properties": {k: v for k, v in TASK_PATCH["properties"].items() if k != "name"},
                "description": "Top-level keys of the spec to change in the copy (null "
                "removes one); the copy is paused unless enabled is given",
            },
        },
    },
}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "description": "What is wrong, in a sentence"},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["path", "message"],
                    "properties": {
                        "path": {
                            "type": "string",
                            "description": "Where: a field such as schedule.cron, a query "
                            "argument, or empty for the whole input",
                        },
                        "message": STRING,
                    },
                },
            },
        },
    },
    "Me": {
        "type": "object",
        "required": ["username", "role"],
        "properties": {
            "username": STRING,
            "role": {"enum": ["viewer", "operator", "admin"]},
            "token": {
                "type": "object",
                "description": "The API token of the request (none for a browser session): "
                "scope read may only GET and HEAD; expires_at in epoch seconds, or null",
                "properties": {
                    "id": STRING,
                    "name": STRING,
                    "scope": {"enum": ["all", "read"]},
                    "expires_at": {"type": ["number", "null"]},
                },
            },
        },
    },
    "TaskSpec": TASK_SPEC,
    "TaskPatch": TASK_PATCH,
    "Task": TASK,
    "TaskSummary": TASK_SUMMARY,
    "TaskPage": _page("TaskSummary"),
    "Deleted": {
        "type": "object",
        "required": ["deleted", "killed"],
        "properties": {
            "deleted": ref("TaskSummary"),
            "killed": {
                "type": "array",
                "items": STRING,
                "description": "The ids of the running runs asked to stop",
            },
        },
    },
    "Run": RUN,
    "RunDetail": {"allOf": [ref("Run"), {"properties": {"report": REPORT}}]},
    "RunPage": _page("Run"),
    "RunOutput": {
        "type": "object",
        "required": ["run_id", "status", "output"],
        "properties": {
            "run_id": STRING,
            "status": RUN_STATUS,
            "output": {"type": "string", "description": "The last 64 KiB of the output"},
        },
    },
    "Report": REPORT,
    "Progress": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "percent": {"type": ["number", "null"], "minimum": 0, "maximum": 100},
            "message": {"type": "string", "maxLength": 2000},
        },
    },
    "Result": {
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {
            "status": {"enum": list(RESULT_STATUSES)},
            "message": {"type": "string", "maxLength": 2000},
        },
    },
    "Event": EVENT,
    "EventPage": _page("Event"),
    "Agent": AGENT,
    "AgentList": _items("Agent"),
    "Cluster": {
        "type": "object",
        "required": ["connected", "leader", "centers", "agents", "unassigned"],
        "properties": {
            "connected": {
                "type": "boolean",
                "description": "false: this web site reaches no ZooKeeper",
            },
            "leader": {"type": ["string", "null"], "description": "The leading center"},
            "centers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["center_id", "leader"],
                    "properties": {"center_id": STRING, "leader": {"type": "boolean"}},
                },
            },
            "agents": {"type": "array", "items": ref("Agent")},
            "unassigned": {
                "type": "array",
                "description": "Tasks no live agent of their group can take",
                "items": {
                    "type": "object",
                    "required": ["task_id", "group"],
                    "properties": {
                        "task_id": STRING,
                        "name": {"type": ["string", "null"]},
                        "group": {"type": ["string", "null"]},
                    },
                },
            },
        },
    },
    "File": FILE_INFO,
    "FileList": _items("File"),
    "Upload": {
        "type": "object",
        "required": ["file"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "name": {
                "type": "string",
                "description": "The file's name (default: the uploaded file's name)",
            },
        },
    },
    "OpenApi": {"type": "object", "description": "This document"},
    "Secret": SECRET,
    "SecretList": {
        "type": "object",
        "required": ["items", "can_store", "store_problem"],
        "properties": {
            "items": {"type": "array", "items": ref("Secret")},
            "can_store": {
                "type": "boolean",
                "description": "Whether this web process can store secrets (it has a key ring)",
            },
            "store_problem": {
                "type": ["string", "null"],
                "description": "Why it cannot (null when it can)",
            },
        },
    },
    "SecretPut": {
        "type": "object",
        "required": ["value"],
        "additionalProperties": False,
        "properties": {
            "value": {
                "type": "string",
                "minLength": 1,
                "description": "The value: at most 64 KiB of text, no NUL; never shown again",
            },
            "description": {"type": "string", "maxLength": 500},
        },
    },
    "SecretDeleted": {
        "type": "object",
        "required": ["deleted"],
        "properties": {"deleted": STRING},
    },
    **PLAN_SCHEMAS,
    **ADMIN_SCHEMAS,
    "RunParams": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Backfill": {
        "type": "object",
        "required": ["start", "end"],
        "additionalProperties": False,
        "properties": {"start": INSTANT, "end": INSTANT},
    },
    "BackfillQueued": {
        "type": "object",
        "required": ["queued", "existing"],
        "properties": {
            "queued": {"type": "integer"},
            "existing": {"type": "integer"},
            "first": nullable(TIME),
            "last": nullable(TIME),
        },
    },
    "Pool": {
        "type": "object",
        "required": ["name", "size"],
        "properties": {
            "name": STRING,
            "size": {"type": "integer"},
            "updated_at": nullable(TIME),
            "updated_by": nullable(STRING),
            "running": nullable({"type": "integer"}),
            "waiting": nullable({"type": "integer"}),
        },
    },
    "PoolList": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": ref("Pool")}},
    },
    "PoolPut": {
        "type": "object",
        "required": ["size"],
        "additionalProperties": False,
        "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 10000}},
    },
    "PoolDeleted": {
        "type": "object",
        "required": ["deleted"],
        "properties": {"deleted": STRING},
    },
}

# --- calendars and blackout windows (web/api/calendars.py) ---------------------------------
_DAY_OR_RANGE = {
    "type": "string",
    "description": "A date YYYY-MM-DD, or a range YYYY-MM-DD..YYYY-MM-DD (both included)",
    "examples": ["2026-12-24", "2026-12-27..2026-12-31"],
}
_WEEKDAY = {"type": "string", "description": "mon..sun (or the full name)", "examples": ["sat"]}
_LOCAL_CLOCK = {"type": "string", "pattern": "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"}
_BLACKOUT_FIELDS = {
    "group": {"type": "string", "description": "An agent group, or * for every group"},
    "timezone": TIMEZONE,
    "days": {"type": "array", "items": _WEEKDAY},
    "dates": {"type": "array", "items": _DAY_OR_RANGE},
    "from": {**_LOCAL_CLOCK, "description": "Local time the window opens (00:00)"},
    "to": {
        **_LOCAL_CLOCK,
        "description": "Local time it closes (24:00); at or before from: the next day",
    },
    "start": {"type": "string", "description": "Once: local time YYYY-MM-DDTHH:MM it opens"},
    "end": {"type": "string", "description": "Once: local time it closes (31 days at most)"},
    "description": {"type": "string", "maxLength": 1000},
}
CALENDAR_SCHEMAS: dict[str, Any] = {
    "Calendar": {
        "type": "object",
        "required": ["name", "dates", "weekdays"],
        "properties": {
            "name": STRING,
            "dates": {"type": "array", "items": {"type": "string", "format": "date"}},
            "weekdays": {"type": "array", "items": STRING},
            "description": nullable(STRING),
            "source": nullable({**STRING, "description": "ics:FILE when imported"}),
            "tasks": {**STRINGS, "description": "The tasks naming it"},
            "updated_at": nullable(TIME),
            "updated_by": nullable(STRING),
        },
    },
    "CalendarSummary": {
        "type": "object",
        "required": ["name", "weekdays", "date_count"],
        "properties": {
            "name": STRING,
            "weekdays": {"type": "array", "items": STRING},
            "date_count": {"type": "integer"},
            "description": nullable(STRING),
            "source": nullable(STRING),
            "updated_at": nullable(TIME),
            "updated_by": nullable(STRING),
        },
    },
    "CalendarList": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": ref("CalendarSummary")}},
    },
    "CalendarPut": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "dates": {"type": "array", "items": _DAY_OR_RANGE},
            "weekdays": {"type": "array", "items": _WEEKDAY},
            "description": {"type": "string", "maxLength": 1000},
        },
    },
    "CalendarDeleted": {
        "type": "object",
        "required": ["deleted"],
        "properties": {"deleted": STRING},
    },
    "Blackout": {
        "type": "object",
        "required": ["name", "group", "timezone", "summary"],
        "properties": {
            "name": STRING,
            "summary": {**STRING, "description": "The window in one line"},
            **{k: nullable(v) for k, v in _BLACKOUT_FIELDS.items()},
            "updated_at": nullable(TIME),
            "updated_by": nullable(STRING),
        },
    },
    "BlackoutList": {
        "type": "object",
        "required": ["items"],
        "properties": {"items": {"type": "array", "items": ref("Blackout")}},
    },
    "BlackoutPut": {
        "type": "object",
        "required": ["group"],
        "additionalProperties": False,
        "properties": _BLACKOUT_FIELDS,
    },
}
SCHEMAS.update(CALENDAR_SCHEMAS)

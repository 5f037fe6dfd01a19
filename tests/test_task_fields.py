"""The model's field table (cloudtask.task.TASK_FIELDS) against the three that describe a task:
the model itself (the keys it takes and writes, their types, choices, defaults, which are
required and which take null), the web form (which field shows each key) and the API's
OpenAPI task schema (same keys, types, choices, defaults, required).

Each check returns its disagreements, so the last tests can show that a key added to the
table alone (not to the model) is caught."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from cloudtask.task import (
    FIELD_TYPES,
    TASK_FIELD,
    TASK_FIELDS,
    TASK_KEYS,
    TaskField,
    TaskSpec,
    parse_task,
    validate_task,
)
from web.openapi_schemas import SCHEMAS, TASK_SPEC_PROPERTIES
from web.taskform import (
    ERROR_FIELDS,
    FIELD_OF_PATH,
    NOT_IN_FIELDS,
    default_form,
    form_spec,
    key_fields,
)

FORM_TEMPLATE = Path(__file__).resolve().parent.parent / "web" / "templates" / "tasks" / "form.html"
BASE = {"name": "t", "schedule": {"every": "1h"}, "command": "true"}
HTTP = {"url": "https://example.com/hook"}
# values the model takes for each key: one of each JSON type the table gives the key
ACCEPTED: dict[str, list[Any]] = {
    "version": [1],
    "name": ["nightly-cleanup"],
    "group": ["batch"],
    "schedule": [{"every": "1h"}, [{"every": "1h"}, {"cron": "0 3 * * *"}]],
    "command": ["true", ["sh", "-c", "true"], None],
    "shell": [True],
    "file": ["run.sh", None],
    "file_version": ["a" * 64, None],
    "http": [HTTP, None],
    "container": [{"image": "alpine:3.20", "args": ["true"]}, None],
    "mode": ["all"],
    "requires": [{"os": "windows"}],
    "timeout": ["10m", 30, None],
    "retries": [3],
    "retry_delay": ["30s", 1.5],
    "concurrency": ["replace"],
    "misfire": ["skip"],
    "misfire_grace": ["5m", 60],
    "on_lost": ["rerun"],
    "enabled": [False],
    "env": [{"A": "1"}],
    "cwd": ["/tmp", None],
    "run_as": ["batch:staff", "nobody", None],
    "pool": ["db-heavy", None],
    "pool_wait": ["5m", 30, None],
    "notify": [{"emails": ["a@example.com"], "on": ["failure"]}],
    "warn_after": ["10m", 30, None],
    "deadline": ["06:00", {"at": "06:00", "days": "mon-fri", "timezone": "Europe/Berlin"}, None],
    "expect_every": ["6h", 3600, None],
    "description": ["what it does"],
    "owner": ["ops"],
}
# a value of each JSON type, to try the types a key does not take
OF_TYPE: dict[str, Any] = {
    "string": "x",
    "integer": 7,
    "number": 2.5,
    "boolean": True,
    "object": {"a": "b"},
    "array": ["x"],
    "null": None,
}


def json_type(value: Any) -> str:
    for name, kind in (("boolean", bool), ("integer", int), ("number", float), ("string", str)):
        if isinstance(value, kind):
            return name
    return {dict: "object", list: "array", type(None): "null"}[type(value)]


def takes(types: set[str], kind: str) -> bool:
    """Whether JSON types ``types`` take a value of ``kind`` (a number takes integers)."""
    return kind in types or (kind == "integer" and "number" in types)


def spec_with(key: str, value: Any) -> dict[str, Any]:
    """A valid base spec with ``key`` set to ``value`` (and what that key needs beside it)."""
    spec = dict(BASE)
    if key in ("http", "container") and value is not None:
        del spec["command"]
    if key == "command" and value is None:
        spec["http"] = HTTP
    if key == "file_version" and value is not None:
        spec["file"] = "run.sh"
    spec[key] = value
    return spec


def refused_at(spec: dict[str, Any], key: str) -> bool:
    return any(re.match(rf"{key}($|[.\[])", p.path) for p in validate_task(spec))


# --- the checks -------------------------------------------------------------------------------


def model_disagreements(fields: tuple[TaskField, ...]) -> list[str]:
    """Where ``fields`` and the model (TaskSpec, its canonical form, validate_task) differ."""
    out = []
    names = sorted(f.name for f in fields)
    spec_fields = sorted(
        ["version", *(f.name for f in dataclasses.fields(TaskSpec) if "within" not in f.metadata)]
    )  # (a field "within" another is read from that key: secret_env from env)
    if names != spec_fields:
        out.append(f"the table has {names}, TaskSpec {spec_fields}")
    canonical = parse_task(BASE).to_dict()
    if sorted(canonical) != names:
        out.append(f"the canonical form has {sorted(canonical)}, the table {names}")
    with_http = parse_task(spec_with("command", None)).to_dict()
    for field in fields:
        out += field_disagreements(field, with_http if field.name == "command" else canonical)
    return out


def field_disagreements(field: TaskField, canonical: dict[str, Any]) -> list[str]:
    """Where one field of the table and the model's reading of its key differ."""
    out = []
    name, types = field.name, set(field.json_types)
    if not field.required and canonical.get(name, ...) != field.default:
        out.append(f"{name}: the model's default is {canonical.get(name, 'nothing')!r}")
    missing = spec_with(name, None)
    del missing[name]
    if refused_at(missing, name) != field.required:
        out.append(f"{name}: required is {field.required}, the model disagrees")
    if refused_at(spec_with(name, None), name) == field.nullable:
        out.append(f"{name}: nullable is {field.nullable}, the model disagrees")
    values = ACCEPTED.get(name) or [OF_TYPE[t] for t in field.json_types]
    for value in values:
        if not takes(types, json_type(value)):
            out.append(f"{name}: the model takes {value!r}, not of {sorted(types)}")
        if validate_task(spec_with(name, value)):
            out.append(f"{name}: the model refuses {value!r}")
    given = {json_type(v) for v in values}
    if any(not any(takes({t}, g) for g in given) for t in types):
        out.append(f"{name}: the values tried do not cover its types {sorted(types)}")
    for kind, value in OF_TYPE.items():
        if not takes(types, kind) and not refused_at(spec_with(name, value), name):
            out.append(
                f"{name}: the model takes a value of type {kind}, the table says {sorted(types)}"
            )
    for choice in field.enum:
        if validate_task(spec_with(name, choice)):
            out.append(f"{name}: the model refuses the choice {choice!r}")
    if field.enum and not refused_at(spec_with(name, "no-such-choice"), name):
        out.append(f"{name}: the model takes a value not among {field.enum}")
    return out


def schema_types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a schema takes (its type, its choices' values, or its alternatives')."""
    if "anyOf" in schema or "oneOf" in schema:
        return set().union(*(schema_types(s) for s in schema.get("anyOf", schema.get("oneOf"))))
    if "const" in schema:
        return {json_type(schema["const"])}
    if "enum" in schema:
        return {json_type(v) for v in schema["enum"]}
    kind = schema["type"]
    return set(kind) if isinstance(kind, list) else {kind}


def schema_choices(schema: dict[str, Any]) -> list[Any]:
    if "const" in schema:
        return [schema["const"]]
    if "enum" in schema:
        return list(schema["enum"])
    return [c for s in schema.get("anyOf", []) for c in schema_choices(s)]


def openapi_disagreements(fields: tuple[TaskField, ...], spec: dict[str, Any]) -> list[str]:
    """Where ``fields`` and the OpenAPI task schema ``spec`` differ."""
    out = []
    properties = spec["properties"]
    if list(properties) != [f.name for f in fields]:
        out.append(f"the schema has {list(properties)}")
    if spec["required"] != [f.name for f in fields if f.required]:
        out.append(f"the schema requires {spec['required']}")
    if spec.get("additionalProperties") is not False:
        out.append("the schema takes other keys")
    for field in fields:
        schema = properties.get(field.name)
        if schema is None:
            continue
        if schema_types(schema) != set(field.json_types):
            out.append(f"{field.name}: the schema takes {sorted(schema_types(schema))}")
        if schema_choices(schema) != list(field.enum):
            out.append(f"{field.name}: the schema's choices are {schema_choices(schema)}")
        if not field.required and schema.get("default", ...) != field.default:
            out.append(f"{field.name}: the schema's default is {schema.get('default')!r}")
        if not schema.get("description", "").startswith(field.description):
            out.append(f"{field.name}: the schema does not say {field.description!r}")
    return out


def template_fields() -> set[str]:
    """The fields the form's template shows errors at: data-field="x" and the macros' names."""
    text = FORM_TEMPLATE.read_text()
    return set(re.findall(r'data-field="(\w+)"', text)) | set(
        re.findall(r"\b(?:text|area|select|check)\('(\w+)'", text)
    )


def form_disagreements(fields: tuple[TaskField, ...], field_of_key: dict[str, str]) -> list[str]:
    """Where ``fields`` and the form's map of top-level keys to fields differ."""
    out = []
    names = {f.name for f in fields}
    for key in sorted(names - set(field_of_key) - set(NOT_IN_FIELDS)):
        out.append(f"{key}: no form field shows it")
    shown = template_fields()
    for key, field in field_of_key.items():
        if key not in names:
            out.append(f"the form maps {key}, which is not a key of the model")
        if field not in ERROR_FIELDS or field not in shown:
            out.append(f"{key}: its form field {field!r} is not on the form")
    return out


# --- the table agrees with the model, the form and the document -------------------------------


def test_the_table_is_the_models_keys():
    assert tuple(f.name for f in TASK_FIELDS) == TASK_KEYS
    assert set(TASK_FIELD) == set(TASK_KEYS) and len(TASK_FIELDS) == len(TASK_KEYS)
    assert all(f.type in FIELD_TYPES for f in TASK_FIELDS)
    assert set(ACCEPTED) == set(TASK_KEYS)  # every key is tried below


def test_the_model_agrees_with_the_table():
    assert model_disagreements(TASK_FIELDS) == []


def test_the_openapi_task_schema_agrees_with_the_table():
    assert openapi_disagreements(TASK_FIELDS, SCHEMAS["TaskSpec"]) == []
    assert SCHEMAS["TaskSpec"]["properties"] is TASK_SPEC_PROPERTIES
    patch = SCHEMAS["TaskPatch"]["properties"]
    assert list(patch) == list(TASK_KEYS)
    for field in TASK_FIELDS:  # a patch takes null for any key (it removes the key)
        assert schema_types(patch[field.name]) == set(field.json_types) | {"null"}


def test_the_form_agrees_with_the_table():
    assert form_disagreements(TASK_FIELDS, key_fields()) == []
    assert {k: v for k, v in FIELD_OF_PATH.items() if "." not in k} == key_fields()
    # what the form writes are keys of the model, whatever the run kind
    for run_kind in ("command", "http"):
        form = default_form()
        form.update(name="n", command="true", run_kind=run_kind, url="https://example.com")
        spec, problems = form_spec(form)
        assert problems == [] and set(spec) <= set(TASK_KEYS)
        assert validate_task(spec) == []


# --- the checks catch a key added to the table alone ------------------------------------------

EXTRA = TaskField("priority", "integer", "Which runs first", default=0)


def test_a_key_added_to_the_table_alone_is_caught():
    widened = (*TASK_FIELDS, EXTRA)
    found = model_disagreements(widened)
    assert any("TaskSpec" in d for d in found) and any("canonical" in d for d in found)
    assert any(d.startswith("priority: the model refuses") for d in found)
    assert any("priority" in d for d in form_disagreements(widened, key_fields(widened)))
    # a schema that was not derived from the table would miss it too
    assert openapi_disagreements(widened, SCHEMAS["TaskSpec"])


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(TASK_FIELD["retries"], type="string"),
        dataclasses.replace(TASK_FIELD["timeout"], nullable=False),
        dataclasses.replace(TASK_FIELD["mode"], enum=("one", "all", "some")),
        dataclasses.replace(TASK_FIELD["misfire_grace"], default="2h"),
        dataclasses.replace(TASK_FIELD["group"], required=True),
    ],
    ids=["type", "nullable", "enum", "default", "required"],
)
def test_a_field_the_model_reads_otherwise_is_caught(changed):
    fields = tuple(changed if f.name == changed.name else f for f in TASK_FIELDS)
    assert model_disagreements(fields)
    assert openapi_disagreements(fields, SCHEMAS["TaskSpec"])

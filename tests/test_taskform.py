"""The task form's translation (web.taskform), without Flask: a stored spec shown as fields
and read back gives the same task, for every kind of schedule and run; what the form alone
can see is a problem at its spec path; the model's problems land at the right field."""

from __future__ import annotations

import ast
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import web.taskform
from cloudtask.exceptions import Problem
from cloudtask.task import parse_task, validate_task
from web.taskform import (
    ERROR_FIELDS,
    FIELD_OF_PATH,
    default_form,
    field_of,
    fits_fields,
    form_spec,
    group_problems,
    read_form,
    spec_form,
)

LATER = (datetime.now(timezone.utc) + timedelta(days=30)).replace(microsecond=0)
SPECS = {
    "cron with seconds, a time zone and a window": {
        "name": "nightly",
        "schedule": {
            "cron": "30 */5 * * * *",
            "timezone": "Europe/Berlin",
            "between": ["08:00", "18:00"],
            "start": "2030-01-01T00:00:00+01:00",
        },
        "command": "echo hi",
        "timeout": "10m",
        "retries": 3,
        "retry_delay": "30s",
        "concurrency": "allow",
        "misfire": "skip",
        "misfire_grace": "5m",
        "on_lost": "rerun",
        "pool": "db-heavy",
        "pool_wait": "5m",
        "mode": "all",
        "owner": "ops",
        "description": "the nightly one",
    },
    "every, paused, through a shell": {
        "name": "poll",
        "group": "pollers",
        "schedule": {"every": "90s", "timezone": "Asia/Tokyo"},
        "command": "./poll.sh | tee -a log",
        "shell": True,
        "cwd": "/srv/poll",
        "run_as": "poller:staff",
        "enabled": False,
    },
    "at, once": {"name": "once", "schedule": {"at": LATER.isoformat()}, "command": "true"},
    "after two parents": {
        "name": "report",
        "schedule": {"after": ["extract", "load"], "within": "6h", "timezone": "Europe/Berlin"},
        "command": "make report",
    },
    "keepalive with a pinned file": {
        "name": "service",
        "schedule": {"keepalive": True},
        "command": "./serve",
        "file": "serve.tar.gz",
        "file_version": "a" * 64,
    },
    "http task with a callback": {
        "name": "webhook",
        "schedule": {"every": "1h"},
        "http": {
            "url": "https://example.com/hook",
            "method": "POST",
            "headers": {"X-Team": "ops", "Content-Type": "application/json"},
            "body": '{"a": 1}',
            "expect_status": [200, 202],
            "timeout": "30s",
            "callback": True,
        },
    },
    "notify settings": {
        "name": "watched",
        "schedule": {"cron": "0 3 * * *"},
        "command": "true",
        "notify": {"emails": ["a@example.com", "b@example.com"], "on": ["failure", "success"]},
    },
    "calendars and required labels": {
        "name": "payroll",
        "schedule": {
            "cron": "0 6 * * *",
            "timezone": "Europe/Berlin",
            "calendar": {"only": "workdays", "skip": ["de-holidays", "company-days"]},
        },
        "command": "true",
        "requires": {"os": "linux", "rack": "b 12, east"},
    },
    "every on one calendar": {
        "name": "weekend-sync",
        "schedule": {"every": "2h", "calendar": {"only": "weekend"}},
        "command": "true",
    },
    "env": {
        "name": "configured",
        "schedule": {"every": "1h"},
        "command": "true",
        "env": {"LEVEL": "info", "DSN": "a=b;c=d", "EMPTY": ""},
    },
}


class Posted:
    """A posted form as Werkzeug gives it: ``get`` (one value) and ``getlist`` (all)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name, default)
        return value[0] if isinstance(value, list) and value else value

    def getlist(self, name: str) -> list[Any]:
        value = self.values.get(name, [])
        return value if isinstance(value, list) else [value]


def posted(form: dict[str, Any]) -> Posted:
    """What a browser posts for ``form``: text as typed, checked boxes as "on" (unchecked
    ones are not sent), one value per checked event."""
    values: dict[str, Any] = {}
    for name, value in form.items():
        if isinstance(value, bool):
            if value:
                values[name] = "on"
        else:
            values[name] = value
    return Posted(values)


def test_the_translation_imports_neither_flask_nor_the_rest_of_the_site():
    tree = ast.parse(Path(web.taskform.__file__).read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported
    assert all(name and not name.startswith(("flask", "werkzeug", "web")) for name in imported)


@pytest.mark.parametrize("kind", SPECS)
def test_a_spec_shown_as_fields_and_read_back_is_the_same_task(kind):
    canonical = parse_task(SPECS[kind]).to_dict()
    form = spec_form(canonical)
    assert form["editor"] == "fields"  # the fields show it whole
    spec, problems = form_spec(form)
    assert problems == []
    assert parse_task(spec).to_dict() == canonical
    # the same through a browser's post (checkboxes "on" or absent)
    again, problems = form_spec(read_form(posted(form)))
    assert problems == [] and again == spec


def test_what_the_fields_show():
    cron = spec_form(parse_task(SPECS["cron with seconds, a time zone and a window"]).to_dict())
    assert (cron["schedule_kind"], cron["cron"], cron["timezone"]) == (
        "cron",
        "30 */5 * * * *",
        "Europe/Berlin",
    )
    assert (cron["between_start"], cron["between_end"]) == ("08:00", "18:00")
    assert (cron["timeout"], cron["retries"], cron["mode"]) == ("10m", "3", "all")
    http = spec_form(parse_task(SPECS["http task with a callback"]).to_dict())
    assert http["run_kind"] == "http" and http["url"] == "https://example.com/hook"
    assert http["headers"] == "X-Team: ops\nContent-Type: application/json"
    assert http["expect_status"] == "200, 202" and http["callback"] is True
    notify = spec_form(parse_task(SPECS["notify settings"]).to_dict())
    assert notify["notify_emails"] == "a@example.com, b@example.com"
    assert notify["notify_on"] == ["failure", "success"]
    env = spec_form(parse_task(SPECS["env"]).to_dict())
    assert env["env"] == "LEVEL=info\nDSN=a=b;c=d\nEMPTY="
    keepalive = spec_form(parse_task(SPECS["keepalive with a pinned file"]).to_dict())
    assert keepalive["schedule_kind"] == "keepalive" and keepalive["file_version"] == "a" * 64


def test_required_labels_and_calendars_in_the_fields():
    form = default_form()
    form.update(
        name="n",
        command="true",
        requires="os = linux\nno separator",
        calendar_only="workdays",
        calendar_skip="de-holidays,  company",
    )
    spec, problems = form_spec(form)
    assert problems == [Problem("requires", "line 2: expected label=value, got 'no separator'")]
    assert spec["requires"] == {"os": "linux"}
    assert spec["schedule"]["calendar"] == {"only": "workdays", "skip": ["de-holidays", "company"]}
    # a kind that takes no calendar: the (hidden) calendar fields are ignored
    form.update(requires="", schedule_kind="keepalive")
    spec, problems = form_spec(form)
    assert problems == [] and "calendar" not in spec["schedule"] and spec["requires"] == {}
    # a label value the fields would change (read stripped) opens as JSON
    canonical = parse_task(
        {"name": "n", "schedule": {"every": "1h"}, "command": "true", "requires": {"os": " x "}}
    ).to_dict()
    assert not fits_fields(canonical) and spec_form(canonical)["editor"] == "json"


def test_a_spec_the_fields_cannot_show_opens_as_json_and_reads_back():
    canonical = parse_task(
        {
            "name": "argv",
            "schedule": [{"every": "1h"}, {"cron": "0 3 * * *"}],
            "command": ["python", "-c", "print(1)"],
            "env": {"MULTI": "two\nlines"},
        }
    ).to_dict()
    assert not fits_fields(canonical)
    form = spec_form(canonical)
    assert form["editor"] == "json"
    spec, problems = form_spec(form)
    assert problems == [] and "version" not in spec
    assert parse_task(spec).to_dict() == canonical


def test_a_new_form_reads_as_the_models_defaults():
    form = default_form()
    form["name"], form["command"] = "fresh", "true"
    spec, problems = form_spec(form)
    assert problems == []
    got = parse_task(spec).to_dict()
    assert (
        got
        == parse_task(
            {
                "name": "fresh",
                "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
                "command": "true",
            }
        ).to_dict()
    )


def test_numbers_typed_in_duration_fields_are_seconds():
    form = default_form()
    form.update(name="n", command="true", schedule_kind="every", every="90", timeout="2.5")
    spec, _ = form_spec(form)
    assert spec["schedule"]["every"] == 90 and spec["timeout"] == 2.5
    form.update(retries="²")  # a digit to str.isdigit, not to int(): the model refuses it
    spec, _ = form_spec(form)
    assert spec["retries"] == "²"
    assert [p.path for p in validate_task(spec)] == ["retries"]


def test_a_time_without_an_offset_is_read_in_the_forms_zone():
    form = default_form()
    form.update(name="n", command="true", schedule_kind="at", at="2030-05-01T03:00")
    form["timezone"] = "Europe/Berlin"
    spec, _ = form_spec(form)
    assert spec["schedule"] == {"at": "2030-05-01T03:00:00+02:00"}


def test_bad_lines_are_problems_at_their_spec_path_and_field():
    form = default_form()
    form.update(name="n", command="true", env="GOOD=1\nno separator here")
    spec, problems = form_spec(form)
    assert problems == [Problem("env", "line 2: expected KEY=VALUE, got 'no separator here'")]
    assert spec["env"] == {"GOOD": "1"}
    form.update(env="", run_kind="http", url="https://example.com", headers="X-A: 1\n: empty")
    spec, problems = form_spec(form)
    assert [p.path for p in problems] == ["http.headers"]
    assert "line 2" in problems[0].message and spec["http"]["headers"] == {"X-A": "1"}
    by_field, top = group_problems(problems, "fields")
    assert by_field == {"headers": [problems[0].message]} and top == []


@pytest.mark.parametrize(
    ("changes", "path", "field"),
    [
        ({"cron": "61 * * * *"}, "schedule.cron", "cron"),
        ({"timezone": "Mars/Olympus"}, "schedule.timezone", "timezone"),
        ({"retries": "many"}, "retries", "retries"),
        ({"timeout": "soon"}, "timeout", "timeout"),
        ({"name": "bad name!"}, "name", "name"),
        ({"notify_emails": "nobody"}, "notify.emails[0]", "notify_emails"),
        ({"between_start": "25:00", "between_end": "06:00"}, "schedule.between", "between"),
        ({"run_kind": "http", "url": "ftp://nowhere"}, "http.url", "url"),
        ({"calendar_only": "workdays, not-a-name!"}, "schedule.calendar.only", "calendar_only"),
        ({"calendar_skip": "bad/name"}, "schedule.calendar.skip", "calendar_skip"),
        ({"requires": "bad label=x"}, "requires.bad label", "requires"),
        (
            {"run_kind": "http", "url": "https://a.example", "expect_status": "abc"},
            "http.expect_status",
            "expect_status",
        ),
    ],
)
def test_a_bad_value_is_the_models_problem_at_the_right_field(changes, path, field):
    form = default_form()
    form.update({"name": "n", "command": "true", **changes})
    spec, problems = form_spec(form)
    assert problems == []
    found = validate_task(spec)
    (problem,) = [p for p in found if p.path.startswith(path)]  # [0] of a list: below path
    assert field_of(problem.path) == field
    by_field, top = group_problems(found, "fields")
    assert problem.message in by_field[field] and top == []


def test_problems_of_no_field_go_to_the_top_and_json_mode_shows_all_at_the_editor():
    problems = [Problem("version", "unsupported"), Problem("", "expected a task object")]
    by_field, top = group_problems(problems, "fields")
    assert by_field == {} and top == [str(p) for p in problems]
    by_field, top = group_problems(problems, "json")
    assert by_field == {"spec_json": [str(p) for p in problems]} and top == []


def test_bad_json_is_a_problem_of_the_whole_input():
    form = default_form()
    form.update(editor="json", spec_json='{"name": ')
    spec, problems = form_spec(form)
    assert spec is None and [p.path for p in problems] == [""]
    assert problems[0].message.startswith("the JSON is not valid")
    form["spec_json"] = json.dumps({"name": "j", "schedule": {"every": "1h"}, "command": "x"})
    spec, problems = form_spec(form)
    assert problems == [] and validate_task(spec) == []


def test_read_form_takes_what_was_typed_and_nothing_else():
    form = read_form(
        Posted(
            {
                "name": "  spaced  ",
                "enabled": "on",
                "callback": "yes",
                "notify_on": ["failure", "lost"],
                "editor": "something else",
                "unknown": "ignored",
            }
        )
    )
    assert form["name"] == "  spaced  " and form["cron"] == "" and "unknown" not in form
    assert form["enabled"] is True and form["shell"] is False and form["callback"] is True
    assert form["notify_on"] == ["failure", "lost"] and form["editor"] == "fields"


def test_every_field_a_problem_can_land_on_exists():
    assert set(FIELD_OF_PATH.values()) <= set(ERROR_FIELDS)

"""Task specs: defaults, every validation rule with its path, and the canonical round trip."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from typing import Any

import pytest

from cloudtask.exceptions import Problem, ValidationError
from cloudtask.schedules import AtSchedule, CronSchedule, EverySchedule
from cloudtask.task import (
    TASK_KEYS,
    HttpSpec,
    NotifySpec,
    TaskSpec,
    parse_task,
    validate_task,
)

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
MINIMAL: dict[str, Any] = {"name": "hello", "schedule": {"every": "1m"}, "command": "echo hi"}
HTTP: dict[str, Any] = {
    "name": "ping",
    "schedule": {"cron": "*/5 * * * *"},
    "http": {"url": "https://api.example.com/ping"},
}
DESIGN_EXAMPLE: dict[str, Any] = {
    "name": "nightly-cleanup",
    "group": "default",
    "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
    "command": "python cleanup.py --days 7",
    "file": "cleanup.zip",
    "mode": "one",
    "timeout": "10m",
    "retries": 2,
    "retry_delay": "30s",
    "concurrency": "forbid",
    "misfire": "run_once",
    "misfire_grace": "1h",
    "on_lost": "record",
    "enabled": True,
    "env": {"LEVEL": "info"},
    "cwd": None,
    "run_as": None,
    "pool": None,
    "pool_wait": None,
    "notify": {"emails": ["ops@example.com"], "on": ["failure", "timeout", "missed", "lost"]},
    "description": "",
    "owner": "",
}


def with_changes(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with top-level keys replaced; a value of ... removes the key."""
    data = copy.deepcopy(base)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def test_minimal_spec_gets_the_defaults() -> None:
    spec = parse_task(MINIMAL, now=NOW)
    assert spec.name == "hello" and spec.group == "default"
    (item,) = spec.schedule.items
    assert isinstance(item, EverySchedule) and item.every == 60.0
    assert spec.command == "echo hi" and spec.shell is False and spec.file is None
    assert spec.http is None
    assert (spec.mode, spec.timeout, spec.retries, spec.retry_delay) == ("one", None, 0, 0.0)
    assert (spec.concurrency, spec.misfire, spec.misfire_grace) == ("forbid", "run_once", 3600.0)
    assert spec.enabled is True and spec.env == {} and spec.cwd is None
    assert spec.notify == NotifySpec(emails=(), on=("failure", "timeout", "missed", "lost"))
    assert spec.description == "" and spec.owner == ""
    assert validate_task(MINIMAL, now=NOW) == []


def test_design_example_parses() -> None:
    spec = parse_task(DESIGN_EXAMPLE, now=NOW)
    (item,) = spec.schedule.items
    assert item == CronSchedule("0 3 * * *", "Europe/Berlin")
    assert spec.schedule.next_after(NOW) == datetime(2026, 6, 1, 1, tzinfo=timezone.utc)
    assert spec.file == "cleanup.zip"
    assert (spec.timeout, spec.retries, spec.retry_delay, spec.misfire_grace) == (600, 2, 30, 3600)
    assert spec.env == {"LEVEL": "info"}
    assert spec.notify.emails == ("ops@example.com",)
    assert spec.to_dict() == {
        "version": 1,
        **DESIGN_EXAMPLE,
        "shell": False,
        "http": None,
        "file_version": None,
        "container": None,
        "requires": {},
        "warn_after": None,
        "deadline": None,
        "expect_every": None,
    }


def test_http_spec_is_normalised() -> None:
    data = with_changes(
        HTTP,
        http={
            "urls": ["https://a.example.com/run", "http://10.0.0.2:8080/run"],
            "strategy": "failover",
            "method": "post",
            "headers": {"Authorization": "Bearer x"},
            "body": {"days": 7},
            "expect_status": 202,
            "timeout": "30s",
        },
    )
    spec = parse_task(data)
    assert spec.command is None
    assert spec.http == HttpSpec(
        urls=("https://a.example.com/run", "http://10.0.0.2:8080/run"),
        strategy="failover",
        method="POST",
        headers={"Authorization": "Bearer x"},
        body=json.dumps({"days": 7}),
        expect_status=(202,),
        timeout=30.0,
    )
    single = parse_task(HTTP).http
    assert single is not None and single.urls == ("https://api.example.com/ping",)
    assert (single.method, single.strategy, single.expect_status) == ("GET", "first", None)


def test_command_list_and_shell() -> None:
    spec = parse_task(with_changes(MINIMAL, command=["python", "-c", "print(1)"]))
    assert spec.command == ("python", "-c", "print(1)")
    shell = parse_task(with_changes(MINIMAL, command="echo $HOME | wc -c", shell=True))
    assert shell.shell is True and shell.command == "echo $HOME | wc -c"


def test_keepalive_accepts_concurrency_and_retries() -> None:
    data = with_changes(
        MINIMAL, schedule={"keepalive": True}, concurrency="allow", retries=3, mode="all"
    )
    spec = parse_task(data, now=NOW)
    assert spec.schedule.keepalive and spec.retries == 3 and spec.concurrency == "allow"


def test_small_normalisations() -> None:
    spec = parse_task(
        with_changes(MINIMAL, cwd="", notify={"on": ["failure", "failure", "success"]})
    )
    assert spec.cwd is None
    assert spec.notify == NotifySpec(emails=(), on=("failure", "success"))
    assert parse_task(with_changes(MINIMAL, notify={"on": []})).notify.on == ()
    assert parse_task(with_changes(MINIMAL, version=1)) == parse_task(MINIMAL)
    assert parse_task(with_changes(MINIMAL, timeout=90.0004)).timeout == 90.0


BAD_CASES: list[tuple[dict[str, Any], str, str]] = [
    # top level
    (with_changes(MINIMAL, colour="red"), "colour", "unknown key"),
    (with_changes(MINIMAL, version=2), "version", "expected 1"),
    (with_changes(MINIMAL, version=True), "version", "expected 1"),
    # name and group
    (with_changes(MINIMAL, name=...), "name", "required"),
    (with_changes(MINIMAL, name="../etc"), "name", "letters, digits"),
    (with_changes(MINIMAL, name="-dash-first"), "name", "starting with a letter or digit"),
    (with_changes(MINIMAL, name="a" * 129), "name", "1-128"),
    (with_changes(MINIMAL, name="with space"), "name", "not a valid name"),
    (with_changes(MINIMAL, name=3), "name", "expected a string, got 3"),
    (with_changes(MINIMAL, group="a/b"), "group", "not a valid name"),
    (with_changes(MINIMAL, group=None), "group", "expected a string, got null"),
    # schedule
    (with_changes(MINIMAL, schedule=...), "schedule", "required"),
    (with_changes(MINIMAL, schedule={"cron": "0 0 31 2 *"}), "schedule.cron", "never fires"),
    (with_changes(MINIMAL, schedule=[{"every": "1h"}, {"every": "1x"}]), "schedule[1].every", "1x"),
    (with_changes(MINIMAL, schedule="0 3 * * *"), "schedule", "expected an object"),
    # command / http
    (with_changes(MINIMAL, command=...), "command", "required"),
    (with_changes(MINIMAL, command=None), "command", "required"),
    (with_changes(MINIMAL, http=HTTP["http"]), "http", "not both"),
    (with_changes(MINIMAL, command=""), "command", "empty"),
    (with_changes(MINIMAL, command="   "), "command", "empty"),
    (with_changes(MINIMAL, command=[]), "command", "non-empty list"),
    (with_changes(MINIMAL, command=["ls", 3]), "command[1]", "expected a string, got 3"),
    (with_changes(MINIMAL, command=["", "x"]), "command[0]", "empty"),
    (with_changes(MINIMAL, command=3), "command", "string or a list"),
    (with_changes(MINIMAL, command='echo "open'), "command", "quoting"),
    (with_changes(MINIMAL, shell="yes"), "shell", "true or false"),
    (with_changes(MINIMAL, command=["ls", "-l"], shell=True), "shell", "one string"),
    (with_changes(HTTP, shell=True), "shell", "command"),
    (with_changes(MINIMAL, file="dir/run.sh"), "file", "plain file name"),
    (with_changes(MINIMAL, file="dir\\run.sh"), "file", "plain file name"),
    (with_changes(MINIMAL, file=".."), "file", "plain file name"),
    (with_changes(MINIMAL, file=""), "file", "plain file name"),
    (with_changes(MINIMAL, file="x" * 256), "file", "255"),
    (with_changes(MINIMAL, file=3), "file", "expected a string"),
    (with_changes(HTTP, file="a.zip"), "file", "only applies to a command"),
    (with_changes(HTTP, http="https://x.example"), "http", "expected an object"),
    (with_changes(HTTP, http={"method": "GET"}), "http", "url"),
    (
        with_changes(HTTP, http={"url": "https://a.example", "urls": ["https://b.example"]}),
        "http.urls",
        "not both",
    ),  # fmt: skip
    (with_changes(HTTP, http={"urls": []}), "http.urls", "non-empty list"),
    (
        with_changes(HTTP, http={"urls": ["https://a.example", "ftp://b.example"]}),
        "http.urls[1]",
        "http://",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"urls": ["https://a.example", 3]}),
        "http.urls[1]",
        "expected a string",
    ),
    (with_changes(HTTP, http={"url": "https://"}), "http.url", "host"),
    (with_changes(HTTP, http={"url": "example.com/x"}), "http.url", "https://"),
    (with_changes(HTTP, http={"url": "http://bad host/"}), "http.url", "host"),
    (with_changes(HTTP, http={"url": 3}), "http.url", "expected a string"),
    (
        with_changes(HTTP, http={"url": "https://a.example", "retry": 1}),
        "http.retry",
        "unknown key",
    ),
    (
        with_changes(HTTP, http={"url": "https://a.example", "strategy": "roundrobin"}),
        "http.strategy",
        "first, random, failover",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "method": "FETCH"}),
        "http.method",
        "GET, POST",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "headers": ["X: y"]}),
        "http.headers",
        "object",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "headers": {"X-N": 3}}),
        "http.headers.X-N",
        "expected a string",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "headers": {"Bad Name": "v"}}),
        "http.headers.Bad Name",
        "header name",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "headers": {"X": "a\r\nB: c"}}),
        "http.headers.X",
        "line breaks",
    ),  # fmt: skip
    (with_changes(HTTP, http={"url": "https://a.example", "body": 3}), "http.body", "JSON object"),
    (
        with_changes(HTTP, http={"url": "https://a.example", "expect_status": 600}),
        "http.expect_status",
        "100 to 599",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "expect_status": [200, "201"]}),
        "http.expect_status",
        "100 to 599",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "expect_status": []}),
        "http.expect_status",
        "100 to 599",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "expect_status": True}),
        "http.expect_status",
        "100 to 599",
    ),  # fmt: skip
    (
        with_changes(HTTP, http={"url": "https://a.example", "timeout": "soon"}),
        "http.timeout",
        "not a duration",
    ),  # fmt: skip
    # run policy
    (with_changes(MINIMAL, mode="some"), "mode", "one, all"),
    (with_changes(MINIMAL, timeout="abc"), "timeout", "'abc' is not a duration"),
    (with_changes(MINIMAL, timeout=0), "timeout", "more than 0"),
    (with_changes(MINIMAL, timeout=-5), "timeout", "non-negative"),
    (with_changes(MINIMAL, timeout=True), "timeout", "expected a duration"),
    (with_changes(MINIMAL, retries=-1), "retries", "0 to 100"),
    (with_changes(MINIMAL, retries=101), "retries", "0 to 100"),
    (with_changes(MINIMAL, retries=True), "retries", "got true"),
    (with_changes(MINIMAL, retries=1.5), "retries", "whole number"),
    (with_changes(MINIMAL, retries="2"), "retries", "whole number"),
    (with_changes(MINIMAL, retry_delay="later"), "retry_delay", "not a duration"),
    (with_changes(MINIMAL, concurrency="queue"), "concurrency", "forbid, allow, replace"),
    (with_changes(MINIMAL, misfire="later"), "misfire", "run_once, skip"),
    (with_changes(MINIMAL, misfire_grace=[1]), "misfire_grace", "expected a duration"),
    (with_changes(MINIMAL, enabled="yes"), "enabled", "true or false"),
    (with_changes(MINIMAL, enabled=1), "enabled", "true or false"),
    # environment and files
    (with_changes(MINIMAL, env=["A=1"]), "env", "object"),
    (with_changes(MINIMAL, env={"1ABC": "x"}), "env.1ABC", "variable name"),
    (with_changes(MINIMAL, env={"A-B": "x"}), "env.A-B", "variable name"),
    (with_changes(MINIMAL, env={"LEVEL": 3}), "env.LEVEL", "expected a string, got 3"),
    (with_changes(MINIMAL, cwd=3), "cwd", "expected a string"),
    # notify
    (with_changes(MINIMAL, notify="ops@example.com"), "notify", "object"),
    (with_changes(MINIMAL, notify={"emails": "ops@example.com"}), "notify.emails", "list"),
    (with_changes(MINIMAL, notify={"emails": ["ops"]}), "notify.emails[0]", "email address"),
    (
        with_changes(MINIMAL, notify={"emails": ["ok@x.org", "a@b@c"]}),
        "notify.emails[1]",
        "email address",
    ),  # fmt: skip
    (with_changes(MINIMAL, notify={"emails": ["@example.com"]}), "notify.emails[0]", "email"),
    (with_changes(MINIMAL, notify={"emails": ["ops@"]}), "notify.emails[0]", "email"),
    (with_changes(MINIMAL, notify={"emails": [3]}), "notify.emails[0]", "expected a string"),
    (with_changes(MINIMAL, notify={"on": ["sometimes"]}), "notify.on[0]", "failure, timeout"),
    (with_changes(MINIMAL, notify={"cc": ["x@y.z"]}), "notify.cc", "unknown key"),
    # free text
    (with_changes(MINIMAL, description=3), "description", "expected a string"),
    (with_changes(MINIMAL, owner=["me"]), "owner", "expected a string"),
]


@pytest.mark.parametrize(("data", "path", "words"), BAD_CASES)
def test_each_problem_has_its_path_and_says_what_is_wrong(
    data: dict[str, Any], path: str, words: str
) -> None:
    problems = validate_task(data, now=NOW)
    by_path = {p.path: p.message for p in problems}
    assert path in by_path, problems
    assert words in by_path[path]
    with pytest.raises(ValidationError) as caught:
        parse_task(data, now=NOW)
    assert caught.value.problems == problems


@pytest.mark.parametrize("data", [None, [MINIMAL], "hello", 3])
def test_a_task_must_be_an_object(data: object) -> None:
    (problem,) = validate_task(data)
    assert problem.path == "" and "expected a task object" in problem.message


def test_every_problem_is_returned_at_once() -> None:
    data = {
        "name": "bad name",
        "schedule": [{"every": "500ms"}, {"cron": "0 0 31 2 *", "timezone": "Moon/Base"}],
        "command": ["ls", 3],
        "retries": 500,
        "env": {"9": "x"},
        "notify": {"emails": ["nobody"]},
        "extra": True,
    }
    paths = [p.path for p in validate_task(data)]
    assert sorted(paths) == sorted(
        [
            "extra",
            "name",
            "schedule[0].every",
            "schedule[1].cron",
            "schedule[1].timezone",
            "command[1]",
            "retries",
            "env.9",
            "notify.emails[0]",
        ]
    )


def test_past_instants_are_refused_only_when_now_is_given() -> None:
    past = with_changes(MINIMAL, schedule={"at": "2026-05-01T00:00:00Z"})
    (problem,) = validate_task(past, now=NOW)
    assert problem.path == "schedule.at" and "in the past" in problem.message
    spec = parse_task(past)  # a stored spec is re-read without `now`
    assert spec.schedule.is_once
    assert spec.schedule.items == (AtSchedule(datetime(2026, 5, 1, tzinfo=timezone.utc)),)
    future = with_changes(MINIMAL, schedule={"at": "2026-07-01T00:00:00Z"})
    assert validate_task(future, now=NOW) == []
    ended = with_changes(MINIMAL, schedule={"every": "1h", "end": "2026-05-31T00:00:00Z"})
    assert [p.path for p in validate_task(ended, now=NOW)] == ["schedule.end"]
    assert validate_task(ended) == []


ROUND_TRIP_SPECS: list[dict[str, Any]] = [
    MINIMAL,
    DESIGN_EXAMPLE,
    with_changes(
        HTTP,
        http={
            "urls": ["https://a.example.com", "https://b.example.com"],
            "strategy": "random",
            "method": "PUT",
            "headers": {"X-Token": "t"},
            "body": [1, 2],
            "expect_status": [200, 201],
            "timeout": "2m",
        },
        timeout="1h30m",
        notify={"emails": ["a@b.c"], "on": ["success", "recovered"]},
    ),  # fmt: skip
    with_changes(MINIMAL, command=["python", "run.py"], file="run.zip", cwd="/srv", mode="all"),
    with_changes(MINIMAL, command="echo $PATH", shell=True, enabled=False, retry_delay=1.5),
    with_changes(MINIMAL, schedule={"keepalive": True}, misfire="skip", misfire_grace="0s"),
    with_changes(
        MINIMAL,
        schedule=[
            {"cron": "*/15 * * * * *", "between": ["22:00", "06:00"], "timezone": "Asia/Tokyo"},
            {"every": "90m", "start": "2026-01-01T00:00:00+01:00", "end": "2027-01-01T00:00:00Z"},
            {"at": "2026-12-24T18:00:00Z"},
        ],
        description="Nightly ✓",
        owner="team-data",
        concurrency="replace",
    ),
]


@pytest.mark.parametrize("data", ROUND_TRIP_SPECS)
def test_to_dict_round_trip(data: dict[str, Any]) -> None:
    spec = parse_task(data, now=NOW)
    canonical = spec.to_dict()
    assert canonical["version"] == 1
    assert set(canonical) == set(TASK_KEYS)
    assert json.loads(json.dumps(canonical)) == canonical  # plain JSON
    again = parse_task(canonical, now=NOW)
    assert again == spec
    assert again.to_dict() == canonical


def test_validation_error_lists_each_problem() -> None:
    data = with_changes(MINIMAL, name="", retries=-1)
    with pytest.raises(ValidationError) as caught:
        parse_task(data)
    error = caught.value
    assert [p.path for p in error.problems] == ["name", "retries"]
    text = str(error)
    assert "2 problems" in text
    for problem in error.problems:
        assert f"  - {problem.path}: {problem.message}" in text
    assert Problem("retries", "x").to_dict() == {"path": "retries", "message": "x"}


def test_task_spec_is_frozen() -> None:
    spec = parse_task(MINIMAL)
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    assert isinstance(spec, TaskSpec)


def test_huge_durations_are_refused_with_a_message_not_an_overflow():
    base = {"name": "a", "schedule": {"every": "1h"}, "command": "true"}
    problems = validate_task({**base, "timeout": 10**400})
    assert [p.path for p in problems] == ["timeout"] and "too long" in problems[0].message
    problems = validate_task({**base, "schedule": {"every": "1" + "0" * 400 + "s"}})
    assert [p.path for p in problems] == ["schedule.every"] and "too long" in problems[0].message

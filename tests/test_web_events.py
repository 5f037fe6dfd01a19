"""The events page and ``GET /api/v1/events``: newest first, filters by kind (or a prefix),
severity, task, agent, group and time, bad filters named; events stored in the documented
shape (see cloudtask/events.py)."""

from __future__ import annotations

import html
from datetime import datetime, timedelta, timezone

import pytest
from helpers import OPERATOR, VIEWER, make_web_app, web_login

from cloudtask.clock import to_bson_time
from cloudtask.runmodel import new_id
from cloudtask.users import Users

NOW = datetime.now(timezone.utc)
SEVERITY = {"run.failed": "error", "run.missed": "warning", "agent.left": "error"}


def add_event(store, kind, minutes_ago, **fields):
    at = to_bson_time(NOW - timedelta(minutes=minutes_ago))
    doc = {
        "_id": fields.pop("_id", new_id()),
        "version": 1,
        "kind": kind,
        "severity": SEVERITY.get(kind, "info"),
        "at": at,
        "ts": at.timestamp(),
        "message": fields.pop("message", f"{kind} {minutes_ago} minutes ago"),
        "task_id": None,
        "task_name": None,
        "group": None,
        "run_id": None,
        "agent": None,
        "details": {},
        "delivery": "new",
        **fields,
    }
    store.events.insert_one(doc)
    return doc


@pytest.fixture
def events(store):
    task = store.create_task({"name": "nightly", "schedule": {"every": "1h"}, "command": "true"})
    made = {
        "failed": add_event(
            store,
            "run.failed",
            5,
            task_id=task["_id"],
            task_name="nightly",
            group="default",
            run_id="run-000000000001",
            agent="a1",
            message="task nightly failed on agent a1 (exit 2) <b>",
        ),
        "missed": add_event(store, "run.missed", 50, task_id=task["_id"], task_name="nightly"),
        "left": add_event(store, "agent.left", 20, agent="a2", group="reports"),
        "old": add_event(store, "task.created", 60 * 48, task_id=task["_id"], task_name="nightly"),
    }
    return task, made


@pytest.fixture
def client(store):
    app = make_web_app(store)
    client = app.test_client()
    web_login(client, VIEWER.name, VIEWER.password)
    return client


def ids(answer):
    return [e["id"] for e in answer.get_json()["items"]]


def test_the_api_lists_events_newest_first_with_their_facts(client, events):
    _, made = events
    answer = client.get("/api/v1/events")
    assert answer.status_code == 200
    body = answer.get_json()
    assert ids(answer) == [made[k]["_id"] for k in ("failed", "left", "missed", "old")]
    assert body["total"] == 4
    first = body["items"][0]
    assert first["kind"] == "run.failed" and first["severity"] == "error"
    assert first["agent"] == "a1" and first["run_id"] == "run-000000000001"
    assert "delivery" not in first


@pytest.mark.parametrize(
    "query, expected",
    [
        ("kind=run.failed", ["failed"]),
        ("kind=run.", ["failed", "missed"]),
        ("severity=error", ["failed", "left"]),
        ("agent=a2", ["left"]),
        ("group=reports", ["left"]),
        (
            "since=" + (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"),
            ["failed", "left", "missed"],
        ),
        ("until=" + (NOW - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S"), ["missed", "old"]),
    ],
)
def test_filters_pick_exactly_the_right_events(client, events, query, expected):
    _, made = events
    assert ids(client.get(f"/api/v1/events?{query}")) == [made[k]["_id"] for k in expected]


def test_the_task_filter(client, events):
    task, made = events
    got = ids(client.get(f"/api/v1/events?task={task['_id']}"))
    assert got == [made[k]["_id"] for k in ("failed", "missed", "old")]


@pytest.mark.parametrize(
    "query, path",
    [("kind=nonsense", "kind"), ("severity=loud", "severity"), ("since=yesterday", "since")],
)
def test_bad_filters_are_named(client, events, query, path):
    answer = client.get(f"/api/v1/events?{query}")
    assert answer.status_code == 422
    assert [d["path"] for d in answer.get_json()["details"]] == [path]
    page = client.get(f"/events?{query}")
    assert page.status_code == 422
    assert f'data-error="{path}"' in page.get_data(as_text=True)


def test_the_page_shows_events_escaped_with_links(client, events):
    task, made = events
    page = client.get("/events").get_data(as_text=True)
    assert page.index(made["failed"]["_id"]) < page.index(made["left"]["_id"])
    assert html.escape("task nightly failed on agent a1 (exit 2) <b>") in page
    assert "exit 2) <b>" not in page
    assert f'href="/tasks/{task["_id"]}"' in page
    assert 'href="/runs/run-000000000001"' in page


def test_pages_of_events(client, store):
    for i in range(7):
        add_event(store, "agent.joined", i, agent=f"a{i}")
    answer = client.get("/api/v1/events?per_page=3&page=3")
    assert answer.get_json()["total"] == 7
    assert len(ids(answer)) == 1


def test_anonymous_users_are_refused(store):
    app = make_web_app(store)
    assert app.test_client().get("/api/v1/events").status_code == 401
    assert app.test_client().get("/events").status_code == 302
    Users(store).get(OPERATOR.name)  # the app made its users


def test_the_dashboard_shows_the_recent_errors_and_warnings(client, events):
    _, made = events
    page = client.get("/").get_data(as_text=True)
    section = page[page.index('id="recent-events"') : page.index('id="recent-runs"')]
    assert made["failed"]["_id"] in section and made["left"]["_id"] in section
    assert made["missed"]["_id"] in section
    assert made["old"]["_id"] not in section  # task.created is info: not on the dashboard
    assert 'href="/runs/run-000000000001"' in section

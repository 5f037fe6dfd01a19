"""Events and runs by task name (Flask test client on a real store): the events API, the events
page and GET /api/v1/runs take a task's name as well as its id; a deleted task's events and
runs are still found by either; a name no task ever had is a 404 saying so, not an empty list
that reads like "nothing happened"."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from helpers import Api, error_of, make_web_app, run_document, task_spec, web_login

from cloudtask.operations import Operations
from cloudtask.users import Users


@pytest.fixture
def app(store):
    app = make_web_app(store)
    app.tokens = {"viewer": Users(store).create_token("viewer1", "tests")}  # type: ignore[attr-defined]
    return app


@pytest.fixture
def viewer(app):
    return Api(app.test_client(), app.tokens["viewer"])


@pytest.fixture
def tasks(store):
    """Two tasks made through the operations (each change is an event), with a run each."""
    ops = Operations(store)
    made = {name: ops.create_task("op1", task_spec(name)) for name in ("alpha", "beta")}
    ops.set_enabled("op1", made["alpha"]["_id"], False)  # one more event of alpha
    now = datetime.now(timezone.utc)
    for i, task in enumerate(made.values()):
        store.runs.insert_one(run_document(task, now - timedelta(minutes=i + 1)))
    return made


def task_ids(items):
    return {item["task_id"] for item in items}


def test_events_by_task_name_or_id(viewer, tasks):
    alpha = tasks["alpha"]["_id"]
    by_name = viewer.get("/events?task=alpha")
    assert by_name.status_code == 200
    items = by_name.get_json()["items"]
    assert len(items) == 2 and task_ids(items) == {alpha}
    assert viewer.get(f"/events?task={alpha}").get_json()["items"] == items
    assert len(viewer.get("/events?task=beta").get_json()["items"]) == 1


def test_an_unknown_task_is_a_404_saying_so(viewer, tasks):
    for path in ("/events?task=gamma", "/runs?task=gamma", "/events?task=alpha2&kind=task."):
        body = error_of(viewer.get(path), 404)
        assert "no task named" in body["error"], path
    # the other filters still say what is wrong with them first
    assert viewer.get("/runs?task=gamma&per_page=0").status_code == 422


def test_runs_by_task_name_or_id(viewer, tasks):
    alpha = tasks["alpha"]["_id"]
    by_name = viewer.get("/runs?task=alpha")
    assert by_name.status_code == 200
    page = by_name.get_json()
    assert page["total"] == 1 and task_ids(page["items"]) == {alpha}
    assert viewer.get(f"/runs?task={alpha}").get_json()["items"] == page["items"]
    assert viewer.get("/runs").get_json()["total"] == 2


def test_a_deleted_tasks_events_and_runs_are_still_found(viewer, store, tasks):
    beta = tasks["beta"]["_id"]
    Operations(store).delete_task("op1", beta)
    events = viewer.get("/events?task=beta")
    assert events.status_code == 200
    kinds = [e["kind"] for e in events.get_json()["items"]]
    assert kinds == ["task.deleted", "task.created"]
    assert viewer.get(f"/events?task={beta}").get_json()["items"] == events.get_json()["items"]
    runs = viewer.get("/runs?task=beta").get_json()
    assert runs["total"] == 1 and task_ids(runs["items"]) == {beta}
    assert viewer.get(f"/runs?task={beta}").get_json()["total"] == 1


def test_the_events_page_takes_a_name_and_says_when_there_is_no_such_task(app, tasks):
    client = app.test_client()
    web_login(client, "viewer1", "viewer passphrase")
    answer = client.get("/events?task=alpha")
    assert answer.status_code == 200
    page = answer.get_data(as_text=True)
    assert page.count('data-kind="task.') == 2 and "No events match" not in page
    assert 'placeholder="task name or id"' in page
    answer = client.get(f"/events?task={tasks['alpha']['_id']}")
    assert answer.get_data(as_text=True).count('data-kind="task.') == 2

    answer = client.get("/events?task=gamma")
    assert answer.status_code == 404
    page = answer.get_data(as_text=True)
    assert "no task named &#39;gamma&#39;" in page and 'data-error="task"' in page
    assert "No events match" not in page and 'data-kind="' not in page

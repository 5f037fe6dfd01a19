"""The REST API (Flask test client on a real store; ZooKeeper where kills, owners and agents
matter): task CRUD with a Bearer token, validation like the model, bad bodies, 409s, roles,
runs (list, get, output, kill), run now, agents and the cluster, files, the callbacks of http
tasks, JSON errors for unknown routes and methods, and the OpenAPI document.

Longer than the other files on purpose: the last tests hold the OpenAPI document against what
every route above answers, and the Bearer-token clients (``op``, ``viewer``, ``anonymous``)
would clash by name with the site's logged-in clients of conftest.py if they moved there."""

from __future__ import annotations

import hashlib
import io
import json
import re
from datetime import datetime, timedelta, timezone

import pytest
import schemathesis
from helpers import Api, make_web_app, run_document
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cloudtask.config import Config
from cloudtask.task import validate_task
from cloudtask.users import Users
from cloudtask.zkpaths import ZkPaths, encode
from web.api import api
from web.openapi import document

NOW = datetime.now(timezone.utc)
SPEC = {"name": "backup", "schedule": {"every": "1h"}, "command": ["sh", "-c", "echo hi"]}
JSON_HEADERS = {"Content-Type": "application/json"}
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def make_app(store, zk=None, config=None):
    app = make_web_app(store, zk, config)
    users = Users(store)
    app.tokens = {  # type: ignore[attr-defined]
        "operator": users.create_token("op1", "tests"),
        "viewer": users.create_token("viewer1", "tests"),
    }
    return app


@pytest.fixture
def app(store):
    return make_app(store)


@pytest.fixture
def op(app):
    return Api(app.test_client(), app.tokens["operator"])


@pytest.fixture
def viewer(app):
    return Api(app.test_client(), app.tokens["viewer"])


@pytest.fixture
def anonymous(app):
    return Api(app.test_client())


def error_of(answer, status):
    assert answer.status_code == status, (answer.status_code, answer.get_data(as_text=True))
    body = answer.get_json()
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body.get("details", []), list)
    return body


def paths_of(body):
    return [d["path"] for d in body["details"]]


def add_run(store, task, status="running", agent=None, token=None, output="", **more):
    """A run of ``task`` stored as an agent stores one (each a minute before the previous)."""
    when = NOW - timedelta(minutes=1 + store.runs.count_documents({}))
    doc = run_document(
        task,
        when,
        status=status,
        agent=agent,
        token_hash=hashlib.sha256(token.encode()).hexdigest() if token else None,
    )
    doc["output_tail"] = output
    doc.update(more)
    store.runs.insert_one(doc)
    return doc


# --- who am I, and logging in ----------------------------------------------------------------


def test_me_answers_the_tokens_user_and_refuses_no_or_a_wrong_token(app, op, viewer, anonymous):
    me = op.get("/me").get_json()
    assert (me["username"], me["role"], me["token"]["scope"]) == ("op1", "operator", "all")
    assert me["token"]["expires_at"] is None
    me = viewer.get("/me").get_json()
    assert (me["username"], me["role"]) == ("viewer1", "viewer")
    error_of(anonymous.get("/me"), 401)
    error_of(Api(app.test_client(), "ct_not-a-token").get("/me"), 401)


def test_a_browser_session_works_too_and_its_writes_need_the_csrf_token(app):
    client = app.test_client()
    page = client.get("/login").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    answer = client.post(
        "/login", data={"username": "op1", "password": "operator passphrase", "csrf_token": csrf}
    )
    assert answer.status_code == 302
    assert client.get("/api/v1/me").get_json()["username"] == "op1"
    assert client.post("/api/v1/tasks", json=SPEC).status_code == 400  # no CSRF token
    # the login started a new session with a new token: the one of the login form is void
    assert (
        client.post("/api/v1/tasks", json=SPEC, headers={"X-CSRF-Token": csrf}).status_code == 400
    )
    page = client.get("/tasks").get_data(as_text=True)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    answer = client.post("/api/v1/tasks", json=SPEC, headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 201


# --- tasks -------------------------------------------------------------------------------------


def test_task_crud_with_a_token(op, store):
    answer = op.post("/tasks", json=SPEC)
    assert answer.status_code == 201, answer.get_json()
    task = answer.get_json()
    assert answer.headers["Location"] == f"/api/v1/tasks/{task['id']}"
    assert answer.headers["ETag"] == '"1"'
    assert task["name"] == "backup" and task["revision"] == 1 and task["state"] == "enabled"
    assert task["spec"]["command"] == ["sh", "-c", "echo hi"]
    assert len(task["next_fires"]) == 10
    fires = [datetime.fromisoformat(f) for f in task["next_fires"]]
    assert all(f.utcoffset() == timedelta(0) for f in fires)
    assert fires == sorted(fires) and fires[1] - fires[0] == timedelta(hours=1)
    assert task["owner_agent"] is None

    by_name = op.get("/tasks/backup").get_json()
    by_id = op.get(f"/tasks/{task['id']}").get_json()
    assert by_name["id"] == by_id["id"] == task["id"]

    replaced = op(
        "PUT",
        "/tasks/backup",
        json={**SPEC, "schedule": {"cron": "0 3 * * *"}, "timeout": "10m"},
        headers={"If-Match": '"1"'},
    )
    assert replaced.status_code == 200, replaced.get_json()
    assert replaced.headers["ETag"] == '"2"'
    assert replaced.get_json()["spec"]["schedule"]["cron"] == "0 3 * * *"
    assert replaced.get_json()["spec"]["timeout"] == "10m"

    patched = op("PATCH", f"/tasks/{task['id']}?revision=2", json={"timeout": None, "retries": 2})
    assert patched.status_code == 200, patched.get_json()
    body = patched.get_json()
    assert body["revision"] == 3
    assert body["spec"]["timeout"] is None and body["spec"]["retries"] == 2
    assert body["spec"]["schedule"]["cron"] == "0 3 * * *"  # the rest kept

    listed = op.get("/tasks").get_json()
    assert [t["name"] for t in listed["items"]] == ["backup"]
    assert listed["total"] == 1 and listed["capped"] is False

    deleted = op("DELETE", "/tasks/backup")
    assert deleted.status_code == 200
    assert deleted.get_json()["deleted"]["id"] == task["id"]
    assert deleted.get_json()["killed"] == []
    error_of(op.get("/tasks/backup"), 404)
    error_of(op("DELETE", "/tasks/backup"), 404)
    actions = [a["action"] for a in store.audit.find({}).sort("_id", 1)]
    assert actions[:4] == ["task.create", "task.update", "task.update", "task.delete"]


BAD_SPECS = [
    {
        "name": "bad name!",
        "schedule": {"cron": "61 * * * *"},
        "command": "true",
        "retries": 500,
        "env": {"1X": "a"},
        "colour": "red",
    },
    {"name": "x", "schedule": [{"every": "0s"}, {"keepalive": True}], "http": {"url": "ftp://a"}},
    {"name": "y", "schedule": {"every": "1h", "timezone": "Mars/Base"}},
    {"schedule": "daily", "command": ["", "a"], "notify": {"on": ["sometimes"]}},
]


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_validation_errors_name_the_fields_like_the_model(op, store, spec):
    expected = [p.to_dict() for p in validate_task(spec, now=datetime.now(timezone.utc))]
    assert expected
    body = error_of(op.post("/tasks", json=spec), 422)
    assert body["details"] == expected
    assert store.tasks.count_documents({}) == 0

    op.post("/tasks", json=SPEC)
    body = error_of(op("PUT", "/tasks/backup", json=spec), 422)
    assert body["details"] == expected


def test_a_patch_is_validated_like_the_whole_task(op):
    op.post("/tasks", json=SPEC)
    body = error_of(op("PATCH", "/tasks/backup", json={"schedule": {"every": "0s"}}), 422)
    assert paths_of(body) == ["schedule.every"]
    body = error_of(op("PATCH", "/tasks/backup", json={"http": {"url": "https://x.example"}}), 422)
    assert paths_of(body) == ["http"]  # a command and an http call: null the command too
    answer = op(
        "PATCH", "/tasks/backup", json={"command": None, "http": {"url": "https://x.example"}}
    )
    assert answer.status_code == 200
    assert answer.get_json()["spec"]["http"]["urls"] == ["https://x.example"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{not json",
        b"[1, 2]",
        b"null",
        b'"text"',
        b"42",
        b'{"name": NaN}',
        b'{"retries": 1e999}',
        b'{"retries": 99999999999999999999999}',
        b'{"name": "' + b"9" * 5000 + b'"}',  # fine as a string: refused by the model (422)
        b'{"description": "\\ud800"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"a": ' * 40 + b"1" + b"}" * 40,
        b'{"name": "\xff\xfe"}',
    ],
)
def test_bodies_that_are_not_a_json_object_are_400(op, raw):
    for method, path in (("POST", "/tasks"), ("PUT", "/tasks/backup"), ("PATCH", "/tasks/backup")):
        if method != "POST":
            op.post("/tasks", json=SPEC)
        answer = op(method, path, data=raw, headers=JSON_HEADERS)
        if raw.startswith(b'{"name": "999'):
            assert answer.status_code == 422, answer.get_json()
        else:
            error_of(answer, 400)


def test_unicode_is_kept_as_sent_and_nul_characters_are_refused_at_their_path(op):
    text = "caf\u00e9 \U0001f600 ab \u202e"
    answer = op.post("/tasks", json={**SPEC, "description": text, "env": {"X": "\u00e9"}})
    assert answer.status_code == 201, answer.get_json()
    task = op.get("/tasks/backup").get_json()
    assert task["spec"]["description"] == text and task["spec"]["env"] == {"X": "\u00e9"}
    # a NUL used to be stored and then failed every run (issue 12): refused at its path now
    nul = {**SPEC, "name": "other", "description": "a\x00b", "env": {"X": "\x00"}}
    body = error_of(op.post("/tasks", json=nul), 422)
    assert sorted(paths_of(body)) == ["description", "env.X"]
    body = error_of(op.post("/tasks", json={**SPEC, "name": "caf\u00e9\x00"}), 422)
    assert paths_of(body) == ["name"]
    error_of(op.get("/tasks/a%00b"), 404)


def test_a_huge_body_is_413(op):
    spec = {**SPEC, "description": "x" * (2 * 1024 * 1024)}
    body = error_of(op.post("/tasks", json=spec), 413)
    assert "too large" in body["error"]


def test_conflicts_are_409(op):
    op.post("/tasks", json=SPEC)
    body = error_of(op.post("/tasks", json=SPEC), 409)
    assert paths_of(body) == ["name"]
    op.post("/tasks", json={**SPEC, "name": "other"})
    body = error_of(op("PATCH", "/tasks/other", json={"name": "backup"}), 409)
    assert paths_of(body) == ["name"]

    op("PATCH", "/tasks/backup", json={"retries": 1})  # now revision 2
    error_of(op("PUT", "/tasks/backup", json=SPEC, headers={"If-Match": '"1"'}), 409)
    error_of(op("PATCH", "/tasks/backup?revision=1", json={"retries": 3}), 409)
    assert op.get("/tasks/backup").get_json()["spec"]["retries"] == 1
    answer = op("PATCH", "/tasks/backup", json={"retries": 3}, headers={"If-Match": "*"})
    assert answer.status_code == 200

    body = error_of(op("PATCH", "/tasks/backup", json={}, headers={"If-Match": "abc"}), 422)
    assert paths_of(body) == ["If-Match"]
    body = error_of(op("PATCH", "/tasks/backup?revision=-1", json={}), 422)
    assert paths_of(body) == ["revision"]


def test_viewers_read_but_get_403_on_every_write_and_no_token_is_401(op, viewer, anonymous):
    task = op.post("/tasks", json=SPEC).get_json()
    assert viewer.get("/tasks").status_code == 200
    assert viewer.get("/tasks/backup").status_code == 200
    writes = [
        ("POST", "/tasks", SPEC),
        ("PUT", "/tasks/backup", SPEC),
        ("PATCH", "/tasks/backup", {"retries": 1}),
        ("DELETE", "/tasks/backup", None),
        ("POST", "/tasks/backup/run", None),
        ("POST", "/tasks/backup/pause", None),
        ("POST", "/tasks/backup/resume", None),
        ("POST", "/runs/x1/kill", None),
        ("POST", "/files?name=a.sh", None),
    ]
    for method, path, body in writes:
        error_of(viewer(method, path, json=body), 403)
        error_of(anonymous(method, path, json=body), 401)
    assert op.get("/tasks/backup").get_json()["revision"] == task["revision"]
    for path in ("/tasks", "/tasks/backup", "/runs", "/agents", "/cluster", "/files"):
        error_of(anonymous.get(path), 401)


def test_list_filters_and_pages(op):
    for name in ("alpha", "beta", "Bravo", "charlie"):
        assert op.post("/tasks", json={**SPEC, "name": name}).status_code == 201
    op.post("/tasks/charlie/pause")
    page = op.get("/tasks?per_page=2").get_json()
    assert [t["name"] for t in page["items"]] == ["Bravo", "alpha"]
    assert (page["page"], page["per_page"], page["total"]) == (1, 2, 4)
    page = op.get("/tasks?per_page=2&page=2").get_json()
    assert [t["name"] for t in page["items"]] == ["beta", "charlie"]
    assert [t["name"] for t in op.get("/tasks?q=b").get_json()["items"]] == ["Bravo", "beta"]
    paused = op.get("/tasks?state=paused").get_json()["items"]
    assert [(t["name"], t["state"], t["enabled"]) for t in paused] == [("charlie", "paused", False)]
    assert op.get("/tasks?last=never").get_json()["total"] == 4
    assert op.get("/tasks?q=%00%F0%9F%98%80").get_json()["total"] == 0


@pytest.mark.parametrize(
    "args, where",
    [
        ("per_page=0", "per_page"),
        ("per_page=501", "per_page"),
        ("page=abc", "page"),
        ("page=" + "9" * 5000, "page"),
        ("state=sleeping", "state"),
        ("last=ok", "last"),
        ("q=" + "x" * 201, "q"),
    ],
)
def test_bad_query_arguments_are_422_naming_them(op, args, where):
    body = error_of(op.get(f"/tasks?{args}"), 422)
    assert paths_of(body) == [where]


@pytest.mark.parametrize(
    "args, where",
    [("status=done", "status"), ("since=yesterday", "since"), ("per_page=-1", "per_page")],
)
def test_bad_run_filters_are_422(op, args, where):
    assert paths_of(error_of(op.get(f"/runs?{args}"), 422)) == [where]


def test_pause_and_resume(op, store):
    op.post("/tasks", json=SPEC)
    paused = op.post("/tasks/backup/pause")
    assert paused.status_code == 200
    assert (paused.get_json()["enabled"], paused.get_json()["state"]) == (False, "paused")
    assert store.get_task_by_name("backup")["enabled"] is False
    resumed = op.post("/tasks/backup/resume").get_json()
    assert (resumed["enabled"], resumed["state"]) == (True, "enabled")
    error_of(op.post("/tasks/nope/pause"), 404)


# --- runs ------------------------------------------------------------------------------------


def test_run_now_list_get_output_and_kill_a_queued_run(op, store):
    task = op.post("/tasks", json=SPEC).get_json()
    answer = op.post("/tasks/backup/run")
    assert answer.status_code == 202
    run = answer.get_json()
    assert run["status"] == "queued" and run["trigger"] == "manual"
    assert run["requested_by"] == "op1" and run["agent"] is None
    assert answer.headers["Location"] == f"/api/v1/runs/{run['id']}"

    listed = op.get(f"/runs?task={task['id']}").get_json()
    assert [r["id"] for r in listed["items"]] == [run["id"]] and listed["total"] == 1
    assert op.get("/runs?status=succeeded").get_json()["total"] == 0

    detail = op.get(f"/runs/{run['id']}").get_json()
    assert detail["id"] == run["id"] and detail["report"] is None
    assert "output_tail" not in detail and "token_hash" not in detail
    output = op.get(f"/runs/{run['id']}/output").get_json()
    assert output == {"run_id": run["id"], "status": "queued", "output": ""}

    killed = op.post(f"/runs/{run['id']}/kill")
    assert killed.status_code == 202
    assert killed.get_json()["status"] == "killed"  # no agent took it: cancelled at once
    error_of(op.post(f"/runs/{run['id']}/kill"), 409)
    for path in ("/runs/nope", "/runs/nope/output"):
        error_of(op.get(path), 404)
    error_of(op.post("/runs/nope/kill"), 404)
    error_of(op.post("/tasks/nope/run"), 404)


def test_a_run_shows_its_output_and_report_but_never_its_token(op, store):
    task = store.create_task(SPEC)
    run = add_run(store, task, status="succeeded", agent="a1", token="secret", output="hello\n")
    store.report_progress(run["_id"], 50.0, "half")
    detail = op.get(f"/runs/{run['_id']}").get_json()
    assert "token_hash" not in detail and "output_tail" not in detail
    assert detail["report"]["percent"] == 50.0 and detail["report"]["message"] == "half"
    assert detail["report"]["result"] is None
    output = op.get(f"/runs/{run['_id']}/output").get_json()
    assert output == {"run_id": run["_id"], "status": "succeeded", "output": "hello\n"}
    listed = op.get("/runs").get_json()["items"]
    assert "token_hash" not in listed[0] and "output_tail" not in listed[0]


def test_a_keepalive_task_cannot_be_run_now(op):
    op.post("/tasks", json={**SPEC, "schedule": {"keepalive": True}})
    error_of(op.post("/tasks/backup/run"), 409)


def test_killing_a_running_run_asks_its_agent_through_zookeeper(store, zk):
    app = make_app(store, zk)
    op = Api(app.test_client(), app.tokens["operator"])
    task = store.create_task(SPEC)
    run = add_run(store, task, agent="agent-1")
    assert op.post(f"/runs/{run['_id']}/kill").status_code == 202
    assert zk.exists(ZkPaths().kill("agent-1", run["_id"]))

    other = add_run(store, task, agent="agent-2")
    error_of(op("DELETE", "/tasks/backup?kill_running=maybe"), 422)
    deleted = op("DELETE", "/tasks/backup?kill_running=true")
    assert deleted.status_code == 200
    assert set(deleted.get_json()["killed"]) == {run["_id"], other["_id"]}
    assert zk.exists(ZkPaths().kill("agent-2", other["_id"]))


def test_without_a_cluster_a_running_run_cannot_be_killed(op, store):
    run = add_run(store, store.create_task(SPEC), agent="agent-1")
    body = error_of(op.post(f"/runs/{run['_id']}/kill"), 409)
    assert "ZooKeeper" in body["error"]


# --- agents and the cluster ------------------------------------------------------------------


def test_agents_and_the_cluster_show_host_pid_owner_and_unassigned_tasks(store, zk):
    paths = ZkPaths()
    owned = store.create_task(SPEC)
    lonely = store.create_task({**SPEC, "name": "lonely", "group": "g2"})
    load = {
        "cpu_percent": 12.5,
        "memory_percent": 40.0,
        "agent_cpu_percent": 3,
        "agent_rss_mb": 120,
        "running": 2,
    }
    info = {"host": "web-1", "pid": 4242, "load": load, "max_parallel": 8}
    zk.create(paths.agent("default", "agent-1"), encode(info), makepath=True, ephemeral=True)
    zk.create(paths.assignment("agent-1", owned["_id"]), b"{}", makepath=True)
    zk.create(paths.center("c1"), encode({"host": "web-1"}), makepath=True, ephemeral=True)
    status = {"leader": "c1", "unassigned": {lonely["_id"]: "g2"}}
    zk.create(paths.status, encode(status), makepath=True)
    store.record_agents({"agent-0": {"group": "default", "host": "old-1", "pid": 7}})
    app = make_app(store, zk)
    op = Api(app.test_client(), app.tokens["viewer"])

    agents = op.get("/agents").get_json()["items"]
    by_id = {a["agent_id"]: a for a in agents}
    live = by_id["agent-1"]
    assert (live["host"], live["pid"], live["status"], live["group"]) == (
        "web-1",
        4242,
        "online",
        "default",
    )
    assert live["load"] == {
        "cpu_percent": 12.5,
        "memory_percent": 40.0,
        "agent_cpu_percent": 3,
        "agent_rss_mb": 120,
    }
    assert (live["running"], live["tasks"], live["last_seen"]) == (2, 1, None)

    assert op.get("/tasks/backup").get_json()["owner_agent"] == "agent-1"
    items = op.get("/tasks").get_json()["items"]
    assert {t["name"]: t["owner_agent"] for t in items} == {"backup": "agent-1", "lonely": None}

    view = op.get("/cluster").get_json()
    assert view["connected"] is True and view["leader"] == "c1"
    assert [(c["center_id"], c["leader"]) for c in view["centers"]] == [("c1", True)]
    assert "agent-1" in [a["agent_id"] for a in view["agents"]]
    assert view["unassigned"] == [{"task_id": lonely["_id"], "name": "lonely", "group": "g2"}]


def test_without_zookeeper_the_cluster_says_it_is_not_connected(viewer):
    view = viewer.get("/cluster").get_json()
    assert view["connected"] is False and view["agents"] == [] and view["leader"] is None


# --- files -----------------------------------------------------------------------------------


def test_files_upload_by_multipart_or_raw_body_and_list(op, viewer, store):
    data = b"#!/bin/sh\necho hi\n"
    answer = op.post("/files", data={"file": (io.BytesIO(data), "hello.sh")})
    assert answer.status_code == 201, answer.get_json()
    info = answer.get_json()
    assert info["name"] == "hello.sh" and info["size"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["uploaded_by"] == "op1"
    again = op.post("/files", data={"file": (io.BytesIO(data), "uploads/hello.sh")})
    assert again.status_code == 200 and again.get_json()["created"] is False

    named = op.post("/files", data={"file": (io.BytesIO(b"x"), "a.sh"), "name": "b.sh"})
    assert named.status_code == 201 and named.get_json()["name"] == "b.sh"
    raw = op.post("/files?name=hello.sh", data=b"echo two", headers={"Content-Type": "text/plain"})
    assert raw.status_code == 201
    assert raw.get_json()["sha256"] == hashlib.sha256(b"echo two").hexdigest()

    files = viewer.get("/files").get_json()["items"]
    assert [(f["name"], f["size"]) for f in files] == [("b.sh", 1), ("hello.sh", 8)]
    assert store.get_file_by_hash(hashlib.sha256(data).hexdigest()) == data
    # every upload that stored a version is audited, as on the site and the command line
    uploads = [
        (e["actor"], e["target"], (e["before"] or {}).get("sha256"))
        for e in store.audit.find({"action": "file.upload"}).sort("at", 1)
    ]
    assert uploads == [
        ("op1", "file:hello.sh", None),
        ("op1", "file:b.sh", None),
        ("op1", "file:hello.sh", hashlib.sha256(data).hexdigest()),
    ]

    assert paths_of(error_of(op.post("/files", data=b"echo"), 422)) == ["name"]
    assert paths_of(error_of(op.post("/files?name=../x.sh", data=b"echo"), 422)) == ["name"]
    assert paths_of(error_of(op.post("/files", data={"name": "a.sh"}), 422)) == ["file"]
    body = error_of(op.post("/files?name=p.zip", data=b"not a zip"), 422)
    assert paths_of(body) == ["file"]


def test_a_task_cannot_name_a_file_or_version_that_is_not_stored(op, store):
    spec = {**SPEC, "command": "./job.sh", "file": "job.sh"}
    body = error_of(op.post("/tasks", json=spec), 422)
    assert paths_of(body) == ["file"] and "upload it first" in body["details"][0]["message"]
    assert store.tasks.count_documents({}) == 0
    one = op.post("/files?name=job.sh", data=b"echo one").get_json()["sha256"]
    two = op.post("/files?name=job.sh", data=b"echo two").get_json()["sha256"]
    pinned = {**spec, "file_version": "f" * 64}
    body = error_of(op.post("/tasks", json=pinned), 422)
    assert paths_of(body) == ["file_version"]
    assert f"{two[:12]}, {one[:12]}" in body["details"][0]["message"]  # newest first
    task = op.post("/tasks", json={**spec, "file_version": one}).get_json()
    assert task["spec"]["file_version"] == one
    # a task whose file went away later can still be changed, just not to another missing one
    for doc in store.db["files.files"].find({"filename": "job.sh"}):
        store.fs.delete(doc["_id"])
    changed = op("PATCH", f"/tasks/{task['id']}", json={"retries": 1})
    assert changed.status_code == 200, changed.get_json()
    body = error_of(op("PATCH", f"/tasks/{task['id']}", json={"file_version": two}), 422)
    assert paths_of(body) == ["file"]
    assert store.get_task(task["id"])["spec"]["file_version"] == one  # nothing lost


def test_an_upload_over_the_limit_is_413(store):
    config = Config().with_section("web", max_upload_bytes=1000)
    app = make_app(store, config=config)
    op = Api(app.test_client(), app.tokens["operator"])
    error_of(op.post("/files?name=big.bin", data=b"x" * 1001), 413)
    error_of(op.post("/files", data={"file": (io.BytesIO(b"x" * 1001), "big.bin")}), 413)
    error_of(op.post("/files?name=big.bin", data=b"x" * 200_000), 413)
    assert op.post("/files?name=ok.bin", data=b"x" * 1000).status_code == 201
    assert op.get("/files").get_json()["items"][0]["name"] == "ok.bin"


# --- callbacks of http tasks -----------------------------------------------------------------


def test_callbacks_with_the_run_token_report_progress_then_one_result(app, store, op):
    task = store.create_task({**SPEC, "command": None, "http": {"url": "https://x.example"}})
    run = add_run(store, task, agent="agent-1", token="run-secret")
    client = app.test_client()

    def callback(kind, body, token="run-secret", run_id=run["_id"]):
        headers = {"X-CloudTask-Token": token} if token else {}
        return client.post(f"/api/v1/runs/{run_id}/{kind}", json=body, headers=headers)

    answer = callback("progress", {"percent": 40, "message": "copying"})
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["percent"] == 40.0
    report = op.get(f"/runs/{run['_id']}").get_json()["report"]
    assert (report["percent"], report["message"]) == (40.0, "copying")

    for token in ("wrong", None):
        error_of(callback("progress", {"percent": 50}, token=token), 401)
        error_of(callback("result", {"status": "succeeded"}, token=token), 401)
    error_of(callback("progress", {"percent": 50}, run_id="no-such-run"), 401)

    bad = [
        ({"percent": 150}, "percent"),
        ({"percent": True}, "percent"),
        ({"percent": "50"}, "percent"),
        ({"message": "x" * 2001}, "message"),
        ({"message": 5}, "message"),
        ({"colour": "red"}, "colour"),
    ]
    for body, where in bad:
        assert paths_of(error_of(callback("progress", body), 422)) == [where]
    assert paths_of(error_of(callback("result", {"status": "done"}), 422)) == ["status"]
    assert paths_of(error_of(callback("result", {}), 422)) == ["status"]
    answer = client.post(
        f"/api/v1/runs/{run['_id']}/result",
        data=b"[1]",
        headers={"X-CloudTask-Token": "run-secret", **JSON_HEADERS},
    )
    error_of(answer, 400)

    answer = callback("result", {"status": "failed", "message": "disk full"})
    assert answer.status_code == 202
    assert answer.get_json()["result"]["status"] == "failed"
    assert store.get_report(run["_id"])["result"]["message"] == "disk full"
    error_of(callback("result", {"status": "succeeded", "message": "again"}), 409)
    error_of(callback("progress", {"percent": 99}), 409)
    assert store.get_report(run["_id"])["result"]["status"] == "failed"


def test_callbacks_of_a_finished_run_are_409(app, store):
    task = store.create_task(SPEC)
    run = add_run(store, task, status="succeeded", agent="agent-1", token="tok")
    client = app.test_client()
    for kind, body in (("progress", {"percent": 1}), ("result", {"status": "succeeded"})):
        answer = client.post(
            f"/api/v1/runs/{run['_id']}/{kind}", json=body, headers={"X-CloudTask-Token": "tok"}
        )
        error_of(answer, 409)
    assert store.get_report(run["_id"]) is None


# --- routes, methods, the document -----------------------------------------------------------


def test_unknown_routes_and_methods_answer_json(op):
    body = error_of(op.get("/nothing-here"), 404)
    assert body["details"] == []
    answer = op("DELETE", "/tasks")
    error_of(answer, 405)
    assert set(answer.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def api_rules(app):
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/"):
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
            out |= {(m.lower(), path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def test_the_openapi_document_covers_every_api_route_and_is_valid(app, viewer, anonymous):
    error_of(anonymous.get("/openapi.json"), 401)
    doc = viewer.get("/openapi.json").get_json()
    assert doc == json.loads(json.dumps(document(api)))  # what tests/test_api_fuzz.py fuzzes
    documented = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert documented == api_rules(app)
    assert len(documented) >= 21
    schemathesis.openapi.from_dict(doc).validate()  # the OpenAPI 3.1 meta-schema

    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    callback = doc["paths"]["/api/v1/runs/{run_id}/progress"]["post"]
    assert callback["security"] == [{"runToken": []}]
    assert doc["components"]["securitySchemes"]["runToken"]["name"] == "X-CloudTask-Token"
    listing = doc["paths"]["/api/v1/tasks"]["get"]
    params = {p["name"]: p["schema"] for p in listing["parameters"]}
    assert params["per_page"]["maximum"] == 500 and "sleeping" not in params["state"]["enum"]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert "401" in operation["responses"], (method, path)
            if operation.get("x-required-role") == "operator":
                assert "403" in operation["responses"], (method, path)
            if "{" in path:
                assert "404" in operation["responses"] or "401" in operation["responses"]
    errors = doc["components"]["responses"]
    assert {"Invalid", "Conflict", "TooLarge", "BadRequest"} <= set(errors)


def test_the_document_matches_what_the_routes_answer(op, app, store):
    """A few real answers checked against the document's schemas (schemathesis' checks)."""
    doc = op.get("/openapi.json").get_json()
    schema = schemathesis.openapi.from_dict(doc)
    task = op.post("/tasks", json=SPEC)
    run = op.post("/tasks/backup/run")
    answers = [
        ("POST", "/api/v1/tasks", task),
        ("GET", "/api/v1/tasks/{task}", op.get("/tasks/backup")),
        ("GET", "/api/v1/tasks", op.get("/tasks")),
        ("POST", "/api/v1/tasks/{task}/run", run),
        ("GET", "/api/v1/runs", op.get("/runs")),
        ("GET", "/api/v1/runs/{run_id}", op.get(f"/runs/{run.get_json()['id']}")),
        ("GET", "/api/v1/cluster", op.get("/cluster")),
        ("POST", "/api/v1/tasks", op.post("/tasks", json={"name": 5})),
    ]
    for method, path, answer in answers:
        params = {"task": "backup", "run_id": run.get_json()["id"]}
        wanted = {k: v for k, v in params.items() if "{" + k + "}" in path}
        case = schema[path][method].Case(path_parameters=wanted)
        case.validate_response(answer, checks=CONFORMANCE)
    assert json.loads(task.get_data())["name"] == "backup"

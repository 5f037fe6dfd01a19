"""The task pages (Flask test client on a real store; ZooKeeper where the owner agent shows):
list with filters and pages, detail with next fires and last runs, the form (create, errors
next to their fields, edit, stale edit), clone, pause, resume, run now, delete, the schedule
preview, the trend data, and roles, CSRF and unknown ids.

Longer than the other files on purpose: one page family, whose form tests share the posted
field helpers defined here; the form's translation itself is tested without Flask in
test_taskform.py."""

from __future__ import annotations

import html
import json
import re
from datetime import datetime, timedelta, timezone

import helpers
import pytest
from helpers import VIEWER, make_web_app, run_document, web_login

from cloudtask.clock import to_bson_time
from cloudtask.zkpaths import ZkPaths, encode
from web.taskform import field_of

NOW = datetime.now(timezone.utc)


@pytest.fixture
def app(store):
    return make_web_app(store)


@pytest.fixture
def csrf_page():
    return "/tasks"


def make_task(store, name="backup", **spec):
    return helpers.make_task(store, name, **spec)


def add_runs(store, task, count, start=None, status=lambda i: "succeeded"):
    """``count`` finished runs of ``task``, an hour apart, oldest first; returns the docs."""
    start = start or NOW - timedelta(hours=count)
    docs = []
    for i in range(count):
        when = start + timedelta(hours=i)
        doc = run_document(task, when)
        doc.update(
            status=status(i),
            started_at=to_bson_time(when),
            finished_at=to_bson_time(when + timedelta(seconds=1 + i)),
            duration=1.0 + i,
            exit_code=0,
        )
        docs.append(doc)
    store.runs.insert_many(docs)
    store.note_last_runs(docs)
    return docs


def field_block(page: str, name: str) -> str:
    """The form's ``<div class="field" data-field=NAME>`` block: its input and its errors."""
    match = re.search(
        rf'<div class="field[^"]*" data-field="{name}"[^>]*>(.*?)(?=data-field=|</fieldset>|</form>)',
        page,
        re.DOTALL,
    )
    assert match, f"no field {name} in the page"
    return match.group(1)


def listed(page: str) -> list[str]:
    table = page.split('id="task-table"', 1)[1] if 'id="task-table"' in page else ""
    return re.findall(r'<td><a href="/tasks/[^"/]+">([^<]+)</a>', table)


def form_data(token: str, **changes) -> dict:
    data = {
        "csrf_token": token,
        "editor": "fields",
        "name": "nightly",
        "group": "reports",
        "description": "the nightly report",
        "owner": "team-data",
        "enabled": "on",
        "schedule_kind": "cron",
        "cron": "0 3 * * *",
        "timezone": "Europe/Berlin",
        "run_kind": "command",
        "command": "./report.sh --full",
        "timeout": "10m",
        "retries": "2",
        "retry_delay": "30s",
        "concurrency": "forbid",
        "misfire": "run_once",
        "misfire_grace": "1h",
        "mode": "one",
        "env": "REPORT_DIR=/srv/reports\nLEVEL=full",
        "notify_emails": "ops@example.com, data@example.com",
        "notify_on": ["failure", "timeout"],
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(
    "path, field",
    [
        ("schedule.cron", "cron"),
        ("schedule", "schedule_kind"),
        ("schedule.between[1]", "between"),
        ("command[0]", "command"),
        ("http", "url"),
        ("http.urls[1]", "url"),
        ("http.headers.X-Api.Key", "headers"),
        ("env.PATH", "env"),
        ("notify.emails[2]", "notify_emails"),
        ("notify.on[0]", "notify_on"),
        ("timeout", "timeout"),
        ("version", None),
        ("", None),
    ],
)
def test_each_problem_path_has_its_field(path, field):
    assert field_of(path) == field


# --- list -------------------------------------------------------------------------------------


def test_list_filters_and_pages(client, store, operator):
    tasks = []
    for i in range(120):
        tasks.append(
            make_task(
                store,
                f"task-{i:03d}",
                group=f"g{i % 3}",
                owner="team-a" if i % 2 else "team-b",
                enabled=i % 10 != 0,
                schedule={"cron": "0 3 * * *", "timezone": "Europe/Berlin"}
                if i % 4 == 0
                else {"every": "10s"},
            )
        )
    add_runs(store, tasks[5], 1, status=lambda i: "failed")
    add_runs(store, tasks[6], 1)
    done = store.tasks.find_one({"_id": tasks[7]["_id"]})
    done["done_at"] = to_bson_time(NOW)
    store.tasks.replace_one({"_id": done["_id"]}, done)

    first = client.get("/tasks")
    page = first.get_data(as_text=True)
    assert first.status_code == 200
    assert listed(page) == [f"task-{i:03d}" for i in range(50)]
    assert "120 tasks, page 1 of 3" in page
    assert "cron 0 3 * * * Europe/Berlin" in page and "every 10s" in page
    assert 'href="/tasks/new"' in page  # an operator may create
    assert re.search(r'<option value="g2"\s*>g2</option>', page)  # the groups to filter by
    assert '<option value="team-a">' in page  # owners suggested
    assert "?page=2" in page
    third = client.get("/tasks?page=3").get_data(as_text=True)
    assert listed(third) == [f"task-{i:03d}" for i in range(100, 120)]

    def names(query):
        answer = client.get(f"/tasks?{query}&per_page=500")
        assert answer.status_code == 200, query
        return listed(answer.get_data(as_text=True))

    assert names("q=TASK-01") == [f"task-{i:03d}" for i in range(10, 20)]
    assert names("group=g1") == [f"task-{i:03d}" for i in range(120) if i % 3 == 1]
    assert names("state=paused") == [f"task-{i:03d}" for i in range(0, 120, 10)]
    assert names("state=done") == ["task-007"]
    assert "task-007" not in names("state=enabled") and "task-001" in names("state=enabled")
    assert names("owner=team-a") == [f"task-{i:03d}" for i in range(1, 120, 2)]
    assert names("last=failed") == ["task-005"]
    assert names("last=succeeded") == ["task-006"]
    assert len(names("last=never")) == 118
    assert names("group=g2&owner=team-b&q=task-0") == [
        f"task-{i:03d}" for i in range(100) if i % 3 == 2 and i % 2 == 0
    ]
    filtered = client.get("/tasks?group=g1").get_data(as_text=True)
    assert "40 tasks" in filtered and re.search(r'<option value="g1"\s*selected>', filtered)
    failed_row = client.get("/tasks?last=failed").get_data(as_text=True)
    assert 'class="badge bad"' in failed_row and "cluster not connected" in failed_row

    bad = client.get("/tasks?state=sleeping&page=x")
    text = bad.get_data(as_text=True)
    assert bad.status_code == 422
    assert "expected one of enabled, paused, done" in text and "expected a whole number" in text


def test_list_for_a_viewer_has_no_new_button(client, store, viewer):
    make_task(store, "only")
    page = client.get("/tasks").get_data(as_text=True)
    assert listed(page) == ["only"] and 'href="/tasks/new"' not in page


# --- detail -----------------------------------------------------------------------------------


def test_detail_shows_next_fires_in_the_zone_and_the_last_runs(client, store, operator):
    task = make_task(
        store, "berlin", schedule={"cron": "30 3 * * *", "timezone": "Europe/Berlin"}, owner="ops"
    )
    runs = add_runs(store, task, 25, status=lambda i: "failed" if i == 24 else "succeeded")
    answer = client.get(f"/tasks/{task['_id']}")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    fires = page.split('id="next-fires"', 1)[1].split("</section>", 1)[0]
    assert 'class="zone">Europe/Berlin<' in fires
    local = re.findall(r"\d{4}-\d\d-\d\d 03:30:00 (CES?T)", fires)
    assert len(local) == 10
    utc = re.findall(r"\d{4}-\d\d-\d\d (0[12]):30:00 UTC", fires)
    assert len(utc) == 10
    last = page.split('id="last-runs"', 1)[1]
    shown = re.findall(r'href="/runs/([0-9a-f]+)"', last)
    assert shown == [r["_id"] for r in reversed(runs[-20:])]  # the newest 20, newest first
    assert runs[0]["_id"] not in page
    assert "cluster not connected" in page
    assert '"timezone": "Europe/Berlin"' in html.unescape(page)  # the definition
    assert 'id="trend"' in page and f"/tasks/{task['_id']}/trend.json" in page
    for action in ("pause", "run", "edit", "clone", "delete"):
        assert f"/tasks/{task['_id']}/{action}" in page


def test_detail_of_keepalive_done_and_paused_tasks(client, store, viewer):
    service = make_task(store, "service", schedule={"keepalive": True})
    page = client.get(f"/tasks/{service['_id']}").get_data(as_text=True)
    assert "keepalive task has no fire times" in page and f"/{service['_id']}/run" not in page
    once = make_task(store, "once", schedule={"at": (NOW + timedelta(days=1)).isoformat()})
    doc = store.tasks.find_one({"_id": once["_id"]})
    doc["done_at"] = to_bson_time(NOW)
    store.tasks.replace_one({"_id": doc["_id"]}, doc)
    page = client.get(f"/tasks/{once['_id']}").get_data(as_text=True)
    assert "one-shot task is done" in page and "state-done" in page
    paused = make_task(store, "paused", enabled=False, schedule={"every": "10m"})
    page = client.get(f"/tasks/{paused['_id']}").get_data(as_text=True)
    assert "once resumed" in page and "No runs yet" in page
    assert f"/{paused['_id']}/resume" not in page  # a viewer sees no actions


def test_detail_names_the_owner_agent_or_why_there_is_none(store, zk):
    app = make_web_app(store, zk, users=[VIEWER])
    owned = make_task(store, "owned", group="g1")
    stranded = make_task(store, "stranded", group="g2")
    paths = ZkPaths(app.config["CLOUDTASK"].zookeeper.root)
    zk.create(paths.agent("g1", "agent-7"), encode({"host": "h1", "pid": 1}), makepath=True)
    zk.create(paths.assignment("agent-7", owned["_id"]), b"{}", makepath=True)
    zk.create(
        paths.status, encode({"leader": "c1", "unassigned": {stranded["_id"]: "g2"}}), makepath=True
    )
    client = app.test_client()
    web_login(client, "viewer1", "viewer passphrase", "/tasks")  # the first page reads the cluster
    assert "agent-7" in client.get(f"/tasks/{owned['_id']}").get_data(as_text=True)
    page = client.get(f"/tasks/{stranded['_id']}").get_data(as_text=True)
    assert "unassigned: no live agent in group g2" in page
    listing = client.get("/tasks").get_data(as_text=True)
    assert '<td class="mono nowrap">agent-7</td>' in listing


# --- the form ---------------------------------------------------------------------------------


def test_create_from_the_fields(client, store, operator):
    form = client.get("/tasks/new")
    assert form.status_code == 200 and 'name="csrf_token"' in form.get_data(as_text=True)
    answer = client.post("/tasks/new", data=form_data(operator))
    assert answer.status_code == 302
    doc = store.get_task_by_name("nightly")
    assert answer.headers["Location"].endswith(f"/tasks/{doc['_id']}")
    spec = doc["spec"]
    assert spec["schedule"] == {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}
    assert spec["command"] == "./report.sh --full" and spec["shell"] is False
    assert (spec["timeout"], spec["retries"], spec["retry_delay"]) == ("10m", 2, "30s")
    assert spec["env"] == {"REPORT_DIR": "/srv/reports", "LEVEL": "full"}
    assert spec["notify"] == {
        "emails": ["ops@example.com", "data@example.com"],
        "on": ["failure", "timeout"],
    }
    assert (doc["group"], spec["owner"], doc["enabled"]) == ("reports", "team-data", True)
    assert store.audit.find_one({"action": "task.create", "actor": "op1"})
    assert "Task nightly created" in client.get(answer.headers["Location"]).get_data(as_text=True)


def test_create_an_http_task_paused_with_a_window(client, store, operator):
    data = form_data(
        operator,
        name="ping",
        enabled=None,
        schedule_kind="every",
        every="90",
        cron="",
        start="2026-01-01T00:00",
        between_start="08:00",
        between_end="18:00",
        run_kind="http",
        command="ignored because http is chosen",
        url="https://svc.example/ping",
        method="POST",
        headers="X-Token: abc",
        body='{"a": 1}',
        expect_status="200, 204",
        callback="on",
    )
    assert client.post("/tasks/new", data=data).status_code == 302
    doc = store.get_task_by_name("ping")
    assert doc["enabled"] is False
    spec = doc["spec"]
    schedule = spec["schedule"]
    assert schedule["every"] == "1m30s" and schedule["between"] == ["08:00", "18:00"]
    assert schedule["start"] == "2025-12-31T23:00:00Z"  # read in Europe/Berlin (no offset)
    assert spec["command"] is None
    assert spec["http"]["urls"] == ["https://svc.example/ping"]
    assert spec["http"]["method"] == "POST" and spec["http"]["headers"] == {"X-Token": "abc"}
    assert spec["http"]["expect_status"] == [200, 204] and spec["http"]["callback"] is True


def test_a_file_version_not_stored_is_shown_at_its_field(client, store, operator):
    stored = store.put_file("report.sh", b"echo report\n", "op1")
    data = form_data(operator, command="./report.sh", file="report.sh", file_version="a" * 64)
    answer = client.post("/tasks/new", data=data)
    assert answer.status_code == 422
    version = field_block(answer.get_data(as_text=True), "file_version")
    assert "has no version aaaaaaaaaaaa" in version and stored["sha256"][:12] in version
    assert store.tasks.count_documents({}) == 0
    data["file_version"] = stored["sha256"]
    assert client.post("/tasks/new", data=data).status_code == 302
    assert store.get_task_by_name("nightly")["spec"]["file_version"] == stored["sha256"]


def test_create_errors_are_shown_next_to_their_fields_and_the_input_kept(client, store, operator):
    data = form_data(
        operator, cron="61 * * * *", timeout="soon", command="", env="GOOD=1\nno equals sign"
    )
    answer = client.post("/tasks/new", data=data)
    page = answer.get_data(as_text=True)
    assert answer.status_code == 422
    cron = field_block(page, "cron")
    assert 'value="61 * * * *"' in cron and 'class="field-error"' in cron
    timeout = field_block(page, "timeout")
    assert 'value="soon"' in timeout and "&#39;soon&#39; is not a duration" in timeout
    command = field_block(page, "command")
    assert "required: give a command" in command
    env = field_block(page, "env")
    assert "line 2: expected KEY=VALUE" in env and "GOOD=1\nno equals sign" in env
    for untouched in ("name", "group", "retries"):
        assert "field-error" not in field_block(page, untouched)
    assert 'value="nightly"' in field_block(page, "name")
    assert 'value="Europe/Berlin"' in field_block(page, "timezone")
    assert store.tasks.count_documents({}) == 0

    notify = form_data(operator, notify_emails="ops@example.com, nobody", notify_on=[])
    page = client.post("/tasks/new", data=notify).get_data(as_text=True)
    assert "&#39;nobody&#39; is not an email address" in field_block(page, "notify_emails")
    assert "field-error" not in field_block(page, "notify_on")
    window = form_data(operator, between_start="25:00", between_end="06:00", end="soon")
    page = client.post("/tasks/new", data=window).get_data(as_text=True)
    assert "expected a time &#39;HH:MM&#39;" in field_block(page, "between")
    assert "is not an ISO-8601 time" in field_block(page, "end")

    http = form_data(operator, run_kind="http", url="ftp://nowhere", expect_status="abc")
    page = client.post("/tasks/new", data=http).get_data(as_text=True)
    assert "is not an http:// or https:// URL" in field_block(page, "url")
    assert "expected an HTTP status" in field_block(page, "expect_status")
    bad_zone = form_data(operator, timezone="Mars/Olympus", name="bad name!")
    page = client.post("/tasks/new", data=bad_zone).get_data(as_text=True)
    assert "unknown timezone" in field_block(page, "timezone")
    assert "is not a valid name" in field_block(page, "name")
    assert store.tasks.count_documents({}) == 0


def test_create_with_a_name_taken(client, store, operator):
    make_task(store, "nightly")
    answer = client.post("/tasks/new", data=form_data(operator))
    assert answer.status_code == 409
    assert "already exists" in field_block(answer.get_data(as_text=True), "name")


def test_create_and_fail_as_json(client, store, operator):
    spec = {
        "name": "two-schedules",
        "schedule": [{"cron": "0 3 * * *"}, {"every": "6h"}],
        "command": ["python", "job.py"],
    }
    data = {"csrf_token": operator, "editor": "json", "spec_json": json.dumps(spec)}
    assert client.post("/tasks/new", data=data).status_code == 302
    doc = store.get_task_by_name("two-schedules")
    assert len(doc["spec"]["schedule"]) == 2
    # such a task opens in the JSON editor (the fields cannot show two schedules)
    edit = client.get(f"/tasks/{doc['_id']}/edit").get_data(as_text=True)
    assert re.search(r'value="json" checked', edit)

    broken = client.post("/tasks/new", data={**data, "spec_json": '{"name": "x",'})
    assert broken.status_code == 422
    assert "not valid" in field_block(broken.get_data(as_text=True), "spec_json")
    invalid = {**data, "spec_json": json.dumps({"name": "y", "schedule": {"cron": "x"}})}
    page = client.post("/tasks/new", data=invalid).get_data(as_text=True)
    block = field_block(page, "spec_json")
    assert "schedule.cron:" in block and "command: required" in block
    assert '"cron": "x"' in html.unescape(block)  # the typed JSON is kept


def test_edit_and_a_stale_edit(client, store, operator):
    task = make_task(
        store,
        "edit-me",
        schedule={"cron": "*/5 * * * *", "timezone": "Asia/Tokyo"},
        env={"A": "1"},
        timeout="2m",
    )
    form = client.get(f"/tasks/{task['_id']}/edit").get_data(as_text=True)
    assert 'value="*/5 * * * *"' in field_block(form, "cron")
    assert 'value="Asia/Tokyo"' in field_block(form, "timezone")
    assert 'value="2m"' in field_block(form, "timeout")
    assert 'name="revision" value="1"' in form
    data = form_data(
        operator, name="edit-me", cron="0 * * * *", timezone="Asia/Tokyo", revision="1"
    )
    answer = client.post(f"/tasks/{task['_id']}/edit", data=data)
    assert answer.status_code == 302
    doc = store.get_task(task["_id"])
    assert doc["revision"] == 2 and doc["spec"]["schedule"]["cron"] == "0 * * * *"
    assert doc["spec"]["timeout"] == "10m"

    stale = form_data(operator, name="edit-me", cron="15 * * * *", revision="1")
    answer = client.post(f"/tasks/{task['_id']}/edit", data=stale)
    page = answer.get_data(as_text=True)
    assert answer.status_code == 409
    assert "changed meanwhile" in page and 'value="15 * * * *"' in field_block(page, "cron")
    assert store.get_task(task["_id"])["spec"]["schedule"]["cron"] == "0 * * * *"

    bad = form_data(operator, name="edit-me", retries="many", revision="2")
    page = client.post(f"/tasks/{task['_id']}/edit", data=bad).get_data(as_text=True)
    assert "expected a whole number from 0 to 100" in field_block(page, "retries")
    assert store.get_task(task["_id"])["revision"] == 2


def test_clone(client, store, operator):
    task = make_task(store, "original", owner="ops")
    page = client.get(f"/tasks/{task['_id']}/clone").get_data(as_text=True)
    assert 'value="original-copy"' in page
    answer = client.post(
        f"/tasks/{task['_id']}/clone", data={"csrf_token": operator, "name": "the-copy"}
    )
    assert answer.status_code == 302
    copy = store.get_task_by_name("the-copy")
    assert copy["enabled"] is False and copy["spec"]["owner"] == "ops"
    assert answer.headers["Location"].endswith(f"/tasks/{copy['_id']}")
    taken = client.post(
        f"/tasks/{task['_id']}/clone", data={"csrf_token": operator, "name": "the-copy"}
    )
    assert taken.status_code == 409 and "already exists" in taken.get_data(as_text=True)
    bad = client.post(f"/tasks/{task['_id']}/clone", data={"csrf_token": operator, "name": "a b"})
    assert bad.status_code == 422
    assert "is not a valid name" in field_block(bad.get_data(as_text=True), "name")


def test_pause_and_resume(client, store, operator):
    task = make_task(store, "toggle")
    answer = client.post(f"/tasks/{task['_id']}/pause", data={"csrf_token": operator})
    assert answer.status_code == 302 and store.get_task(task["_id"])["enabled"] is False
    page = client.get(answer.headers["Location"]).get_data(as_text=True)
    assert "paused" in page and f"/tasks/{task['_id']}/resume" in page
    client.post(f"/tasks/{task['_id']}/resume", data={"csrf_token": operator})
    assert store.get_task(task["_id"])["enabled"] is True
    assert [a["action"] for a in store.audit.find({}, sort=[("at", 1)])][-2:] == [
        "task.pause",
        "task.resume",
    ]


def test_run_now_stores_a_queued_manual_run(client, store, operator):
    task = make_task(store, "manual")
    answer = client.post(f"/tasks/{task['_id']}/run", data={"csrf_token": operator})
    assert answer.status_code == 302
    runs = list(store.runs.find({"task_id": task["_id"]}))
    assert len(runs) == 1
    run = runs[0]
    assert (run["status"], run["trigger"], run["agent"]) == ("queued", "manual", None)
    assert run["requested_by"] == "op1"
    assert answer.headers["Location"].endswith(f"/runs/{run['_id']}")

    service = make_task(store, "service", schedule={"keepalive": True})
    refused = client.post(f"/tasks/{service['_id']}/run", data={"csrf_token": operator})
    assert refused.headers["Location"].endswith(f"/tasks/{service['_id']}")
    assert "keepalive service" in client.get(refused.headers["Location"]).get_data(as_text=True)
    assert store.runs.count_documents({"task_id": service["_id"]}) == 0


def test_delete_with_and_without_killing_runs(client, store, operator):
    keep = make_task(store, "delete-me")
    page = client.get(f"/tasks/{keep['_id']}/delete").get_data(as_text=True)
    assert 'name="kill_running"' in page and 'name="csrf_token"' in page
    answer = client.post(f"/tasks/{keep['_id']}/delete", data={"csrf_token": operator})
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/tasks")
    assert store.tasks.count_documents({"_id": keep["_id"]}) == 0

    task = make_task(store, "delete-and-kill")
    run = store.request_manual_run(task, requested_by="op1")
    page = client.get(f"/tasks/{task['_id']}/delete").get_data(as_text=True)
    assert "1 run of it is queued or running now" in page
    answer = client.post(
        f"/tasks/{task['_id']}/delete", data={"csrf_token": operator, "kill_running": "on"}
    )
    assert answer.status_code == 302
    assert store.tasks.count_documents({"_id": task["_id"]}) == 0
    assert store.get_run(run["_id"])["status"] == "killed"
    assert "1 of its 1 running runs asked to stop" in client.get("/tasks").get_data(as_text=True)


# --- preview and trend ------------------------------------------------------------------------


def test_preview_of_good_and_bad_schedules(client, viewer):
    good = client.get("/tasks/preview?cron=0+3+*+*+*&timezone=America/New_York")
    body = good.get_json()
    assert good.status_code == 200 and body["timezone"] == "America/New_York"
    assert len(body["fires"]) == 5
    assert all(re.search(r" 03:00:00 E[SD]T", f["local"]) for f in body["fires"])
    every = client.get("/tasks/preview?every=15m&n=3").get_json()
    times = [datetime.fromisoformat(f["utc"]) for f in every["fires"]]
    assert [b - a for a, b in zip(times, times[1:])] == [timedelta(minutes=15)] * 2
    window = client.get(
        "/tasks/preview?every=1h&timezone=UTC&between_start=09:00&between_end=11:00&n=4"
    ).get_json()
    hours = [datetime.fromisoformat(f["utc"]).hour for f in window["fires"]]
    # within the window only, alternating (it starts at 10 when asked between 09:00 and 10:00)
    assert len(hours) == 4 and set(hours) == {9, 10}
    assert all(a != b for a, b in zip(hours, hours[1:]))

    for query, path in [
        ("cron=61+*+*+*+*", "schedule.cron"),
        ("cron=0+0+30+2+*", "schedule.cron"),  # never fires
        ("cron=0+3+*+*+*&timezone=Nowhere/City", "schedule.timezone"),
        ("every=0s", "schedule.every"),
        ("every=soon", "schedule.every"),
        ("cron=H+*+*+*+*", "schedule.cron"),
        ("schedule=%7Bnope", "schedule"),
        ("cron=*+*+*+*+*&start=yesterday", "schedule.start"),
        ("cron=*+*+*+*+*&n=0", "n"),
    ]:
        answer = client.get(f"/tasks/preview?{query}")
        assert answer.status_code == 422, query
        assert answer.get_json()["details"][0]["path"] == path, query
    nothing = client.get("/tasks/preview")
    assert nothing.status_code == 200 and nothing.get_json()["fires"] == []
    for odd in [
        "%00",
        "*/0+*+*+*+*",
        "1-100000+*+*+*+*",
        "%E2%9C%93+*+*+*+*",
        "0+0+31+4+*",
        "a" * 500,
    ]:
        answer = client.get(f"/tasks/preview?cron={odd}")
        assert answer.status_code in (200, 422), odd
        assert answer.is_json, odd


def test_trend_points(client, store, viewer):
    task = make_task(store, "trend")
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    statuses = ["succeeded", "failed", "timed_out", "missed"]
    runs = add_runs(store, task, 8, start=start, status=lambda i: statuses[i % 4])
    body = client.get(f"/tasks/{task['_id']}/trend.json").get_json()
    points = body["points"]
    assert [p["id"] for p in points] == [r["_id"] for r in runs]  # oldest first
    assert points[0] == {
        "t": int(start.timestamp() * 1000),
        "d": 1.0,
        "s": "succeeded",
        "id": runs[0]["_id"],
    }
    assert [p["s"] for p in points[:4]] == statuses
    since = client.get(f"/tasks/{task['_id']}/trend.json?since=2026-01-01T05:00:00Z").get_json()
    assert [p["id"] for p in since["points"]] == [r["_id"] for r in runs[5:]]
    span = client.get(
        f"/tasks/{task['_id']}/trend.json?since=2026-01-01T02:00:00Z&until=2026-01-01T04:00:00"
    ).get_json()
    assert [p["id"] for p in span["points"]] == [r["_id"] for r in runs[2:4]]
    newest = client.get(f"/tasks/{task['_id']}/trend.json?limit=3").get_json()
    assert [p["id"] for p in newest["points"]] == [r["_id"] for r in runs[-3:]]
    queued = store.request_manual_run(task, requested_by="op1")
    points = client.get(f"/tasks/{task['_id']}/trend.json").get_json()["points"]
    assert points[-1]["id"] == queued["_id"] and points[-1]["d"] is None

    bad = client.get(f"/tasks/{task['_id']}/trend.json?since=last+tuesday")
    assert bad.status_code == 422 and bad.get_json()["details"][0]["path"] == "since"
    assert client.get(f"/tasks/{task['_id']}/trend.json?limit=0").status_code == 422
    missing = client.get("/tasks/nope/trend.json")
    assert missing.status_code == 404 and "nope" in missing.get_json()["error"]
    empty = make_task(store, "empty")
    assert client.get(f"/tasks/{empty['_id']}/trend.json").get_json()["points"] == []


# --- roles, CSRF, unknown ids -----------------------------------------------------------------


def test_viewers_cannot_change_anything(client, store, viewer):
    task = make_task(store, "guarded")
    base = f"/tasks/{task['_id']}"
    for path in ("/tasks/new", f"{base}/edit", f"{base}/clone", f"{base}/delete"):
        page = client.get(path)  # a viewer may look, read-only
        assert page.status_code == 200, path
        text = page.get_data(as_text=True)
        assert "Read only" in text and re.search(r'<button type="submit"[^>]* disabled>', text)
    posts = {
        "/tasks/new": form_data(viewer, name="sneaky"),
        f"{base}/edit": form_data(viewer, name="guarded", revision="1"),
        f"{base}/clone": {"name": "sneaky-copy"},
        f"{base}/pause": {},
        f"{base}/resume": {},
        f"{base}/run": {},
        f"{base}/delete": {"kill_running": "on"},
    }
    for path, data in posts.items():
        answer = client.post(path, data={**data, "csrf_token": viewer})
        assert answer.status_code == 403, path
    after = store.get_task(task["_id"])
    assert after["revision"] == 1 and after["enabled"] is True
    assert store.tasks.count_documents({}) == 1 and store.runs.count_documents({}) == 0


def test_posts_without_the_csrf_token_are_refused(client, store, operator):
    task = make_task(store, "csrf")
    base = f"/tasks/{task['_id']}"
    for path in (
        "/tasks/new",
        f"{base}/edit",
        f"{base}/clone",
        f"{base}/pause",
        f"{base}/run",
        f"{base}/delete",
    ):
        answer = client.post(path, data={**form_data("wrong-token"), "name": "x"})
        assert answer.status_code == 400, path
        assert "security token" in answer.get_data(as_text=True)
    assert store.tasks.count_documents({}) == 1 and store.runs.count_documents({}) == 0
    assert store.get_task(task["_id"])["enabled"] is True


def test_an_unknown_task_is_a_404_page(client, operator):
    for path in ("/tasks/nope", "/tasks/nope/edit", "/tasks/nope/clone", "/tasks/nope/delete"):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert "no task with id" in answer.get_data(as_text=True) and "<html" in answer.get_data(
            as_text=True
        )
    for action in ("pause", "resume", "run", "delete", "edit", "clone"):
        answer = client.post(f"/tasks/nope/{action}", data=form_data(operator))
        assert answer.status_code == 404, action

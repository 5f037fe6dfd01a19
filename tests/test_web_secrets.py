"""Stored secrets on the site and the API (Flask test client on the real nx-27017 store; the
real aiosmtpd SMTP server and the webhook receiver where secrets are used): the Secrets page
and /api/v1/secrets are write-only (no answer ever holds a value), viewers see names and the
tasks using them, operators set, replace and delete (refused while used), CSRF and roles
hold, a web process without a key ring says why it cannot store secrets; tasks refer to
secrets from the form (``secret:NAME``) and the API, a missing one is refused at its path
(also by ``cloudtask apply``), credential-named headers in clear get warnings; and a test
that follows one secret through being set, used and replaced finds its value in no answer,
page, audit entry, event, delivery or mail."""

from __future__ import annotations

import html
import json
import re
import threading
import time

import pytest
from aiosmtpd.smtp import AuthResult
from click.testing import CliRunner
from helpers import ADMIN, OPERATOR, VIEWER, SmtpServer, make_web_app, web_login
from notifying import T0, run_event

from cloudtask.cli import cli
from cloudtask.config import load_config
from cloudtask.localservers import free_port
from cloudtask.notify import Notifier
from cloudtask.secretbox import make_key_file
from cloudtask.users import Users

VALUE = "Sv-1f9c-first-VALUE-never-shown"
REPLACED = "Sv-77ab-second-VALUE-never-shown"
MAIL_PASSWORD = "Mp-33d0-smtp-VALUE-never-shown"
HOOK_KEY = "Hk-9e21-webhook-VALUE-never-shown"
URL_TOKEN = "Ut-5c4a-url-VALUE-never-shown"
ALL_VALUES = (VALUE, REPLACED, MAIL_PASSWORD, HOOK_KEY, URL_TOKEN)


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys"
    make_key_file(path)
    return path


def web_config(keys=None, **alerts):
    cfg = load_config(None, environ={})
    if keys is not None:
        cfg = cfg.with_section("secrets", keys=f"file:{keys}")
    if alerts:
        cfg = cfg.with_section("alerts", **alerts)
    return cfg


@pytest.fixture
def app(store, keys):
    app = make_web_app(store, config=web_config(keys), users=[ADMIN, OPERATOR, VIEWER])
    users = Users(store)
    app.tokens = {  # type: ignore[attr-defined]
        "operator": users.create_token(OPERATOR.name, "tests"),
        "viewer": users.create_token(VIEWER.name, "tests"),
    }
    return app


def logged_in(app, user):
    client = app.test_client()
    client.csrf = web_login(client, user.name, user.password, "/secrets")
    return client


def api(app, role):
    """(method, path, **kw) -> answer, with the role's Bearer token."""
    client = app.test_client()

    def call(method, path, **kw):
        headers = {"Authorization": f"Bearer {app.tokens[role]}", **kw.pop("headers", {})}
        return client.open("/api/v1" + path, method=method, headers=headers, **kw)

    return call


def set_secret(client, name, value, description=""):
    data = {"csrf_token": client.csrf, "name": name, "value": value, "description": description}
    return client.post("/secrets", data=data)


def flashes(page):
    return [html.unescape(m) for m in re.findall(r'<p class="flash [a-z]+"[^>]*>([^<]*)</p>', page)]


def task_spec(name="report", **more):
    return {"name": name, "schedule": {"every": "1h"}, "command": "env", **more}


# --- the page ---------------------------------------------------------------------------------


def test_operators_set_replace_and_delete_secrets_on_the_page_and_never_see_a_value(app, store):
    op = logged_in(app, OPERATOR)
    answer = set_secret(op, "db.password", VALUE, "the reports database")
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/secrets")
    page = op.get("/secrets").get_data(as_text=True)
    assert "Secret db.password stored (sealed under key k1). Its value is not shown again." in (
        flashes(page)
    )
    row = re.search(r'<tr data-secret="db.password">(.*?)</tr>', page, re.S).group(1)
    assert "the reports database" in row and "k1" in row and "by op1" in row
    assert re.search(r'<input id="f-value" type="password" name="value" value=""', page)
    assert VALUE not in page

    # the Replace link fills the name (and description) in; the value field stays empty
    page = op.get("/secrets?name=db.password").get_data(as_text=True)
    assert 'value="db.password"' in page and "Replace value" in page and VALUE not in page
    assert set_secret(op, "db.password", REPLACED, "the reports database").status_code == 302
    page = op.get("/secrets").get_data(as_text=True)
    assert "Secret db.password replaced (sealed under key k1)." in " ".join(flashes(page))
    assert store.get_secret_info("db.password")["revision"] == 2

    # refused input: shown at its field, 422, the value not echoed
    answer = set_secret(op, "9 lives", REPLACED)
    page = answer.get_data(as_text=True)
    assert answer.status_code == 422 and REPLACED not in page
    assert "beginning with a letter" in page and 'data-error="name"' in page
    answer = set_secret(op, "empty", "")
    assert answer.status_code == 422 and 'data-error="value"' in answer.get_data(as_text=True)

    # used by a task: deleting is refused, naming the task, with a link to it
    task = store.create_task(task_spec(env={"PGPASSWORD": {"secret": "db.password"}}))
    page = op.get("/secrets").get_data(as_text=True)
    assert f'href="/tasks/{task["_id"]}">report</a>' in page
    confirm = op.get("/secrets/db.password/delete").get_data(as_text=True)
    assert "Used by 1 task" in confirm and f"/tasks/{task['_id']}" in confirm
    answer = op.post("/secrets/db.password/delete", data={"csrf_token": op.csrf})
    assert answer.status_code == 409
    assert "Not deleted: secret 'db.password' is used by 1 task(s): report." in html.unescape(
        answer.get_data(as_text=True)
    )
    store.delete_task(task["_id"])
    answer = op.post("/secrets/db.password/delete", data={"csrf_token": op.csrf})
    assert answer.status_code == 302
    assert "Secret db.password deleted." in flashes(op.get("/secrets").get_data(as_text=True))
    answer = op.post("/secrets/db.password/delete", data={"csrf_token": op.csrf})
    assert answer.status_code == 404
    actions = [e["action"] for e in store.audit.find({"target": "secret:db.password"})]
    assert actions == ["secret.set", "secret.set", "secret.delete"]
    assert all(v not in json.dumps(list(store.audit.find({})), default=str) for v in ALL_VALUES)


def test_viewers_see_names_and_users_only_and_cannot_change_anything(app, store, keys):
    op = logged_in(app, OPERATOR)
    assert set_secret(op, "db.password", VALUE, "the reports database").status_code == 302
    task = store.create_task(task_spec(env={"PGPASSWORD": {"secret": "db.password"}}))
    viewer = logged_in(app, VIEWER)
    page = viewer.get("/secrets").get_data(as_text=True)
    assert "db.password" in page and f"/tasks/{task['_id']}" in page
    assert "the reports database" not in page and 'id="set-secret"' not in page
    assert "Read only" in page and "/secrets/db.password/delete" not in page
    for answer in (
        set_secret(viewer, "x", "y"),
        viewer.post("/secrets/db.password/delete", data={"csrf_token": viewer.csrf}),
        viewer.get("/secrets/db.password/delete"),
    ):
        assert answer.status_code == 403
    # a form without the session's CSRF token is refused, whoever posts it
    assert op.post("/secrets", data={"name": "x", "value": "y"}).status_code == 400
    assert op.post("/secrets/db.password/delete").status_code == 400
    assert store.get_secret_info("db.password")["revision"] == 1
    # the API: a viewer's list holds names and users, nothing else
    listed = api(app, "viewer")("GET", "/secrets").get_json()
    assert listed["items"] == [
        {"name": "db.password", "used_by": [{"id": task["_id"], "name": "report"}]}
    ]
    assert api(app, "viewer")("PUT", "/secrets/x", json={"value": "y"}).status_code == 403
    assert api(app, "viewer")("DELETE", "/secrets/db.password").status_code == 403


def test_without_a_key_ring_the_page_and_the_api_say_secrets_cannot_be_stored(store, tmp_path):
    app = make_web_app(store, config=web_config(), users=[OPERATOR])
    token = Users(store).create_token(OPERATOR.name, "t")
    op = logged_in(app, OPERATOR)
    page = op.get("/secrets").get_data(as_text=True)
    assert 'id="no-key-ring"' in page and 'id="set-secret"' not in page
    assert "this web process has no key ring: secrets.keys is not set" in page
    answer = set_secret(op, "db.password", VALUE)
    assert answer.status_code == 503 and "Secrets cannot be stored" in answer.get_data(as_text=True)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    listed = client.get("/api/v1/secrets", headers=auth).get_json()
    assert listed["can_store"] is False and "secrets.keys is not set" in listed["store_problem"]
    answer = client.put("/api/v1/secrets/db.password", json={"value": VALUE}, headers=auth)
    assert answer.status_code == 503
    assert answer.get_json()["error"].startswith("secrets cannot be stored: this web process")
    # bad input is still said first: the name is wrong whatever the key ring
    answer = client.put("/api/v1/secrets/9x", json={"value": VALUE}, headers=auth)
    assert answer.status_code == 422
    # a key ring that cannot be read: said so
    broken = make_web_app(
        store, config=web_config(tmp_path / "nothing-here"), users=[OPERATOR]
    ).test_client()
    answer = broken.get("/api/v1/secrets", headers=auth).get_json()
    assert "its key ring cannot be read: secrets.keys: cannot read" in answer["store_problem"]
    assert list(store.db["secrets"].find({})) == []


# --- the API ----------------------------------------------------------------------------------


def test_the_api_sets_replaces_lists_and_deletes_without_ever_answering_a_value(app, store):
    call = api(app, "operator")
    answer = call("PUT", "/secrets/api.token", json={"value": VALUE, "description": "partner"})
    assert answer.status_code == 201, answer.get_json()
    body = answer.get_json()
    assert body["name"] == "api.token" and body["description"] == "partner"
    assert body["key_id"] == "k1" and body["updated_by"] == "op1" and body["revision"] == 1
    answer = call("PUT", "/secrets/api.token", json={"value": REPLACED})
    assert answer.status_code == 200
    assert answer.get_json()["revision"] == 2 and answer.get_json()["description"] == "partner"
    for path in ("/secrets", "/secrets/api.token"):
        text = call("GET", path).get_data(as_text=True)
        assert "api.token" in text and VALUE not in text and REPLACED not in text
    assert call("GET", "/secrets/nope").status_code == 404

    for body, path in (
        ({"value": ""}, "value"),
        ({"value": 5}, "value"),
        ({"value": "a\u0000b"}, "value"),
        ({}, "value"),
        ({"value": "x", "description": 7}, "description"),
        ({"value": "x", "other": 1}, "other"),
    ):
        answer = call("PUT", "/secrets/ok", json=body)
        assert answer.status_code == 422, body
        assert [d["path"] for d in answer.get_json()["details"]] == [path], body
    answer = call("PUT", "/secrets/bad%20name", json={"value": "x"})
    assert [d["path"] for d in answer.get_json()["details"]] == ["name"]
    assert call("PUT", "/secrets/ok", data="[", content_type="application/json").status_code == 400

    store.create_task(task_spec(env={"TOKEN": {"secret": "api.token"}}))
    answer = call("DELETE", "/secrets/api.token")
    assert answer.status_code == 409 and "used by 1 task(s): report" in answer.get_json()["error"]
    store.delete_task(store.get_task_by_name("report")["_id"])
    assert call("DELETE", "/secrets/api.token").get_json() == {"deleted": "api.token"}
    assert call("DELETE", "/secrets/api.token").status_code == 404
    # every answer above: no value; every audit entry: no value
    assert all(v not in json.dumps(list(store.audit.find({})), default=str) for v in ALL_VALUES)


# --- tasks refer to secrets ---------------------------------------------------------------------


def test_tasks_refer_to_secrets_through_the_api_a_missing_one_is_refused_at_its_path(app, store):
    call = api(app, "operator")
    spec = task_spec(
        env={"PGPASSWORD": {"secret": "db.password"}, "PLAIN": "x"},
        command=None,
        http={
            "url": "https://api.example.com/jobs",
            "method": "POST",
            "headers": {"X-Api-Key": {"secret": "api.key"}, "Authorization": "Bearer in-clear"},
            "body": {"secret": "payload"},
        },
    )
    spec.pop("command")
    answer = call("POST", "/tasks", json=spec)
    assert answer.status_code == 422
    assert {(d["path"], d["message"].split(" (")[0]) for d in answer.get_json()["details"]} == {
        ("env.PGPASSWORD", "no secret named 'db.password'"),
        ("http.headers.X-Api-Key", "no secret named 'api.key'"),
        ("http.body", "no secret named 'payload'"),
    }
    for name in ("db.password", "api.key", "payload"):
        assert call("PUT", f"/secrets/{name}", json={"value": VALUE}).status_code == 201
    answer = call("POST", "/tasks", json=spec)
    assert answer.status_code == 201, answer.get_json()
    task = answer.get_json()
    assert task["spec"]["env"]["PGPASSWORD"] == {"secret": "db.password"}  # a reference, shown so
    assert task["spec"]["http"]["body"] == {"secret": "payload"}
    assert task["warnings"] == [
        {
            "path": "http.headers.Authorization",
            "message": "looks like a credential given in clear: every viewer of the task sees "
            'it; store it as a secret and give {"secret": "NAME"}',
        }
    ]
    assert "warnings" not in call("GET", f"/tasks/{task['id']}").get_json()  # changes only
    # a patch that keeps the header in clear warns again; one that uses a secret does not
    answer = call("PATCH", f"/tasks/{task['id']}", json={"description": "nightly"})
    assert [w["path"] for w in answer.get_json()["warnings"]] == ["http.headers.Authorization"]
    http = {**task["spec"]["http"], "headers": {"Authorization": {"secret": "api.key"}}}
    answer = call("PATCH", f"/tasks/{task['id']}", json={"http": http})
    assert answer.status_code == 200 and answer.get_json()["warnings"] == []
    assert store.get_secret_info("api.key")["used_by"][0]["name"] == "report"
    # a reference to a secret that went missing is not re-checked when it is not changed
    answer = call("PATCH", f"/tasks/{task['id']}", json={"env": {"A": {"secret": "gone"}}})
    assert [d["path"] for d in answer.get_json()["details"]] == ["env.A"]
    text = json.dumps([call("GET", f"/tasks/{task['id']}").get_json()])
    assert VALUE not in text


def test_cloudtask_apply_refuses_a_task_naming_a_missing_secret(
    app, store, tmp_path, mongo_server, mongo_db_name
):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "report.json").write_text(
        json.dumps(task_spec(env={"PGPASSWORD": {"secret": "db.password"}}))
    )
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    result = CliRunner().invoke(cli, ["apply", str(tmp_path / "tasks")], env=env)
    assert result.exit_code != 0
    assert "env.PGPASSWORD: no secret named 'db.password'" in result.output
    assert store.tasks.count_documents({}) == 0
    assert (
        api(app, "operator")("PUT", "/secrets/db.password", json={"value": VALUE}).status_code
        == 201
    )
    result = CliRunner().invoke(cli, ["apply", "--yes", str(tmp_path / "tasks")], env=env)
    assert result.exit_code == 0, result.output
    assert store.get_task_by_name("report")["secrets_used"] == ["db.password"]


def test_the_form_takes_secret_references_shows_them_back_and_warns_of_clear_credentials(
    app, store
):
    op = logged_in(app, OPERATOR)
    assert set_secret(op, "db.password", VALUE).status_code == 302
    assert set_secret(op, "api.key", VALUE).status_code == 302
    page = op.get("/tasks/new").get_data(as_text=True)
    assert "db.password" in page and "KEY=secret:NAME" in page
    form = {
        "csrf_token": op.csrf,
        "editor": "fields",
        "name": "report",
        "schedule_kind": "every",
        "every": "1h",
        "run_kind": "http",
        "url": "https://api.example.com/jobs",
        "method": "POST",
        "headers": "X-Api-Key: secret:api.key\nAuthorization: Bearer typed-in-clear",
        "body": "secret:db.password",
        "env": "PGPASSWORD=secret:db.password\nPLAIN=visible",
        "retries": "0",
        "concurrency": "forbid",
        "misfire": "run_once",
        "mode": "one",
    }
    answer = op.post("/tasks/new", data=form)
    assert answer.status_code == 302, answer.get_data(as_text=True)
    task = store.get_task_by_name("report")
    assert task["spec"]["env"] == {"PGPASSWORD": {"secret": "db.password"}, "PLAIN": "visible"}
    assert task["spec"]["http"]["headers"]["X-Api-Key"] == {"secret": "api.key"}
    assert task["spec"]["http"]["body"] == {"secret": "db.password"}
    detail = op.get(answer.headers["Location"]).get_data(as_text=True)
    (warning,) = [m for m in flashes(detail) if m.startswith("Warning")]
    assert warning.startswith("Warning: http.headers.Authorization: looks like a credential")
    assert 'id="task-secrets"' in detail and "api.key" in detail and VALUE not in detail
    edit = html.unescape(op.get(f"/tasks/{task['_id']}/edit").get_data(as_text=True))
    assert "PGPASSWORD=secret:db.password" in edit and "X-Api-Key: secret:api.key" in edit
    assert ">secret:db.password</textarea>" in edit and VALUE not in edit

    # a secret that is not stored: the field says so, 422, nothing saved
    answer = op.post("/tasks/new", data={**form, "name": "other", "env": "A=secret:missing"})
    page = html.unescape(answer.get_data(as_text=True))
    assert answer.status_code == 422 and "no secret named 'missing'" in page
    assert re.search(r'data-field="env".*?no secret named', page, re.S)
    # a plain value that begins with secret: cannot be told from a reference: JSON editor
    store.create_task(task_spec("literal", env={"X": "secret:not-a-reference"}))
    literal = store.get_task_by_name("literal")
    assert 'name="editor" value="json"' in op.get(f"/tasks/{literal['_id']}/edit").get_data(
        as_text=True
    )


# --- leftovers of the limits: deep JSON, long schedule lists, the password variable -------------


def test_deeply_nested_json_in_the_form_and_the_preview_is_a_clear_422(app):
    op = logged_in(app, OPERATOR)
    deep = "[" * 100_000
    answer = op.post(
        "/tasks/new", data={"csrf_token": op.csrf, "editor": "json", "spec_json": deep}
    )
    page = html.unescape(answer.get_data(as_text=True))
    assert answer.status_code == 422
    assert "the JSON is not valid: nested more than 32 levels deep (line 1, column 33)" in page
    answer = op.get("/tasks/preview", query_string={"schedule": deep})
    assert answer.status_code == 422
    (detail,) = answer.get_json()["details"]
    assert detail["path"] == "schedule" and "nested more than 32 levels deep" in detail["message"]
    schedules = json.dumps([{"every": "1h"}] * 10_000)
    started = time.monotonic()
    answer = op.get("/tasks/preview", query_string={"schedule": schedules})
    assert time.monotonic() - started < 2
    assert answer.status_code == 422
    assert answer.get_json()["details"] == [
        {"path": "schedule", "message": "10,000 schedules; at most 100 are taken per task"}
    ]
    ok = op.get("/tasks/preview", query_string={"schedule": json.dumps([{"every": "1h"}] * 3)})
    assert ok.status_code == 200 and len(ok.get_json()["fires"]) == 5


def test_the_settings_page_refuses_a_password_variable_without_the_prefix(app, store):
    admin = logged_in(app, ADMIN)
    page = admin.get("/settings").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    answer = admin.post(
        "/settings",
        data={"csrf_token": token, "smtp_password_env": "CLOUDTASK_MONGO_URI", "smtp_port": "587"},
    )
    text = html.unescape(answer.get_data(as_text=True))
    assert answer.status_code == 422
    assert re.search(
        r'data-error="smtp_password_env">may only name an environment variable starting with '
        r"CLOUDTASK_SMTP_",
        text,
    )
    assert "smtp_password_env" not in (store.read_settings_doc("alerts") or {})


# --- one secret followed everywhere -------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_secret_set_used_and_replaced_is_in_no_answer_page_entry_event_or_mail(
    store, keys, receiver
):
    """Every answer the site gives (pages, API, redirects) while secrets are set, used by tasks
    and the notifier, and replaced; every audit entry, event, delivery and mail: no value."""
    tried: list[bytes] = []

    def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
        tried.append(auth_data.password)
        return AuthResult(success=auth_data.password == MAIL_PASSWORD.encode(), handled=False)

    smtp = SmtpServer(
        free_port(), authenticator=authenticator, auth_required=True, auth_require_tls=False
    ).start()
    cfg = web_config(
        keys,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_security="none",
        smtp_user="alerts",
        smtp_timeout=5.0,
        mail_from="CloudTask <alerts@example.com>",
        operators=("ops@example.com",),
    )
    app = make_web_app(store, config=cfg, users=[ADMIN, OPERATOR, VIEWER], TEST_MAIL_WAIT=20.0)
    answers: list[str] = []

    @app.after_request
    def record(answer):  # every answer the site gives, whatever the route
        answers.append(answer.get_data(as_text=True) + json.dumps(dict(answer.headers)))
        return answer

    token = Users(store).create_token(OPERATOR.name, "t")
    bearer = {"Authorization": f"Bearer {token}"}
    op, admin, viewer = (logged_in(app, u) for u in (OPERATOR, ADMIN, VIEWER))
    stop = threading.Event()

    def center():  # the leading center's notifier, with the key ring of its own config
        notifier = Notifier(store, cfg)
        while not stop.is_set():
            notifier.run_once()
            stop.wait(0.2)

    thread = threading.Thread(target=center, daemon=True)
    thread.start()
    try:
        # set: by the page and by the API
        assert set_secret(op, "db.password", VALUE, "reports").status_code == 302
        api_client = app.test_client()
        for name, value in (
            ("mail.password", MAIL_PASSWORD),
            ("hook.key", HOOK_KEY),
            ("slack.url", f"{receiver.url}?token={URL_TOKEN}"),
        ):
            answer = api_client.put(
                f"/api/v1/secrets/{name}", json={"value": value}, headers=bearer
            )
            assert answer.status_code == 201
        # used: by tasks (form and API) and by the alert settings
        spec = task_spec(env={"PGPASSWORD": {"secret": "db.password"}})
        created = api_client.post("/api/v1/tasks", json=spec, headers=bearer).get_json()
        form = {
            "csrf_token": op.csrf,
            "editor": "fields",
            "name": "from-form",
            "schedule_kind": "every",
            "every": "1h",
            "run_kind": "command",
            "command": "env",
            "env": "PGPASSWORD=secret:db.password",
            "retries": "0",
            "concurrency": "forbid",
            "misfire": "run_once",
            "mode": "one",
        }
        assert op.post("/tasks/new", data=form).status_code == 302
        page = admin.get("/settings").get_data(as_text=True)
        settings_token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        data = {
            "csrf_token": settings_token,
            "smtp_host": "127.0.0.1",
            "smtp_port": str(smtp.port),
            "smtp_security": "none",
            "smtp_user": "alerts",
            "smtp_password_secret": "mail.password",
            "smtp_timeout": "5s",
            "mail_from": "CloudTask <alerts@example.com>",
            "operators": "ops@example.com",
            "alert_interval": "15m",
            "webhooks": "secret:slack.url secret:hook.key",
            "webhook_timeout": "5s",
        }
        answer = admin.post("/settings", data=data)
        assert answer.status_code == 302, answer.get_data(as_text=True)
        page = admin.get("/settings").get_data(as_text=True)
        assert "secret:slack.url secret:hook.key" in page
        assert re.search(r'<option value="mail.password"\s+selected>', page)
        # the test mail: sent by the center, which opens the password
        answer = admin.post(
            "/settings/test-mail",
            data={"csrf_token": settings_token, "to": "me@example.com"},
            follow_redirects=True,
        )
        (sent,) = [m for m in flashes(answer.get_data(as_text=True)) if "mail" in m]
        assert sent.startswith("Test mail sent to me@example.com by the leading center"), sent
        assert tried == [MAIL_PASSWORD.encode()]
        # a failure: mailed and posted to the webhook whose URL is a secret
        task = store.get_task(created["id"])
        run_event(store, task, T0, output="exit 2")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            len(smtp.inbox.messages()) < 2 or not receiver.requests
        ):
            time.sleep(0.1)
        assert len(smtp.inbox.messages()) == 2 and len(receiver.requests) == 1
        # replaced: by the page and by the API
        assert set_secret(op, "db.password", REPLACED, "reports").status_code == 302
        answer = api_client.put(
            "/api/v1/secrets/hook.key", json={"value": REPLACED}, headers=bearer
        )
        assert answer.status_code == 200
        # every page and API answer anyone reads afterwards
        for client in (op, admin, viewer):
            for path in (
                "/",
                "/tasks",
                f"/tasks/{created['id']}",
                f"/tasks/{created['id']}/edit",
                "/tasks/new",
                "/secrets",
                "/secrets?name=db.password",
                "/secrets/db.password/delete",
                "/events",
                "/runs",
                "/audit",
                "/settings",
            ):
                client.get(path)
        for path in (
            "/api/v1/secrets",
            "/api/v1/secrets/db.password",
            "/api/v1/secrets/slack.url",
            f"/api/v1/tasks/{created['id']}",
            "/api/v1/tasks",
            "/api/v1/events",
        ):
            assert api_client.get(path, headers=bearer).status_code == 200, path
    finally:
        stop.set()
        thread.join(10)
        smtp.stop()

    mails = [msg.as_string() for _, msg in smtp.inbox.messages()]
    hooks = [r["body"].decode() + json.dumps(r["headers"]) for r in receiver.requests]
    stored = json.dumps(
        {
            name: list(store.db[name].find({}))
            for name in ("audit", "events", "deliveries", "tasks", "settings", "runs")
        },
        default=str,
    )
    assert len(answers) > 60 and "secret.set" in stored and "task.create" in stored
    for value in ALL_VALUES:
        for where, texts in (
            ("answer", answers),
            ("mail", mails),
            ("webhook", hooks),
            ("store", [stored]),
        ):
            found = [t for t in texts if value in t]
            assert not found, f"{value} in a {where}: {found[0][:300]}"


def test_names_no_secret_can_have_are_answered_without_asking_the_store(app):
    call = api(app, "operator")
    for raw in ("a%00b", "%F0%9F%94%91", "x" * 300, ".hidden"):
        assert call("GET", f"/secrets/{raw}").status_code == 404, raw
        assert call("DELETE", f"/secrets/{raw}").status_code == 404, raw
        answer = call("PUT", f"/secrets/{raw}", json={"value": "v"})
        assert answer.status_code == 422, raw
        assert [d["path"] for d in answer.get_json()["details"]] == ["name"]
    op = logged_in(app, OPERATOR)
    assert op.get("/secrets/a%00b/delete").status_code == 404
    assert op.post("/secrets/a%00b/delete", data={"csrf_token": op.csrf}).status_code == 404


def test_a_test_mail_no_center_sends_is_withdrawn_and_said_so(store, keys):
    """The SMTP password is a stored secret and no center leads: the page says so after its
    wait, and the delivery is withdrawn (a center starting later does not mail it)."""
    cfg = web_config(
        keys,
        smtp_host="127.0.0.1",
        smtp_port=free_port(),
        smtp_security="none",
        smtp_user="alerts",
        smtp_password_secret="mail.password",
    )
    app = make_web_app(store, config=cfg, users=[ADMIN, OPERATOR], TEST_MAIL_WAIT=0.5)
    assert set_secret(logged_in(app, OPERATOR), "mail.password", MAIL_PASSWORD).status_code == 302
    admin = logged_in(app, ADMIN)
    page = admin.get("/settings").get_data(as_text=True)
    assert 'id="password-problem"' not in page  # the named secret is stored: nothing to say
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    answer = admin.post(
        "/settings/test-mail",
        data={"csrf_token": token, "to": "me@example.com"},
        follow_redirects=True,
    )
    (message,) = [m for m in flashes(answer.get_data(as_text=True)) if "test mail" in m]
    assert message.startswith(
        "the test mail was not sent: no leading center sent it within 0.5s (the SMTP password "
        "is a stored secret, which only the leading center opens: is a center running?)"
    )
    (delivery,) = store.db["deliveries"].find({"kind": "test"})
    assert delivery["status"] == "failed" and delivery["last_error"].startswith("withdrawn")
    (entry,) = store.audit.find({"action": "settings.test_mail"})
    assert entry["after"]["via"] == "leading center" and entry["after"]["sent"] is False
    # the secret named is gone from the store: the page says so
    store.db["secrets"].delete_many({})
    page = html.unescape(admin.get("/settings").get_data(as_text=True))
    assert "alerts.smtp_password_secret: no secret named 'mail.password'" in page

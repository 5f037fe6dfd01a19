"""What a review of the site found, kept fixed: redirects off the site, sessions that outlive
a password change, lost updates of users, input that used to raise instead of answering, the
site when ZooKeeper or MongoDB is down, and http tasks that must not follow redirects."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import finished, start

from cloudtask.agent.executor import Executor
from cloudtask.clock import utcnow
from cloudtask.localservers import MongoServer, ZooKeeperServer
from cloudtask.runmodel import new_run_document
from cloudtask.store import Store
from cloudtask.task import validate_task
from cloudtask.users import Users, _Stale
from cloudtask.zkpaths import connect
from web import create_app


def form_token(client, path="/login") -> str:
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def log_in(client, username, password, next_path: str | None = None):
    url = "/login" + (f"?next={next_path}" if next_path else "")
    return client.post(
        url, data={"username": username, "password": password, "csrf_token": form_token(client)}
    )


def session_token(client) -> str:
    page = client.get("/tasks").get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


@pytest.fixture
def app(store):
    app = create_app(test_config={"STORE": store, "TESTING": True})
    Users(store).add("admin1", "admin passphrase", role="admin")
    Users(store).add("op1", "operator passphrase", role="operator")
    return app


# --- redirects ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/%09/evil.example",
        "//evil.example",
        "/%5Cevil.example",
        "https://evil.example/",
        "/%0d%0aX",
    ],
)
def test_login_never_redirects_off_the_site(app, target):
    answer = log_in(app.test_client(), "op1", "operator passphrase", next_path=target)
    assert answer.status_code == 302
    assert answer.headers["Location"] == "/", answer.headers["Location"]


def test_login_keeps_a_path_on_the_site(app):
    answer = log_in(
        app.test_client(), "op1", "operator passphrase", next_path="/runs?status=failed"
    )
    assert answer.headers["Location"] == "/runs?status=failed"


# --- sessions -----------------------------------------------------------------------------


def test_a_password_reset_ends_the_users_sessions(app, store):
    victim = app.test_client()
    assert log_in(victim, "op1", "operator passphrase").status_code == 302
    assert victim.get("/tasks").status_code == 200
    Users(store).set_password("op1", "a new passphrase")
    assert victim.get("/tasks").status_code == 302  # to the login page
    assert log_in(victim, "op1", "a new passphrase").status_code == 302
    assert victim.get("/tasks").status_code == 200


def test_changing_ones_password_keeps_this_session_and_ends_the_others(app):
    here, elsewhere = app.test_client(), app.test_client()
    for client in (here, elsewhere):
        assert log_in(client, "op1", "operator passphrase").status_code == 302
    answer = here.post(
        "/account/password",
        data={
            "current": "operator passphrase",
            "new": "another passphrase",
            "csrf_token": session_token(here),
        },
    )
    assert answer.status_code == 302
    assert here.get("/tasks").status_code == 200
    assert elsewhere.get("/tasks").status_code == 302


def test_disabling_ends_sessions_for_good(app, store):
    client = app.test_client()
    log_in(client, "op1", "operator passphrase")
    Users(store).set_enabled("op1", False, by="admin1")
    Users(store).set_enabled("op1", True, by="admin1")
    assert client.get("/tasks").status_code == 302  # the old session does not come back


def test_guessing_the_current_password_is_throttled(app):
    client = app.test_client()
    log_in(client, "op1", "operator passphrase")
    token = session_token(client)
    codes = [
        client.post(
            "/account/password",
            data={"current": f"wrong {i}", "new": "whatever passphrase", "csrf_token": token},
        ).status_code
        for i in range(6)
    ]
    assert codes == [400] * 5 + [429]


# --- users: no lost updates ----------------------------------------------------------------


def test_a_stale_user_write_is_refused_not_applied(store):
    users = Users(store)
    users.add("u1", "first passphrase", role="operator")
    token_id, token = users.add_token("u1", "ci")
    stale = users.get("u1")  # read before the revoke ...
    users.revoke_token("u1", token_id)
    stale["role"] = "viewer"
    with pytest.raises(_Stale):  # ... so writing it back would bring the token back
        users._replace(stale)
    assert users.by_token(token) is None
    assert users.get("u1")["role"] == "operator"


def test_changes_made_at_once_all_land(store):
    users = Users(store)
    users.add("u2", "first passphrase", role="operator")
    errors: list[Exception] = []

    def add_tokens(prefix):
        try:
            for i in range(5):
                users.add_token("u2", f"{prefix}-{i}")
        except Exception as e:  # a Conflict after the retries would show here
            errors.append(e)

    threads = [threading.Thread(target=add_tokens, args=(p,)) for p in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(users.list_tokens("u2")) == 15


# --- input that used to raise --------------------------------------------------------------


def test_a_non_ascii_csrf_token_is_refused_cleanly(app):
    client = app.test_client()
    log_in(client, "op1", "operator passphrase")
    answer = client.post("/tasks/new", data={"csrf_token": "é", "name": "x"})
    assert answer.status_code == 400
    assert "security token" in answer.get_data(as_text=True)


@pytest.mark.parametrize("retries", ["²", "٣", "9" * 5000])
def test_odd_numbers_in_the_form_are_errors_at_their_field(app, retries):
    client = app.test_client()
    log_in(client, "op1", "operator passphrase")
    form = {
        "csrf_token": session_token(client),
        "editor": "fields",
        "name": "odd",
        "schedule_kind": "every",
        "every": "1h",
        "run_kind": "command",
        "command": "true",
        "retries": retries,
        "expect_status": "²",
        "timeout": "9" * 5000,
    }
    answer = client.post("/tasks/new", data=form)
    assert answer.status_code == 422
    assert "retries" in answer.get_data(as_text=True)


@pytest.mark.parametrize(
    "path",
    [
        "/runs?since=0001-01-01T00:00%2B01:00",
        "/runs?until=9999-12-31T23:59-01:00",
        "/api/v1/runs?since=0001-01-01T00:00%2B01:00",
    ],
)
def test_times_at_the_calendars_edge_are_refused(app, path):
    client = app.test_client()
    log_in(client, "op1", "operator passphrase")
    answer = client.get(path)
    assert answer.status_code == 422
    assert "1970 to 9000" in answer.get_data(as_text=True)


def test_the_chart_refuses_times_at_the_calendars_edge(app, store):
    task = store.create_task({"name": "t", "schedule": {"every": "1h"}, "command": "true"})
    client = app.test_client()
    log_in(client, "op1", "operator passphrase")
    answer = client.get(f"/tasks/{task['_id']}/trend.json?until=9999-12-31T23:59-01:00")
    assert answer.status_code == 422
    assert answer.get_json()["details"][0]["path"] == "until"


def test_instants_near_the_calendars_end_are_refused_by_the_model():
    spec = {"name": "a", "schedule": {"every": "1h", "start": "9999-12-31T20:00:00Z"}}
    problems = validate_task({**spec, "command": "true"})
    assert [p.path for p in problems] == ["schedule.start"]
    assert "before the year 9000" in problems[0].message


def test_a_multi_line_env_value_opens_in_the_json_editor(app, store):
    task = store.create_task(
        {"name": "t", "schedule": {"every": "1h"}, "command": "true", "env": {"K": "a\nb"}}
    )
    client = app.test_client()
    log_in(client, "op1", "operator passphrase")
    page = client.get(f"/tasks/{task['_id']}/edit").get_data(as_text=True)
    assert re.search(r'name="editor" value="json"\s+checked', page)


# --- ZooKeeper or MongoDB down --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_zookeeper_down_changes_still_answer_and_are_audited(store, tmp_path):
    server = ZooKeeperServer(tmp_path / "zk", tick_time_ms=200)
    server.start()
    zk = connect(server.hosts, 2.0)
    try:
        app = create_app(test_config={"STORE": store, "TESTING": True, "ZK": zk})
        Users(store).add("op1", "operator passphrase", role="operator")
        task = store.create_task({"name": "t", "schedule": {"every": "1h"}, "command": "true"})
        now = utcnow()
        run = new_run_document(
            task_id=task["_id"],
            task_name="t",
            group="default",
            revision=1,
            scheduled_for=now,
            slot="one",
            attempt=0,
            trigger="schedule",
            agent="a1",
            status="running",
            now=now,
        )
        store.claim_runs([run])
        client = app.test_client()
        log_in(client, "op1", "operator passphrase")
        token = session_token(client)
        server.stop()
        started = time.monotonic()
        answer = client.post(f"/tasks/{task['_id']}/pause", data={"csrf_token": token})
        assert answer.status_code == 302
        assert store.get_task(task["_id"])["enabled"] is False
        assert store.audit.find_one({"action": "task.pause"}) is not None
        answer = client.post(f"/runs/{run['_id']}/kill", data={"csrf_token": token})
        assert answer.status_code == 503
        assert "ZooKeeper" in answer.get_data(as_text=True)
        assert time.monotonic() - started < 30
    finally:
        zk.stop()
        zk.close()
        server.stop()


@pytest.mark.external
@pytest.mark.timeout(120)
def test_mongodb_down_pages_say_so_instead_of_logging_out(tmp_path):
    server = MongoServer(tmp_path / "mongo")
    server.start()
    try:
        store = Store(server.uri, "down", server_selection_timeout_ms=1000)
        app = create_app(test_config={"STORE": store, "TESTING": True})
        Users(store).add("op1", "operator passphrase", role="operator")
        token = Users(store).create_token("op1", "ci")
        client = app.test_client()
        log_in(client, "op1", "operator passphrase")
        assert client.get("/tasks").status_code == 200
        server.stop()
        page = client.get("/tasks")
        assert page.status_code == 503, page.status_code
        assert "MongoDB" in page.get_data(as_text=True)
        html = app.test_client().get("/tasks", headers={"Authorization": f"Bearer {token}"})
        assert html.status_code == 503
        api = app.test_client().get("/api/v1/tasks", headers={"Authorization": f"Bearer {token}"})
        assert api.status_code == 503 and api.is_json
    finally:
        server.stop()


# --- http tasks do not follow redirects ----------------------------------------------------


class _Redirecting(BaseHTTPRequestHandler):
    target = ""
    seen: list[dict] = []

    def do_GET(self):
        if self.path == "/jump":
            self.send_response(302)
            self.send_header("Location", self.target)
            self.end_headers()
            return
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"landed")

    def log_message(self, *args):
        pass


def test_an_http_task_does_not_follow_a_redirect_with_its_token(store, writer, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    _Redirecting.target, _Redirecting.seen = f"{base}/elsewhere", []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    executor = Executor(
        agent_id="a1", log_dir=tmp_path / "logs", writer=writer, max_parallel=2, kill_grace=1.0
    )
    try:
        ctx = start(store, executor, {"http": {"url": f"{base}/jump"}})
        doc = finished(store, ctx.run_id)
        assert doc["status"] == "failed" and doc["http_status"] == 302
        assert _Redirecting.seen == []  # nothing, and no token, reached the redirect's target
        ctx = start(store, executor, {"http": {"url": f"{base}/jump", "expect_status": 302}})
        assert finished(store, ctx.run_id)["status"] == "succeeded"
    finally:
        executor.shutdown()
        server.shutdown()
        server.server_close()


def test_the_login_throttle_is_shared_by_web_processes_and_stays_small(store):
    from web.security import LoginThrottle

    # two web processes on one database: their failures add up
    first = LoginThrottle(lambda: store)
    second = LoginThrottle(lambda: store)
    for throttle in (first, second, first, second):
        throttle.failed("alice", "10.0.0.1")
    assert not first.blocked("alice", "10.0.0.1") and not second.blocked("alice", "10.0.0.1")
    second.failed("alice", "10.0.0.1")
    assert first.blocked("alice", "10.0.0.1") and second.blocked("alice", "10.0.0.1")
    assert not first.blocked("alice", "10.0.0.2") and not first.blocked("bob", "10.0.0.1")
    for _ in range(20):
        first.failed("alice", "10.0.0.1")
    # one document per count (the pair, the address, the user), each keeping only as many
    # times as its limit, under a fixed-size key
    docs = {d["_id"]: d for d in store.db["login_failures"].find({})}
    assert len(docs) == 3 and all(len(key) == 64 for key in docs)
    assert len(docs[LoginThrottle._key("alice", "10.0.0.1")]["times"]) == 5
    assert sorted(len(d["times"]) for d in docs.values()) == [5, 10, 20]
    first.failed("x" * 100_000, "10.0.0.3")  # a made-up name of any length: a fixed-size key
    assert all(len(d["_id"]) == 64 for d in store.db["login_failures"].find({}))
    # a success forgets the pair's failures (not the address's, nor the user's)
    for _ in range(5):
        first.failed("bob", "10.0.0.6")
    assert second.blocked("bob", "10.0.0.6")
    first.succeeded("bob", "10.0.0.6")
    assert not second.blocked("bob", "10.0.0.6")
    # the failures stop counting after the window, and expired pairs are deleted
    now = [time.time()]
    short = LoginThrottle(lambda: store, limit=2, window=2.0, clock=lambda: now[0])
    short.failed("carol", "10.0.0.4")
    short.failed("carol", "10.0.0.4")
    assert short.blocked("carol", "10.0.0.4")
    now[0] += 2.3
    assert not short.blocked("carol", "10.0.0.4")
    now[0] += 60.0  # a minute after its last sweep
    short.failed("dave", "10.0.0.5")  # sweeps the expired ones (without a TTL monitor)
    keys = {d["_id"] for d in store.db["login_failures"].find({})}
    assert LoginThrottle._key("carol", "10.0.0.4") not in keys
    assert LoginThrottle._key("dave", "10.0.0.5") in keys

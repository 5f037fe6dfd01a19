"""User management (admin only) and the audit log, on a real store through the Flask test
client: adding a user, changing roles (effective on the next request), disabling (sessions and
API tokens stop), resetting passwords, API tokens (shown once, revoked), the last-admin guard
rails, 403 for operators and viewers on every admin page and action, an audit entry for every
change without secrets, and the audit page's filters, pages, diffs and links."""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone

import pytest
from bson import ObjectId
from helpers import ADMIN, OPERATOR, VIEWER, make_web_app, post_login, web_login

from cloudtask.clock import to_bson_time
from cloudtask.runmodel import SCHEMA_VERSION, new_id
from cloudtask.users import Users, token_hash

ADMIN_PW, OPERATOR_PW, VIEWER_PW = ADMIN.password, OPERATOR.password, VIEWER.password
NOW = datetime.now(timezone.utc)


@pytest.fixture
def app(store):
    return make_web_app(store, users=[ADMIN, OPERATOR, VIEWER])


def login(client, username, password) -> str:
    """Log in through the form; returns the session's CSRF token. The login's own audit entry
    (``auth.login``, tested in test_web_sessions.py) is taken out again, so the tests here
    see only the entries of what they do."""
    csrf = web_login(client, username, password, "/audit")
    client.application.extensions["cloudtask"].store().audit.delete_many({"action": "auth.login"})
    return csrf


def can_log_in(app, username, password) -> bool:
    return post_login(app.test_client(), username, password).status_code == 302


@pytest.fixture
def admin(app):
    client = app.test_client()
    client.csrf = login(client, "root", ADMIN_PW)
    return client


def post(client, url, **data):
    return client.post(url, data={"csrf_token": client.csrf, **data})


def error_of(page: str, field: str) -> str:
    """The error message shown next to a field (empty if none)."""
    found = re.search(rf'data-error="{field}">([^<]*)<', page)
    return html.unescape(found.group(1)) if found else ""


def audits(store, **query):
    """The audit entries matching ``query``, oldest first; the door's (``auth.*``: logins,
    failed logins) only when ``query`` names an action."""
    entries = list(store.audit.find(query).sort("at", 1))
    if "action" in query:
        return entries
    return [e for e in entries if not e["action"].startswith("auth.")]


def add_user(admin, name, role="viewer", password="a long passphrase", password2=None):
    return post(
        admin,
        "/users",
        username=name,
        role=role,
        password=password,
        password2=password if password2 is None else password2,
    )


# --- users ------------------------------------------------------------------------------------


def test_admin_adds_a_user_who_can_then_log_in(app, admin, store):
    answer = add_user(admin, "erin", role="operator")
    assert answer.status_code == 302
    assert answer.headers["Location"].endswith("/users/erin")
    assert can_log_in(app, "erin", "a long passphrase")
    listing = admin.get("/users").get_data(as_text=True)
    assert "/users/erin" in listing and "operator" in listing
    detail = admin.get("/users/erin")
    assert detail.status_code == 200 and "erin" in detail.get_data(as_text=True)
    [entry] = audits(store, action="user.create")
    assert entry["actor"] == "root" and entry["target"] == "user:erin"
    assert entry["after"] == {"username": "erin", "role": "operator", "enabled": True}


def test_the_users_page_shows_where_each_user_comes_from(admin, store):
    """A local account, a directory (LDAP) user and an OpenID Connect user: the Source column
    of the list, and the user's own page, say which (the record's ``source``, none: local)."""
    users = Users(store)
    users.sign_in_external("dana", "ldap", "viewer", subject="uid=dana,ou=people,dc=example")
    users.sign_in_external("oscar", "oidc", "operator", subject="sub-oscar")
    listing = admin.get("/users").get_data(as_text=True)
    assert "<th>Source</th>" in listing
    rows = {
        name: source
        for name, source in re.findall(
            r'<a href="/users/([^"]+)">.*?<td data-source="([a-z]+)">', listing, re.S
        )
    }
    assert rows == {
        "root": "local",
        "op1": "local",
        "viewer1": "local",
        "dana": "ldap",
        "oscar": "oidc",
    }
    assert '<td data-source="ldap">LDAP</td>' in listing
    assert '<td data-source="oidc">OpenID Connect</td>' in listing
    for name, label in (("root", "local"), ("dana", "LDAP"), ("oscar", "OpenID Connect")):
        page = admin.get(f"/users/{name}").get_data(as_text=True)
        assert re.search(rf"<dt>Source</dt><dd data-source=\"[a-z]+\">{label}</dd>", page)


@pytest.mark.parametrize(
    "name, password, password2, field, status",
    [
        ("op1", "a long passphrase", None, "username", 409),
        ("bad name", "a long passphrase", None, "username", 422),
        ("frank", "short", None, "password", 422),
        ("frank", "a long passphrase", "another long one", "password2", 422),
    ],
)
def test_add_form_shows_each_error_next_to_its_field(
    app, admin, store, name, password, password2, field, status
):
    answer = add_user(admin, name, password=password, password2=password2)
    assert answer.status_code == status
    page = answer.get_data(as_text=True)
    assert error_of(page, field), page
    assert 'value="' + html.escape(name) + '"' in page  # what was typed is shown again
    assert audits(store, action="user.create") == []
    if name == "frank":
        assert not can_log_in(app, "frank", password)


def test_a_role_change_takes_effect_on_the_next_request(app, admin, store):
    task = store.create_task({"name": "nightly", "schedule": {"every": "1h"}, "command": "true"})
    operator = app.test_client()
    operator.csrf = login(operator, "op1", OPERATOR_PW)
    assert post(operator, f"/tasks/{task['_id']}/pause").status_code == 302
    answer = post(admin, "/users/op1/role", role="viewer")
    assert answer.status_code == 302
    assert Users(store).get("op1")["role"] == "viewer"
    # the change ended the user's session: they log in again, under the new role
    ended = post(operator, f"/tasks/{task['_id']}/resume")
    assert ended.status_code == 400  # the form's token went with the session: reload, log in
    assert operator.get("/tasks").status_code == 302
    operator.csrf = login(operator, "op1", OPERATOR_PW)
    assert post(operator, f"/tasks/{task['_id']}/resume").status_code == 403
    assert operator.get("/tasks").status_code == 200  # logged in again, now read only
    [entry] = audits(store, action="user.role")
    assert (entry["before"], entry["after"]) == ({"role": "operator"}, {"role": "viewer"})
    bad = post(admin, "/users/op1/role", role="root")
    assert bad.status_code == 422 and "expected one of" in error_of(
        bad.get_data(as_text=True), "role"
    )


def test_disabling_a_user_ends_their_session_and_their_api_token(app, admin, store):
    token = Users(store).create_token("op1", "ci")
    operator = app.test_client()
    login(operator, "op1", OPERATOR_PW)
    bearer = {"Authorization": f"Bearer {token}"}
    assert operator.get("/tasks").status_code == 200
    assert app.test_client().get("/api/v1/me", headers=bearer).status_code == 200
    assert post(admin, "/users/op1/disable").status_code == 302
    answer = operator.get("/tasks")
    assert answer.status_code == 302 and "/login" in answer.headers["Location"]
    assert app.test_client().get("/api/v1/me", headers=bearer).status_code == 401
    assert not can_log_in(app, "op1", OPERATOR_PW)
    listing = admin.get("/users").get_data(as_text=True)
    assert "disabled" in listing
    assert post(admin, "/users/op1/enable").status_code == 302
    assert app.test_client().get("/api/v1/me", headers=bearer).status_code == 200
    assert can_log_in(app, "op1", OPERATOR_PW)
    actions = [e["action"] for e in audits(store, target="user:op1")]
    assert actions == ["user.disable", "user.enable"]
    assert audits(store, action="user.disable")[0]["after"] == {"enabled": False}


def test_an_admin_resets_a_password(app, admin, store):
    short = post(admin, "/users/viewer1/password", password="short", password2="short")
    assert short.status_code == 422
    assert "at least 10" in error_of(short.get_data(as_text=True), "password")
    differ = post(
        admin, "/users/viewer1/password", password="new passphrase", password2="other passphrase"
    )
    assert differ.status_code == 422
    assert "differ" in error_of(differ.get_data(as_text=True), "password2")
    assert can_log_in(app, "viewer1", VIEWER_PW)  # the refused changes changed nothing
    answer = post(
        admin, "/users/viewer1/password", password="new passphrase", password2="new passphrase"
    )
    assert answer.status_code == 302
    assert not can_log_in(app, "viewer1", VIEWER_PW)
    assert can_log_in(app, "viewer1", "new passphrase")
    [entry] = audits(store, action="user.password")
    assert "new passphrase" not in str(entry) and "scrypt" not in str(entry)


def test_a_token_is_shown_once_works_and_can_be_revoked(app, admin, store):
    answer = post(admin, "/users/op1/tokens", name="deploy")
    assert answer.status_code == 200
    assert "no-store" in answer.headers["Cache-Control"]
    page = answer.get_data(as_text=True)
    token = re.search(r'id="token-value">([^<]+)<', page).group(1)
    assert "cannot be shown again" in page
    me = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.get_json()["username"] == "op1"
    [stored] = Users(store).get("op1")["tokens"]
    assert stored["hash"] == token_hash(token)
    for url in ("/users", "/users/op1", "/audit"):
        later = admin.get(url).get_data(as_text=True)
        assert token not in later and stored["hash"] not in later, url
    assert "deploy" in admin.get("/users/op1").get_data(as_text=True)
    assert stored["id"] in admin.get("/users/op1").get_data(as_text=True)
    revoked = post(admin, f"/users/op1/tokens/{stored['id']}/revoke")
    assert revoked.status_code == 302
    me = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 401
    again = post(admin, f"/users/op1/tokens/{stored['id']}/revoke")
    assert again.status_code == 404 and error_of(again.get_data(as_text=True), "tokens")
    unnamed = post(admin, "/users/op1/tokens", name="  ")
    assert unnamed.status_code == 422
    assert error_of(unnamed.get_data(as_text=True), "token_name")
    assert [e["action"] for e in audits(store, target="user:op1")] == [
        "token.create",
        "token.revoke",
    ]
    for entry in audits(store):
        assert token not in str(entry) and stored["hash"] not in str(entry)


def test_the_last_admin_cannot_be_demoted_or_disabled(app, admin, store):
    for url, data in (("/users/root/role", {"role": "operator"}), ("/users/root/disable", {})):
        answer = post(admin, url, **data)
        assert answer.status_code == 409, url
        message = error_of(answer.get_data(as_text=True), "role" if "role" in url else "enabled")
        assert "last enabled admin" in message, url
    doc = Users(store).get("root")
    assert doc["role"] == "admin" and doc["enabled"]
    # with a second admin, neither may demote or disable themselves, but each the other
    assert add_user(admin, "second", role="admin").status_code == 302
    assert post(admin, "/users/root/role", role="viewer").status_code == 409
    assert "own account" in error_of(
        post(admin, "/users/root/disable").get_data(as_text=True), "enabled"
    )
    other = app.test_client()
    other.csrf = login(other, "second", "a long passphrase")
    assert post(other, "/users/root/role", role="operator").status_code == 302
    last = post(other, "/users/second/role", role="viewer")  # second is the last admin now
    assert last.status_code == 409
    assert "last enabled admin" in error_of(last.get_data(as_text=True), "role")
    assert Users(store).enabled_admins() == ["second"]
    assert [e["action"] for e in audits(store, action="user.role")] == ["user.role"]


@pytest.mark.parametrize("who, password", [("op1", OPERATOR_PW), ("viewer1", VIEWER_PW)])
def test_operators_and_viewers_get_403_on_every_admin_page_and_action(app, store, who, password):
    client = app.test_client()
    csrf = login(client, who, password)
    Users(store).create_token("viewer1", "x")
    token_id = Users(store).list_tokens("viewer1")[0]["id"]
    checked = 0
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("admin.user"):
            continue
        url = rule.rule.replace("<username>", "viewer1").replace("<token_id>", token_id)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            answer = client.open(
                url, method=method, data={"csrf_token": csrf, "role": "admin", "name": "x"}
            )
            assert answer.status_code == 403, (who, method, url, answer.status_code)
            checked += 1
    assert checked >= 9
    assert Users(store).get("viewer1")["role"] == "viewer"
    assert len(Users(store).get("viewer1")["tokens"]) == 1
    assert audits(store) == []
    assert client.get("/audit").status_code == 200  # the audit log is for everyone


def test_an_admin_page_for_an_unknown_user_is_404(admin):
    assert admin.get("/users/nobody").status_code == 404
    assert post(admin, "/users/nobody/role", role="viewer").status_code == 404
    assert post(admin, "/users/nobody/tokens", name="x").status_code == 404


def test_every_change_leaves_an_audit_entry_without_secrets(app, admin, store):
    add_user(admin, "gina", role="operator", password="gina passphrase")
    post(admin, "/users/gina/role", role="viewer")
    post(admin, "/users/gina/disable")
    post(admin, "/users/gina/enable")
    post(
        admin,
        "/users/gina/password",
        password="gina new passphrase",
        password2="gina new passphrase",
    )
    page = post(admin, "/users/gina/tokens", name="ci").get_data(as_text=True)
    token = re.search(r'id="token-value">([^<]+)<', page).group(1)
    token_id = Users(store).list_tokens("gina")[0]["id"]
    post(admin, f"/users/gina/tokens/{token_id}/revoke")
    entries = audits(store, target="user:gina")
    assert [e["action"] for e in entries] == [
        "user.create",
        "user.role",
        "user.disable",
        "user.enable",
        "user.password",
        "token.create",
        "token.revoke",
    ]
    assert all(e["actor"] == "root" for e in entries)
    secrets = ("gina passphrase", "gina new passphrase", token, token_hash(token), "scrypt:")
    for entry in entries:
        for secret in secrets:
            assert secret not in str(entry), (entry["action"], secret)
    shown = admin.get("/audit?target=user:gina").get_data(as_text=True)
    for secret in secrets:
        assert secret not in shown
    assert "token.revoke" in shown and token_id in shown


# --- the audit log ----------------------------------------------------------------------------


def old_entry(store, at, actor, action, target, before=None, after=None):
    """An audit entry as Store.add_audit writes it, made at the past time ``at``: its id is
    an ObjectId of that moment, as an entry made then has."""
    at = to_bson_time(at)
    doc = {
        "_id": str(ObjectId.from_datetime(at))[:8] + new_id()[8:],
        "version": SCHEMA_VERSION,
        "at": at,
        "actor": actor,
        "action": action,
        "target": target,
        "before": before,
        "after": after,
    }
    store.audit.insert_one(doc)
    return doc


def rows(page: str) -> list[str]:
    """The audit table's rows, newest first, as 'actor action target' lines."""
    body = page.split('id="audit-table"', 1)[-1] if 'id="audit-table"' in page else ""
    out = []
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S):
        cells = [
            re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        if cells:
            out.append(" ".join(html.unescape(c) for c in cells[1:4]))
    return out


@pytest.fixture
def history(store):
    """Six entries an hour apart, oldest 6 hours ago."""
    base = NOW.replace(microsecond=0) - timedelta(hours=6)
    made = [
        ("alice", "task.create", "task:nightly-cleanup"),
        ("bob", "task.update", "task:nightly-cleanup"),
        ("alice", "task.pause", "task:reports"),
        ("carol", "user.role", "user:dave"),
        ("bob", "file.upload", "file:backup.sh"),
        ("alice", "task.delete", "task:nightly-cleanup"),
    ]
    return [old_entry(store, base + timedelta(hours=i), *m) for i, m in enumerate(made)], base


def test_the_audit_log_lists_newest_first_and_filters(app, store, history):
    entries, base = history
    viewer = app.test_client()
    login(viewer, "viewer1", VIEWER_PW)

    def listed(query=""):
        answer = viewer.get("/audit" + query)
        assert answer.status_code == 200, (query, answer.status_code)
        return rows(answer.get_data(as_text=True))

    everything = listed()
    assert everything[0] == "alice task.delete task:nightly-cleanup"
    assert everything[-1] == "alice task.create task:nightly-cleanup"
    assert len(everything) == 6
    assert listed("?actor=alice") == [
        "alice task.delete task:nightly-cleanup",
        "alice task.pause task:reports",
        "alice task.create task:nightly-cleanup",
    ]
    assert listed("?action=task.") == [r for r in everything if " task." in r]
    assert listed("?action=task.update") == ["bob task.update task:nightly-cleanup"]
    assert len(listed("?target=nightly-cleanup")) == 3  # a task name typed plainly
    assert listed("?target=task:nightly-cleanup") == listed("?target=nightly-cleanup")
    assert listed("?target=user:dave") == ["carol user.role user:dave"]
    since = (base + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S")
    until = (base + timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert listed(f"?since={since}&until={until}") == [
        "carol user.role user:dave",
        "alice task.pause task:reports",
    ]
    assert listed(f"?since={since}&until={until}&actor=alice") == ["alice task.pause task:reports"]
    assert listed(f"?until={until}&actor=alice") == [
        "alice task.pause task:reports",
        "alice task.create task:nightly-cleanup",
    ]
    assert listed(f"?since={since}&action=task.") == [
        "alice task.delete task:nightly-cleanup",
        "alice task.pause task:reports",
    ]
    assert listed("?actor=nobody") == []


def test_the_audit_log_pages(app, store, history):
    viewer = app.test_client()
    login(viewer, "viewer1", VIEWER_PW)
    pages = []
    for page in (1, 2, 3):
        answer = viewer.get(f"/audit?per_page=2&page={page}")
        assert answer.status_code == 200
        text = answer.get_data(as_text=True)
        assert f"page {page} of 3" in text
        pages.append(rows(text))
    assert [len(p) for p in pages] == [2, 2, 2]
    flat = [r for p in pages for r in p]
    assert flat == rows(viewer.get("/audit").get_data(as_text=True))
    until = (history[1] + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%S")
    window = [
        rows(viewer.get(f"/audit?per_page=2&page={n}&until={until}").get_data(as_text=True))
        for n in (1, 2, 3)
    ]
    assert window == [flat[1:3], flat[3:5], flat[5:6]]
    beyond = viewer.get("/audit?per_page=2&page=9")
    assert beyond.status_code == 200 and rows(beyond.get_data(as_text=True)) == []


@pytest.mark.parametrize(
    "query, field",
    [
        ("since=yesterday", "since"),
        ("until=2026-13-45", "until"),
        ("since=2026-11-25T00:00&until=2026-11-24T00:00", "until"),
        ("page=0", "page"),
        ("per_page=100000", "per_page"),
        ("actor=" + "x" * 300, "actor"),
    ],
)
def test_bad_audit_filters_are_422_with_the_message_next_to_the_field(
    app, store, history, query, field
):
    viewer = app.test_client()
    login(viewer, "viewer1", VIEWER_PW)
    answer = viewer.get("/audit?" + query)
    assert answer.status_code == 422
    page = answer.get_data(as_text=True)
    assert error_of(page, field), page
    assert len(rows(page)) == 6  # the list is still shown, without the bad filter


def test_a_real_entry_falls_in_the_time_range_around_now(app, admin, store):
    add_user(admin, "henry")
    hour_ago = (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    later = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert rows(admin.get(f"/audit?since={hour_ago}").get_data(as_text=True)) == [
        "root user.create user:henry"
    ]
    assert rows(admin.get(f"/audit?until={hour_ago}").get_data(as_text=True)) == []
    assert (
        len(rows(admin.get(f"/audit?since={hour_ago}&until={later}").get_data(as_text=True))) == 1
    )


def test_audit_entries_show_a_compact_escaped_diff_and_link_live_tasks(app, admin, store):
    task = store.create_task({"name": "reports", "schedule": {"every": "1h"}, "command": "true"})
    before = {
        "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
        "command": "echo <old>",
        "retries": 0,
        "env": {"A": "1"},
    }
    after = {
        "schedule": {"cron": "0 4 * * *", "timezone": "UTC"},
        "command": "echo <b>new</b>",
        "retries": 0,
        "env": {"A": "1"},
        "tags": ["x", "y"],
    }
    old_entry(
        store, NOW - timedelta(minutes=5), "bob", "task.update", "task:reports", before, after
    )
    old_entry(store, NOW - timedelta(minutes=4), "bob", "task.delete", "task:gone", {"a": 1}, None)
    old_entry(
        store,
        NOW - timedelta(minutes=3),
        "bob",
        "user.x",
        "user:op1",
        {"password_hash": "scrypt:zzz", "role": "viewer"},
        {"password_hash": "scrypt:yyy", "role": "admin"},
    )
    page = admin.get("/audit").get_data(as_text=True)
    assert f'href="/tasks/{task["_id"]}">task:reports</a>' in page
    assert ">task:gone</a>" not in page and "task:gone" in page  # deleted: no link
    assert 'href="/users/op1">user:op1</a>' in page
    assert "schedule.cron" in page and "0 3 * * *" in page and "0 4 * * *" in page
    assert "echo &lt;b&gt;new&lt;/b&gt;" in page and "<b>new</b>" not in page
    keys = re.findall(r'class="key mono">([^<]+)<', page)
    assert "retries" not in keys and "env" not in keys  # unchanged keys are not shown
    assert {"schedule.cron", "command", "tags", "a", "password_hash", "role"} <= set(keys)
    assert '["x", "y"]' in html.unescape(page)
    assert "scrypt:" not in page and "*** (changed)" in page
    viewer = app.test_client()
    login(viewer, "viewer1", VIEWER_PW)
    shown = viewer.get("/audit").get_data(as_text=True)
    assert 'href="/users/op1"' not in shown  # user pages are for admins

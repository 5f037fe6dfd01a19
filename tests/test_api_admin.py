"""The REST API's admin half (Flask test client on a real store): users and their API tokens,
the alert settings with write-only secrets, and the audit log; the roles the pages enforce
(viewers and operators get 403 on everything admin), the guard rails of the users pages
(nobody demotes, disables or deletes themselves), and no password, hash or token secret ever
answered or written to the audit log."""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timedelta, timezone

import pytest
import schemathesis
from helpers import ADMIN, OPERATOR, VIEWER, Api, error_of, make_web_app, paths_of, post_login
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cloudtask.config import load_config
from cloudtask.notify.settings import stored_settings
from cloudtask.users import Users, token_hash
from web.api import api
from web.openapi import document

JSON_HEADERS = {"Content-Type": "application/json"}
SMTP_PASSWORD = "smtp-pass-Zq81xv"
HOOK_SECRET = "hook-secret-Wp44mn"
FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]


def file_config():
    """A config whose alerts section (the "file") sets a host and an operator address."""
    return load_config(
        None,
        environ={
            "CLOUDTASK_ALERTS_SMTP_HOST": "mail.file.example",
            "CLOUDTASK_ALERTS_OPERATORS": "file-ops@example.com",
        },
    )


@pytest.fixture
def app(store):
    app = make_web_app(store, None, file_config(), users=[ADMIN, OPERATOR, VIEWER])
    users = Users(store)
    app.tokens = {  # type: ignore[attr-defined]
        "admin": users.create_token(ADMIN.name, "tests"),
        "operator": users.create_token(OPERATOR.name, "tests"),
        "viewer": users.create_token(VIEWER.name, "tests"),
    }
    return app


@pytest.fixture
def admin(app):
    return Api(app.test_client(), app.tokens["admin"])


@pytest.fixture
def op(app):
    return Api(app.test_client(), app.tokens["operator"])


@pytest.fixture
def viewer(app):
    return Api(app.test_client(), app.tokens["viewer"])


def audit_text(store):
    return json.dumps(list(store.audit.find({}, {"_id": 0})), default=str)


# --- users ------------------------------------------------------------------------------------


def test_admin_lists_users_with_their_source_and_never_a_hash(admin, store):
    Users(store).add("dirk", "directory passphrase", "viewer")
    store.users.update_one({"_id": "dirk"}, {"$set": {"source": "ldap"}})
    answer = admin.get("/users")
    assert answer.status_code == 200
    users = {u["username"]: u for u in answer.get_json()["items"]}
    assert set(users) == {"root", "op1", "viewer1", "dirk"}
    assert users["root"]["role"] == "admin" and users["root"]["source"] == "local"
    assert users["dirk"]["source"] == "ldap"
    assert users["op1"]["tokens"][0]["name"] == "tests"
    text = answer.get_data(as_text=True)
    assert "password" not in text and "hash" not in text and "ct_" not in text


def test_admin_creates_a_user_the_password_never_echoed_nor_audited(admin, app, store):
    answer = admin.post(
        "/users", json={"username": "ann", "password": "ann passphrase 1", "role": "operator"}
    )
    assert answer.status_code == 201, answer.get_json()
    assert answer.headers["Location"] == "/api/v1/users/ann"
    user = answer.get_json()
    assert (user["username"], user["role"], user["enabled"], user["source"]) == (
        "ann",
        "operator",
        True,
        "local",
    )
    assert "ann passphrase 1" not in answer.get_data(as_text=True)
    assert "ann passphrase 1" not in audit_text(store)
    entry = store.audit.find_one({"action": "user.create"})
    assert (entry["actor"], entry["target"]) == ("root", "user:ann")
    # the new user can log in with that password
    assert post_login(app.test_client(), "ann", "ann passphrase 1").status_code == 302
    assert admin.get("/users/ann").get_json()["role"] == "operator"

    taken = error_of(admin.post("/users", json={"username": "ann", "password": "x" * 12}), 409)
    assert paths_of(taken) == ["username"]
    bad = error_of(
        admin.post("/users", json={"username": "no spaces", "password": "short", "role": "boss"}),
        422,
    )
    assert set(paths_of(bad)) == {"username", "password", "role"}
    bad = error_of(admin.post("/users", json={"username": 5, "colour": "red"}), 422)
    assert set(paths_of(bad)) == {"colour", "username", "password"}
    error_of(admin.post("/users", data="[]", headers=JSON_HEADERS), 400)
    assert store.users.count_documents({}) == 4  # nothing more was stored


def test_admin_changes_role_disables_resets_password_and_deletes(admin, app, store):
    ann = Users(store)
    ann.add("ann", "ann passphrase 1", "viewer")
    ann_token = Api(app.test_client(), ann.create_token("ann", "laptop"))
    assert ann_token.get("/me").get_json()["role"] == "viewer"

    answer = admin.patch("/users/ann", json={"role": "operator"})
    assert answer.status_code == 200 and answer.get_json()["role"] == "operator"
    assert ann_token.get("/me").get_json()["role"] == "operator"
    assert store.audit.find_one({"action": "user.role"})["after"] == {"role": "operator"}

    assert admin.patch("/users/ann", json={"enabled": False}).get_json()["enabled"] is False
    error_of(ann_token.get("/me"), 401)  # a disabled user's tokens stop working
    assert post_login(app.test_client(), "ann", "ann passphrase 1").status_code != 302
    assert admin.patch("/users/ann", json={"enabled": True}).get_json()["enabled"] is True
    assert ann_token.get("/me").status_code == 200

    answer = admin.patch("/users/ann", json={"password": "a new passphrase"})
    assert answer.status_code == 200
    assert "a new passphrase" not in answer.get_data(as_text=True) + audit_text(store)
    assert post_login(app.test_client(), "ann", "ann passphrase 1").status_code != 302
    assert post_login(app.test_client(), "ann", "a new passphrase").status_code == 302

    bad = error_of(
        admin.patch("/users/ann", json={"role": "boss", "enabled": "no", "password": "short"}),
        422,
    )
    assert set(paths_of(bad)) == {"role", "enabled", "password"}
    assert admin.get("/users/ann").get_json()["role"] == "operator"  # nothing was changed
    error_of(admin.patch("/users/nobody", json={"role": "viewer"}), 404)

    answer = admin.delete("/users/ann")
    assert answer.status_code == 200 and answer.get_json()["deleted"]["username"] == "ann"
    error_of(ann_token.get("/me"), 401)
    error_of(admin.get("/users/ann"), 404)
    error_of(admin.delete("/users/ann"), 404)
    assert store.audit.find_one({"action": "user.delete"})["target"] == "user:ann"


def test_the_guard_rails_of_the_users_pages_hold(admin, store):
    # the last enabled admin stays
    for change in ({"role": "operator"}, {"enabled": False}):
        body = error_of(admin.patch("/users/root", json=change), 409)
        assert "last enabled admin" in body["error"]
    assert "your own account" in error_of(admin.delete("/users/root"), 409)["error"]
    # with another admin, still nobody demotes, disables or deletes their own account
    Users(store).add("boss", "boss passphrase", "admin")
    for change in ({"role": "operator"}, {"enabled": False}):
        body = error_of(admin.patch("/users/root", json=change), 409)
        assert "your own account" in body["error"]
    assert "your own account" in error_of(admin.delete("/users/root"), 409)["error"]
    root = store.users.find_one({"_id": "root"})
    assert root["role"] == "admin" and root["enabled"]
    assert admin.patch("/users/boss", json={"role": "viewer"}).status_code == 200
    assert Users(store).enabled_admins() == ["root"]


def test_a_directory_user_gets_no_password_here(admin, store):
    Users(store).add("dirk", "directory passphrase", "viewer")
    store.users.update_one({"_id": "dirk"}, {"$set": {"source": "ldap"}})
    body = error_of(admin.patch("/users/dirk", json={"password": "another passphrase"}), 422)
    assert paths_of(body) == ["password"] and "ldap" in body["details"][0]["message"]
    assert admin.patch("/users/dirk", json={"role": "operator"}).status_code == 200


# --- tokens -----------------------------------------------------------------------------------


def test_tokens_are_shown_once_expire_may_be_read_only_and_are_revoked(admin, app, store):
    before = time.time()
    answer = admin.post(
        "/users/op1/tokens", json={"name": "ci", "expires_in_days": 30, "read_only": True}
    )
    assert answer.status_code == 201, answer.get_json()
    assert answer.headers["Cache-Control"] == "no-store"
    new = answer.get_json()
    secret = new["token"]
    assert secret.startswith("ct_") and new["scope"] == "read" and new["name"] == "ci"
    assert before + 30 * 86400 - 5 <= new["expires_at"] <= time.time() + 30 * 86400 + 5
    assert secret not in audit_text(store)
    ci = Api(app.test_client(), secret)
    assert ci.get("/me").get_json()["username"] == "op1"
    error_of(ci.post("/tasks", json={"name": "x"}), 403)  # read-only

    listed = admin.get("/users/op1/tokens")
    assert listed.status_code == 200
    assert [t["name"] for t in listed.get_json()["items"]] == ["tests", "ci"]
    assert secret not in listed.get_data(as_text=True)
    assert "hash" not in listed.get_data(as_text=True)
    assert secret not in admin.get("/users/op1").get_data(as_text=True)

    answer = admin.delete(f"/users/op1/tokens/{new['id']}")
    assert answer.status_code == 200 and answer.get_json()["revoked"]["name"] == "ci"
    error_of(ci.get("/me"), 401)
    error_of(admin.delete(f"/users/op1/tokens/{new['id']}"), 404)
    error_of(admin.post("/users/nobody/tokens", json={"name": "x"}), 404)
    assert {e["action"] for e in store.audit.find({"target": "user:op1"})} == {
        "token.create",
        "token.revoke",
    }


def test_bad_token_requests_say_what_is_wrong(admin):
    body = error_of(
        admin.post(
            "/users/op1/tokens",
            json={"name": "", "expires_in_days": 0, "read_only": "yes", "scope": "all"},
        ),
        422,
    )
    assert set(paths_of(body)) == {"name", "expires_in_days", "read_only", "scope"}
    body = error_of(
        admin.post("/users/op1/tokens", json={"name": "x", "expires_in_days": 1.5}), 422
    )
    assert paths_of(body) == ["expires_in_days"]
    assert len(admin.get("/users/op1/tokens").get_json()["items"]) == 1


# --- roles ------------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("GET", "/users", None),
    ("POST", "/users", {"username": "eve", "password": "eve passphrase"}),
    ("GET", "/users/op1", None),
    ("PATCH", "/users/viewer1", {"role": "admin"}),
    ("DELETE", "/users/root", None),
    ("GET", "/users/root/tokens", None),
    ("POST", "/users/root/tokens", {"name": "steal"}),
    ("DELETE", "/users/root/tokens/abcd", None),
    ("GET", "/settings", None),
    ("PATCH", "/settings", {"smtp_host": "evil.example"}),
    ("PUT", "/settings", {}),
    ("DELETE", "/settings/smtp_host", None),
]


@pytest.mark.parametrize("who", ["op", "viewer"])
def test_viewers_and_operators_get_403_where_the_pages_do(who, request, store):
    client = request.getfixturevalue(who)
    for method, path, body in ADMIN_ROUTES:
        answer = client(method, path, json=body) if body is not None else client(method, path)
        body = error_of(answer, 403)
        assert "admin" in body["error"], (method, path)
    assert store.users.count_documents({}) == 3
    assert stored_settings(store) == {}
    assert store.users.find_one({"_id": "viewer1"})["role"] == "viewer"
    # the audit log is for anyone logged in, like its page
    assert client.get("/audit").status_code == 200


# --- settings ---------------------------------------------------------------------------------


def test_settings_show_the_effective_value_and_its_source(admin):
    answer = admin.get("/settings")
    assert answer.status_code == 200
    doc = answer.get_json()
    assert doc["config_file"] == "defaults"
    host = doc["settings"]["smtp_host"]
    assert host == {
        "value": "mail.file.example",
        "source": "file",
        "file_value": "mail.file.example",
    }
    assert doc["settings"]["operators"]["value"] == ["file-ops@example.com"]
    assert doc["settings"]["smtp_port"]["value"] == 587
    assert doc["settings"]["smtp_password"] == {"set": False, "source": "file", "file_set": False}

    answer = admin.patch("/settings", json={"smtp_host": "mail.db.example", "smtp_port": 2525})
    assert answer.status_code == 200, answer.get_json()
    doc = answer.get_json()
    assert doc["changed"] is True and doc["updated_by"] == "root"
    assert doc["settings"]["smtp_host"] == {
        "value": "mail.db.example",
        "source": "database",
        "file_value": "mail.file.example",
    }
    assert doc["settings"]["smtp_port"]["source"] == "database"
    assert doc["settings"]["operators"]["source"] == "file"


def test_secrets_are_write_only(admin, store):
    answer = admin.patch(
        "/settings",
        json={
            "smtp_password": SMTP_PASSWORD,
            "webhooks": [{"url": "https://hooks.example/a", "secret": HOOK_SECRET}],
        },
    )
    assert answer.status_code == 200, answer.get_json()
    for text in (answer.get_data(as_text=True), admin.get("/settings").get_data(as_text=True)):
        assert SMTP_PASSWORD not in text and HOOK_SECRET not in text
    doc = admin.get("/settings").get_json()["settings"]
    assert doc["smtp_password"] == {"set": True, "source": "database", "file_set": False}
    assert doc["webhooks"]["value"] == [
        {"url": "https://hooks.example/a", "kinds": None, "secret_set": True}
    ]
    assert SMTP_PASSWORD not in audit_text(store) and HOOK_SECRET not in audit_text(store)
    entry = store.audit.find_one({"action": "settings.alerts"})
    assert entry["actor"] == "root" and "smtp_password" in entry["after"]["secrets_changed"]

    # left out, the secrets are kept: a change of the webhook's kinds keeps its secret
    answer = admin.patch(
        "/settings",
        json={
            "smtp_user": "mailer",
            "webhooks": [{"url": "https://hooks.example/a", "kinds": ["run.failed"]}],
        },
    )
    assert answer.status_code == 200, answer.get_json()
    stored = stored_settings(store)
    assert stored["smtp_password"] == SMTP_PASSWORD
    assert stored["webhooks"][0]["secret"] == HOOK_SECRET
    assert list(stored["webhooks"][0]["kinds"]) == ["run.failed"]
    # a new webhook without a secret has none to keep: refused at its path, nothing stored
    body = error_of(
        admin.patch("/settings", json={"webhooks": [{"url": "https://hooks.example/b"}]}), 422
    )
    assert paths_of(body) == ["webhooks[0].secret"]
    assert stored_settings(store) == stored
    # PUT replaces the stored set; the password is still kept unless null
    answer = admin.put("/settings", json={"smtp_host": "mail.put.example"})
    assert answer.status_code == 200
    assert set(stored_settings(store)) == {"smtp_host", "smtp_password"}
    assert admin.patch("/settings", json={"smtp_password": None}).status_code == 200
    assert "smtp_password" not in stored_settings(store)
    assert admin.get("/settings").get_json()["settings"]["smtp_password"]["set"] is False


def test_a_password_and_a_stored_secret_are_not_both_given(admin, store):
    body = error_of(
        admin.patch(
            "/settings", json={"smtp_password": "x" * 12, "smtp_password_secret": "smtp.pw"}
        ),
        422,
    )
    assert paths_of(body) == ["smtp_password"]
    assert stored_settings(store) == {}


def test_bad_settings_are_refused_at_their_path_and_nothing_is_stored(admin, store):
    admin.patch("/settings", json={"smtp_host": "mail.db.example"})
    before = stored_settings(store)
    body = error_of(
        admin.patch(
            "/settings",
            json={
                "smtp_port": "many",
                "operators": ["ok@example.com", "not an address"],
                "alert_interval": "soon",
                "smtp_host": "mail.other.example",
            },
        ),
        422,
    )
    assert set(paths_of(body)) == {"smtp_port", "operators[1]", "alert_interval"}
    body = error_of(admin.patch("/settings", json={"colour": "red"}), 422)
    assert paths_of(body) == ["colour"]
    error_of(admin.patch("/settings", data="[1]", headers=JSON_HEADERS), 400)
    assert stored_settings(store) == before


def test_reset_to_the_file_value_and_the_file_value_is_not_stored(admin, store):
    admin.patch("/settings", json={"smtp_host": "mail.db.example", "smtp_port": 2525})
    answer = admin.delete("/settings/smtp_host")
    assert answer.status_code == 200
    host = answer.get_json()["settings"]["smtp_host"]
    assert (host["value"], host["source"]) == ("mail.file.example", "file")
    assert set(stored_settings(store)) == {"smtp_port"}
    # null resets too; a value typed as the file has it follows the file
    admin.patch("/settings", json={"smtp_port": None, "operators": ["file-ops@example.com"]})
    assert stored_settings(store) == {}
    unchanged = admin.patch("/settings", json={"smtp_host": "mail.file.example"})
    assert unchanged.get_json()["changed"] is False
    body = error_of(admin.delete("/settings/colour"), 404)
    assert "smtp_host" in body["error"]
    actions = [e["action"] for e in store.audit.find({"target": "settings:alerts"})]
    assert actions == ["settings.alerts"] * 3


# --- audit ------------------------------------------------------------------------------------


def test_the_audit_log_is_filtered_and_paged_newest_first(admin, viewer, store):
    for name in ("a1", "a2", "a3"):
        assert (
            admin.post("/users", json={"username": name, "password": "p" * 12}).status_code == 201
        )
    admin.patch("/users/a2", json={"role": "operator"})
    answer = viewer.get("/audit")
    assert answer.status_code == 200
    page = answer.get_json()
    actions = [(e["action"], e["target"]) for e in page["items"]]
    assert actions[:4] == [
        ("user.role", "user:a2"),
        ("user.create", "user:a3"),
        ("user.create", "user:a2"),
        ("user.create", "user:a1"),
    ]
    role = page["items"][0]
    assert role["actor"] == "root" and role["changes"] == [
        {"key": "role", "old": "viewer", "new": "operator"}
    ]
    assert role["before"] == {"role": "viewer"} and role["after"] == {"role": "operator"}

    assert viewer.get("/audit?action=user.role").get_json()["total"] == 1
    assert viewer.get("/audit?action=user.").get_json()["total"] == 4
    assert viewer.get("/audit?target=user:a1").get_json()["total"] == 1
    assert viewer.get("/audit?actor=root&action=user.create").get_json()["total"] == 3
    assert viewer.get("/audit?actor=nobody").get_json()["items"] == []

    first = viewer.get("/audit?action=user.&per_page=3").get_json()
    second = viewer.get("/audit?action=user.&per_page=3&page=2").get_json()
    assert (first["total"], len(first["items"]), len(second["items"])) == (4, 3, 1)
    assert second["items"][0]["target"] == "user:a1"

    now = datetime.now(timezone.utc)
    future = (now + timedelta(hours=1)).isoformat()
    assert viewer.get("/audit", query_string={"since": future}).get_json()["total"] == 0
    past = (now - timedelta(hours=1)).isoformat()
    assert (
        viewer.get("/audit", query_string={"since": past, "action": "user."}).get_json()["total"]
        == 4
    )
    assert viewer.get("/audit", query_string={"until": past}).get_json()["total"] == 0


def test_bad_audit_filters_are_422_naming_them(viewer):
    body = error_of(viewer.get("/audit?per_page=0&since=yesterday"), 422)
    assert set(paths_of(body)) == {"per_page", "since"}
    body = error_of(viewer.get("/audit?since=2026-01-02T00:00&until=2026-01-01T00:00"), 422)
    assert paths_of(body) == ["until"]


# --- generated input (schemathesis) against the admin routes, as an admin --------------------

ADMIN_FUZZ_TOKEN = "ct_" + secrets.token_urlsafe(32)
ADMIN_FUZZ = schemathesis.openapi.from_dict(
    document(api),
    config=schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"bearer": {"bearer": ADMIN_FUZZ_TOKEN}}},
            "dictionaries": {
                "users": {"values": ["op1", "root"]},
                "settings": {"values": ["smtp_host", "webhooks", "smtp_password"]},
            },
            "parameters": {
                "path.username": {"dictionary": "users", "probability": 0.5},
                "path.key": {"dictionary": "settings", "probability": 0.5},
            },
        }
    ),
).include(path_regex="^/api/v1/(users|settings|audit)")


@pytest.fixture
def fuzz_admin_app(store):
    app = make_web_app(store, None, file_config(), users=[ADMIN, OPERATOR, VIEWER])
    doc = Users(store).get(ADMIN.name)
    doc["tokens"] = [{"id": "fuzz0001", "name": "fuzz", "hash": token_hash(ADMIN_FUZZ_TOKEN)}]
    store.users.replace_one({"_id": doc["_id"]}, doc)
    return app


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@ADMIN_FUZZ.parametrize()
@settings(
    max_examples=int(os.environ.get("CLOUDTASK_FUZZ_EXAMPLES", "30")),
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_admin_input_makes_a_500_or_an_undocumented_answer(case, fuzz_admin_app):
    case.operation.schema.app = fuzz_admin_app
    case.call_and_validate(base_url="http://localhost", app=fuzz_admin_app, checks=FUZZ_CHECKS)


# --- one's own tokens -------------------------------------------------------------------------


def test_any_user_makes_lists_and_revokes_their_own_tokens_from_a_password_login(app, store):
    import re

    client = app.test_client()
    assert post_login(client, VIEWER.name, VIEWER.password).status_code == 302
    page = client.get("/").get_data(as_text=True)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page)[1]
    session = Api(client)
    made = session.post(
        "/me/tokens",
        json={"name": "laptop", "read_only": True},
        headers={"X-CSRF-Token": csrf},
    )
    assert made.status_code == 201, made.get_data(as_text=True)
    body = made.get_json()
    assert body["username"] == VIEWER.name and body["scope"] == "read"
    assert made.headers["Cache-Control"] == "no-store"
    # the token works, with the viewer's role, and lists its owner's tokens only
    mine = Api(app.test_client(), body["token"])
    assert mine.get("/me").get_json()["role"] == "viewer"
    items = mine.get("/me/tokens").get_json()["items"]
    assert sorted(t["name"] for t in items) == ["laptop", "tests"]
    assert not any("token" in t for t in items) and body["token"] not in json.dumps(items)
    # a token makes no token (not even an admin's): a password login does
    admin = Api(app.test_client(), app.tokens["admin"])
    refused = error_of(admin.post("/me/tokens", json={"name": "more"}), 403)
    assert "cannot make API tokens" in refused["error"]
    # nobody revokes another user's token here
    others = Users(store).list_tokens(OPERATOR.name)
    error_of(session.delete(f"/me/tokens/{others[0]['id']}", headers={"X-CSRF-Token": csrf}), 404)
    assert len(Users(store).list_tokens(OPERATOR.name)) == 1
    gone = session.delete(f"/me/tokens/{body['id']}", headers={"X-CSRF-Token": csrf})
    assert gone.status_code == 200 and gone.get_json()["revoked"]["name"] == "laptop"
    assert mine.get("/me").status_code == 401
    assert "token.create" in audit_text(store) and "token.revoke" in audit_text(store)


def test_an_admin_sends_a_test_mail_through_the_api(admin, op, store, smtp):
    changed = admin.patch(
        "/settings",
        json={"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "smtp_security": "none"},
    )
    assert changed.status_code == 200, changed.get_data(as_text=True)
    answer = admin.post("/settings/test-mail", json={"to": "me@example.com"})
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["sent"] is True and body["to"] == "me@example.com"
    assert body["message"].startswith("Test mail sent to me@example.com through 127.0.0.1:")
    ((rcpts, msg),) = smtp.inbox.messages()
    assert rcpts == ["me@example.com"] and msg["Subject"].startswith("[CloudTask] TEST")
    # a refused send is the test's answer, not an error of the request
    admin.patch("/settings", json={"smtp_port": 1})
    failed = admin.post("/settings/test-mail", json={"to": "me@example.com"}).get_json()
    assert failed["sent"] is False and "not sent" in failed["message"]
    assert len(smtp.inbox.messages()) == 1
    assert paths_of(error_of(admin.post("/settings/test-mail", json={"to": "nobody"}), 422)) == [
        "to"
    ]
    assert paths_of(error_of(admin.post("/settings/test-mail", json={}), 422)) == ["to"]
    error_of(op.post("/settings/test-mail", json={"to": "me@example.com"}), 403)
    assert audit_text(store).count("settings.test_mail") == 2

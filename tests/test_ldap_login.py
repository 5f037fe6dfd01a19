"""Login through an LDAP directory (``auth.ldap``), against a real OpenLDAP server (Debian's
``slapd``, started by each test in a folder of its own: tests/slapd.py) and the site on a
real MongoDB wire server.

A directory user logs in with the role their group maps to (a local record is made, with no
password); a wrong password is refused like any other; a user in no mapped group is refused
with a message saying so; a user removed from the group or deleted from the directory loses
access at the next login and their sessions end, and so do their sessions and API tokens at
the next re-check (every ``auth.ldap.recheck_interval``); local accounts keep working and are
never taken over by a directory entry of the same name; StartTLS and LDAPS with the
directory's CA work and an untrusted certificate is a clear error; a directory that is down
is a clear error (503) that logs no one out; a bad setting names its key.
"""

from __future__ import annotations

import json
import time

import pytest
from helpers import ADMIN, form_csrf, make_web_app, post_login, web_login
from slapd import (
    GROUPS,
    MISSING,
    PEOPLE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    Slapd,
    group,
    person,
)

from cloudtask.authconfig import check_ldap
from cloudtask.config import Config, load_config
from cloudtask.exceptions import ConfigError
from cloudtask.users import Users

pytestmark = [
    pytest.mark.external,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
    pytest.mark.timeout(120),
]

PASSWORDS = {
    "alice": "alice directory pass",
    "bob": "bob directory pass",
    "carol": "carol directory pass",
    "dave": "dave directory pass",
    "root": "root directory pass",  # the name of a local admin: never taken over
}
ROLE_MAP = {
    "cloudtask-admins": "admin",
    "cn=cloudtask-operators,ou=groups,dc=example,dc=org": "operator",  # by DN, too
    "cloudtask-viewers": "viewer",
}
SECRET_ENV = "CLOUDTASK_TEST_LDAP_BIND_PASSWORD"


def directory_ldif() -> str:
    people = "\n".join(person(uid, password) for uid, password in PASSWORDS.items())
    groups = "\n".join(
        [
            group("cloudtask-admins", "carol", "root"),
            group("cloudtask-operators", "alice"),
            group("cloudtask-viewers", "bob", "alice"),
            group("other-team", "dave"),
        ]
    )
    return people + "\n" + groups


@pytest.fixture
def slapd(tmp_path):
    server = Slapd(tmp_path / "slapd").start(directory_ldif())
    yield server
    server.stop()


def ldap_config(server: Slapd, **over) -> Config:
    setting = {
        "servers": [server.url],
        "bind_dn": SERVICE_DN,
        "bind_password": f"env:{SECRET_ENV}",
        "base_dn": PEOPLE,
        "group_base_dn": GROUPS,
        "role_map": ROLE_MAP,
        "timeout": "3s",
        **over,
    }
    return Config().with_section("auth", ldap=check_ldap(setting))


@pytest.fixture
def app(store, slapd, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SERVICE_PASSWORD)
    return make_web_app(store, config=ldap_config(slapd), users=[ADMIN])


def login(app, name: str, password: str | None = None):
    """A new browser: (its client, the login's answer)."""
    client = app.test_client()
    answer = post_login(client, name, PASSWORDS[name] if password is None else password)
    return client, answer


def logged_in_as(client) -> str | None:
    """Who the site says this browser is (None: sent to the login page)."""
    answer = client.get("/api/v1/me")
    return answer.get_json()["username"] if answer.status_code == 200 else None


def audit(store, action: str) -> list[dict]:
    return list(store.audit.find({"action": action}).sort("at", 1))


def sessions_of(store, name: str) -> int:
    return store.db["sessions"].count_documents({"user": name})


def test_directory_users_log_in_with_the_role_of_their_groups(app, store):
    client, answer = login(app, "alice")
    assert answer.status_code == 302
    me = client.get("/api/v1/me").get_json()
    assert me == {"username": "alice", "role": "operator"}  # operators (by DN) beat viewers
    doc = store.users.find_one({"_id": "alice"})
    assert doc["source"] == "ldap" and doc["subject"] == f"uid=alice,{PEOPLE}"
    assert "password_hash" not in doc  # the directory keeps the password
    assert PASSWORDS["alice"] not in repr(list(store.audit.find())) + repr(doc)
    assert sorted(doc["groups"]) == ["cloudtask-viewers", f"cn=cloudtask-operators,{GROUPS}"]
    created = audit(store, "user.create")
    assert created[0]["actor"] == "(ldap)" and created[0]["after"]["role"] == "operator"
    logins = audit(store, "auth.login")
    assert logins[-1]["target"] == "user:alice" and logins[-1]["after"]["via"] == "ldap"

    carol, answer = login(app, "carol")
    assert carol.get("/api/v1/me").get_json() == {"username": "carol", "role": "admin"}
    assert carol.get("/users").status_code == 200  # an admin page
    bob, _ = login(app, "bob")
    assert bob.get("/api/v1/me").get_json()["role"] == "viewer"

    # the directory's name is the record's, whatever case was typed; a second login updates it
    again, answer = login(app, "alice")
    assert answer.status_code == 302 and logged_in_as(again) == "alice"
    assert store.users.count_documents({"source": "ldap"}) == 3
    assert logged_in_as(client) == "alice"  # the first session goes on


def test_a_wrong_or_empty_password_is_refused_like_any_other(app, store):
    answers = [login(app, "alice", password) for password in ("not her password", "")]
    stranger = app.test_client()
    answers.append((stranger, post_login(stranger, "nobody", "some password 1")))
    for client, answer in answers:
        assert answer.status_code == 401
        assert "Wrong user name or password." in answer.get_data(as_text=True)
        assert logged_in_as(client) is None
    assert store.users.find_one({"_id": "alice"}) is None  # nothing made for a failure
    failures = audit(store, "auth.login_failed")
    assert len(failures) == 3
    assert "not her password" not in repr(failures)


def test_a_user_in_no_mapped_group_is_refused_with_a_clear_message(app, store):
    client, answer = login(app, "dave")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 403
    assert "in no group that gives access to CloudTask" in page
    assert "Traceback" not in page
    assert logged_in_as(client) is None
    assert store.users.find_one({"_id": "dave"}) is None
    refused = audit(store, "auth.login_refused")
    assert refused[0]["after"]["reason"] == "no mapped group"
    assert refused[0]["after"]["via"] == "ldap"


def test_a_user_removed_from_their_groups_loses_access_and_their_sessions_end(app, store, slapd):
    first, _ = login(app, "alice")
    second, _ = login(app, "alice")
    assert logged_in_as(first) == logged_in_as(second) == "alice"
    assert sessions_of(store, "alice") == 2
    token = Users(store).create_token("alice", "script")

    slapd.remove_member("cloudtask-operators", "alice")  # still a viewer: the role goes down
    third, answer = login(app, "alice")
    assert answer.status_code == 302
    assert third.get("/api/v1/me").get_json()["role"] == "viewer"
    assert logged_in_as(first) is None and logged_in_as(second) is None  # a new role: ended
    assert audit(store, "user.role")[-1]["after"] == {"role": "viewer"}

    slapd.remove_member("cloudtask-viewers", "alice")  # in no mapped group now
    fourth, answer = login(app, "alice")
    assert answer.status_code == 403
    assert "in no group that gives access" in answer.get_data(as_text=True)
    assert logged_in_as(third) is None  # every session of hers ended at that login
    assert sessions_of(store, "alice") == 0
    api = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert api.status_code == 401  # and her API token no longer works
    revoked = audit(store, "auth.access_revoked")
    assert revoked[-1]["target"] == "user:alice"
    assert revoked[-1]["after"] == {"reason": "in no mapped group", "during": "login"}


def test_a_user_deleted_from_the_directory_loses_access_and_their_sessions_end(app, store, slapd):
    client, _ = login(app, "bob")
    assert logged_in_as(client) == "bob"
    slapd.delete(f"uid=bob,{PEOPLE}")
    other, answer = login(app, "bob")
    assert answer.status_code == 401  # the directory no longer knows the name
    assert logged_in_as(client) is None  # and the login that found that out ended her session
    assert sessions_of(store, "bob") == 0
    assert store.users.find_one({"_id": "bob"})["refused"]["reason"] == (
        "no longer in the directory"
    )
    assert audit(store, "auth.access_revoked")[-1]["after"]["during"] == "login"


def test_sessions_and_tokens_are_rechecked_against_the_directory(app, store, slapd):
    """No login needed: a session (or an API token) whose last check is older than
    auth.ldap.recheck_interval is checked again, and ends when the directory dropped its
    user."""
    alice, _ = login(app, "alice")
    carol, _ = login(app, "carol")
    token = Users(store).create_token("carol", "script")
    bearer = {"Authorization": f"Bearer {token}"}
    checked = store.users.find_one({"_id": "alice"})["checked_at"]
    assert abs(checked - time.time()) < 30

    slapd.remove_member("cloudtask-operators", "alice")
    slapd.remove_member("cloudtask-viewers", "alice")
    slapd.delete(f"uid=carol,{PEOPLE}")
    assert logged_in_as(alice) == "alice"  # checked less than 15 minutes ago: not yet
    assert app.test_client().get("/api/v1/me", headers=bearer).status_code == 200

    store.users.update_many({}, {"$set": {"checked_at": time.time() - 16 * 60}})
    assert logged_in_as(alice) is None
    assert app.test_client().get("/api/v1/me", headers=bearer).status_code == 401
    assert logged_in_as(carol) is None
    assert sessions_of(store, "alice") == sessions_of(store, "carol") == 0
    reasons = {e["target"]: e["after"] for e in audit(store, "auth.access_revoked")}
    assert reasons["user:alice"] == {"reason": "in no mapped group", "during": "re-check"}
    assert reasons["user:carol"] == {"reason": "no longer in the directory", "during": "re-check"}

    # put back in a group, she logs in again (and is no longer refused)
    slapd.modify(
        f"dn: cn=cloudtask-viewers,{GROUPS}\nchangetype: modify\nadd: member\n"
        f"member: uid=alice,{PEOPLE}\n"
    )
    again, answer = login(app, "alice")
    assert answer.status_code == 302 and again.get("/api/v1/me").get_json()["role"] == "viewer"
    assert "refused" not in store.users.find_one({"_id": "alice"})


def test_local_accounts_keep_working_and_are_never_taken_over(app, store, slapd):
    # "root" is a local admin, and the directory has a "root" too, in the admins' group
    client, answer = login(app, "root", ADMIN.password)
    assert answer.status_code == 302
    assert client.get("/api/v1/me").get_json() == {"username": "root", "role": "admin"}
    intruder, answer = login(app, "root")  # the directory's password for "root"
    assert answer.status_code == 401
    assert logged_in_as(intruder) is None
    assert "source" not in store.users.find_one({"_id": "root"})
    # a local admin still logs in while the directory is down
    slapd.stop()
    client, answer = login(app, "root", ADMIN.password)
    assert answer.status_code == 302 and logged_in_as(client) == "root"


def test_a_directory_that_is_down_is_a_clear_error_and_logs_no_one_out(app, store, slapd):
    alice, _ = login(app, "alice")
    slapd.stop()
    client, answer = login(app, "bob")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 503
    assert "The directory (LDAP) cannot be reached right now" in page
    assert "Traceback" not in page and "Connection refused" not in page
    failure = audit(store, "auth.login_failed")[-1]
    assert failure["after"]["reason"] == "directory unavailable"
    # a session due for its re-check goes on while the directory cannot be asked
    store.users.update_one({"_id": "alice"}, {"$set": {"checked_at": time.time() - 3600}})
    assert logged_in_as(alice) == "alice"
    assert sessions_of(store, "alice") == 1


def test_directory_users_have_no_password_here(app, store):
    client, _ = login(app, "alice")
    csrf = web_login(client, "alice", PASSWORDS["alice"])
    page = client.get("/account/password").get_data(as_text=True)
    assert "the directory (LDAP), which keeps its password" in page
    answer = client.post(
        "/account/password",
        data={"csrf_token": csrf, "current": PASSWORDS["alice"], "new": "a new password 1"},
    )
    assert answer.status_code == 400
    assert "password_hash" not in store.users.find_one({"_id": "alice"})
    with pytest.raises(Exception, match="kept by the directory"):
        Users(store).set_password("alice", "a new password 1")
    # a password stored by hand is never accepted for a directory user
    from werkzeug.security import generate_password_hash

    store.users.update_one(
        {"_id": "alice"}, {"$set": {"password_hash": generate_password_hash("planted pass 1")}}
    )
    _, answer = login(app, "alice", "planted pass 1")
    assert answer.status_code == 401


def test_an_admin_disabling_a_directory_user_keeps_them_out(app, store):
    login(app, "bob")
    Users(store).set_enabled("bob", False)
    client, answer = login(app, "bob")
    assert answer.status_code == 403
    assert "disabled" in answer.get_data(as_text=True)
    assert logged_in_as(client) is None
    assert store.users.find_one({"_id": "bob"})["enabled"] is False


@pytest.mark.parametrize("how", ["start_tls", "ldaps"])
def test_tls_with_the_directorys_ca_and_an_untrusted_certificate(store, slapd, monkeypatch, how):
    monkeypatch.setenv(SECRET_ENV, SERVICE_PASSWORD)
    over = {"start_tls": True} if how == "start_tls" else {"servers": [slapd.ldaps_url]}
    trusted = make_web_app(store, config=ldap_config(slapd, ca_file=slapd.ca_file, **over))
    client, answer = login(trusted, "alice")
    assert answer.status_code == 302 and logged_in_as(client) == "alice"
    untrusted = make_web_app(store, config=ldap_config(slapd, **over))  # the system's CAs
    client, answer = login(untrusted, "bob")
    assert answer.status_code == 503
    assert "cannot be reached" in answer.get_data(as_text=True)
    failure = audit(store, "auth.login_failed")[-1]
    assert failure["after"]["reason"] == "directory unavailable"


def test_groups_listed_on_the_users_entry(store, tmp_path, monkeypatch):
    """group_attribute (memberOf, kept by slapd's memberof overlay) instead of a group
    search; a group counts by its DN or its name."""
    server = Slapd(tmp_path / "memberof").start(directory_ldif(), memberof=True)
    try:
        monkeypatch.setenv(SECRET_ENV, SERVICE_PASSWORD)
        config = ldap_config(server, group_base_dn="", group_attribute="memberOf")
        app = make_web_app(store, config=config, users=[])
        for name, role in (("carol", "admin"), ("alice", "operator"), ("bob", "viewer")):
            client, answer = login(app, name)
            assert answer.status_code == 302, name
            assert client.get("/api/v1/me").get_json() == {"username": name, "role": role}
        _, answer = login(app, "dave")
        assert answer.status_code == 403
    finally:
        server.stop()


def test_bind_with_a_dn_template_and_no_service_account(store, slapd):
    config = Config().with_section(
        "auth",
        ldap=check_ldap(
            {
                "servers": [slapd.url],
                "user_dn_template": f"uid={{username}},{PEOPLE}",
                "group_base_dn": GROUPS,
                "role_map": ROLE_MAP,
            }
        ),
    )
    app = make_web_app(store, config=config, users=[])
    client, answer = login(app, "carol")
    assert answer.status_code == 302
    assert client.get("/api/v1/me").get_json() == {"username": "carol", "role": "admin"}
    _, answer = login(app, "carol", "wrong password 1")
    assert answer.status_code == 401
    client = app.test_client()  # a name with filter and DN characters is only a name
    answer = client.post(
        "/login",
        data={"username": "*)(uid=*", "password": "x", "csrf_token": form_csrf(client)},
    )
    assert answer.status_code == 401


def test_bad_settings_name_their_key(store, slapd, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"auth.ldap.bind_password names .*{SECRET_ENV}"):
        make_web_app(store, config=ldap_config(slapd))
    no_roles = {"servers": [slapd.url], "base_dn": PEOPLE, "group_base_dn": GROUPS}
    with pytest.raises(ConfigError, match=r"CLOUDTASK_AUTH_LDAP at \.role_map: required"):
        load_config(environ={"CLOUDTASK_AUTH_LDAP": json.dumps(no_roles)})
    monkeypatch.setenv(SECRET_ENV, "not the service password")
    app = make_web_app(store, config=ldap_config(slapd), users=[ADMIN])
    client, answer = login(app, "alice")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 503 and "an admin must check auth.ldap" in page
    client, answer = login(app, "root", ADMIN.password)  # local accounts still log in
    assert answer.status_code == 302

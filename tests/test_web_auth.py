"""The web site's login, sessions, CSRF, throttling, API tokens and role checks (Flask's test
client on a real store)."""

from __future__ import annotations

import pytest
from helpers import VIEWER, form_csrf, make_web_app, post_login

from cloudtask.users import Users
from web.auth import requires


@pytest.fixture
def app(store):
    app = make_web_app(store, users=[("admin1", "admin passphrase", "admin"), VIEWER])

    @requires("operator")
    def operator_only():
        return {"ok": True}

    app.add_url_rule("/api/v1/operator-only", "operator_only", operator_only)
    return app


def test_anonymous_is_refused_everywhere_but_login_and_health(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/login").status_code == 200
    page = client.get("/")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    api = client.get("/api/v1/me")
    assert api.status_code == 401 and "Bearer" in api.get_json()["error"]
    assert client.get("/account/password").status_code == 302


def test_login_session_and_logout(client):
    answer = post_login(client, "admin1", "admin passphrase")
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/")
    cookie = answer.headers.get("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "admin1" in client.get("/").get_data(as_text=True)
    assert client.get("/api/v1/me").get_json() == {"username": "admin1", "role": "admin"}
    assert client.post("/logout").status_code == 400  # no CSRF token: refused
    assert client.post("/logout", data={"csrf_token": form_csrf(client, "/")}).status_code == 302
    assert client.get("/").status_code == 302


def test_wrong_password_and_missing_csrf(client):
    assert post_login(client, "admin1", "not the password").status_code == 401
    no_token = client.post("/login", data={"username": "admin1", "password": "admin passphrase"})
    assert no_token.status_code == 400 and "security token" in no_token.get_data(as_text=True)


def test_login_is_throttled_after_five_failures(client):
    for _ in range(5):
        assert post_login(client, "admin1", "wrong guess!!").status_code == 401
    assert post_login(client, "admin1", "admin passphrase").status_code == 429
    assert (
        post_login(client, "viewer1", "viewer passphrase").status_code == 302
    )  # other users unaffected


def test_next_never_leaves_the_site(client):
    answer = client.post(
        "/login?next=//evil.example/x",
        data={
            "username": "admin1",
            "password": "admin passphrase",
            "csrf_token": form_csrf(client),
        },
    )
    assert answer.headers["Location"] == "/"


def test_bearer_tokens_and_roles(client, store):
    token = Users(store).create_token("viewer1", "test")
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/me", headers=headers).get_json()["username"] == "viewer1"
    assert client.get("/api/v1/me", headers={"Authorization": "Bearer nope"}).status_code == 401
    refused = client.get("/api/v1/operator-only", headers=headers)
    assert refused.status_code == 403 and "operator" in refused.get_json()["error"]
    admin = Users(store).create_token("admin1", "test")
    assert (
        client.get(
            "/api/v1/operator-only", headers={"Authorization": f"Bearer {admin}"}
        ).status_code
        == 200
    )


def test_change_own_password(client, store):
    post_login(client, "viewer1", "viewer passphrase")
    token = form_csrf(client, "/account/password")
    bad = client.post(
        "/account/password",
        data={"current": "wrong one!!", "new": "another passphrase", "csrf_token": token},
    )
    assert bad.status_code == 400
    ok = client.post(
        "/account/password",
        data={"current": "viewer passphrase", "new": "another passphrase", "csrf_token": token},
    )
    assert ok.status_code == 302
    assert Users(store).authenticate("viewer1", "another passphrase")

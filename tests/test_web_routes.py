"""Every route of the site, found in the app's URL map: anonymous users are refused (a
redirect to the login page, 401 on the API) except on the login page, the health checks and
the http-task callbacks; viewers get 403 on every write; a browser write without the CSRF
token is refused. New routes are covered without editing this file."""

from __future__ import annotations

import re

import pytest
from helpers import VIEWER, make_web_app, web_login

OPEN = {"auth.login", "healthz", "metrics.readyz", "static", "api.run_progress", "api.run_result"}
# a viewer's own session, password and API tokens
VIEWER_WRITES = {
    "auth.logout",
    "auth.change_password",
    "api.create_my_token",
    "api.revoke_my_token",
}
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
def app(store):
    return make_web_app(store, users=[VIEWER])


def routes(app):
    """(endpoint, method, url) for every rule, with made-up values for its arguments."""
    out = []
    for rule in app.url_map.iter_rules():
        url = rule.rule
        for arg in rule.arguments:
            url = re.sub(rf"<(?:[^:>]+:)?{arg}>", "x1", url)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((rule.endpoint, method, url))
    return out


def test_the_site_has_the_areas_of_the_issue(app):
    endpoints = {endpoint for endpoint, _, _ in routes(app)}
    for wanted in ("dashboard.index", "tasks.index", "runs.index", "cluster.index"):
        assert wanted in endpoints
    assert any(e.startswith("api.") for e in endpoints)
    assert len(endpoints) > 10


def test_anonymous_users_are_refused_everywhere_else(app):
    client = app.test_client()
    checked = 0
    for endpoint, method, url in routes(app):
        if endpoint in OPEN:
            continue
        answer = client.open(url, method=method, headers={"X-CSRF-Token": "none"})
        if url.startswith("/api/"):
            assert answer.status_code == 401, (method, url, answer.status_code)
            assert answer.is_json and answer.get_json()["error"], (method, url)
        elif method == "GET":
            assert answer.status_code == 302, (method, url, answer.status_code)
            assert "/login" in answer.headers["Location"], (method, url)
        else:  # a browser write without a session: no CSRF token can match, so 400 first
            assert answer.status_code in (302, 400), (method, url, answer.status_code)
        checked += 1
    assert checked > 10


def test_callbacks_need_the_run_token(app):
    client = app.test_client()
    for path in ("/api/v1/runs/x1/progress", "/api/v1/runs/x1/result"):
        answer = client.post(path, json={"percent": 5, "status": "succeeded"})
        assert answer.status_code in (401, 404), (path, answer.status_code)
        answer = client.post(path, json={}, headers={"X-CloudTask-Token": "wrong"})
        assert answer.status_code in (401, 404), (path, answer.status_code)


def test_viewers_get_403_on_every_write(app):
    client = app.test_client()
    csrf = web_login(client, "viewer1", "viewer passphrase")
    checked = 0
    for endpoint, method, url in routes(app):
        if method not in WRITE_METHODS or endpoint in OPEN | VIEWER_WRITES:
            continue
        answer = client.open(url, method=method, headers={"X-CSRF-Token": csrf}, json={})
        assert answer.status_code == 403, (method, url, answer.status_code)
        checked += 1
    assert checked > 5


def test_viewers_read_every_page(app, store):
    client = app.test_client()
    web_login(client, "viewer1", "viewer passphrase")
    for endpoint, method, url in routes(app):
        role = getattr(app.view_functions[endpoint], "required_role", None)
        admin_only = role == "admin" or endpoint.startswith(("admin.user", "settings."))
        if method != "GET" or endpoint in OPEN or "x1" in url or admin_only:
            continue
        answer = client.get(url)
        assert answer.status_code in (200, 302), (url, answer.status_code)


def test_a_write_without_the_csrf_token_is_refused(app):
    client = app.test_client()
    web_login(client, "viewer1", "viewer passphrase")
    for endpoint, method, url in routes(app):
        if method not in WRITE_METHODS or url.startswith("/api/") or endpoint in OPEN:
            continue
        answer = client.open(url, method=method, data={})
        assert answer.status_code == 400, (method, url, answer.status_code)
        assert "security token" in answer.get_data(as_text=True)

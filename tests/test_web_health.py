"""The web app factory and its health check, on a real MongoDB wire server: anonymous callers
(monitoring) get only ok or not ok, as the status code and ``{"status": ...}``; the details
(the version, and what failed, which names MongoDB's host and port) only a logged-in user."""

from __future__ import annotations

import pytest
from helpers import VIEWER, make_web_app, post_login

from cloudtask.config import Config
from cloudtask.localservers import MongoServer, free_port
from cloudtask.store import Store
from cloudtask.users import Users
from web import create_app


def test_healthz_ok_with_store(store):
    client = create_app(test_config={"STORE": store}).test_client()
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.get_json() == {"status": "ok"}  # nothing more for an anonymous caller


def test_healthz_unavailable_without_mongodb():
    port = free_port()
    cfg = Config().with_section("mongodb", uri=f"mongodb://127.0.0.1:{port}")
    answer = create_app(cfg).test_client().get("/healthz")
    assert answer.status_code == 503
    assert answer.get_json() == {"status": "unavailable"}
    text = answer.get_data(as_text=True)
    assert str(port) not in text and "127.0.0.1" not in text and "Topology" not in text


def test_healthz_details_are_for_logged_in_users(store):
    app = make_web_app(store, users=[VIEWER])
    client = app.test_client()
    assert post_login(client, VIEWER.name, VIEWER.password).status_code == 302
    body = client.get("/healthz").get_json()
    assert body["status"] == "ok" and body["version"]
    token = Users(store).create_token(VIEWER.name, "monitoring")
    by_token = app.test_client().get("/healthz", headers={"Authorization": f"Bearer {token}"})
    assert by_token.status_code == 200 and "version" in by_token.get_json()
    junk = app.test_client().get("/healthz", headers={"Authorization": "Bearer junk"})
    assert junk.status_code == 200 and junk.get_json() == {"status": "ok"}


@pytest.mark.external
@pytest.mark.timeout(120)
def test_healthz_with_mongodb_gone_says_only_unavailable_even_with_a_session(tmp_path):
    server = MongoServer(tmp_path / "mongo")
    server.start()
    try:
        store = Store(server.uri, "down", server_selection_timeout_ms=1000)
        app = make_web_app(store, users=[VIEWER])
        token = Users(store).create_token(VIEWER.name, "monitoring")
        client = app.test_client()
        assert post_login(client, VIEWER.name, VIEWER.password).status_code == 302
        server.stop()
        for answer in (
            client.get("/healthz"),
            app.test_client().get("/healthz", headers={"Authorization": f"Bearer {token}"}),
        ):
            assert answer.status_code == 503
            assert answer.get_json() == {"status": "unavailable"}
            assert str(server.port) not in answer.get_data(as_text=True)
    finally:
        server.stop()

"""The web app factory and its health check, on a real MongoDB wire server."""

from __future__ import annotations

from cloudtask.config import Config
from cloudtask.localservers import free_port
from web import create_app


def test_healthz_ok_with_store(store):
    client = create_app(test_config={"STORE": store}).test_client()
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.get_json()["status"] == "ok"


def test_healthz_unavailable_without_mongodb():
    cfg = Config().with_section("mongodb", uri=f"mongodb://127.0.0.1:{free_port()}")
    answer = create_app(cfg).test_client().get("/healthz")
    assert answer.status_code == 503
    body = answer.get_json()
    assert body["status"] == "unavailable" and "MongoDB" in body["error"]

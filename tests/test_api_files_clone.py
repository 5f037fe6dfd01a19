"""The REST API's task files and clone (Flask test client on a real store): one file with its
versions, the bytes of a version and of the latest (the same bytes, a download, a safe
name), rollback to an older version (audited, 409 when it is the latest, 422 for a version
not stored, 403 for viewers), and POST /tasks/{task}/clone (paused, with changes, the name
checked and taken, audited)."""

from __future__ import annotations

import hashlib

import pytest
from helpers import Api, error_of, make_web_app, paths_of

from cloudtask.operations import Operations
from cloudtask.users import Users

JSON_HEADERS = {"Content-Type": "application/json"}
SPEC = {
    "name": "backup",
    "schedule": {"cron": "0 3 * * *"},
    "command": ["sh", "-c", "echo hi"],
    "group": "default",
    "timeout": "10m",
}


@pytest.fixture
def app(store):
    app = make_web_app(store)
    users = Users(store)
    app.tokens = {  # type: ignore[attr-defined]
        "operator": users.create_token("op1", "tests"),
        "viewer": users.create_token("viewer1", "tests"),
    }
    return app


@pytest.fixture
def op(app):
    return Api(app.test_client(), app.tokens["operator"])


@pytest.fixture
def viewer(app):
    return Api(app.test_client(), app.tokens["viewer"])


def sha(data):
    return hashlib.sha256(data).hexdigest()


V1 = b"#!/bin/sh\necho one\n"
V2 = b"#!/bin/sh\necho two\n\x00\xff binary too\n"


@pytest.fixture
def two_versions(op):
    for data in (V1, V2):
        answer = op.post("/files?name=job.sh", data=data)
        assert answer.status_code == 201, answer.get_json()
    return sha(V1), sha(V2)


# --- versions and download --------------------------------------------------------------------


def test_a_files_versions_newest_first_with_pins_and_tasks(op, viewer, store, two_versions):
    v1, v2 = two_versions
    runs_file = {**SPEC, "command": "./job.sh", "file": "job.sh"}
    Operations(store).create_task("op1", {**runs_file, "name": "pinned", "file_version": v1})
    Operations(store).create_task("op1", {**runs_file, "name": "follower"})
    answer = viewer.get("/files/job.sh/versions")
    assert answer.status_code == 200
    versions = answer.get_json()["items"]
    assert [v["sha256"] for v in versions] == [v2, v1]
    assert [v["latest"] for v in versions] == [True, False]
    assert [v["size"] for v in versions] == [len(V2), len(V1)]
    assert versions[1]["pinned_by"] == ["pinned"] and versions[0]["pinned_by"] == []
    assert versions[0]["uploaded_by"] == "op1"

    detail = viewer.get("/files/job.sh").get_json()
    assert detail["latest"]["sha256"] == v2 and len(detail["versions"]) == 2
    assert {t["name"]: t["file_version"] for t in detail["tasks"]} == {
        "follower": None,
        "pinned": v1,
    }
    assert detail["total_tasks"] == 2
    error_of(viewer.get("/files/nothing.sh"), 404)
    error_of(viewer.get("/files/nothing.sh/versions"), 404)


def test_download_gives_the_exact_bytes_as_an_attachment(viewer, two_versions):
    v1, v2 = two_versions
    answer = viewer.get(f"/files/job.sh/versions/{v1}/download")
    assert answer.status_code == 200
    assert answer.get_data() == V1
    assert answer.mimetype == "application/octet-stream"
    assert answer.headers["Content-Disposition"] == "attachment; filename=job.sh"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["ETag"] == f'"{v1}"'
    latest = viewer.get("/files/job.sh/download")
    assert latest.status_code == 200 and latest.get_data() == V2
    assert sha(latest.get_data()) == v2

    error_of(viewer.get(f"/files/job.sh/versions/{'0' * 64}/download"), 404)
    error_of(viewer.get("/files/job.sh/versions/not-a-sha/download"), 404)
    error_of(viewer.get(f"/files/other.sh/versions/{v1}/download"), 404)
    error_of(viewer.get("/files/other.sh/download"), 404)


def test_a_downloaded_name_is_safe_in_the_header(op, viewer, store):
    name = "r\u00e9sum\u00e9 v1.sh"  # a name the store takes, with characters a header does not
    stored = Operations(store).put_file("op1", name, b"echo hi\n", keep=5)
    answer = viewer.get(f"/files/{name}/versions/{stored['sha256']}/download")
    assert answer.status_code == 200 and answer.get_data() == b"echo hi\n"
    disposition = answer.headers["Content-Disposition"]
    assert disposition == "attachment; filename=r_sum__v1.sh"
    assert disposition.isascii()


# --- rollback ---------------------------------------------------------------------------------


def test_rollback_makes_an_old_version_the_latest_again(op, viewer, store, two_versions):
    v1, v2 = two_versions
    answer = op.post("/files/job.sh/rollback", json={"sha256": v1.upper()})
    assert answer.status_code == 201, answer.get_json()
    new = answer.get_json()
    assert (new["sha256"], new["rolled_back_from"], new["latest"]) == (v1, v2, True)
    assert answer.headers["Location"] == "/api/v1/files/job.sh/versions"
    versions = viewer.get("/files/job.sh/versions").get_json()["items"]
    assert [v["sha256"] for v in versions] == [v1, v2, v1]
    assert viewer.get("/files/job.sh/download").get_data() == V1
    entry = store.audit.find_one({"action": "file.rollback"})
    assert (entry["actor"], entry["target"], entry["after"]["sha256"]) == ("op1", "file:job.sh", v1)

    body = error_of(op.post("/files/job.sh/rollback", json={"sha256": v1}), 409)
    assert "already the latest" in body["error"]
    body = error_of(op.post("/files/job.sh/rollback", json={"sha256": "f" * 64}), 422)
    assert paths_of(body) == ["sha256"]
    body = error_of(op.post("/files/job.sh/rollback", json={"sha256": "abc", "why": 1}), 422)
    assert set(paths_of(body)) == {"sha256", "why"}
    error_of(op.post("/files/job.sh/rollback", data="[]", headers=JSON_HEADERS), 400)
    error_of(op.post("/files/gone.sh/rollback", json={"sha256": v2}), 404)
    error_of(viewer.post("/files/job.sh/rollback", json={"sha256": v2}), 403)
    assert len(viewer.get("/files/job.sh/versions").get_json()["items"]) == 3


# --- clone ------------------------------------------------------------------------------------


def test_clone_makes_a_paused_copy_under_a_new_name(op, viewer, store):
    assert op.post("/tasks", json=SPEC).status_code == 201
    answer = op.post("/tasks/backup/clone", json={"name": "backup-copy"})
    assert answer.status_code == 201, answer.get_json()
    copy = answer.get_json()
    assert answer.headers["Location"] == f"/api/v1/tasks/{copy['id']}"
    assert (copy["name"], copy["enabled"], copy["state"]) == ("backup-copy", False, "paused")
    original = op.get("/tasks/backup").get_json()
    assert copy["id"] != original["id"] and original["enabled"] is True
    same = {k: v for k, v in copy["spec"].items() if k not in ("name", "enabled")}
    assert same == {k: v for k, v in original["spec"].items() if k not in ("name", "enabled")}
    entry = store.audit.find_one({"action": "task.clone"})
    assert (entry["actor"], entry["target"], entry["before"]) == (
        "op1",
        "task:backup-copy",
        {"from": "backup"},
    )

    # by id too, with changes, which may resume it
    answer = op.post(
        f"/tasks/{original['id']}/clone",
        json={"name": "backup-batch", "changes": {"group": "batch", "enabled": True}},
    )
    assert answer.status_code == 201, answer.get_json()
    copy = answer.get_json()
    assert (copy["group"], copy["enabled"], copy["spec"]["timeout"]) == ("batch", True, "10m")


def test_bad_clones_say_what_is_wrong_and_store_nothing(op, viewer, store):
    assert op.post("/tasks", json=SPEC).status_code == 201
    body = error_of(op.post("/tasks/backup/clone", json={"name": "backup"}), 409)
    assert paths_of(body) == ["name"]
    body = error_of(op.post("/tasks/backup/clone", json={"name": "no spaces"}), 422)
    assert paths_of(body) == ["name"]
    body = error_of(op.post("/tasks/backup/clone", json={"colour": "red"}), 422)
    assert set(paths_of(body)) == {"colour", "name"}
    body = error_of(
        op.post(
            "/tasks/backup/clone",
            json={"name": "copy2", "changes": {"schedule": {"cron": "61 * * * *"}}},
        ),
        422,
    )
    assert paths_of(body)[0].startswith("changes.schedule")
    body = error_of(
        op.post("/tasks/backup/clone", json={"name": "copy3", "changes": {"name": "x"}}), 422
    )
    assert paths_of(body) == ["changes.name"]
    error_of(op.post("/tasks/backup/clone", json={"name": "c", "changes": [1]}), 422)
    error_of(op.post("/tasks/backup/clone", data="", headers=JSON_HEADERS), 400)
    error_of(op.post("/tasks/nothing/clone", json={"name": "copy4"}), 404)
    error_of(viewer.post("/tasks/backup/clone", json={"name": "copy5"}), 403)
    assert store.tasks.count_documents({}) == 1

"""The file pages (Flask test client on a real store): upload as an operator (multipart, with
the browser's file name sanitised or a name given), errors next to their field (no file, bad
name, bad archive, too large), the list with the tasks using each file, a file's versions with
the latest and the pins marked, rollback, download of the exact bytes, and roles."""

from __future__ import annotations

import hashlib
import html
import io
import re
import zipfile

import pytest
from helpers import make_task, make_web_app

from cloudtask.config import Config

LIMIT = 2000  # web.max_upload_bytes of these tests' app


@pytest.fixture
def app(store):
    config = Config().with_section("web", max_upload_bytes=LIMIT, file_versions_kept=3)
    return make_web_app(store, config=config)


@pytest.fixture
def csrf_page():
    return "/files"


def upload(client, csrf, data: bytes | None, filename: str = "job.sh", name: str = ""):
    form = {"csrf_token": csrf, "name": name}
    if data is not None:
        form["file"] = (io.BytesIO(data), filename)
    return client.post("/files", data=form, content_type="multipart/form-data")


def text(answer) -> str:
    return html.unescape(answer.get_data(as_text=True))


def field_error(answer, field: str) -> str:
    found = re.search(rf'id="error-{field}">([^<]*)<', answer.get_data(as_text=True))
    assert found, f"no error shown at the {field} field"
    return html.unescape(found.group(1))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_with(member: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, b"x")
    return buf.getvalue()


def task(store, name, file, version=None):
    pinned = {"file_version": version} if version else {}
    return make_task(store, name, command=f"./{file}", file=file, **pinned)


# --- upload -----------------------------------------------------------------------------------


def test_operator_uploads_a_file_and_sees_it_listed(client, operator, store):
    answer = upload(client, operator, b"#!/bin/sh\necho hi\n", "hello.sh")
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/files/hello.sh")
    meta = store.latest_file("hello.sh")
    assert meta["sha256"] == sha(b"#!/bin/sh\necho hi\n") and meta["uploaded_by"] == "op1"
    # the flash message on the file's page
    assert f"version {meta['sha256'][:12]}" in text(client.get(answer.headers["Location"]))
    listed = text(client.get("/files"))
    assert "hello.sh" in listed and meta["sha256"][:12] in listed and "18\u00a0B" in listed
    audit = store.audit.find_one({"target": "file:hello.sh"})
    assert audit["actor"] == "op1" and audit["action"] == "file.upload"
    assert audit["after"]["sha256"] == meta["sha256"]


def test_the_name_field_overrides_and_the_browser_name_is_sanitised(client, operator, store):
    assert upload(client, operator, b"a", "job.sh", name="renamed.sh").status_code == 302
    assert upload(client, operator, b"b", "/home/me/win.sh").status_code == 302
    assert upload(client, operator, b"c", "../../etc/cron.sh").status_code == 302
    assert [f["name"] for f in store.list_files()] == ["cron.sh", "renamed.sh", "win.sh"]


@pytest.mark.parametrize(
    "filename, name, field, message",
    [
        (".bashrc", "", "file", "not a plain file name"),
        ("job.sh", "a/b", "name", "not a plain file name"),
        ("job.sh", "x..y", "name", "not a plain file name"),
        ("job.sh", ".hidden", "name", "no leading '.'"),
    ],
)
def test_bad_names_are_refused_with_a_message(
    client, operator, store, filename, name, field, message
):
    answer = upload(client, operator, b"x", filename, name=name)
    assert answer.status_code == 422
    assert message in field_error(answer, field)
    if field == "file":
        assert "give another name in the name field" in field_error(answer, field)
    assert store.list_files() == []


def test_no_file_chosen(client, operator):
    answer = upload(client, operator, None)
    assert answer.status_code == 400 and "choose a file" in field_error(answer, "file")
    # what a browser sends when the field is left empty: a part without a file name
    answer = upload(client, operator, b"", filename="")
    assert answer.status_code == 400 and "choose a file" in field_error(answer, "file")


def test_a_bad_archive_is_refused_naming_the_member(client, operator, store):
    answer = upload(client, operator, zip_with("../evil"), "pkg.zip", name="kept-name.zip")
    assert answer.status_code == 422
    assert "archive member '../evil' would land outside the run folder" in field_error(
        answer, "file"
    )
    assert 'value="kept-name.zip"' in answer.get_data(as_text=True)  # what was typed is kept
    assert store.list_files() == []


def test_size_limit(client, operator, store):
    # over web.max_upload_bytes, under the request limit: refused at the field
    answer = upload(client, operator, b"x" * (LIMIT + 1), "big.bin")
    assert answer.status_code == 422 and f"upload limit of {LIMIT} bytes" in field_error(
        answer, "file"
    )
    # far over: the request itself is refused (413) with the limit named, never a 500
    answer = upload(client, operator, b"x" * (LIMIT + 200 * 1024), "huge.bin")
    assert answer.status_code == 413 and "too large" in text(answer)
    assert upload(client, operator, b"x" * LIMIT, "fits.bin").status_code == 302
    assert [f["name"] for f in store.list_files()] == ["fits.bin"]


def test_the_same_bytes_again_add_no_version(client, operator, store):
    upload(client, operator, b"same", "s.sh")
    answer = upload(client, operator, b"same", "s.sh")
    assert answer.status_code == 302
    assert "latest version already" in text(client.get("/files/s.sh"))
    assert len(store.list_file_versions("s.sh")) == 1


def test_versions_beyond_the_configured_count_are_pruned(client, operator, store):
    for i in range(5):
        upload(client, operator, f"v{i}".encode(), "p.sh")
    assert [v["sha256"] for v in store.list_file_versions("p.sh")] == [
        sha(f"v{i}".encode()) for i in (4, 3, 2)
    ]


# --- the list and a file's page ---------------------------------------------------------------


def test_the_list_shows_the_tasks_using_each_file(client, viewer, store):
    store.put_file("used.sh", b"1")
    store.put_file("unused.sh", b"2")
    task(store, "follower", "used.sh")
    task(store, "pinner", "used.sh", sha(b"1"))
    page = text(client.get("/files"))
    row = re.search(r"<tr>\s*<td><a href=\"/files/used.sh\">.*?</tr>", page, re.S).group(0)
    assert "follower" in row and "pinner" in row and "pinned" in row
    row = re.search(r"<tr>\s*<td><a href=\"/files/unused.sh\">.*?</tr>", page, re.S).group(0)
    assert "none" in row
    assert 'type="file"' not in page  # a viewer gets no upload form


def test_file_page_lists_versions_latest_and_pins(client, viewer, store):
    for data in (b"one", b"two", b"three"):
        store.put_file("f.sh", data, uploaded_by="alice")
    task(store, "pins-one", "f.sh", sha(b"one"))
    task(store, "pins-two", "f.sh", sha(b"two"))
    task(store, "pins-two-too", "f.sh", sha(b"two"))
    task(store, "follows", "f.sh")
    task(store, "pins-gone", "f.sh", "d" * 64)
    task(store, "other-file", "other.sh")
    answer = client.get("/files/f.sh")
    assert answer.status_code == 200
    page = text(answer)
    rows = re.findall(
        r'<tr class="version( latest)?" data-sha256="([0-9a-f]+)">(.*?)</tr>', page, re.S
    )
    assert [r[1] for r in rows] == [sha(b"three"), sha(b"two"), sha(b"one")]
    assert [bool(r[0]) for r in rows] == [True, False, False]
    assert "latest" in rows[0][2] and "latest" not in rows[1][2]
    assert "pins-two" in rows[1][2] and "pins-two-too" in rows[1][2] and "pinned" in rows[1][2]
    assert "pins-one" in rows[2][2] and "pins-two" not in rows[2][2]
    assert "alice" in rows[0][2]
    assert "Roll back" not in page  # a viewer sees no rollback button
    tasks = re.search(r'id="file-tasks">(.*?)</section>', page, re.S).group(1)
    for name in ("pins-one", "pins-two", "follows", "pins-gone"):
        assert name in tasks
    assert "other-file" not in tasks and "not stored" in tasks
    assert f'the latest (<span class="mono">{sha(b"three")[:12]}' in tasks


def test_unknown_file_is_404(client, viewer):
    answer = client.get("/files/nope.sh")
    assert answer.status_code == 404 and "no stored file named 'nope.sh'" in text(answer)


# --- rollback ---------------------------------------------------------------------------------


def test_operator_rolls_back_to_an_older_version(client, operator, store):
    store.put_file("r.sh", b"old")
    store.put_file("r.sh", b"new")
    page = text(client.get("/files/r.sh"))
    assert page.count("Roll back to this") == 1  # only the older version has the button
    answer = client.post(
        "/files/r.sh/rollback", data={"csrf_token": operator, "sha256": sha(b"old")}
    )
    assert answer.status_code == 302
    assert store.latest_file("r.sh")["sha256"] == sha(b"old")
    page = text(client.get("/files/r.sh"))
    assert "is the latest again" in page and f"rollback (was {sha(b'new')[:12]})" in page
    audit = store.audit.find_one({"action": "file.rollback"})
    assert audit["actor"] == "op1" and audit["before"]["sha256"] == sha(b"new")


def test_rollback_errors_are_shown_on_the_page(client, operator, store):
    store.put_file("e.sh", b"a")
    store.put_file("e.sh", b"b")
    for form, status, message in [
        ({}, 422, "expected the sha256"),
        ({"sha256": "xyz"}, 422, "expected the sha256"),
        ({"sha256": "0" * 64}, 422, "has no stored version"),
        ({"sha256": sha(b"b")}, 409, "already the latest"),
    ]:
        answer = client.post("/files/e.sh/rollback", data={"csrf_token": operator, **form})
        assert answer.status_code == status, (form, answer.status_code)
        assert message in text(answer)
    answer = client.post(
        "/files/none.sh/rollback", data={"csrf_token": operator, "sha256": "0" * 64}
    )
    assert answer.status_code == 404


# --- download ---------------------------------------------------------------------------------


def test_download_returns_the_exact_bytes(client, viewer, store):
    data = bytes(range(256)) * 3
    old = store.put_file("bin ary;x.sh", b"\x00old")
    store.put_file("tool.bin", data)
    answer = client.get(f"/files/tool.bin/{sha(data)}/download")
    assert answer.status_code == 200 and answer.data == data
    assert answer.headers["Content-Disposition"].startswith("attachment")
    assert "filename=tool.bin" in answer.headers["Content-Disposition"]
    assert answer.headers["Content-Type"] == "application/octet-stream"
    # an unusual stored name gets a safe name in the header
    answer = client.get(f"/files/bin%20ary;x.sh/{old['sha256']}/download")
    assert answer.status_code == 200 and answer.data == b"\x00old"
    assert "filename=bin_ary_x.sh" in answer.headers["Content-Disposition"]
    assert client.get(f"/files/tool.bin/{'0' * 64}/download").status_code == 404
    assert client.get("/files/tool.bin/not-a-hash/download").status_code == 404
    # a version of another file is not served under this name
    assert client.get(f"/files/tool.bin/{old['sha256']}/download").status_code == 404


# --- roles ------------------------------------------------------------------------------------


def test_viewer_gets_403_on_upload_and_rollback(client, viewer, store):
    store.put_file("v.sh", b"1")
    store.put_file("v.sh", b"2")
    answer = upload(client, viewer, b"x", "sneaky.sh")
    assert answer.status_code == 403
    answer = client.post("/files/v.sh/rollback", data={"csrf_token": viewer, "sha256": sha(b"1")})
    assert answer.status_code == 403
    assert store.latest_file("v.sh")["sha256"] == sha(b"2")
    assert [f["name"] for f in store.list_files()] == ["v.sh"]


def test_upload_without_the_csrf_token_is_refused(client, operator, store):
    answer = client.post(
        "/files", data={"file": (io.BytesIO(b"x"), "x.sh")}, content_type="multipart/form-data"
    )
    assert answer.status_code == 400 and store.list_files() == []


def test_anonymous_is_sent_to_login(client, store):
    store.put_file("a.sh", b"1")
    for path in ("/files", "/files/a.sh", f"/files/a.sh/{sha(b'1')}/download"):
        answer = client.get(path)
        assert answer.status_code == 302 and "/login" in answer.headers["Location"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("job.sh", "job.sh"),
        ("C:\\Users\\me\\win.sh", "win.sh"),
        ("/home/me/pkg.tar.gz", "pkg.tar.gz"),
        ("../../etc/passwd", "passwd"),
        ("dir/", ""),
    ],
)
def test_client_file_names_keep_only_the_base_name(raw, expected):
    from web.files import client_file_name

    assert client_file_name(raw) == expected


def test_the_list_shows_counts_when_many_tasks_use_files(client, viewer, store, monkeypatch):
    import web.files

    monkeypatch.setattr(web.files, "LIST_TASKS_READ", 2)
    store.put_file("busy.sh", b"1")
    for i in range(3):
        task(store, f"t{i}", "busy.sh")
    page = text(client.get("/files"))
    row = re.search(r"<tr>\s*<td><a href=\"/files/busy.sh\">.*?</tr>", page, re.S).group(0)
    assert "3 tasks" in row and "t0" not in row
    detail = text(client.get("/files/busy.sh"))
    assert all(f"t{i}" in detail for i in range(3))

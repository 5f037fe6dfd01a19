"""Task files on a real store: versions (kept, pinned, the same bytes, rollback), archives
checked at upload, fetched by name or pinned hash, cached by hash, laid out per run, archives
unpacked only inside the run folder, and the `cloudtask file` commands."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import zipfile
from datetime import datetime

import pytest
from bson import ObjectId
from helpers import finished, start

from cloudtask.agent.executor import Executor
from cloudtask.agent.files import FileCache, TaskFileError
from cloudtask.exceptions import Conflict, NotFound, ValidationError


@pytest.fixture
def file_executor(store, writer, tmp_path):
    ex = Executor(
        agent_id="files-agent",
        log_dir=tmp_path / "logs",
        writer=writer,
        max_parallel=2,
        kill_grace=1.0,
        files=FileCache(store, tmp_path / "cache"),
        work_dir=tmp_path / "work",
    )
    yield ex
    ex.shutdown()


def zip_bytes(members: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (modes or {}).get(name, 0o100644) << 16
            zf.writestr(info, data)
    return buf.getvalue()


def test_script_runs_from_its_run_folder_and_folder_is_removed(store, file_executor, tmp_path):
    store.put_file("hello.sh", b'#!/bin/sh\necho "hi from $(basename $PWD) $CLOUDTASK_WORKDIR"\n')
    ctx = start(store, file_executor, {"command": "./hello.sh", "file": "hello.sh"})
    run = finished(store, ctx.run_id)
    assert run["status"] == "succeeded", run
    assert run["output_tail"].split()[:2] == ["hi", "from"]
    assert ctx.run_id in run["output_tail"]
    assert not (tmp_path / "work" / ctx.run_id).exists()
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_latest_version_runs(store, file_executor):
    store.put_file("v.sh", b"#!/bin/sh\necho one\n")
    store.put_file("v.sh", b"#!/bin/sh\necho two\n")
    run = finished(store, start(store, file_executor, {"command": "./v.sh", "file": "v.sh"}).run_id)
    assert run["output_tail"].strip() == "two"


def store_unchecked(store, name: str, data: bytes) -> None:
    """Store a version without the upload checks, as a version stored before they existed:
    the agent must still refuse to unpack a bad archive."""
    meta = {"version": 1, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    store.fs.put(data, filename=name, metadata={**meta, "uploaded_by": "old"})


def test_zip_package_is_unpacked_with_modes(store, file_executor):
    data = zip_bytes(
        {"pkg/run.sh": b"#!/bin/sh\ncat pkg/data.txt\n", "pkg/data.txt": b"payload\n"},
        {"pkg/run.sh": 0o100755},
    )
    store.put_file("pkg.zip", data)
    run = finished(
        store, start(store, file_executor, {"command": "pkg/run.sh", "file": "pkg.zip"}).run_id
    )
    assert run["status"] == "succeeded", run
    assert run["output_tail"].strip() == "payload"


def test_tar_gz_package(store, file_executor):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        script = b"print('from tar')\n"
        info = tarfile.TarInfo("job.py")
        info.size = len(script)
        tf.addfile(info, io.BytesIO(script))
    store.put_file("job.tar.gz", buf.getvalue())
    run = finished(
        store,
        start(
            store, file_executor, {"command": [sys.executable, "job.py"], "file": "job.tar.gz"}
        ).run_id,
    )
    assert run["output_tail"].strip() == "from tar"


@pytest.mark.parametrize("member", ["../escape.txt", "/etc/evil", "a/../../escape.txt"])
def test_zip_traversal_is_refused(store, file_executor, tmp_path, member):
    store_unchecked(store, "bad.zip", zip_bytes({member: b"x"}))
    run = finished(
        store, start(store, file_executor, {"command": ["true"], "file": "bad.zip"}).run_id
    )
    assert run["status"] == "failed"
    assert "outside the run folder" in run["error"]
    assert (
        not (tmp_path / "escape.txt").exists() and not (tmp_path / "work" / "escape.txt").exists()
    )


def test_tar_link_is_refused(store, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    store_unchecked(store, "link.tar.gz", buf.getvalue())
    with pytest.raises(TaskFileError, match="not a plain file"):
        FileCache(store, tmp_path / "c").lay_out("link.tar.gz", tmp_path / "run")


def test_missing_file_fails_the_run_with_a_message(store, file_executor):
    run = finished(
        store, start(store, file_executor, {"command": ["true"], "file": "nope.sh"}).run_id
    )
    assert run["status"] == "failed" and "nope.sh" in run["error"] and "upload" in run["error"]


def test_cache_is_keyed_by_content_hash(store, tmp_path):
    meta = store.put_file("c.sh", b"#!/bin/sh\necho ok\n")
    cache = FileCache(store, tmp_path / "cache")
    path, _ = cache.cached("c.sh")
    assert path.name == meta["sha256"] and path.read_bytes() == b"#!/bin/sh\necho ok\n"
    new = store.put_file("c.sh", b"#!/bin/sh\necho new\n")
    assert cache.cached("c.sh")[0].name == new["sha256"]


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x\ny"])
def test_bad_file_names_are_refused(store, name):
    with pytest.raises(ValidationError):
        store.put_file(name, b"x")


def test_cli_put_and_list(tmp_path, mongo_server, mongo_db_name):
    from click.testing import CliRunner

    from cloudtask.cli import cli

    script = tmp_path / "job.sh"
    script.write_text("echo hi\n")
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    put = CliRunner().invoke(cli, ["file", "put", str(script)], env=env)
    assert put.exit_code == 0 and "stored job.sh: 8 bytes" in put.output
    listed = CliRunner().invoke(cli, ["file", "list"], env=env)
    assert listed.output.startswith("job.sh\t8\t")
    bad = CliRunner().invoke(cli, ["file", "put", str(script), "--name", "../x"], env=env)
    assert bad.exit_code == 2 and "not a plain file name" in bad.output


# --- versions: kept, pinned, same bytes, rollback ---------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version(i: int) -> bytes:
    return f"#!/bin/sh\necho v{i}\n".encode()


def pin(store, task_name: str, file_name: str, sha256: str | None):
    spec = {"name": task_name, "schedule": {"every": "1h"}, "command": f"./{file_name}"}
    spec["file"] = file_name
    if sha256:
        spec["file_version"] = sha256
    return store.create_task(spec)


def test_21_uploads_keep_the_newest_20(store):
    for i in range(21):
        meta = store.put_file("r.sh", version(i), uploaded_by="op", keep=20)
        assert meta["created"] and meta["sha256"] == sha(version(i))
    versions = store.list_file_versions("r.sh")
    assert [v["sha256"] for v in versions] == [sha(version(i)) for i in range(20, 0, -1)]
    assert versions[0]["latest"] and not any(v["latest"] for v in versions[1:])
    assert versions[0]["uploaded_by"] == "op" and versions[0]["size"] == len(version(20))
    with pytest.raises(NotFound):
        store.get_file_by_hash(sha(version(0)))
    assert store.list_files()[0]["versions"] == 20


def test_a_pinned_old_version_survives_pruning(store):
    store.put_file("p.sh", version(0), keep=3)
    pin(store, "pins-v0", "p.sh", sha(version(0)))
    pin(store, "follows", "p.sh", None)
    for i in range(1, 6):
        store.put_file("p.sh", version(i), keep=3)
    kept = [v["sha256"] for v in store.list_file_versions("p.sh")]
    # the newest three, and the pinned v0; v1 and v2 are gone
    assert kept == [sha(version(5)), sha(version(4)), sha(version(3)), sha(version(0))]
    assert store.get_file_by_hash(sha(version(0))) == version(0)
    with pytest.raises(NotFound):
        store.get_file_by_hash(sha(version(1)))
    pins = {v["sha256"]: v["pinned_by"] for v in store.list_file_versions("p.sh")}
    assert pins[sha(version(0))] == ["pins-v0"] and pins[sha(version(5))] == []


def test_the_same_bytes_twice_are_one_version(store):
    first = store.put_file("same.sh", b"echo same\n")
    again = store.put_file("same.sh", b"echo same\n", uploaded_by="someone else")
    assert first["created"] and not again["created"]
    assert again["id"] == first["id"] and again["sha256"] == first["sha256"]
    assert len(store.list_file_versions("same.sh")) == 1
    # bytes equal to an older version (not the latest) are a new upload
    store.put_file("same.sh", b"echo other\n")
    assert store.put_file("same.sh", b"echo same\n")["created"]
    assert len(store.list_file_versions("same.sh")) == 3


def test_rollback_makes_an_old_version_the_latest_again(store):
    old = store.put_file("rb.sh", version(1), uploaded_by="alice")
    new = store.put_file("rb.sh", version(2), uploaded_by="alice")
    meta = store.rollback_file("rb.sh", old["sha256"], "bob")
    assert meta["sha256"] == old["sha256"] and meta["rolled_back_from"] == new["sha256"]
    assert store.latest_file("rb.sh")["sha256"] == old["sha256"]
    history = store.list_file_versions("rb.sh")
    assert [v["sha256"] for v in history] == [old["sha256"], new["sha256"], old["sha256"]]
    assert history[0]["uploaded_by"] == "bob" and history[0]["latest"]
    assert history[1]["rolled_back_from"] is None
    with pytest.raises(Conflict, match="already the latest"):
        store.rollback_file("rb.sh", old["sha256"], "bob")
    with pytest.raises(NotFound, match="no stored version"):
        store.rollback_file("rb.sh", "0" * 64, "bob")
    with pytest.raises(NotFound, match="no stored file"):
        store.rollback_file("nothing.sh", old["sha256"], "bob")


def test_rollback_history_is_pruned_like_uploads(store):
    a = store.put_file("h.sh", b"a", keep=2)
    store.put_file("h.sh", b"b", keep=2)
    store.rollback_file("h.sh", a["sha256"], "op", keep=2)
    assert [v["sha256"] for v in store.list_file_versions("h.sh")] == [sha(b"a"), sha(b"b")]


def test_size_limit(store):
    assert store.put_file("ten.bin", b"x" * 10, max_bytes=10)["size"] == 10
    with pytest.raises(ValidationError) as caught:
        store.put_file("eleven.bin", b"x" * 11, max_bytes=10)
    problem = caught.value.problems[0]
    assert problem.path == "file" and "upload limit of 10 bytes" in problem.message
    assert [f["name"] for f in store.list_files()] == ["ten.bin"]


# --- archives are checked at upload -----------------------------------------------------------


def tar_bytes(add, mode="w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        add(tf)
    return buf.getvalue()


def add_file(tf, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def add_symlink(tf, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tf.addfile(info)


def add_device(tf, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    tf.addfile(info)


BAD_ARCHIVES = {
    "zip with ../evil": ("evil.zip", zip_bytes({"ok.txt": b"x", "../evil": b"x"}), "'../evil'"),
    "zip with a nested ..": ("n.zip", zip_bytes({"a/../../evil": b"x"}), "'a/../../evil'"),
    "zip with a symlink": ("l.zip", zip_bytes({"ln": b"/etc"}, {"ln": 0o120777}), "'ln' is a link"),
    "tar with an absolute path": (
        "abs.tar.gz",
        tar_bytes(lambda tf: add_file(tf, "/etc/evil")),
        "'/etc/evil' would land outside",
    ),
    "tar with a symlink": (
        "link.tgz",
        tar_bytes(lambda tf: add_symlink(tf, "passwd", "/etc/passwd")),
        "'passwd' is a link",
    ),
    "plain tar with a device": (
        "dev.tar",
        tar_bytes(lambda tf: add_device(tf, "null"), mode="w"),
        "'null' is not a plain file",
    ),
    "not a zip at all": ("junk.zip", b"not a zip archive", "not a readable zip archive"),
    "truncated tar.gz": (
        "cut.tar.gz",
        tar_bytes(lambda tf: add_file(tf, "big.bin", bytes(range(256)) * 4000))[:600],
        "not a readable tar archive",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_a_bad_archive_is_refused_at_upload_naming_the_member(store, case):
    name, data, expected = BAD_ARCHIVES[case]
    with pytest.raises(ValidationError) as caught:
        store.put_file(name, data)
    assert caught.value.problems[0].path == "file"
    assert expected in str(caught.value), str(caught.value)
    assert store.list_files() == []


def test_good_archives_and_plain_files_are_accepted(store):
    store.put_file("ok.zip", zip_bytes({"pkg/run.sh": b"x", "pkg/": b""}))
    store.put_file("ok.tar.gz", tar_bytes(lambda tf: add_file(tf, "a/b.txt")))
    store.put_file("ok.tar", tar_bytes(lambda tf: add_file(tf, "c.txt"), mode="w"))
    # not an archive's name: the bytes are not looked into
    store.put_file("data.bin", b"../evil")
    assert [f["name"] for f in store.list_files()] == ["data.bin", "ok.tar", "ok.tar.gz", "ok.zip"]


# --- the agent: pinned or latest --------------------------------------------------------------


def test_lay_out_uses_the_pinned_version_or_the_latest(store, tmp_path):
    one = store.put_file("pin.sh", version(1))
    store.put_file("pin.sh", version(2))
    cache = FileCache(store, tmp_path / "cache")
    pinned = cache.lay_out("pin.sh", tmp_path / "run-pinned", version=one["sha256"])
    latest = cache.lay_out("pin.sh", tmp_path / "run-latest")
    assert pinned["sha256"] == one["sha256"] and latest["sha256"] == sha(version(2))
    assert (tmp_path / "run-pinned" / "pin.sh").read_bytes() == version(1)
    assert (tmp_path / "run-latest" / "pin.sh").read_bytes() == version(2)
    assert (tmp_path / "run-pinned" / "pin.sh").stat().st_mode & 0o111
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [one["sha256"], sha(version(2))]
    )


def test_a_deleted_pinned_version_fails_clearly_even_if_cached(store, tmp_path):
    one = store.put_file("gone.sh", version(1))
    store.put_file("gone.sh", version(2))
    cache = FileCache(store, tmp_path / "cache")
    cache.lay_out("gone.sh", tmp_path / "r1", version=one["sha256"])
    store.fs.delete(ObjectId(one["id"]))
    with pytest.raises(TaskFileError, match="pinned version .* is no longer stored"):
        cache.lay_out("gone.sh", tmp_path / "r2", version=one["sha256"])
    with pytest.raises(TaskFileError, match="no longer stored"):
        cache.lay_out("gone.sh", tmp_path / "r3", version="f" * 64)


def test_a_pinned_task_runs_its_version_and_a_following_task_the_latest(store, file_executor):
    one = store.put_file("two.sh", b"#!/bin/sh\necho one\n")
    store.put_file("two.sh", b"#!/bin/sh\necho two\n")
    pinned = start(
        store,
        file_executor,
        {"command": "./two.sh", "file": "two.sh", "file_version": one["sha256"]},
    )
    following = start(store, file_executor, {"command": "./two.sh", "file": "two.sh"})
    assert finished(store, pinned.run_id)["output_tail"].strip() == "one"
    assert finished(store, following.run_id)["output_tail"].strip() == "two"


def test_a_run_pinning_a_missing_version_fails_with_a_message(store, file_executor):
    store.put_file("m.sh", b"#!/bin/sh\necho hi\n")
    run = finished(
        store,
        start(
            store, file_executor, {"command": "./m.sh", "file": "m.sh", "file_version": "e" * 64}
        ).run_id,
    )
    assert run["status"] == "failed" and "no longer stored" in run["error"], run


# --- the command line -------------------------------------------------------------------------


@pytest.fixture
def cli_env(mongo_server, mongo_db_name):
    return {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}


def invoke(args, env):
    from click.testing import CliRunner

    from cloudtask.cli import cli

    return CliRunner().invoke(cli, args, env=env)


def test_cli_versions_and_rollback(store, tmp_path, cli_env):
    script = tmp_path / "job.sh"
    script.write_text("echo one\n")
    assert invoke(["file", "put", str(script)], cli_env).exit_code == 0
    same = invoke(["file", "put", str(script)], cli_env)
    assert same.exit_code == 0 and "unchanged job.sh" in same.output
    script.write_text("echo two\n")
    assert invoke(["file", "put", str(script)], cli_env).exit_code == 0
    first = sha(b"echo one\n")
    listed = invoke(["file", "versions", "job.sh"], cli_env)
    lines = listed.output.splitlines()
    assert listed.exit_code == 0 and len(lines) == 2
    assert lines[0].startswith(sha(b"echo two\n")) and lines[0].endswith("latest")
    assert lines[1].startswith(first)
    done = invoke(["file", "rollback", "job.sh", first[:12]], cli_env)
    assert done.exit_code == 0 and f"version {first} is the latest again" in done.output
    assert store.latest_file("job.sh")["sha256"] == first
    assert "rollback from" in invoke(["file", "versions", "job.sh"], cli_env).output
    assert invoke(["file", "list"], cli_env).output.startswith(f"job.sh\t9\t{first}\t")
    audit = [d["action"] for d in store.audit.find({"target": "file:job.sh"})]
    assert audit.count("file.upload") == 2 and audit.count("file.rollback") == 1


def test_cli_errors_have_no_traceback(store, tmp_path, cli_env):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(zip_bytes({"../evil": b"x"}))
    put = invoke(["file", "put", str(bad)], cli_env)
    assert put.exit_code == 2 and "'../evil'" in put.output and "Traceback" not in put.output
    missing = invoke(["file", "versions", "nope.sh"], cli_env)
    assert missing.exit_code == 1 and "no stored file named 'nope.sh'" in missing.output
    store.put_file("x.sh", b"1")
    store.put_file("x.sh", b"2")
    for arg, code, text in [
        ("zz", 2, "8 to 64 hex digits"),
        ("00000000", 1, "no stored version"),
        (sha(b"2"), 1, "already the latest"),
    ]:
        answer = invoke(["file", "rollback", "x.sh", arg], cli_env)
        assert answer.exit_code == code and text in answer.output, answer.output
        assert answer.exception is None or isinstance(answer.exception, SystemExit)


def test_the_file_list_summaries_are_rebuilt_for_files_stored_before_them(store):
    store_unchecked(store, "legacy.sh", b"old 1")
    store_unchecked(store, "legacy.sh", b"old 2")
    listed = store.list_files()
    assert [(f["name"], f["sha256"], f["versions"]) for f in listed] == [
        ("legacy.sh", sha(b"old 2"), 2)
    ]
    store.put_file("new.sh", b"n", uploaded_by="op")
    store.put_file("legacy.sh", b"old 3")
    listed = {f["name"]: f for f in store.list_files()}
    assert listed["legacy.sh"]["sha256"] == sha(b"old 3") and listed["legacy.sh"]["versions"] == 3
    assert listed["new.sh"]["uploaded_by"] == "op" and listed["new.sh"]["size"] == 1
    assert isinstance(listed["new.sh"]["uploaded_at"], datetime)

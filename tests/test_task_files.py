"""Task files on a real store: fetched by name, cached by hash, laid out per run, archives
unpacked only inside the run folder."""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile

import pytest
from helpers import finished, start

from cloudtask.agent.executor import Executor
from cloudtask.agent.files import FileCache, TaskFileError
from cloudtask.exceptions import ValidationError


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
    store.put_file("bad.zip", zip_bytes({member: b"x"}))
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
    store.put_file("link.tar.gz", buf.getvalue())
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

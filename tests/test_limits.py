"""Limits on what people send, each refused with a clear error that says where: NUL bytes and
lone surrogates, sizes of commands and environments, the number of schedules, JSON nesting
(task specs, task files, ``cloudtask next``), request bodies in waitress."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import wait_for

from cloudtask.cli import cli
from cloudtask.cli.servers import request_body_limit
from cloudtask.config import Config
from cloudtask.exceptions import ValidationError
from cloudtask.jsonlimits import MAX_JSON_DEPTH, JSONDepthError, depth_problem, loads
from cloudtask.localservers import free_port
from cloudtask.task import (
    MAX_COMMAND_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VALUE_BYTES,
    MAX_SCHEDULES,
    parse_task,
    validate_task,
)

BASE: dict[str, Any] = {"name": "job", "schedule": {"every": "1h"}, "command": "true"}
HTTP: dict[str, Any] = {
    "name": "call",
    "schedule": {"every": "1h"},
    "http": {"url": "https://svc.example/run"},
}


def problems_of(spec: dict[str, Any]) -> dict[str, str]:
    return {p.path: p.message for p in validate_task(spec)}


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` lists inside each other around ``leaf``, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# --- NUL bytes (and lone surrogates): stored, they failed every run with a traceback -------------


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({**BASE, "command": "echo a\0b"}, "command"),
        ({**BASE, "command": ["echo", "a\0b"]}, "command[1]"),
        ({**BASE, "command": "sh -c 'echo hi'", "shell": False, "env": {"A": "x\0y"}}, "env.A"),
        ({**BASE, "cwd": "/tmp\0/x"}, "cwd"),
        ({**HTTP, "http": {"url": "https://svc.example/\0"}}, "http.url"),
        ({**HTTP, "http": {"urls": ["https://a.example/", "https://b\0.example/"]}}, "http.urls[1]"),
        ({**HTTP, "http": {"url": "https://a.example/", "headers": {"X-A": "1\x002"}}}, "http.headers.X-A"),
        ({**HTTP, "http": {"url": "https://a.example/", "body": "a\0b"}}, "http.body"),
        ({**HTTP, "http": {"url": "https://a.example/", "body": {"k": ["\0"]}}}, "http.body.k[0]"),
        ({**BASE, "description": "a\0"}, "description"),
        ({**BASE, "notify": {"emails": ["a\0@example.com"]}}, "notify.emails[0]"),
    ],
)  # fmt: skip
def test_nul_bytes_are_refused_where_they_are(spec, path):
    problems = problems_of(spec)
    assert problems.get(path) == "must not contain NUL characters (\\0)", problems
    with pytest.raises(ValidationError) as e:
        parse_task(spec)
    assert f"{path}: must not contain NUL characters" in str(e.value)


def test_an_env_name_with_nul_is_refused():
    problems = problems_of({**BASE, "env": {"A\0B": "x"}})
    assert "env.A\0B" in problems


def test_a_lone_surrogate_is_refused_not_a_crash_at_storage():
    problems = problems_of({**BASE, "env": {"A": "x\ud800"}})
    assert problems["env.A"] == "is not valid text: it holds a lone surrogate ('\\ud800')"


# --- sizes ---------------------------------------------------------------------------------------


def test_a_command_over_64_kib_is_refused_as_a_string_and_as_a_list():
    assert MAX_COMMAND_BYTES == 64 * 1024
    assert problems_of({**BASE, "command": "echo " + "x" * (MAX_COMMAND_BYTES - 5)}) == {}
    text = "echo " + "x" * 900_000  # the review's 900 KB command: stored, and could not run
    message = problems_of({**BASE, "command": text})["command"]
    assert message == "the command is 900,005 bytes; at most 65,536 bytes (64 KiB) are taken"
    args = ["echo", *(["y" * 1000] * 70)]  # 70 arguments of 1000 bytes, joined by spaces
    message = problems_of({**BASE, "command": args})["command"]
    assert message.startswith("the command (its arguments joined by spaces) is 70,074 bytes")


def test_sizes_count_utf8_bytes():
    over = "é" * (MAX_COMMAND_BYTES // 2 + 1)  # 2 bytes each
    assert "command[1]" not in problems_of({**BASE, "command": ["echo", over]})
    assert "at most 65,536 bytes" in problems_of({**BASE, "command": ["echo", over]})["command"]


def test_env_values_and_the_whole_env_are_bounded():
    assert (MAX_ENV_VALUE_BYTES, MAX_ENV_BYTES) == (64 * 1024, 256 * 1024)
    assert problems_of({**BASE, "env": {"A": "v" * MAX_ENV_VALUE_BYTES}}) == {}
    problems = problems_of({**BASE, "env": {"A": "v" * (MAX_ENV_VALUE_BYTES + 1)}})
    assert problems == {
        "env.A": "the value is 65,537 bytes; at most 65,536 bytes (64 KiB) are taken"
    }
    many = {f"V{i}": "v" * 60_000 for i in range(5)}  # each fits, together they do not
    problems = problems_of({**BASE, "env": many})
    assert list(problems) == ["env"]
    assert problems["env"].startswith("the environment (every NAME=value) is 300,0")
    assert problems["env"].endswith("at most 262,144 bytes (256 KiB) are taken")


def test_http_body_and_headers_are_bounded():
    spec = {**HTTP, "http": {"url": "https://a.example/", "body": "b" * 70_000}}
    assert problems_of(spec)["http.body"].startswith("the body is 70,000 bytes; at most 65,536")
    headers = {f"X-H{i}": "h" * 10_000 for i in range(7)}
    spec = {**HTTP, "http": {"url": "https://a.example/", "headers": headers}}
    assert "at most 65,536 bytes" in problems_of(spec)["http.headers"]


def test_at_most_100_schedules_and_a_long_list_is_refused_at_once():
    assert MAX_SCHEDULES == 100
    assert problems_of({**BASE, "schedule": [{"every": f"{i + 1}m"} for i in range(100)]}) == {}
    many = [{"cron": f"{i % 60} * * * *"} for i in range(10_000)]  # the review's 26 s save
    started = time.monotonic()
    problems = problems_of({**BASE, "schedule": many})
    assert time.monotonic() - started < 1.0
    assert problems == {"schedule": "10,000 schedules; at most 100 are taken per task"}


# --- nesting depth ---------------------------------------------------------------------------------


def test_a_deeply_nested_spec_is_a_problem_with_its_path_not_a_recursion_error():
    spec = {**HTTP, "http": {"url": "https://a.example/", "body": {"a": nested(50_000)}}}
    problems = validate_task(spec)
    assert len(problems) == 1
    (problem,) = problems
    assert problem.path.startswith("http.body.a[0][0]")
    assert problem.message == "nested more than 32 levels deep (objects and lists)"
    ok = {**HTTP, "http": {"url": "https://a.example/", "body": {"a": nested(28)}}}
    assert validate_task(ok) == []


def test_deep_json_text_is_refused_before_it_is_parsed():
    with pytest.raises(JSONDepthError) as e:
        loads("[" * 1_000_000)  # json.loads: RecursionError
    assert str(e.value).startswith("nested more than 32 levels deep (line 1, column 33)")
    assert isinstance(e.value, ValueError)
    text = '{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[[["}'  # brackets in a string
    assert loads(text) == json.loads(text)
    assert loads(json.dumps(nested(MAX_JSON_DEPTH))) == nested(MAX_JSON_DEPTH)
    with pytest.raises(JSONDepthError):
        loads(json.dumps(nested(MAX_JSON_DEPTH + 1)))
    with pytest.raises(JSONDepthError) as e:
        loads('{"a":\n  ' + "{" * 40)
    assert (e.value.line, e.value.column) == (2, 34)
    assert depth_problem(nested(3), limit=2) == "[0][0]"


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=True)


def test_a_deeply_nested_task_file_is_reported_not_a_traceback(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"name": "t", "schedule": ' + "[" * 200_000)
    result = invoke("validate", str(path))
    assert result.exit_code == 1 and result.exception is not None
    assert isinstance(result.exception, SystemExit), result.exception
    assert f"{path}: not usable JSON: nested more than 32 levels deep" in result.output
    apply = invoke("apply", str(path))
    assert apply.exit_code == 1 and "nothing applied" in apply.output
    assert "nested more than 32 levels deep" in apply.output


def test_a_moderately_nested_task_file_is_reported_at_the_path(tmp_path):
    path = tmp_path / "deep.json"
    spec = {**HTTP, "http": {"url": "https://a.example/", "body": nested(31)}}
    path.write_text(json.dumps(spec))  # the file's JSON is 33 deep: refused as a whole
    result = invoke("validate", str(path))
    assert result.exit_code == 1 and "nested more than 32 levels deep" in result.output


def test_next_with_deep_json_is_a_usage_error():
    result = invoke("next", "[" * 100_000)
    assert result.exit_code == 2 and "nested more than 32 levels deep" in result.output
    assert not isinstance(result.exception, RecursionError)


# --- request bodies: waitress refuses what the site would, before it reads it --------------------


def exchange(port: int, head: bytes, chunks: tuple[bytes, ...] = (), wait: float = 10) -> bytes:
    """Send ``head`` (and ``chunks``) to the site; its answer, read until it closes the
    connection (b"" if nothing came within ``wait``). A server that closes while it is sent
    to has answered already."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        while len(answer) < 65536:  # to the close: the head and the body may come apart
            try:
                data = sock.recv(4096)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            answer += data
        return answer


def up(port: int) -> bool:
    try:
        return exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n", wait=2).startswith(b"HTTP/")
    except OSError:
        return False


def test_request_bodies_are_capped_in_waitress_at_the_upload_limit(
    mongo_server, mongo_db_name, tmp_path
):
    limit = 1024 * 1024
    cfg = Config().with_section("web", max_upload_bytes=limit)
    assert request_body_limit(cfg) == limit + 64 * 1024 + 1  # what the site allows, and no more
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLOUDTASK_")},
        "CLOUDTASK_CONFIG": "",
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_WEB_MAX_UPLOAD_BYTES": str(limit),
        "CLOUDTASK_WEB_DATA_DIR": str(tmp_path / "web"),
    }
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudtask", "web", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: up(port),
            timeout=30,
            message="the web site did not start",
        )
        # 1 GiB less a byte announced (waitress's own cap is 1 GiB): refused at once, nothing of
        # it read; before, waitress waited for the whole body (to a temporary file)
        started = time.monotonic()
        answer = exchange(
            port,
            b"POST /api/v1/files?name=big HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1073741823\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 413 Request Entity Too Large"), answer
        assert b"exceeds max_body of 1114113" in answer
        assert time.monotonic() - started < 5
        # a chunked body is cut off once it passes the limit
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
        answer = exchange(
            port,
            b"POST /api/v1/files?name=big HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            (chunk,) * 40,  # 2.5 MiB
        )
        assert answer.startswith(b"HTTP/1.1 413"), answer
        # within the limit the site itself answers (here: log in first)
        answer = exchange(
            port,
            b"POST /api/v1/files?name=small HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Connection: close\r\n\r\nhello",
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

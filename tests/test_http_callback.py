"""Callback http tasks: the service answers at once and reports progress and its result later.

A real HTTP server in a thread answers the agent's call; the test plays the service's later
reports by writing them through the store (as the API does); runs go through the real executor
and run writer on the MongoDB wire server, and retries through a real agent.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from helpers import QuietHandler, finished, holds, serve_http, start, wait_for

from cloudtask.agent import httprun
from cloudtask.agent.agent import Agent
from cloudtask.agent.executor import Executor
from cloudtask.agent.logfiles import log_path
from cloudtask.agent.runwriter import RunWriter
from cloudtask.config import Config
from cloudtask.localservers import MongoServer, free_port
from cloudtask.store import Store


class _Service(QuietHandler):
    """``/accept`` answers 202 (the job is taken), ``/busy`` 503; every call is recorded."""

    calls: list[dict] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Service.calls.append(
            {
                "path": self.path,
                "run_id": self.headers.get("X-CloudTask-Run-Id"),
                "token": self.headers.get("X-CloudTask-Token"),
                "attempt": self.headers.get("X-CloudTask-Attempt"),
            }
        )
        if self.path == "/accept":
            self.reply(202, b'{"accepted": true}')
        else:
            self.reply(503, b"try later")


@pytest.fixture
def service():
    _Service.calls = []
    with serve_http(_Service) as url:
        yield url


def _executor(writer, tmp_path) -> Executor:
    return Executor(
        agent_id="a1", log_dir=tmp_path / "logs", writer=writer, max_parallel=4, kill_grace=1.0
    )


@pytest.fixture
def executor(writer, tmp_path):
    ex = _executor(writer, tmp_path)
    yield ex
    ex.shutdown()


def callback_task(url: str, **over) -> dict:
    task = {"command": None, "http": {"url": url, "method": "POST", "callback": True}}
    task.update(over)
    return task


def called(run_id: str) -> dict:
    """The service's record of the agent's call for ``run_id``."""
    return wait_for(
        lambda: next((c for c in _Service.calls if c["run_id"] == run_id), None),
        message=f"the service was not called for run {run_id}",
    )


def log_text(tmp_path) -> str:
    return log_path(tmp_path / "logs", "t", datetime.now().date()).read_text()


def test_a_succeeded_result_finishes_the_run(store, executor, service, tmp_path):
    ctx = start(store, executor, callback_task(f"{service}/accept"))
    call = called(ctx.run_id)
    assert call["token"] == ctx.token  # the service authenticates its reports with it
    wait_for(lambda: store.get_run(ctx.run_id)["status"] == "running", message="not running")
    # the first answer is in: without a result the run goes on
    holds(lambda: store.get_run(ctx.run_id)["status"] == "running", 1.5)
    assert ctx.status == "running"
    store.report_result(ctx.run_id, "succeeded", "all rows synced")
    run = finished(store, ctx.run_id)
    assert run["status"] == "succeeded" and run["error"] is None
    assert run["http_status"] == 202
    assert '{"accepted": true}' in run["output_tail"]
    assert "result succeeded: all rows synced" in run["output_tail"]
    assert run["duration"] >= 1.5
    text = log_text(tmp_path)
    assert "waiting for the service to report its result" in text
    assert "result succeeded: all rows synced" in text
    assert f"run {ctx.run_id} succeeded http 202" in text


def test_a_failed_result_fails_the_run_with_its_message(store, executor, service, tmp_path):
    ctx = start(store, executor, callback_task(f"{service}/accept"))
    called(ctx.run_id)
    store.report_result(ctx.run_id, "failed", "the remote job crashed")
    run = finished(store, ctx.run_id)
    assert run["status"] == "failed"
    assert run["error"] == "the remote job crashed"
    assert "result failed: the remote job crashed" in run["output_tail"]
    assert "result failed: the remote job crashed" in log_text(tmp_path)


def test_progress_shows_in_the_running_run(store, executor, service, tmp_path):
    ctx = start(store, executor, callback_task(f"{service}/accept"))
    called(ctx.run_id)
    store.report_progress(ctx.run_id, 40, "copying")
    run = wait_for(
        lambda: (d := store.get_run(ctx.run_id)).get("progress") and d,
        message="no progress in the run document",
    )
    assert run["status"] == "running"
    assert (run["progress"]["percent"], run["progress"]["message"]) == (40, "copying")
    assert isinstance(run["progress"]["at"], datetime)
    store.report_progress(ctx.run_id, 80.5, "indexing")
    run = wait_for(
        lambda: (d := store.get_run(ctx.run_id))["progress"]["message"] == "indexing" and d,
        message="the second progress report did not show",
    )
    assert run["status"] == "running" and run["progress"]["percent"] == 80.5
    store.report_result(ctx.run_id, "succeeded", "")
    run = finished(store, ctx.run_id)
    assert run["status"] == "succeeded"
    assert run["progress"]["message"] == "indexing"  # the last progress stays on the run
    text = log_text(tmp_path)
    assert "progress 40% copying" in text and "progress 80.5% indexing" in text


def test_no_result_within_the_timeout_times_out(store, executor, service):
    ctx = start(store, executor, callback_task(f"{service}/accept", timeout="2s"))
    called(ctx.run_id)
    run = finished(store, ctx.run_id)
    assert run["status"] == "timed_out"
    assert run["error"] == "no result came within the task's timeout of 2s"
    assert run["duration"] >= 2.0


def test_without_a_timeout_the_wait_has_a_default_bound(store, executor, service, monkeypatch):
    monkeypatch.setattr(httprun, "DEFAULT_CALLBACK_WAIT", 1.5)  # 24 h in production
    ctx = start(store, executor, callback_task(f"{service}/accept"))
    run = finished(store, ctx.run_id)
    assert run["status"] == "timed_out"
    assert run["error"].startswith("no result came within 1.5s")


def test_a_kill_ends_the_wait_promptly(store, executor, service):
    ctx = start(store, executor, callback_task(f"{service}/accept"))
    called(ctx.run_id)
    wait_for(lambda: ctx.status == "running", message="not running")
    time.sleep(0.5)  # well into the wait
    asked = time.monotonic()
    assert executor.kill(ctx.run_id, "killed by request")
    run = finished(store, ctx.run_id)
    took = time.monotonic() - asked
    assert run["status"] == "killed" and run["error"] == "killed by request"
    assert took < 5.0, f"the kill took {took:.1f}s"  # a poll is 1 s: never the whole wait


def test_a_late_result_does_not_change_a_killed_run(store, executor, service):
    ctx = start(store, executor, callback_task(f"{service}/accept"))
    called(ctx.run_id)
    wait_for(lambda: ctx.status == "running", message="not running")
    executor.kill(ctx.run_id, "killed by request")
    assert finished(store, ctx.run_id)["status"] == "killed"
    store.report_result(ctx.run_id, "succeeded", "too late")
    holds(lambda: store.get_run(ctx.run_id)["status"] == "killed", 1.5)


def test_without_callback_the_first_answer_finishes_the_run(store, executor, service):
    task = callback_task(f"{service}/accept")
    task["http"]["callback"] = False
    ctx = start(store, executor, task)
    run = finished(store, ctx.run_id, timeout=10)
    assert run["status"] == "succeeded" and run["http_status"] == 202
    assert "progress" not in run
    assert "result" not in run["output_tail"]


def test_an_unexpected_first_answer_fails_at_once(store, executor, service):
    ctx = start(store, executor, callback_task(f"{service}/busy"))
    run = finished(store, ctx.run_id, timeout=10)
    assert run["status"] == "failed" and run["http_status"] == 503
    assert run["error"].endswith("answered 503, expected 2xx")
    assert run["duration"] < 1.0  # no wait for a report (a poll alone takes 1 s)


def test_an_expected_status_other_than_2xx_starts_the_wait(store, executor, service):
    task = callback_task(f"{service}/busy", timeout="1s")
    task["http"]["expect_status"] = [503]
    ctx = start(store, executor, task)
    run = finished(store, ctx.run_id)
    assert run["status"] == "timed_out" and run["http_status"] == 503


@pytest.mark.external  # a MongoDB server of its own, stopped and started
def test_the_wait_survives_mongodb_being_unreachable(tmp_path, service):
    """MongoDB stops while the run waits: the run goes on (logged once) and ends by its result."""
    server = MongoServer(tmp_path / "mongo", port=free_port())
    server.start()
    store = Store(server.uri, "cb", server_selection_timeout_ms=1000)
    writer = RunWriter(store, flush_interval=0.05, tail_interval=0.2)
    writer.start()
    executor = _executor(writer, tmp_path)
    try:
        ctx = start(store, executor, callback_task(f"{service}/accept"))
        called(ctx.run_id)
        wait_for(lambda: store.get_run(ctx.run_id)["status"] == "running", message="not running")
        server.stop()
        # several polls fail; the run waits on
        holds(lambda: ctx.status == "running" and ctx.finished_at is None, 5.0)
        server.start()
        store.report_result(ctx.run_id, "succeeded", "done while the store was away")
        run = finished(store, ctx.run_id, timeout=30)
        assert run["status"] == "succeeded"
        text = log_text(tmp_path)
        assert text.count("cannot read the service's report yet") == 1
        assert "the service's report can be read again" in text
    finally:
        executor.shutdown()
        writer.stop(timeout=5)
        store.close()
        server.stop()


def test_a_failed_result_is_retried(store, mongo_client, mongo_db_name, service, tmp_path):
    task = store.create_task(
        {
            "name": "cb",
            "schedule": {"at": (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()},
            "misfire_grace": "1h",
            "retries": 1,
            "retry_delay": "0s",
            **callback_task(f"{service}/accept"),
        }
    )
    cfg = Config().with_section(
        "agent", data_dir=str(tmp_path / "a1"), poll_interval=0.2, kill_grace=1.0
    )
    agent = Agent(cfg, Store(mongo_client, mongo_db_name), agent_id="a1")
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        first = wait_for(
            lambda: next((c for c in _Service.calls if c["attempt"] == "0"), None),
            timeout=15,
            message="the first attempt did not call the service",
        )
        store.report_result(first["run_id"], "failed", "disk full")
        second = wait_for(
            lambda: next((c for c in _Service.calls if c["attempt"] == "1"), None),
            timeout=15,
            message="the failed run was not retried",
        )
        assert second["run_id"] != first["run_id"] and second["token"] != first["token"]
        store.report_result(second["run_id"], "succeeded", "")
        done = finished(store, second["run_id"])
        assert done["status"] == "succeeded" and done["trigger"] == "retry"
        failed = store.get_run(first["run_id"])
        assert failed["status"] == "failed" and failed["error"] == "disk full"
        assert {failed["task_id"], done["task_id"]} == {task["_id"]}
    finally:
        agent.stop()
        thread.join(timeout=30)
    assert not thread.is_alive(), "the agent did not stop"

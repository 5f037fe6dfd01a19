"""Stored secrets in runs: an agent opens them just before a run, gives them to the process or
the request, and cuts their values out of everything it keeps of the run (real MongoDB wire
server, real processes, a real HTTP server)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import QuietHandler, make_task, serve_http, wait_for
from test_agent import Running

from cloudtask import netpolicy
from cloudtask.config import Config
from cloudtask.netpolicy import NetworkPolicy
from cloudtask.operations import Operations
from cloudtask.secretbox import SecretBox, make_key_file, parse_ring

PY = sys.executable
VALUE = "hunter2-Secret-Value"
NEW_VALUE = "replaced-Secret-Value-2"


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path):
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


@pytest.fixture
def ring(tmp_path) -> Path:
    path = tmp_path / "secrets.keys"
    make_key_file(path)
    return path


def box_of(path: Path) -> SecretBox:
    return SecretBox(tuple(parse_ring(path.read_text(), str(path))))


def keyed(path: Path) -> Config:
    return Config().with_section("secrets", keys=f"file:{path}")


def finished(store, task_id: str, n: int = 1) -> list[dict]:
    def look():
        docs = list(
            store.runs.find({"task_id": task_id, "status": {"$in": ["succeeded", "failed"]}}).sort(
                "scheduled_for", 1
            )
        )
        return docs if len(docs) >= n else None

    return wait_for(look, timeout=20, message=f"fewer than {n} finished runs")


def log_text(tmp_path: Path, agent_id: str) -> str:
    return "".join(
        p.read_text(errors="replace")
        for p in (tmp_path / agent_id / "logs").rglob("*")
        if p.is_file()
    )


def test_a_process_gets_its_secret_and_nothing_the_agent_keeps_shows_the_value(
    store, agents, ring, tmp_path
):
    ops = Operations(store)
    ops.set_secret("alice", box_of(ring), "db.password", VALUE)
    seen = tmp_path / "seen"
    # the value is printed whole, then split across two writes a moment apart (two chunks)
    script = (
        "import os, sys, time\n"
        "v = os.environ['PGPASSWORD']\n"
        f"open({str(seen)!r}, 'a').write(v + '\\n')\n"
        "print('whole', v, flush=True)\n"
        "sys.stdout.write('split ' + v[:5]); sys.stdout.flush(); time.sleep(0.3)\n"
        "print(v[5:] + ' end', flush=True)\n"
        "sys.stdout.write('at the very end ' + v[:7])\n"
    )
    task = make_task(  # scheduled fires (started from the run loop without secrets)
        store,
        "uses-secret",
        schedule={"every": "1s"},
        command=[PY, "-c", script],
        env={"PGPASSWORD": {"secret": "db.password"}, "PLAIN": "x"},
    )
    agents.start("a1", config=keyed(ring))
    doc = finished(store, task["_id"])[0]
    assert doc["status"] == "succeeded", doc.get("error")
    assert seen.read_text().splitlines()[0] == VALUE  # the process had the value itself
    tail = doc["output_tail"]
    assert VALUE not in tail and "whole ***" in tail and "split *** end" in tail
    assert tail.endswith("at the very end " + VALUE[:7])  # a prefix only: not a value

    # a value replaced is what the next runs get: nothing is kept between runs
    ops.set_secret("alice", box_of(ring), "db.password", NEW_VALUE)
    wait_for(
        lambda: seen.read_text().splitlines()[-1] == NEW_VALUE,
        timeout=20,
        message="no run had the new value",
    )
    agents.stop_all()
    assert set(seen.read_text().splitlines()) == {VALUE, NEW_VALUE}
    docs = list(store.runs.find({"task_id": task["_id"], "status": "succeeded"}))
    assert len(docs) >= 2
    for d in docs:
        assert VALUE not in d["output_tail"] and NEW_VALUE not in d["output_tail"]
        assert "whole ***" in d["output_tail"]
    logs = log_text(tmp_path, "a1")
    assert "whole ***" in logs and "split *** end" in logs
    assert VALUE not in logs and NEW_VALUE not in logs


def test_a_run_whose_secrets_cannot_be_opened_fails_saying_why_and_never_starts(
    store, agents, ring, tmp_path
):
    ops = Operations(store)
    ops.set_secret("alice", box_of(ring), "db.password", VALUE)
    marker = tmp_path / "ran"
    command = [PY, "-c", f"open({str(marker)!r}, 'a').write('ran')"]
    task = make_task(
        store,
        "no-ring",
        schedule={"every": "1h"},
        command=command,
        env={"PGPASSWORD": {"secret": "db.password"}},
    )
    agents.start("a1")  # no key ring in its config
    ops.run_now("alice", task["_id"])
    doc = finished(store, task["_id"])[0]
    assert doc["status"] == "failed" and doc.get("started_at") is None
    assert "no key ring" in doc["error"] and "db.password" in doc["error"]
    assert "not started" in doc["output_tail"]
    agents.stop_all()

    # a ring whose keys did not seal the value: the run fails naming the secret
    other = tmp_path / "other.keys"
    make_key_file(other)
    agents.start("a2", config=keyed(other))
    ops.run_now("alice", task["_id"])
    doc = finished(store, task["_id"], 2)[1]
    assert doc["status"] == "failed" and doc.get("started_at") is None, doc
    assert "cannot open the task's secrets" in doc["error"] and "db.password" in doc["error"]
    assert not marker.exists()


class _Echo(QuietHandler):
    """Records each request's headers and body, and answers with them (the output)."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        got = {"authorization": self.headers.get("Authorization"), "body": body}
        _Echo.seen.append(got)
        self.reply(200, f"authorization={got['authorization']}\nbody={body}\n".encode())


def test_an_http_task_sends_its_secret_header_and_body_and_the_answer_is_redacted(
    store, agents, ring
):
    ops = Operations(store)
    box = box_of(ring)
    ops.set_secret("alice", box, "api.token", "Bearer " + VALUE)
    ops.set_secret("alice", box, "api.body", '{"password": "' + NEW_VALUE + '"}')
    _Echo.seen = []
    with serve_http(_Echo) as url:
        task = make_task(
            store,
            "http-secret",
            schedule={"every": "1h"},
            command=None,
            http={
                "url": url + "/hook",
                "method": "POST",
                "headers": {"Authorization": {"secret": "api.token"}, "X-Plain": "p"},
                "body": {"secret": "api.body"},
            },
        )
        agents.start("a1", config=keyed(ring))
        ops.run_now("alice", task["_id"])
        doc = finished(store, task["_id"])[0]
    assert doc["status"] == "succeeded", doc.get("error")
    assert _Echo.seen == [
        {"authorization": "Bearer " + VALUE, "body": '{"password": "' + NEW_VALUE + '"}'}
    ]
    tail = doc["output_tail"]
    assert tail == "authorization=***\nbody=***\n"


def test_an_http_task_keeps_to_the_agents_deny_list_of_networks(store, agents):
    """With ``security.egress_filter`` the agent's HTTP tasks are refused a denied address
    before anything is sent (the process policy ``cloudtask agent`` sets from its config)."""
    _Echo.seen = []
    with serve_http(_Echo) as url:
        task = make_task(
            store,
            "http-denied",
            schedule={"every": "1h"},
            command=None,
            http={"url": url + "/hook", "method": "POST", "body": "{}"},
        )
        agents.start("a1")
        netpolicy.configure(NetworkPolicy(True, ["127.0.0.0/8"]))
        try:
            Operations(store).run_now("alice", task["_id"])
            doc = finished(store, task["_id"])[0]
        finally:
            netpolicy.configure(NetworkPolicy())
        assert doc["status"] == "failed" and "deny-list" in doc["error"], doc.get("error")
        assert _Echo.seen == []
        Operations(store).run_now("alice", task["_id"])  # the policy off: it is called
        assert finished(store, task["_id"], 2)[1]["status"] == "succeeded"
        assert len(_Echo.seen) == 1

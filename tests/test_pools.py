"""Concurrency pools: a pool of 2 shared by 10 tasks never runs more than 2 at once across
the cluster, a run that waits longer than its pool_wait is skipped saying so, and pools are
checked when tasks are saved. Real ZooKeeper, the MongoDB wire server, a center and two
agents as processes; concurrency judged by the runs' own execution records."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from helpers import wait_for
from test_cluster import Cluster
from test_plans import concurrency

from cloudtask.cli import cli
from cloudtask.exceptions import Conflict, ValidationError
from cloudtask.operations import Operations
from cloudtask.testing.records import read_records, recording_command


def test_a_pool_of_2_shared_by_10_tasks_never_runs_more_than_2_at_once(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, store
):
    records = tmp_path / "records"
    ops = Operations(store)
    ops.set_pool("alice", "db", 2)
    ops.set_pool("alice", "single", 1)
    at = (datetime.now(timezone.utc) + timedelta(seconds=10)).replace(microsecond=0)
    for i in range(10):
        ops.create_task(
            "alice",
            {
                "name": f"t{i}",
                "schedule": {"at": at.isoformat()},
                "pool": "db",
                "command": recording_command(records, work="sleep 0.6"),
            },
        )
    for i in range(3):  # one place, three runs at once, each may wait 1 s
        ops.create_task(
            "alice",
            {
                "name": f"s{i}",
                "schedule": {"at": at.isoformat()},
                "pool": "single",
                "pool_wait": "1s",
                "command": recording_command(records, work="sleep 4"),
            },
        )
    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    try:
        cluster.center("c1")
        cluster.agent("a1")
        cluster.agent("a2")
        wait_for(
            lambda: (
                store.runs.count_documents({"status": {"$in": ["succeeded", "failed", "skipped"]}})
                >= 13
            ),
            timeout=90,
            interval=0.5,
            message="the pooled runs did not all end",
        )
    finally:
        cluster.stop_all()
    seen = read_records(records)
    pooled = [r for r in seen if r.task.startswith("t")]
    starts = Counter(r.task for r in pooled if r.kind == "start")
    assert starts == {f"t{i}": 1 for i in range(10)}, starts
    # across both agents: the places in the pool, from the runs' own start and end times
    events = sorted(
        (r.time, 0 if r.kind == "end" else 1) for r in pooled if r.kind in ("start", "end")
    )
    running = peak = 0
    for _, kind in events:
        running += 1 if kind else -1
        peak = max(peak, running)
    assert peak == 2, peak  # (2: the pool was used to its size, never past it)
    assert len({r.agent for r in pooled}) == 2 or max(concurrency(pooled).values()) <= 2
    single = {
        d["task_name"]: d for d in store.runs.find({"task_name": {"$in": ["s0", "s1", "s2"]}})
    }
    statuses = Counter(d["status"] for d in single.values())
    assert statuses == {"succeeded": 1, "skipped": 2}, statuses
    for doc in single.values():
        if doc["status"] == "skipped":
            assert "waited 1s for a place in pool 'single'" in doc["error"]
    assert Counter(r.task for r in seen if r.task.startswith("s") and r.kind == "start") == {
        next(n for n, d in single.items() if d["status"] == "succeeded"): 1
    }


def test_pools_are_checked_when_tasks_are_saved(store):
    ops = Operations(store)
    with pytest.raises(ValidationError) as e:
        ops.create_task(
            "alice", {"name": "x", "schedule": {"every": "1h"}, "command": "true", "pool": "db"}
        )
    assert [p.path for p in e.value.problems] == ["pool"]
    with pytest.raises(ValidationError) as e:
        ops.set_pool("alice", "db", 0)
    assert [p.path for p in e.value.problems] == ["size"]
    ops.set_pool("alice", "db", 3)
    ops.create_task(
        "alice", {"name": "x", "schedule": {"every": "1h"}, "command": "true", "pool": "db"}
    )
    with pytest.raises(Conflict, match="named by 1 task"):
        ops.delete_pool("alice", "db")
    assert store.get_pool("db")["size"] == 3
    assert store.audit.find_one({"action": "pool.set"})["after"] == {"size": 3}


def test_the_cli_sets_lists_and_deletes_pools(store, mongo_server, mongo_db_name, tmp_path):
    env = {
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_CONFIG": "",
    }
    runner = CliRunner()
    out = runner.invoke(cli, ["pool", "set", "db", "4"], env=env)
    assert out.exit_code == 0 and "pool db: 4 at once" in out.output, out.output
    out = runner.invoke(cli, ["pool", "list"], env=env)
    assert out.output.strip() == "db\t4"
    out = runner.invoke(cli, ["pool", "delete", "db"], env=env)
    assert out.exit_code == 0 and store.list_pools() == []


def test_the_api_and_the_cluster_page_show_the_pools(store):
    from helpers import OPERATOR, VIEWER, make_web_app, web_login

    from cloudtask.config import load_config
    from cloudtask.users import Users

    app = make_web_app(store, config=load_config(None, environ={}), users=[OPERATOR, VIEWER])
    token = Users(store).create_token(OPERATOR.name, "tests")
    viewer = Users(store).create_token(VIEWER.name, "tests")
    client = app.test_client()

    def call(method, path, who=token, **kw):
        return client.open(
            f"/api/v1{path}", method=method, headers={"Authorization": f"Bearer {who}"}, **kw
        )

    assert call("PUT", "/pools/db", json={"size": 2}).status_code == 201
    assert call("PUT", "/pools/db", json={"size": 3}).get_json()["size"] == 3
    assert call("PUT", "/pools/db", json={"size": 0}).status_code == 422
    assert call("PUT", "/pools/db", viewer, json={"size": 1}).status_code == 403
    listed = call("GET", "/pools", viewer).get_json()["items"]
    assert [(p["name"], p["size"], p["running"]) for p in listed] == [("db", 3, None)]
    web_login(client, VIEWER.name, VIEWER.password, "/")
    page = client.get("/cluster").get_data(as_text=True)
    assert 'id="pools"' in page and "<td>db</td><td>3</td>" in page
    assert call("DELETE", "/pools/db").get_json() == {"deleted": "db"}
    assert call("DELETE", "/pools/db").status_code == 404

"""``on_lost: rerun``: a scheduled run lost with its agent (kill -9 mid-run) is run again as
the next attempt by the task's new owner; with ``record`` (the default) it stays lost. Real
ZooKeeper, the MongoDB wire server, a center and two agents as processes; judged by the
runs' own execution records."""

from __future__ import annotations

import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from helpers import make_task, wait_for
from test_cluster import Cluster

from cloudtask.testing.records import read_records, recording_command


@pytest.mark.parametrize("on_lost", ["rerun", "record"])
def test_a_run_lost_with_its_agent_runs_again_only_when_the_task_says_so(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, store, on_lost
):
    records = tmp_path / "records"
    at = datetime.now(timezone.utc) + timedelta(seconds=12)
    task = make_task(
        store,
        "lost-once",
        schedule={"at": at.isoformat()},
        command=recording_command(records, work="sleep 6"),
        on_lost=on_lost,
    )
    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    try:
        cluster.center("c1")
        cluster.agent("a1")
        cluster.agent("a2")
        first = wait_for(
            lambda: next((r for r in read_records(records) if r.kind == "start"), None),
            timeout=60,
            message="the fire did not start",
        )
        victim = first.agent
        cluster.kill(victim, signal.SIGKILL)
        lost = wait_for(
            lambda: store.runs.find_one({"task_id": task["_id"], "status": "lost"}),
            timeout=60,
            message="the run was not marked lost",
        )
        assert lost["attempt"] == 0 and lost["agent"] == victim
        if on_lost == "rerun":
            rerun = wait_for(
                lambda: store.runs.find_one(
                    {"task_id": task["_id"], "attempt": 1, "status": "succeeded"}
                ),
                timeout=60,
                message="the lost run was not run again",
            )
            assert rerun["trigger"] == "retry" and rerun["agent"] != victim
        else:
            time.sleep(8)  # what a rerun would have needed
    finally:
        cluster.stop_all()
    seen = read_records(records)
    starts = [(r.attempt, r.agent) for r in seen if r.kind == "start"]
    if on_lost == "rerun":
        assert starts[0] == (0, victim) and len(starts) == 2, starts
        assert starts[1][0] == 1 and starts[1][1] != victim
        assert [r.attempt for r in seen if r.kind == "end"] == [1]
    else:
        assert starts == [(0, victim)], starts
        assert store.runs.count_documents({"task_id": task["_id"], "attempt": 1}) == 0

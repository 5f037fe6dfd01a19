"""Blackout windows in a real cluster: a task firing every second, in a group with a blackout
covering a few seconds. Every fire in the window is recorded ``skipped`` with the reason
``blackout NAME`` (one run per fire), the task's own execution records show that nothing
started in it, and the runs go on after it. Real ZooKeeper, the MongoDB wire server, a
center and an agent as processes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from helpers import wait_for
from test_cluster import Cluster

from cloudtask.operations import Operations
from cloudtask.testing.records import read_records, recording_command

UTC = timezone.utc


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def test_fires_in_a_blackout_are_recorded_skipped_and_nothing_starts(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, store
):
    records = tmp_path / "records"
    ops = Operations(store)
    ops.create_task(
        "alice",
        {
            "name": "tick",
            "group": "default",
            "schedule": {"cron": "* * * * * *"},  # every second
            "concurrency": "allow",
            "command": recording_command(records),
        },
    )
    # a blackout of another group, and one of every group that is not now: neither counts
    ops.set_blackout(
        "alice",
        "elsewhere",
        {"group": "batch", "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
    )
    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    cluster.env["CLOUDTASK_AGENT_POLL_INTERVAL"] = "1s"
    try:
        cluster.center("c1")
        cluster.agent("a1")
        wait_for(
            lambda: sum(1 for r in read_records(records) if r.kind == "end") >= 3,
            timeout=60,
            interval=0.5,
            message="the task did not run before the blackout",
        )
        start = (datetime.now(UTC) + timedelta(seconds=7)).replace(microsecond=0)
        end = start + timedelta(seconds=6)
        ops.set_blackout(
            "alice",
            "maint",
            {
                "group": "default",
                "timezone": "Europe/Berlin",  # local times: the window is the same instants
                "start": start.astimezone(_berlin()).replace(tzinfo=None).isoformat(),
                "end": end.astimezone(_berlin()).replace(tzinfo=None).isoformat(),
            },
        )
        wait_for(
            lambda: any(
                r.kind == "start" and _aware(r.scheduled_for) >= end + timedelta(seconds=3)
                for r in read_records(records)
            ),
            timeout=60,
            interval=0.5,
            message="the runs did not go on after the blackout",
        )
    finally:
        cluster.stop_all()
    runs = list(store.runs.find({"task_name": "tick"}))
    in_window = {
        _aware(d["scheduled_for"]): d for d in runs if start <= _aware(d["scheduled_for"]) < end
    }
    # one run document for each fire of the window, each skipped with the reason
    assert sorted(in_window) == [start + timedelta(seconds=k) for k in range(6)], sorted(in_window)
    for doc in in_window.values():
        assert (doc["status"], doc.get("error")) == ("skipped", "blackout maint"), doc
    # the task's own records: nothing of the window started, and nothing started in it
    seen = read_records(records)
    starts = [r for r in seen if r.kind == "start"]
    assert not [r for r in starts if start <= _aware(r.scheduled_for) < end]
    assert not [r for r in starts if start.timestamp() + 0.5 <= r.time < end.timestamp() - 0.5]
    # before and after it, the task ran
    assert any(_aware(r.scheduled_for) < start for r in starts)
    after = [r for r in starts if _aware(r.scheduled_for) >= end]
    assert after, "no run after the blackout"
    assert all(
        d["status"] != "skipped"
        for d in runs
        if _aware(d["scheduled_for"]) >= end + timedelta(seconds=1)
    )


def _berlin():
    from zoneinfo import ZoneInfo

    return ZoneInfo("Europe/Berlin")

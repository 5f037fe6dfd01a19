"""``cloudtask status`` against real servers: a running cluster (a center and two agents as
processes) is well (exit 0); fewer agents than expected, an agent killed, a task no agent can
run, the centers stopped, ZooKeeper unreachable, MongoDB gone, runs stuck or lost, deliveries
piling up are each reported with exit 1; bad input exits 2."""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner
from helpers import make_task, run_document, wait_for
from test_cluster import Cluster

from cloudtask.cli import cli
from cloudtask.localservers import free_port
from cloudtask.notify.deliveries import new_delivery
from cloudtask.testing import TcpProxy

pytestmark = pytest.mark.external


# no `cloudtask up` of this folder lends its addresses to the configs below (localstate.py)
NO_LOCAL_CLUSTER = {"CLOUDTASK_DATA_DIR": "/nonexistent/cloudtask-status-tests"}


def status(config_path, *args: str):
    """Run ``cloudtask status --config FILE ARGS``: (exit code, output)."""
    result = CliRunner().invoke(
        cli, ["status", "--config", str(config_path), *args], env=NO_LOCAL_CLUSTER
    )
    return result.exit_code, result.output


def status_json(config_path, *args: str):
    code, output = status(config_path, "--json", *args)
    return code, json.loads(output)


def write_config(tmp_path, name="status.json", **sections) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(sections))
    return str(path)


@pytest.fixture
def standalone_config(tmp_path, mongo_server, mongo_db_name):
    """No ZooKeeper: the cluster's checks are skipped, the store's are made."""
    return write_config(tmp_path, mongodb={"uri": mongo_server.uri, "database": mongo_db_name})


def test_bad_input_exits_2(standalone_config, tmp_path):
    for args in (["--expect", "default"], ["--expect", "=2"], ["--window", "soon"],
                 ["--window", "0s"], ["--timeout", "0"]):  # fmt: skip
        code, output = status(standalone_config, *args)
        assert code == 2, (args, output)
        assert "Traceback" not in output
    broken = tmp_path / "broken.json"
    broken.write_text('{"agent": {"metrics_port": "lots"}}')
    code, output = status(broken)
    assert code == 2 and "agent.metrics_port" in output


def test_a_quiet_store_without_a_cluster_is_well(standalone_config, store):
    make_task(store, "job")
    code, report = status_json(standalone_config)
    assert code == 0, report
    assert report["ok"] is True
    checks = report["checks"]
    assert checks["zookeeper"]["state"] == "skipped" and checks["leader"]["state"] == "skipped"
    assert checks["mongodb"]["state"] == "ok"
    assert checks["tasks"]["enabled"] == 1
    code, table = status(standalone_config)
    assert code == 0 and "All is well." in table and "mongodb     ok" in table


def test_stuck_and_lost_runs_and_deliveries_piling_up(standalone_config, store):
    task = make_task(store, "nightly")
    now = datetime.now(timezone.utc)
    stuck = run_document(task, now - timedelta(minutes=10), agent="ghost")
    stuck["beat"] = time.time() - 600  # its agent stopped beating it ten minutes ago
    beaten = run_document(task, now - timedelta(minutes=9), agent="a1")
    beaten["beat"] = time.time()
    starting = run_document(task, now - timedelta(seconds=1), agent="a2")  # beats soon
    assert store.claim_runs([stuck, beaten, starting]) == [True] * 3
    code, report = status_json(standalone_config)
    runs = report["checks"]["runs"]
    assert code == 1 and report["ok"] is False
    assert runs["state"] == "wrong" and runs["stuck"] == 1 and runs["lost_recently"] == 0
    assert runs["running"] == 3
    assert any("nightly on ghost (silent 10m)" in p for p in runs["problems"])

    # the stuck run judged lost, as a leader does: no longer stuck, but lost lately
    assert store.mark_runs_lost({"_id": stuck["_id"]}, "its agent left") == [stuck["_id"]]
    code, report = status_json(standalone_config, "--window", "1h")
    runs = report["checks"]["runs"]
    assert code == 1 and runs["stuck"] == 0 and runs["lost_recently"] == 1
    assert any("1 runs were recorded lost in the last 1h" in p for p in runs["problems"])
    code, report = status_json(standalone_config, "--window", "1ms")  # not lately
    assert report["checks"]["runs"]["state"] == "ok", report["checks"]["runs"]
    assert code == 0

    store.insert_deliveries(
        [
            new_delivery(
                "d1",
                event_id="e1",
                kind="run.failed",
                channel="mail",
                target="ops@example.org",
                now=time.time() - 900,
                subject="s",
                body="b",
            )  # fmt: skip
        ]
    )
    code, output = status(standalone_config)
    assert code == 1
    assert "deliveries  wrong" in output and "most overdue by 15m" in output
    assert "Something is wrong:" in output


def test_mongodb_unreachable_exits_1(tmp_path):
    config = write_config(tmp_path, mongodb={"uri": f"mongodb://127.0.0.1:{free_port()}"})
    code, output = status(config, "--timeout", "1")
    assert code == 1
    assert "mongodb     wrong" in output and "MongoDB is not reachable" in output
    assert "runs        unknown" in output


SESSION = 2.0


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path, request):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    yield c
    c.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.timeout(240)
def test_a_running_cluster_then_what_goes_wrong(
    cluster, store, zk_server, zk_hosts, mongo_server, mongo_db_name, tmp_path
):
    mongodb = {"uri": mongo_server.uri, "database": mongo_db_name}
    config = write_config(
        tmp_path, zookeeper={"hosts": zk_hosts, "session_timeout": f"{SESSION}s"}, mongodb=mongodb
    )
    make_task(store, "tick", schedule={"every": "1s"}, command="true")
    cluster.center("c1")
    cluster.agent("a1")
    cluster.agent("a2")

    def well():
        code, report = status_json(config, "--expect", "default=2")
        return code == 0 and report

    report = wait_for(well, timeout=60, message="the cluster never looked well")
    checks = report["checks"]
    assert checks["leader"]["leader"] == "c1" and checks["leader"]["centers"] == ["c1"]
    default = checks["agents"]["groups"]["default"]
    assert default == {"online": 2, "known": 2, "expected": 2, "enabled_tasks": 1}
    assert checks["tasks"]["unassigned"] == 0
    code, table = status(config)
    assert code == 0 and "center c1 leads (1 running)" in table and "All is well." in table

    # more agents expected than run
    code, output = status(config, "--expect", "default=3")
    assert code == 1 and "group default: 2 agents online, 3 expected" in output

    # a task for a group with no agent: no one can run it
    make_task(store, "orphan", group="nobody")
    code, report = wait_for(
        lambda: (r := status_json(config))[1]["checks"]["tasks"].get("unassigned") and r,
        timeout=30,
    )
    assert code == 1
    assert any("orphan" in p for p in report["checks"]["tasks"]["problems"])
    assert any(
        "group nobody has 1 enabled tasks and no agent online" in p
        for p in report["checks"]["agents"]["problems"]
    )
    store.delete_task(store.get_task_by_name("orphan")["_id"])

    # an agent killed: it goes offline once its session ends, and that is recent
    cluster.kill("a2", signal.SIGKILL)

    def offline():
        code, report = status_json(config)
        problems = report["checks"]["agents"]["problems"]
        return code == 1 and any("agent a2 (group default) went offline" in p for p in problems)

    wait_for(offline, timeout=60, message="the killed agent was not reported offline")

    # the link to ZooKeeper down: exit 1, and what needs it is unknown
    with TcpProxy(zk_server.hosts) as proxy:
        chroot = zk_hosts[len(zk_server.hosts) :]
        hosts = {"hosts": proxy.address + chroot}
        via = write_config(tmp_path, "via-proxy.json", zookeeper=hosts, mongodb=mongodb)
        assert status(via)[0] in (0, 1)  # reachable through the proxy
        proxy.reset()  # every connection refused, as a stopped server would
        code, report = status_json(via, "--timeout", "2")
        assert code == 1
        assert report["checks"]["zookeeper"]["state"] == "wrong"
        assert "not reachable" in report["checks"]["zookeeper"]["problems"][0]
        assert report["checks"]["leader"]["state"] == "unknown"
        assert report["checks"]["mongodb"]["state"] == "ok"

    # the centers stopped: no leader
    cluster.kill("c1", signal.SIGTERM)

    def no_leader():
        code, output = status(config)
        return code == 1 and "no center leads" in output and output

    output = wait_for(no_leader, timeout=30, message="a leader is still seen")
    assert "leader      wrong" in output

"""The dashboard and the cluster page (Flask test client on a real store and a real ZooKeeper):
the dashboard's figures match the data made here (tasks by state, runs of the last 24 h by
status and the success rate, failing tasks, unassigned tasks by name, agents online and
offline, recent runs) and it works without ZooKeeper; the cluster page lists agents by group
with their host, pid, load and tasks, offline agents with when they were last seen, the
centers with the leader marked, and groups that need an agent; roles and login."""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone

import pytest
from helpers import VIEWER, make_task, make_web_app, post_login, run_document

from cloudtask.clock import to_bson_time
from cloudtask.config import Config
from cloudtask.zkpaths import ZkPaths, encode

NOW = datetime.now(timezone.utc)
SOON = {"at": (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}  # a one-shot schedule


# --- helpers ----------------------------------------------------------------------------------


def make_app(store, zk=None, **config):
    return make_web_app(store, zk, users=[VIEWER], **config)


def login(client, username="viewer1", password="viewer passphrase") -> None:
    assert post_login(client, username, password).status_code == 302


def viewer_client(store, zk):
    """The test client of a new app on ``store`` and ``zk``, logged in as viewer1."""
    client = make_app(store, zk).test_client()
    login(client)
    return client


def figure(page: str, name: str) -> str:
    match = re.search(rf'data-figure="{re.escape(name)}"[^>]*>([^<]*)<', page)
    assert match, f"no figure {name} in the page"
    return match.group(1).strip()


def section(page: str, element_id: str) -> str:
    """The HTML of ``<section ... id=element_id>`` up to its end."""
    start = page.index(f'id="{element_id}"')
    return page[start : page.index("</section>", start)]


def mark_done(store, task):
    doc = store.tasks.find_one({"_id": task["_id"]})
    doc["done_at"] = to_bson_time(NOW)
    store.tasks.replace_one({"_id": doc["_id"]}, doc)  # whole: a $set date reads back as text


def add_run(store, task, status, hours_ago, agent="agent-1", output=""):
    when = NOW - timedelta(hours=hours_ago)
    doc = run_document(task, when, status=status, agent=agent)
    if status not in ("queued", "running"):
        doc.update(
            started_at=to_bson_time(when),
            finished_at=to_bson_time(when + timedelta(seconds=2)),
            duration=2.0,
        )
    doc["output_tail"] = output
    store.runs.insert_one(doc)
    store.note_last_runs([doc])
    return doc


def register_agent(zk, paths, group, agent_id, *, leaving=False, **info):
    doc = {
        "agent_id": agent_id,
        "group": group,
        "host": f"host-{agent_id}",
        "pid": 4001,
        "version": "9.9.1",
        "max_parallel": 8,
        "started_at": "2026-11-24T08:00:00+00:00",
        "cores": 4,
        "load": {
            "cpu_percent": 30,
            "memory_percent": 60,
            "agent_cpu_percent": 3,
            "agent_rss_mb": 110,
            "running": 2,
        },
        **info,
    }
    if leaving:
        doc["leaving"] = True
    zk.create(paths.agent(group, agent_id), encode(doc), ephemeral=True, makepath=True)
    return doc


def register_center(zk, paths, center_id, pid):
    doc = {"center_id": center_id, "host": f"host-{center_id}", "pid": pid, "version": "9.9.1"}
    zk.create(paths.center(center_id), encode(doc), ephemeral=True, makepath=True)


def publish_status(zk, paths, leader, unassigned):
    zk.create(paths.status, encode({"leader": leader, "unassigned": unassigned}), makepath=True)


# --- the dashboard ----------------------------------------------------------------------------


@pytest.fixture
def cluster_data(store, zk):
    """Tasks in every state, runs in and out of the last 24 h, a cluster with agents online,
    leaving and offline, two centers and an unassigned task. Returns what was made."""
    paths = ZkPaths(Config().zookeeper.root)
    t = {
        "ok": make_task(store, "ok-task", group="g1"),
        "fails": make_task(store, "fails-task", group="g1"),
        "slow": make_task(store, "slow-task", group="g1"),
        "gone": make_task(store, "gone-task", group="g1"),
        "recovered": make_task(store, "recovered-task", group="g1"),
        "paused": make_task(store, "paused-task", group="g1", enabled=False),
        "once": make_task(store, "once-task", group="g1", schedule=SOON),
        "paused-once": make_task(store, "paused-once", group="g1", enabled=False, schedule=SOON),
        "stranded": make_task(store, "stranded-task", group="nobody-here"),
    }
    mark_done(store, t["once"])
    mark_done(store, t["paused-once"])
    # older than 24 h, left out of the figures (made first: each run noted last is the last)
    add_run(store, t["gone"], "lost", 50)  # its last run: failing, though not in the figures
    add_run(store, t["ok"], "succeeded", 40)
    for i in range(4):
        add_run(store, t["ok"], "failed", 33 - i)
    add_run(store, t["recovered"], "failed", 26)
    # the last 24 h: 3 succeeded, 1 failed, 1 timed out, 1 killed, 2 skipped, 1 missed, 1 running
    # -> counted 6 (skipped, missed and running do not count), 3 succeeded: 50.0 %
    add_run(store, t["ok"], "succeeded", 20)
    add_run(store, t["ok"], "succeeded", 10)
    add_run(store, t["recovered"], "succeeded", 4)  # its last run succeeded: not failing
    add_run(store, t["fails"], "failed", 3, output="SECRET-OUTPUT-TAIL")
    add_run(store, t["slow"], "timed_out", 2)
    add_run(store, t["ok"], "killed", 1.5)
    add_run(store, t["ok"], "skipped", 1.2)
    add_run(store, t["ok"], "skipped", 1.1)
    add_run(store, t["ok"], "missed", 1)
    running = add_run(store, t["ok"], "running", 0.1)
    # the cluster
    register_agent(zk, paths, "g1", "agent-1")
    register_agent(zk, paths, "g1", "agent-2", leaving=True)
    zk.create(paths.assignment("agent-1", t["ok"]["_id"]), b"{}", makepath=True)
    zk.create(paths.assignment("agent-1", t["fails"]["_id"]), b"{}", makepath=True)
    zk.create(paths.assignment("agent-1", t["slow"]["_id"]), b"{}", makepath=True)
    # the leader saw agent-9 before, then no more: it is recorded offline
    seen = datetime(2026, 11, 20, 12, 30, 5, tzinfo=timezone.utc)
    store.record_agents({"agent-9": {"group": "g1", "host": "old-host", "pid": 77}}, now=seen)
    store.record_agents(
        {"agent-1": {"group": "g1", "host": "host-agent-1"}}, now=seen + timedelta(hours=1)
    )
    register_center(zk, paths, "center-a", 501)
    register_center(zk, paths, "center-b", 502)
    publish_status(zk, paths, "center-b", {t["stranded"]["_id"]: "nobody-here"})
    return {"tasks": t, "running": running, "offline_seen": seen + timedelta(hours=1)}


def test_the_dashboard_figures_match_the_data(store, zk, cluster_data):
    client = viewer_client(store, zk)
    answer = client.get("/")
    assert answer.status_code == 200
    page = answer.get_data(as_text=True)
    # tasks by state, as the task list's state filter counts them
    assert figure(page, "tasks-total") == "9"
    assert figure(page, "tasks-enabled") == "6"  # ok, fails, slow, gone, recovered, stranded
    assert figure(page, "tasks-paused") == "2"  # paused-task, paused-once (done too)
    assert figure(page, "tasks-done") == "2"
    for state in ("enabled", "paused", "done"):
        assert figure(page, f"tasks-{state}") == str(store.task_page({"state": state}).total)
    # runs scheduled in the last 24 h only
    expected = {
        "succeeded": 3,
        "failed": 1,
        "timed_out": 1,
        "killed": 1,
        "skipped": 2,
        "missed": 1,
        "running": 1,
        "queued": 0,
        "lost": 0,
    }
    for status, n in expected.items():
        assert figure(page, f"runs-{status}") == str(n), status
    assert figure(page, "runs-total") == "10"
    assert figure(page, "success-rate") == "50.0"
    assert "3 succeeded of 6 finished runs" in page
    rate = section(page, "run-stats")
    assert re.search(
        r'title="succeeded ÷ \(succeeded \+ failed \+ timed_out \+ lost \+ killed\)', rate
    )
    # failing tasks: last run failed, timed out or lost; a recovered task is not failing
    failing = section(page, "failing-tasks")
    names = re.findall(r'<a href="/tasks/[^"]+">([^<]+)</a>', failing)
    assert names == ["slow-task", "fails-task", "gone-task"]  # latest failure first
    assert figure(page, "failing-total") == "3"
    fails = cluster_data["tasks"]["fails"]
    assert f'href="/tasks/{fails["_id"]}"' in failing
    assert f"/runs/{store.get_task(fails['_id'])['last_run']['id']}" in failing
    # unassigned tasks, by name, with their group
    unassigned = section(page, "unassigned-tasks")
    assert "stranded-task" in unassigned and "nobody-here" in unassigned
    assert figure(page, "unassigned-total") == "1"
    # agents: agent-1 online, agent-2 leaving, agent-9 offline (recorded by the leader)
    assert figure(page, "agents-online") == "1"
    assert figure(page, "agents-leaving") == "1"
    assert figure(page, "agents-offline") == "1"
    agents = section(page, "agent-stats")
    assert "agent-9" in agents and "old-host" in agents and "2026-11-20 13:30:05" in agents
    assert "cluster not connected" not in page.lower()


def test_recent_runs_are_the_newest_scheduled_with_links_and_no_output(store, zk, cluster_data):
    client = viewer_client(store, zk)
    page = client.get("/").get_data(as_text=True)
    recent = section(page, "recent-runs")
    newest = list(store.runs.find({}, {"_id": 1}).sort("scheduled_for", -1).limit(15))
    links = re.findall(r'<td class="mono"><a href="/runs/([^"]+)">', recent)
    assert links == [d["_id"] for d in newest]
    assert links[0] == cluster_data["running"]["_id"]
    assert store.runs.count_documents({}) > 15  # some were left out
    assert "SECRET-OUTPUT-TAIL" not in page


def test_the_dashboard_works_without_zookeeper(store, cluster_data):
    client = viewer_client(store, None)
    answer = client.get("/")
    assert answer.status_code == 200
    page = answer.get_data(as_text=True)
    assert "Cluster not connected" in page
    assert "cluster not connected" in section(page, "agent-stats")
    assert "cluster not connected" in section(page, "unassigned-tasks")
    assert 'data-figure="agents-online"' not in page
    # everything read from MongoDB is still there
    assert figure(page, "tasks-enabled") == "6"
    assert figure(page, "runs-succeeded") == "3"
    assert figure(page, "success-rate") == "50.0"
    assert "fails-task" in section(page, "failing-tasks")


def test_an_empty_dashboard(store):
    client = viewer_client(store, None)
    page = client.get("/").get_data(as_text=True)
    assert figure(page, "tasks-total") == "0"
    assert figure(page, "success-rate") == "–"
    assert "no finished run to count yet" in page
    assert "No failing tasks" in page and "No runs yet" in page


def test_failing_tasks_are_capped_latest_first(store):
    app = make_app(store, None)
    for i in range(23):
        task = make_task(store, f"bad-{i:02d}")
        add_run(store, task, "failed", 100 - i)  # bad-22 failed last
    client = app.test_client()
    login(client)
    page = client.get("/").get_data(as_text=True)
    failing = section(page, "failing-tasks")
    names = re.findall(r'<a href="/tasks/[^"]+">([^<]+)</a>', failing)
    assert names == [f"bad-{i:02d}" for i in range(22, 2, -1)]
    assert figure(page, "failing-total") == "23"
    assert "the latest 20 shown" in failing


def test_the_figures_are_read_at_most_once_per_cache_window(store):
    first = make_task(store, "first")
    cached = make_app(store, None, DASHBOARD_CACHE_SECONDS=600)
    fresh = make_app(store, None, DASHBOARD_CACHE_SECONDS=0)
    clients = {"cached": cached.test_client(), "fresh": fresh.test_client()}
    for client in clients.values():
        login(client)
        assert figure(client.get("/").get_data(as_text=True), "tasks-total") == "1"
    second = make_task(store, "second")
    run = add_run(store, second, "failed", 0.5)
    add_run(store, first, "succeeded", 0.2)
    page = clients["cached"].get("/").get_data(as_text=True)
    assert figure(page, "tasks-total") == "1" and figure(page, "runs-failed") == "0"
    assert f"/runs/{run['_id']}" in section(page, "recent-runs")  # recent runs are always read
    page = clients["fresh"].get("/").get_data(as_text=True)
    assert figure(page, "tasks-total") == "2" and figure(page, "runs-failed") == "1"
    assert figure(page, "success-rate") == "50.0"


# --- the cluster page -------------------------------------------------------------------------


def agent_row(page: str, agent_id: str) -> str:
    match = re.search(rf'<tr data-agent="{re.escape(agent_id)}"[^>]*>(.*?)</tr>', page, re.DOTALL)
    assert match, f"no row for agent {agent_id}"
    return match.group(0)


def cells(row: str) -> list[str]:
    return [
        html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
        for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)
    ]


def test_the_cluster_page_lists_agents_by_group_and_the_centers(store, zk, cluster_data):
    paths = ZkPaths(Config().zookeeper.root)
    register_agent(
        zk, paths, "g3", "agent-3", host="box-3", pid=3333, load={"cpu_percent": 80, "running": 1}
    )
    client = viewer_client(store, zk)
    answer = client.get("/cluster")
    assert answer.status_code == 200
    page = answer.get_data(as_text=True)
    g1 = section(page, "group-g1")
    # Agent, Status, Host, PID, Host load, Agent process, Running / max_parallel, Tasks, Version,
    # Started, Last seen
    assert cells(agent_row(g1, "agent-1")) == [
        "agent-1",
        "online",
        "host-agent-1",
        "4001",
        "cpu 30 % of 4 cores · mem 60 %",
        "cpu 3 % · 110 MB",
        "2 / 8",
        "3",
        "9.9.1",
        "2026-11-24 08:00:00",
        "now",
    ]
    assert 'data-status="leaving"' in agent_row(g1, "agent-2")
    offline = cells(agent_row(g1, "agent-9"))
    assert offline[:4] == ["agent-9", "offline", "old-host", "77"]
    assert offline[-1] == cluster_data["offline_seen"].strftime("%Y-%m-%d %H:%M:%S")
    assert offline[4:8] == ["–", "–", "– / –", "–"]  # an offline agent runs nothing
    # agent-2 is leaving; the done one-shot task does not count, as in the list's state=enabled
    assert "1 live agent" in g1 and "5 enabled tasks" in g1
    g3 = section(page, "group-g3")
    row3 = cells(agent_row(g3, "agent-3"))  # an agent of a version that published less
    assert row3[2:7] == ["box-3", "3333", "cpu 80 % of 4 cores · mem –", "–", "1 / 8"]
    assert "agent-1" not in g3
    # groups that need an agent
    assert "1 task unassigned: no live agent in this group" in section(page, "group-nobody-here")
    assert "no live agent" not in g1
    # centers, the leader marked and first
    centers = section(page, "centers")
    rows = re.findall(r'<tr data-center="([^"]+)"( class="leader")?>(.*?)</tr>', centers, re.DOTALL)
    assert [(r[0], bool(r[1])) for r in rows] == [("center-b", True), ("center-a", False)]
    assert cells(rows[0][2])[:4] == ["center-b", "leader", "host-center-b", "502"]
    assert cells(rows[1][2])[1] == "standby"


def test_the_cluster_page_filters_by_group(store, zk, cluster_data):
    paths = ZkPaths(Config().zookeeper.root)
    register_agent(zk, paths, "g3", "agent-3")
    client = viewer_client(store, zk)
    page = client.get("/cluster?group=g3").get_data(as_text=True)
    assert 'data-agent="agent-3"' in page
    assert 'data-agent="agent-1"' not in page and 'id="group-g1"' not in page
    assert '<option value="g1"' in page  # the other groups can still be chosen
    page = client.get("/cluster?group=no-such-group").get_data(as_text=True)
    assert "No agents and no tasks in group" in page and "no-such-group" in page
    answer = client.get("/cluster?group=" + "x" * 300)
    assert answer.status_code == 422
    assert "group: at most 200 characters" in answer.get_data(as_text=True)


def test_the_cluster_page_without_zookeeper(store):
    store.record_agents({"agent-5": {"group": "g1", "host": "h5", "pid": 55}})
    make_task(store, "some-task", group="g1")
    client = viewer_client(store, None)
    answer = client.get("/cluster")
    assert answer.status_code == 200
    page = answer.get_data(as_text=True)
    assert "Cluster not connected" in page
    row = agent_row(page, "agent-5")
    assert cells(row)[1:4] == ["unknown", "h5", "55"]
    assert 'title="as last recorded: online"' in row
    assert "cluster not connected" in section(page, "centers")
    assert "no live agent" not in page  # unknown, not absent


def test_the_cluster_page_says_when_no_center_runs(store, zk):
    client = viewer_client(store, zk)
    page = client.get("/cluster").get_data(as_text=True)
    assert "No center is running" in page
    assert "No agents and no tasks yet" in page


def test_without_a_leader_a_group_of_tasks_without_agents_is_flagged(store, zk):
    paths = ZkPaths(Config().zookeeper.root)
    make_task(store, "lonely", group="g4")
    make_task(store, "resting", group="g5", enabled=False)
    register_agent(zk, paths, "g1", "agent-1")
    register_center(zk, paths, "center-a", 501)  # a standby: no /status, nobody leads
    client = viewer_client(store, zk)
    page = client.get("/cluster").get_data(as_text=True)
    assert "No center leads" in section(page, "centers")
    assert "enabled tasks but no live agent" in section(page, "group-g4")
    assert 'id="group-g5"' not in page  # paused tasks need no agent
    assert "no live agent" not in section(page, "group-g1")


# --- login and roles --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/cluster", "/cluster?group=g1"])
def test_anonymous_users_are_sent_to_the_login_page(store, path):
    client = make_app(store, None).test_client()
    answer = client.get(path)
    assert answer.status_code == 302 and "/login" in answer.headers["Location"]


def test_viewers_see_both_pages(store, zk):
    client = viewer_client(store, zk)
    for path in ("/", "/cluster"):
        answer = client.get(path)
        assert answer.status_code == 200, path
        assert "viewer1 (viewer)" in answer.get_data(as_text=True)

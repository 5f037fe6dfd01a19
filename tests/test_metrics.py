"""Metrics and health on real servers: the web site's ``/metrics`` (scraped with an API token,
refused without a login, its figures checked against what the store holds) and ``/readyz``
(200, then 503 when the link to ZooKeeper is cut or MongoDB is gone); the metrics endpoints
of agents and centers run as processes (runs started and ended, spawn failures, lateness,
claim conflicts between two agents, the leader gauge of two centers, the ZooKeeper state).
Every answer is parsed with ``prometheus_client``'s own parser."""

from __future__ import annotations

import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from helpers import VIEWER, make_task, make_web_app, run_document, wait_for
from kazoo.client import KazooClient
from prometheus_client.parser import text_string_to_metric_families
from test_cluster import Cluster

from cloudtask import __version__
from cloudtask.config import Config
from cloudtask.localservers import free_port
from cloudtask.metrics import AgentMetrics, CenterMetrics, serve
from cloudtask.metrics.figures import buckets
from cloudtask.notify.deliveries import new_delivery
from cloudtask.operations import Operations
from cloudtask.testing import TcpProxy
from cloudtask.users import Users
from web import create_app

pytestmark = pytest.mark.external


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, for every sample of a Prometheus text answer."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_url(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        return parse(answer.read().decode())


# --- the web site's /metrics --------------------------------------------------------------------


@pytest.fixture
def app(store):
    return make_web_app(store, users=[VIEWER], METRICS_CACHE_SECONDS=0)


@pytest.fixture
def token(store, app):
    return Users(store).create_token(VIEWER.name, "prometheus", scope="read")


def scrape(app, token: str) -> dict:
    answer = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.content_type.startswith("text/plain")
    return parse(answer.get_data(as_text=True))


def test_metrics_need_a_login(app, token):
    client = app.test_client()
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]
    assert b"cloudtask_" not in anonymous.get_data()
    wrong = client.get("/metrics", headers={"Authorization": "Bearer not-a-token"})
    assert wrong.status_code == 401 and b"cloudtask_tasks" not in wrong.get_data()
    assert scrape(app, token)  # a viewer's read-only token is enough
    # OpenMetrics when Prometheus asks for it
    answer = client.get(
        "/metrics",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/openmetrics-text; version=1.0.0",
        },
    )
    assert answer.status_code == 200 and answer.content_type.startswith("application/openmetrics")
    assert answer.get_data(as_text=True).rstrip().endswith("# EOF")
    assert "# TYPE cloudtask_fire_lateness_seconds gaugehistogram" in answer.get_data(as_text=True)


def test_metrics_are_what_the_store_holds(app, token, store):
    ops = Operations(store)
    for name in ("a", "b", "c"):
        ops.create_task("test", {"name": name, "schedule": {"every": "1h"}, "command": "true"})
    ops.set_enabled("test", store.get_task_by_name("b")["_id"], False)
    task = store.get_task_by_name("a")
    now = datetime.now(timezone.utc).replace(microsecond=0)
    runs = []
    for i, (status, late) in enumerate(
        [("succeeded", 0.02), ("succeeded", 0.3), ("failed", 3.0), ("running", 0.004)]
    ):
        doc = run_document(task, now - timedelta(seconds=30 + i), status=status)
        doc["started_at"] = doc["scheduled_for"] + timedelta(seconds=late)
        runs.append(doc)
    manual = run_document(task, now - timedelta(seconds=20), status="succeeded", trigger="manual")
    manual["started_at"] = manual["scheduled_for"] + timedelta(seconds=100)  # not a fire
    old = run_document(task, now - timedelta(days=3), status="lost")  # older than a day
    assert store.claim_runs([*runs, manual, old]) == [True] * 6
    due = new_delivery(
        "d1", event_id="e1", kind="run.failed", channel="mail", target="ops@example.org",
        now=time.time() - 100, subject="s", body="b",
    )  # fmt: skip
    later = new_delivery(
        "d2", event_id="e1", kind="run.failed", channel="webhook", target="hook",
        now=time.time() + 3600, body="b", webhook=0,
    )  # fmt: skip
    store.insert_deliveries([due, later])

    m = scrape(app, token)
    assert value(m, "cloudtask_store_up") == 1
    assert value(m, "cloudtask_tasks", state="enabled") == 2
    assert value(m, "cloudtask_tasks", state="paused") == 1
    assert value(m, "cloudtask_tasks", state="done") == 0
    assert value(m, "cloudtask_runs_last_24h", status="succeeded") == 3
    assert value(m, "cloudtask_runs_last_24h", status="failed") == 1
    assert value(m, "cloudtask_runs_last_24h", status="lost") is None  # three days ago
    assert value(m, "cloudtask_runs_unfinished", status="running") == 1
    assert value(m, "cloudtask_runs_unfinished", status="queued") == 0
    # the schedule fires' lateness: 0.004, 0.02, 0.3 and 3 s (the manual run is left out)
    assert value(m, "cloudtask_fire_lateness_seconds_bucket", le="0.005") == 1
    assert value(m, "cloudtask_fire_lateness_seconds_bucket", le="0.025") == 2
    assert value(m, "cloudtask_fire_lateness_seconds_bucket", le="0.5") == 3
    assert value(m, "cloudtask_fire_lateness_seconds_bucket", le="5.0") == 4
    assert value(m, "cloudtask_fire_lateness_seconds_bucket", le="+Inf") == 4
    assert value(m, "cloudtask_fire_lateness_seconds_gcount") == 4
    assert value(m, "cloudtask_fire_lateness_seconds_gsum") == pytest.approx(3.324, abs=0.01)
    assert value(m, "cloudtask_deliveries_pending") == 2
    assert 99 <= value(m, "cloudtask_deliveries_overdue_seconds") < 130
    assert value(m, "cloudtask_deliveries_failed") == 0
    assert value(m, "cloudtask_cluster_connected") == 0  # this site has no ZooKeeper
    assert value(m, "cloudtask_leader_present") is None  # not told without one


def test_metrics_are_read_once_per_cache_period(store):
    app = make_web_app(store, users=[VIEWER], METRICS_CACHE_SECONDS=10)
    token = Users(store).create_token(VIEWER.name, "prometheus")
    ext = app.extensions["cloudtask"]
    now = [1000.0]
    ext.clock = lambda: now[0]
    make_task(store, "one")
    assert value(scrape(app, token), "cloudtask_tasks", state="enabled") == 1
    make_task(store, "two")
    assert value(scrape(app, token), "cloudtask_tasks", state="enabled") == 1  # kept 10 s
    now[0] += 10.5
    assert value(scrape(app, token), "cloudtask_tasks", state="enabled") == 2


def test_two_apps_in_one_process_have_their_own_figures(store, mongo_client):
    from cloudtask.store import Store

    other = Store(mongo_client, f"{store.db.name}_b")
    try:
        one = make_web_app(store, users=[VIEWER], METRICS_CACHE_SECONDS=0)
        two = make_web_app(other, users=[VIEWER], METRICS_CACHE_SECONDS=0)
        make_task(store, "only-here")
        t1 = Users(store).create_token(VIEWER.name, "p")
        t2 = Users(other).create_token(VIEWER.name, "p")
        assert value(scrape(one, t1), "cloudtask_tasks", state="enabled") == 1
        assert value(scrape(two, t2), "cloudtask_tasks", state="enabled") == 0
    finally:
        mongo_client.drop_database(f"{store.db.name}_b")


def test_metrics_without_mongodb_say_so():
    cfg = Config().with_section("mongodb", uri=f"mongodb://127.0.0.1:{free_port()}")
    app = create_app(cfg, {"TESTING": True, "METRICS_CACHE_SECONDS": 0})
    from web.metrics import read_families

    families = {f.name: f for f in read_families(app.extensions["cloudtask"])}
    assert families["cloudtask_store_up"].samples[0].value == 0
    assert "cloudtask_tasks" not in families


def test_lateness_buckets_are_cumulative():
    counts, total = buckets([0.001, 0.2, 0.2, 7.0, 1000.0], (0.01, 0.5, 10.0))
    assert counts == [1, 3, 4, 5] and total == pytest.approx(1007.401)
    assert buckets([], (1.0,)) == ([0, 0], 0.0)


# --- /readyz ------------------------------------------------------------------------------------


def test_readyz_without_a_cluster(app):
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 200
    assert answer.get_json() == {"status": "ready", "failed": []}


def test_readyz_when_mongodb_is_gone_names_it_and_no_address():
    port = free_port()
    cfg = Config().with_section("mongodb", uri=f"mongodb://127.0.0.1:{port}")
    answer = create_app(cfg).test_client().get("/readyz")
    assert answer.status_code == 503
    assert answer.get_json() == {"status": "unavailable", "failed": ["mongodb"]}
    assert str(port) not in answer.get_data(as_text=True)


def test_readyz_follows_the_link_to_zookeeper(zk_server, store):
    with TcpProxy(zk_server.hosts) as proxy:
        zk = KazooClient(proxy.address, timeout=4)
        zk.start(timeout=15)
        try:
            app = make_web_app(store, zk=zk, users=[VIEWER])
            client = app.test_client()
            assert client.get("/readyz").status_code == 200
            token = Users(store).create_token(VIEWER.name, "monitoring")
            auth = {"Authorization": f"Bearer {token}"}
            detailed = client.get("/readyz", headers=auth).get_json()
            assert detailed["checks"] == {"mongodb": "ok", "zookeeper": "ok"}

            proxy.cut()  # a partition: requests get no answer
            answer = wait_for(
                lambda: (a := client.get("/readyz")).status_code == 503 and a,
                timeout=15,
                message="/readyz did not notice the partition",
            )
            assert answer.get_json() == {"status": "unavailable", "failed": ["zookeeper"]}
            detailed = client.get("/readyz", headers=auth).get_json()
            assert detailed["failed"] == ["zookeeper"]
            assert "ZooKeeper" in detailed["checks"]["zookeeper"]
            assert detailed["checks"]["mongodb"] == "ok"

            proxy.forward()  # healed: ready again once kazoo reconnects
            wait_for(lambda: client.get("/readyz").status_code == 200, timeout=30)
        finally:
            zk.stop()
            zk.close()


# --- agents and centers -------------------------------------------------------------------------


def test_the_zookeeper_state_of_a_process(zk_server):
    with TcpProxy(zk_server.hosts) as proxy:
        zk = KazooClient(proxy.address, timeout=4)
        zk.start(timeout=15)
        metrics = AgentMetrics("a1", "default")
        metrics.watch_cluster(zk, lambda: zk.connected)
        server = serve(metrics.registry, "127.0.0.1", free_port(), "agent")
        assert server is not None
        url = f"http://127.0.0.1:{server.port}/metrics"
        try:
            m = scrape_url(url)
            assert value(m, "cloudtask_zookeeper_connected") == 1
            assert value(m, "cloudtask_zookeeper_state", state="connected") == 1
            assert value(m, "cloudtask_zookeeper_state", state="suspended") == 0
            assert value(m, "cloudtask_agent_may_claim") == 1
            info = {"agent": "a1", "group": "default", "version": __version__}
            assert value(m, "cloudtask_agent_info", **info) == 1
            proxy.reset()
            m = wait_for(
                lambda: (
                    (m := scrape_url(url)) and value(m, "cloudtask_zookeeper_connected") == 0 and m
                )
            )
            assert value(m, "cloudtask_zookeeper_state", state="connected") == 0
            assert value(m, "cloudtask_agent_may_claim") == 0
        finally:
            server.close()
            zk.stop()
            zk.close()


def test_a_metrics_port_in_use_is_logged_and_the_rest_goes_on(caplog):
    metrics = AgentMetrics()
    first = serve(metrics.registry, "127.0.0.1", free_port(), "agent")
    assert first is not None
    try:
        assert serve(metrics.registry, "127.0.0.1", first.port, "agent") is None
        assert "cannot listen on 127.0.0.1" in caplog.text
    finally:
        first.close()
    assert serve(metrics.registry, "127.0.0.1", 0, "agent") is None  # 0: none


def test_center_placement_passes_are_counted_and_timed():
    class Stub:  # what the readings look at; the passes are the context manager's
        center_id, leading, zk = "c1", False, None
        unassigned: dict = {}
        too_large: dict = {}

    metrics = CenterMetrics(Stub())
    with metrics.placement_pass():
        time.sleep(0.01)
    with pytest.raises(RuntimeError), metrics.placement_pass():
        raise RuntimeError("ZooKeeper went away")
    r = metrics.registry
    assert r.get_sample_value("cloudtask_center_placement_passes_total", {"result": "ok"}) == 1
    assert r.get_sample_value("cloudtask_center_placement_passes_total", {"result": "failed"}) == 1
    assert r.get_sample_value("cloudtask_center_placement_pass_seconds_count") == 2
    assert r.get_sample_value("cloudtask_center_placement_pass_seconds_sum") >= 0.01
    assert r.get_sample_value("cloudtask_center_leader") == 0
    assert r.get_sample_value("cloudtask_center_tasks_placed", {"agent": "a1"}) is None


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path, request):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    c.env["CLOUDTASK_AGENT_POLL_INTERVAL"] = "0.5s"
    yield c
    c.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


def _with_port(cluster: Cluster, section: str, port: int) -> None:
    cluster.env[f"CLOUDTASK_{section}_METRICS_PORT"] = str(port)


@pytest.mark.timeout(180)
def test_a_cluster_s_agents_centers_and_site(cluster, store, zk_hosts):
    make_task(store, "tick", schedule={"every": "1s"}, command="true")
    make_task(store, "broken", schedule={"every": "1s"}, command=["/nonexistent/program"])
    ports = {name: free_port() for name in ("c1", "c2", "a1")}
    for name in ("c1", "c2"):
        _with_port(cluster, "CENTER", ports[name])
        cluster.center(name)
    _with_port(cluster, "AGENT", ports["a1"])
    cluster.agent("a1")

    def url(name: str) -> str:
        return f"http://127.0.0.1:{ports[name]}/metrics"

    def reachable(name: str) -> dict | None:
        try:
            return scrape_url(url(name))
        except OSError:
            return None

    def agent_ran() -> dict | None:
        m = reachable("a1")
        if not m:
            return None
        ok = value(m, "cloudtask_agent_runs_ended_total", status="succeeded") or 0
        failures = value(m, "cloudtask_agent_spawn_failures_total") or 0
        return m if ok >= 3 and failures >= 3 else None

    m = wait_for(agent_ran, timeout=60, message="the agent's metrics show no runs")
    assert value(m, "cloudtask_agent_runs_started_total") >= 6
    assert value(m, "cloudtask_agent_runs_ended_total", status="failed") >= 3
    assert value(m, "cloudtask_agent_fire_lateness_seconds_count") >= 6
    assert value(m, "cloudtask_agent_tasks") == 2
    assert value(m, "cloudtask_agent_max_parallel") == 16
    assert value(m, "cloudtask_zookeeper_connected") == 1
    assert value(m, "cloudtask_agent_may_claim") == 1
    info = {"agent": "a1", "group": "default", "version": __version__}
    assert value(m, "cloudtask_agent_info", **info) == 1
    assert value(m, "process_resident_memory_bytes") > 0
    # claimed ahead: fires start close to their due time (loose bound: 2 cores, shared)
    within = value(m, "cloudtask_agent_fire_lateness_seconds_bucket", le="1.0")
    assert within / value(m, "cloudtask_agent_fire_lateness_seconds_count") > 0.8

    centers = {n: scrape_url(url(n)) for n in ("c1", "c2")}
    leaders = [n for n, c in centers.items() if value(c, "cloudtask_center_leader") == 1]
    assert len(leaders) == 1, centers
    lead = centers[leaders[0]]
    follower = centers[({"c1", "c2"} - set(leaders)).pop()]
    assert value(lead, "cloudtask_center_tasks_placed", agent="a1") == 2
    assert value(lead, "cloudtask_center_placement_passes_total", result="ok") >= 1
    assert value(lead, "cloudtask_center_placement_pass_seconds_count") >= 1
    assert value(lead, "cloudtask_zookeeper_connected") == 1
    assert value(follower, "cloudtask_center_tasks_placed", agent="a1") is None
    assert value(follower, "cloudtask_center_placement_passes_total", result="ok") in (None, 0)

    # the site, on the same cluster
    site_zk = KazooClient(zk_hosts, timeout=10)
    site_zk.start(timeout=15)
    try:
        app = make_web_app(store, zk=site_zk, users=[VIEWER], METRICS_CACHE_SECONDS=0)
        token = Users(store).create_token(VIEWER.name, "prometheus")
        app.extensions["cloudtask"].cluster(fresh=True)
        site = scrape(app, token)
        assert value(site, "cloudtask_cluster_connected") == 1
        assert value(site, "cloudtask_leader_present") == 1
        assert value(site, "cloudtask_centers") == 2
        assert value(site, "cloudtask_agents", group="default", status="online") == 1
        assert value(site, "cloudtask_agents", group="default", status="offline") == 0
        assert value(site, "cloudtask_tasks", state="enabled") == 2
        assert value(site, "cloudtask_fire_lateness_seconds_gcount") >= 3
        assert client_ready(app)

        cluster.stop_all()  # nothing moves now: the figures must be the store's exactly
        expected: dict[str, int] = {}
        for doc in store.runs.find({}, {"status": 1}):
            expected[doc["status"]] = expected.get(doc["status"], 0) + 1
        app.extensions["cloudtask"].cluster(fresh=True)
        site = scrape(app, token)
        published = {
            dict(labels)["status"]: v
            for (name, labels), v in site.items()
            if name == "cloudtask_runs_last_24h"
        }
        assert published == expected
        assert value(site, "cloudtask_leader_present") == 0  # the centers stopped
        assert value(site, "cloudtask_agents", group="default", status="online") == 0
    finally:
        site_zk.stop()
        site_zk.close()


def client_ready(app) -> bool:
    return app.test_client().get("/readyz").get_json() == {"status": "ready", "failed": []}


@pytest.mark.timeout(120)
def test_two_standalone_agents_count_the_claims_they_lose(cluster, store):
    for i in range(5):
        make_task(store, f"t{i}", schedule={"every": "1s"}, command="true")
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        _with_port(cluster, "AGENT", port)
        name = f"s{i}"
        cluster._spawn(
            name, ["agent", "--standalone", "--id", name, "--data-dir", str(cluster.tmp / name)]
        )

    def conflicts() -> float:
        total = 0.0
        for port in ports:
            try:
                m = scrape_url(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                return 0.0
            total += value(m, "cloudtask_agent_claim_conflicts_total", stage="claim") or 0
        return total

    assert wait_for(conflicts, timeout=60, message="no claim conflict counted") >= 1

    # the winner of a claim starts its run a moment after the loser counted the conflict
    def started() -> float:
        found = [scrape_url(f"http://127.0.0.1:{port}/metrics") for port in ports]
        return sum(value(m, "cloudtask_agent_runs_started_total") or 0 for m in found)

    assert wait_for(started, timeout=30, message="no run start counted") >= 1
    scrapes = [scrape_url(f"http://127.0.0.1:{port}/metrics") for port in ports]
    # standalone: no ZooKeeper, so no series of it
    assert not any(name.startswith("cloudtask_zookeeper") for m in scrapes for name, _ in m)

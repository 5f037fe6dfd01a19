"""The metrics of one agent or center process, on a registry of its own.

:class:`AgentMetrics` and :class:`CenterMetrics` each hold a private
``prometheus_client.CollectorRegistry``: several agents and centers in one process (the tests,
the benches) never share or collide on a series. Two kinds of series:

* **counted where it happens**: a run started, a run ended, a process that could not be
  started, a claim lost to another agent, a placement pass. The hooks are one call each at
  the place in the agent or the center where the thing happens; each is a
  ``prometheus_client`` counter or histogram update (a lock held for an addition), and
  nothing else, on the agent's hot path;
* **read when scraped** (:class:`Readings`): running runs, free slots, the ZooKeeper
  connection, whether this center leads, the tasks placed on each agent. Each is a callable
  given by the agent or the center, called only when ``/metrics`` is asked for; one that
  fails leaves its series out of that answer (and is logged at debug level).

:func:`serve` publishes a registry at ``http://host:port/metrics`` with
``prometheus_client``'s own HTTP server (a daemon thread); ``agent.metrics_port`` and
``center.metrics_port`` (0: none) say where. A port that cannot be listened on is logged as
an error and the process runs on without metrics: scheduling matters more than its figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__

log = logging.getLogger(__name__)

# seconds between a fire's due time and its start (an agent claims ahead, so most are a few ms)
LATENESS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
# seconds one placement pass of the leading center takes
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# what kazoo's connection states are called here (KazooState: CONNECTED, SUSPENDED, LOST)
ZK_STATES = ("connected", "suspended", "lost")

# a reading: the value, a dict of label values to values (a gauge with labels), or None
# (no series now)
Reading = Callable[[], "float | dict[tuple[str, ...], float] | None"]


@dataclass(frozen=True)
class _Gauge:
    name: str
    documentation: str
    labels: tuple[str, ...]
    read: Reading


class Readings(Collector):
    """Gauges read when scraped: ``read()`` returns the value, or for a gauge with labels a
    dict of label values to values; None leaves the series out."""

    def __init__(self) -> None:
        self._gauges: list[_Gauge] = []

    def gauge(
        self, name: str, documentation: str, read: Reading, labels: tuple[str, ...] = ()
    ) -> None:
        self._gauges.append(_Gauge(name, documentation, labels, read))

    def collect(self) -> Iterator[Metric]:
        for gauge in list(self._gauges):
            try:
                value = gauge.read()
            except Exception as e:  # a reading that fails leaves out its series only
                log.debug("metric %s not read: %s", gauge.name, e)
                continue
            if value is None:
                continue
            family = GaugeMetricFamily(
                gauge.name, gauge.documentation, labels=list(gauge.labels) or None
            )
            if gauge.labels:
                assert isinstance(value, dict)
                for key, v in sorted(value.items()):
                    family.add_metric(list(key), float(v))
            else:
                family.add_metric([], float(value))  # type: ignore[arg-type]
            yield family


def zookeeper_readings(readings: Readings, zk: Any) -> None:
    """``cloudtask_zookeeper_connected`` (0/1) and ``cloudtask_zookeeper_state{state}`` (1 for
    the state kazoo is in) of the process's ZooKeeper client."""
    readings.gauge(
        "cloudtask_zookeeper_connected",
        "1 while this process is connected to ZooKeeper, else 0",
        lambda: 1.0 if zk.connected else 0.0,
    )

    def state() -> dict[tuple[str, ...], float]:
        now = str(zk.state).lower()
        return {(s,): 1.0 if s == now else 0.0 for s in ZK_STATES}

    readings.gauge(
        "cloudtask_zookeeper_state",
        "The ZooKeeper connection's state (kazoo's): 1 for the current one",
        state,
        ("state",),
    )


class AgentMetrics:
    """An agent's counters and readings (see the module's docstring). The agent, its executor
    and its cluster part call the hooks; :attr:`registry` is what is served."""

    def __init__(self, agent_id: str = "", group: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.readings = Readings()
        r.register(self.readings)
        ProcessCollector(registry=r)
        self.readings.gauge(
            "cloudtask_agent_info",
            "This agent: its id, group and CloudTask version (always 1)",
            lambda: {(agent_id, group, __version__): 1.0},
            ("agent", "group", "version"),
        )
        self._started = Counter(
            "cloudtask_agent_runs_started",
            "Runs whose start this agent began (their log opened, their process spawned next)",
            registry=r,
        )
        self._ended = Counter(
            "cloudtask_agent_runs_ended",
            "Runs this agent is done with, by final status (released: handed back unstarted "
            "for the task's owner; dropped: another agent took it over)",
            ["status"],
            registry=r,
        )
        self._spawn_failures = Counter(
            "cloudtask_agent_spawn_failures",
            "Runs that could not be started: the program, its task file, its run_as user or "
            "the run guard failed (each such run is recorded failed)",
            registry=r,
        )
        self._conflicts = Counter(
            "cloudtask_agent_claim_conflicts",
            "Claims lost to another agent: at the claim (its run document was written first "
            "by another agent: a duplicate key) or at the start (a queued claim taken over)",
            ["stage"],
            registry=r,
        )
        self._lost_at_claim = self._conflicts.labels("claim")
        self._lost_at_start = self._conflicts.labels("start")
        self._lateness = Histogram(
            "cloudtask_agent_fire_lateness_seconds",
            "Seconds from a schedule fire's due time to its run's start on this agent",
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self._by_status: dict[str, Any] = {}

    # --- the hooks (any thread) --------------------------------------------------------------

    def run_started(self, trigger: str, scheduled_for: datetime, started_at: datetime) -> None:
        """A run's start began; a schedule fire's lateness is observed."""
        self._started.inc()
        if trigger == "schedule":
            try:
                late = (started_at - scheduled_for).total_seconds()
            except TypeError:  # a time without its zone (never from the store): not measured
                return
            self._lateness.observe(late if late > 0.0 else 0.0)

    def run_ended(self, status: str) -> None:
        child = self._by_status.get(status)
        if child is None:  # (a race here only makes the same child twice)
            child = self._by_status[status] = self._ended.labels(status)
        child.inc()

    def spawn_failed(self) -> None:
        self._spawn_failures.inc()

    def claim_lost(self) -> None:
        """A fire's claim was written first by another agent."""
        self._lost_at_claim.inc()

    def start_lost(self) -> None:
        """A queued claim was taken over by another agent before it started here."""
        self._lost_at_start.inc()

    # --- what is read when scraped -----------------------------------------------------------

    def watch_agent(
        self, executor: Any, tasks: Callable[[], int], ahead: Callable[[], int]
    ) -> None:
        """Read from the agent: its executor's running runs and free slots, how many tasks
        it holds (``tasks()``) and how many claims made ahead wait (``ahead()``)."""
        g = self.readings.gauge
        g(
            "cloudtask_agent_runs_running",
            "Runs whose process or request is going on this agent now",
            lambda: float(executor.running_count()),
        )
        g(
            "cloudtask_agent_free_slots",
            "How many more runs this agent would start at once (max_parallel less its runs)",
            lambda: float(executor.free_slots()),
        )
        g(
            "cloudtask_agent_max_parallel",
            "agent.max_parallel: runs at once on this agent",
            lambda: float(executor.max_parallel),
        )
        g(
            "cloudtask_agent_tasks",
            "Tasks this agent holds now (paused ones included)",
            lambda: float(tasks()),
        )
        g(
            "cloudtask_agent_claims_ahead",
            "Fires claimed ahead of their due time, waiting to start on this agent",
            lambda: float(ahead()),
        )

    def watch_cluster(self, zk: Any, may_claim: Callable[[], bool]) -> None:
        """A cluster agent: its ZooKeeper connection and its fence."""
        zookeeper_readings(self.readings, zk)
        self.readings.gauge(
            "cloudtask_agent_may_claim",
            "1 while this agent's ZooKeeper fence holds (it may claim and start fires), else 0",
            lambda: 1.0 if may_claim() else 0.0,
        )


class NoAgentMetrics(AgentMetrics):
    """The hooks, counting nothing: an executor run without an agent (tests, tools)."""

    def __init__(self) -> None:  # no registry
        pass

    def run_started(self, trigger: str, scheduled_for: datetime, started_at: datetime) -> None:
        pass

    def run_ended(self, status: str) -> None:
        pass

    def spawn_failed(self) -> None:
        pass

    def claim_lost(self) -> None:
        pass

    def start_lost(self) -> None:
        pass


NO_AGENT_METRICS = NoAgentMetrics()


class CenterMetrics:
    """A center's counters and readings (see the module's docstring)."""

    def __init__(self, center: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.readings = Readings()
        r.register(self.readings)
        ProcessCollector(registry=r)
        center_id = str(center.center_id)
        g = self.readings.gauge
        g(
            "cloudtask_center_info",
            "This center: its id and CloudTask version (always 1)",
            lambda: {(center_id, __version__): 1.0},
            ("center", "version"),
        )
        g(
            "cloudtask_center_leader",
            "1 while this center leads (places tasks, sends alerts), else 0",
            lambda: 1.0 if center.leading else 0.0,
        )
        zookeeper_readings(self.readings, center.zk)

        def placed() -> dict[tuple[str, ...], float]:
            if not center.leading:
                return {}
            return {(a,): float(len(t)) for a, t in list(center.writer.placed.items())}

        def unassigned() -> dict[tuple[str, ...], float]:
            if not center.leading:
                return {}
            counts: dict[tuple[str, ...], float] = {}
            for group in list(center.unassigned.values()):
                counts[(group,)] = counts.get((group,), 0.0) + 1.0
            return counts

        g(
            "cloudtask_center_tasks_placed",
            "Tasks assigned to each agent, as the leading center placed them (only the leader "
            "has this series)",
            placed,
            ("agent",),
        )
        g(
            "cloudtask_center_tasks_unassigned",
            "Enabled tasks no live agent of their group can run, by group (leader only)",
            unassigned,
            ("group",),
        )
        g(
            "cloudtask_center_tasks_too_large",
            "Tasks not placed because their assignment is larger than a ZooKeeper request "
            "may be (leader only)",
            lambda: float(len(center.too_large)) if center.leading else None,
        )
        self._passes = Counter(
            "cloudtask_center_placement_passes",
            "Placement passes of this center while it led, by result (ok or failed)",
            ["result"],
            registry=r,
        )
        self._ok, self._failed = self._passes.labels("ok"), self._passes.labels("failed")
        self._duration = Histogram(
            "cloudtask_center_placement_pass_seconds",
            "Seconds one placement pass of this center took while it led",
            buckets=PASS_BUCKETS,
            registry=r,
        )

    @contextmanager
    def placement_pass(self) -> Iterator[None]:
        """Around one pass of the leader: counted ok or failed (the error goes on), timed."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self._failed.inc()
            raise
        else:
            self._ok.inc()
        finally:
            self._duration.observe(time.perf_counter() - started)


class MetricsServer:
    """A registry served at ``http://host:port/metrics`` until :meth:`close`."""

    def __init__(self, server: Any, thread: Any) -> None:
        self._server, self._thread = server, thread

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, host: str, port: int, what: str) -> MetricsServer | None:
    """Serve ``registry`` on ``host:port`` (``what``: the config key, for the log); None when
    ``port`` is 0, or when it cannot be listened on (logged as an error: the process goes on
    without metrics)."""
    if not port:
        return None
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        log.error(
            "metrics not served: cannot listen on %s:%d (%s): %s; the rest goes on",
            host,
            port,
            what,
            e.strerror or e,
        )
        return None
    log.info("metrics at http://%s:%d/metrics", host, port)
    return MetricsServer(server, thread)

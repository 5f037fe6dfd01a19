"""``/metrics`` (the cluster in Prometheus's format) and ``/readyz`` (ready to serve).

``/metrics`` needs a login like any page, a viewer's at least; Prometheus scrapes it with an
API token (``authorization: {credentials: TOKEN}`` in its scrape config, sent as
``Authorization: Bearer``), a read-only token is enough. What it publishes is the whole
cluster as MongoDB and ZooKeeper show it (:mod:`cloudtask.metrics.figures`): tasks by state,
runs of the last day by status and the ones going now, the lateness of the schedule fires of
the last 10 minutes (a gauge histogram), agents by group and status, tasks without an agent,
whether a center leads, and the mail and webhook deliveries not sent. Each agent and center
publishes its own process's metrics on its ``metrics_port`` (:mod:`cloudtask.metrics.process`).

The figures are read by a ``prometheus_client`` collector on a registry of this app's own
(never the process's global one, so apps and tests in one process do not collide), at most
once per ``METRICS_CACHE_SECONDS`` (app config, 10 s): any number of scrapers and
Prometheus servers cost one set of reads. MongoDB down: ``cloudtask_store_up 0`` and the
store's figures left out (the answer is still 200, as exporters do); ZooKeeper down:
``cloudtask_cluster_connected 0`` and the cluster's left out.

``/readyz`` is open to anyone, as ``/healthz`` is: 200 when MongoDB and ZooKeeper (when this
site has a cluster) each answer a request within 2 s, else 503, with ``{"status": "ready" |
"unavailable", "failed": [...]}`` naming the parts that failed. As for ``/healthz``, only a
logged-in user is told more: the version and each check's error, which names hosts and ports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pymongo
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from flask_login import current_user
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from pymongo.errors import PyMongoError

from cloudtask import __version__
from cloudtask.clusterview import ClusterView, merge_agents
from cloudtask.exceptions import CloudTaskError
from cloudtask.metrics import LATENESS_BUCKETS
from cloudtask.metrics import figures as fig

from .auth import requires
from .context import CloudTaskExtension

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)

CACHE_SECONDS = 10.0
STORE_BUDGET = 10.0  # seconds the store's figures may take in all
AGENT_STATUSES = ("online", "leaving", "offline")
TASK_STATES = ("enabled", "paused", "done")


def app_registry(app: Flask) -> CollectorRegistry:
    """The app's own registry (made once, kept with the app's CloudTask state), with the
    collector of the cluster's figures."""

    def make() -> CollectorRegistry:
        registry = CollectorRegistry()
        registry.register(ClusterCollector(app))
        return registry

    return app.extensions["cloudtask"].cached("metrics.registry", float("inf"), make)


class ClusterCollector(Collector):
    """The cluster's figures, read at most once per ``METRICS_CACHE_SECONDS``."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        ext: CloudTaskExtension = self.app.extensions["cloudtask"]
        ttl = float(self.app.config.get("METRICS_CACHE_SECONDS", CACHE_SECONDS))
        yield from ext.cached("metrics.families", ttl, lambda: read_families(ext))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _labelled(
    name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), float(value))
    return family


def read_families(ext: CloudTaskExtension) -> list[Metric]:
    """Every family of ``/metrics``, read now."""
    started, now = time.monotonic(), time.time()
    view = ext.cluster()
    families: list[Metric] = []
    try:
        store = ext.store()
        with pymongo.timeout(STORE_BUDGET):
            families += _store_families(store, now)
            recorded = store.list_agents()
        store_up = 1.0
    except (CloudTaskError, PyMongoError) as e:
        log.warning("metrics: MongoDB's figures not read: %s", e)
        families, recorded, store_up = [], [], 0.0
    families.append(
        _gauge("cloudtask_store_up", "1 when MongoDB answered the figures' reads, else 0", store_up)
    )
    families += _cluster_families(view, recorded)
    families.append(
        _gauge(
            "cloudtask_metrics_read_seconds",
            "Seconds this site took to read these figures (they are kept for a few seconds)",
            time.monotonic() - started,
        )
    )
    return families


def _store_families(store: Any, now: float) -> list[Metric]:
    tasks = fig.tasks_by_state(store)
    recent = fig.recent_run_counts(store, now)
    going = fig.unfinished_run_counts(store)
    late = fig.fire_lateness(store, now)
    backlog = fig.delivery_backlog(store, now)
    counts, total = fig.buckets(late, LATENESS_BUCKETS)
    bounds = [*(repr(float(b)) for b in LATENESS_BUCKETS), "+Inf"]
    window = int(fig.LATENESS_WINDOW // 60)
    return [
        _labelled(
            "cloudtask_tasks",
            "Tasks by state: enabled (and not done), paused, done (one-shot tasks that ran)",
            ["state"],
            {(s,): tasks.get(s, 0) for s in TASK_STATES},
        ),
        _labelled(
            "cloudtask_runs_last_24h",
            "Runs scheduled in the last 24 hours, by status",
            ["status"],
            {(s,): n for s, n in recent.items()},
        ),
        _labelled(
            "cloudtask_runs_unfinished",
            "Runs now queued (waiting for a slot or an agent), claimed ahead of their due "
            "time, or running",
            ["status"],
            {(s,): n for s, n in going.items()},
        ),
        GaugeHistogramMetricFamily(
            "cloudtask_fire_lateness_seconds",
            f"Seconds from due time to start of the schedule fires due in the last {window} "
            "minutes that started (a window, not a running total)",
            buckets=list(zip(bounds, counts, strict=True)),
            gsum_value=total,
        ),
        _gauge(
            "cloudtask_deliveries_pending",
            "Mail and webhook deliveries not sent yet (due, or waiting to be retried)",
            backlog.pending,
        ),
        _gauge(
            "cloudtask_deliveries_overdue_seconds",
            "Seconds the most overdue pending delivery is past its time (0: none; a leading "
            "center that sends keeps it near 0)",
            backlog.overdue,
        ),
        _gauge(
            "cloudtask_deliveries_failed",
            "Deliveries given up after their last attempt",
            backlog.failed,
        ),
    ]


def _cluster_families(view: ClusterView, recorded: list[dict[str, Any]]) -> list[Metric]:
    out: list[Metric] = [
        _gauge(
            "cloudtask_cluster_connected",
            "1 when this site reads the cluster from ZooKeeper, else 0",
            1.0 if view.connected else 0.0,
        )
    ]
    if view.connected:
        agents: dict[tuple[str, ...], float] = {}
        for row in merge_agents(view, recorded):
            for status in AGENT_STATUSES:
                agents.setdefault((row["group"], status), 0.0)
            agents[(row["group"], row["status"])] += 1.0
        out.append(
            _labelled(
                "cloudtask_agents",
                "Agents by group and status: online, leaving (stopping cleanly), offline "
                "(seen before, gone now)",
                ["group", "status"],
                agents,
            )
        )
        unassigned: dict[tuple[str, ...], float] = {}
        for group in view.unassigned.values():
            unassigned[(group,)] = unassigned.get((group,), 0.0) + 1.0
        out.append(
            _labelled(
                "cloudtask_tasks_unassigned",
                "Enabled tasks no live agent of their group can run, by group (as the "
                "leading center published)",
                ["group"],
                unassigned,
            )
        )
        live = {c["center_id"] for c in view.centers}
        out.append(
            _gauge(
                "cloudtask_leader_present",
                "1 when a running center leads, else 0",
                1.0 if view.leader in live else 0.0,
            )
        )
        out.append(_gauge("cloudtask_centers", "Centers running", len(view.centers)))
    return out


@bp.get("/metrics")
@requires("viewer")
def metrics() -> Any:
    """The cluster's figures in Prometheus's text format (OpenMetrics when asked for)."""
    registry = app_registry(current_app._get_current_object())
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry), content_type=content_type)


def readiness(ext: CloudTaskExtension) -> dict[str, str | None]:
    """Each part this site needs and why it failed (None: it answered)."""
    checks: dict[str, str | None] = {}
    try:
        checks["mongodb"] = fig.ping_mongodb(ext.store())
    except CloudTaskError as e:  # no store can be made (no URI)
        checks["mongodb"] = str(e)
    if ext.zk is not None:
        checks["zookeeper"] = fig.ping_zookeeper(ext.zk)
    return checks


@bp.get("/readyz")
def readyz() -> Any:
    """Open to anyone (no login), like ``/healthz``; see the module's docstring."""
    ext: CloudTaskExtension = current_app.extensions["cloudtask"]
    checks = readiness(ext)
    failed = sorted(part for part, error in checks.items() if error)
    code = 503 if failed else 200
    body: dict[str, Any] = {"status": "unavailable" if failed else "ready", "failed": failed}
    if failed:
        log.warning("not ready: %s", "; ".join(f"{p}: {checks[p]}" for p in failed))
    if _logged_in():
        body["version"] = __version__
        body["checks"] = {part: error or "ok" for part, error in checks.items()}
    return jsonify(body), code


def _logged_in() -> bool:
    """Whether this request is a logged-in user's; False when that cannot be told (MongoDB
    down)."""
    try:
        return bool(current_user.is_authenticated)
    except CloudTaskError:
        return False

"""Metrics and health: Prometheus metrics of each agent and center, and the cluster's figures.

* :mod:`.process`: the counters and readings of one agent (:class:`AgentMetrics`) or center
  (:class:`CenterMetrics`), each on a ``prometheus_client`` registry of its own, served at
  ``agent.metrics_port`` / ``center.metrics_port`` by :func:`serve`;
* :mod:`.figures`: the cluster-wide figures read from MongoDB and ZooKeeper, published by the
  web site (``/metrics``, ``/readyz``, :mod:`web.metrics`) and checked by ``cloudtask
  status`` (:mod:`cloudtask.cli.status`).
"""

from __future__ import annotations

from .process import (
    LATENESS_BUCKETS,
    NO_AGENT_METRICS,
    AgentMetrics,
    CenterMetrics,
    MetricsServer,
    Readings,
    serve,
)

__all__ = [
    "LATENESS_BUCKETS",
    "NO_AGENT_METRICS",
    "AgentMetrics",
    "CenterMetrics",
    "MetricsServer",
    "Readings",
    "serve",
]

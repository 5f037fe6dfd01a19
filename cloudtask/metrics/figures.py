"""The cluster in figures, read from MongoDB and ZooKeeper: what the web site's ``/metrics``
and ``/readyz`` and ``cloudtask status`` report.

Every figure is one cheap read, fit for a store of 100,000 runs on the embedded wire server
as on MongoDB: counts are one aggregation over an index (tasks by flag, runs by status, the
deliveries pending), runs are ranged by their numeric ``ts`` or read through the status
index, and nothing reads every run. The callers cache what they publish (the web site) or
run once (the command).

* :func:`ping_mongodb`, :func:`ping_zookeeper`: a cheap round trip each, with a short
  deadline; the error, or None.
* :func:`tasks_by_state`, :func:`recent_run_counts`, :func:`unfinished_run_counts`: tasks by
  state, runs of the last day by status, runs going or waiting now.
* :func:`fire_lateness`: seconds from due time to start of the schedule fires of the last
  ``LATENESS_WINDOW`` seconds (at most ``LATENESS_MOST`` runs, the newest), and
  :func:`buckets` to make a histogram of them.
* :func:`delivery_backlog`: mail and webhook deliveries pending, how late the most overdue
  one is, how many were given up.
* :func:`stuck_runs`, :func:`lost_run_count`: runs whose agent stopped beating them and
  that no leader has judged yet, and runs recorded ``lost`` lately (both read the runs of one
  status, at most a thousand: for ``cloudtask status``, not for every scrape).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pymongo
from kazoo.exceptions import KazooException
from pymongo.errors import PyMongoError

from ..clock import from_epoch, stored_time
from ..exceptions import CloudTaskError
from ..runmodel import RUNNING_STATUSES
from ..zkpaths import bounded

PING_TIMEOUT = 2.0  # seconds each reachability check may take
DAY = 86_400.0
LATENESS_WINDOW = 600.0  # seconds of fires the lateness histogram of the site covers
LATENESS_MOST = 5_000  # runs read for it at most (the newest)
# a run going or waiting whose agent has not beaten it for this long (agents beat every 2 s,
# and a leader judges the runs of a departed agent within its session and a grace)
STUCK_AFTER = 120.0
STUCK_READ_MOST = 1_000  # runs of each status read to find the stuck ones


def _error(e: BaseException, what: str) -> str:
    """What a failed check says: CloudTask's own errors as they are, others with ``what``."""
    if isinstance(e, CloudTaskError):
        return str(e)
    detail = f"{type(e).__name__}: {e}" if str(e) and str(e) != type(e).__name__ else ""
    return f"{what} ({detail or type(e).__name__})"


def ping_mongodb(store: Any, timeout: float = PING_TIMEOUT) -> str | None:
    """Why MongoDB did not answer a ping within ``timeout`` seconds, or None."""
    try:
        with pymongo.timeout(timeout):
            store.ping()
    except (CloudTaskError, PyMongoError) as e:
        return _error(e, "MongoDB did not answer a ping")
    return None


def ping_zookeeper(zk: Any, timeout: float = PING_TIMEOUT) -> str | None:
    """Why ZooKeeper did not answer a request within ``timeout`` seconds, or None. A client
    that is not connected fails at once (kazoo would queue the request)."""
    try:
        bounded(zk, "answer a ping", lambda: zk.exists_async("/"), timeout)
    except (CloudTaskError, KazooException) as e:
        return _error(e, "ZooKeeper did not answer a request")
    return None


def tasks_by_state(store: Any) -> dict[str, int]:
    """Tasks by state, as the task list's state filter counts them: ``enabled`` (and not
    done), ``paused`` (done or not) and ``done`` (one-shot tasks that ran)."""
    enabled, paused, done = store.task_flag_counts()
    done_enabled = sum(n for flag, n in done.items() if flag)
    return {
        "enabled": max(0, enabled - done_enabled),
        "paused": paused,
        "done": sum(done.values()),
    }


def recent_run_counts(store: Any, now: float, seconds: float = DAY) -> dict[str, int]:
    """Runs scheduled in the last ``seconds`` (to ``now``, epoch seconds) by status. The
    range ends a day ahead: bounded on both sides, it is read from the ``ts`` index."""
    counts = store.run_status_counts(now - seconds, now + DAY)
    return {str(status): int(n) for status, n in counts.items()}


def unfinished_run_counts(store: Any) -> dict[str, int]:
    """Runs queued, claimed ahead and running now (one indexed count each)."""
    return {s: store.count("runs", {"status": {"$eq": s}}) for s in RUNNING_STATUSES}


def fire_lateness(
    store: Any, now: float, window: float = LATENESS_WINDOW, most: int = LATENESS_MOST
) -> list[float]:
    """Seconds from the due time to the start of each schedule fire due in the last
    ``window`` seconds that has started (at most the ``most`` newest runs are read). Retries,
    catch-ups and manual runs are left out: their fire time is not when they were due."""
    page = store.run_page({"since": from_epoch(now - window), "page": 1, "per_page": most})
    out = []
    for doc in page.items:
        if doc.get("trigger") != "schedule":
            continue
        started, due = stored_time(doc.get("started_at")), stored_time(doc.get("scheduled_for"))
        if started is not None and due is not None:
            out.append(max(0.0, (started - due).total_seconds()))
    return out


def buckets(values: Iterable[float], bounds: Sequence[float]) -> tuple[list[int], float]:
    """Cumulative counts of ``values`` at or below each bound, then all of them (+Inf), and
    their sum."""
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for v in values:
        total += v
        for i, bound in enumerate(bounds):
            if v <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    cumulative, running = [], 0
    for n in counts:
        running += n
        cumulative.append(running)
    return cumulative, total


@dataclass(frozen=True)
class DeliveryBacklog:
    pending: int  # mail and webhook deliveries not sent yet (waiting or between retries)
    overdue: float  # seconds the most overdue pending delivery is past its time (0: none)
    failed: int  # deliveries given up after their last attempt


def delivery_backlog(store: Any, now: float) -> DeliveryBacklog:
    """What the notifier has not sent: a leader that sends keeps ``overdue`` near 0 (a
    delivery waiting out its retry backoff is pending, not overdue)."""
    pending = store.count("deliveries", {"status": {"$eq": "pending"}})
    due = store.deliveries_due(now, 1)
    overdue = 0.0
    if due:
        overdue = max(0.0, now - float(due[0].get("next_at_ts") or now))
    failed = store.count("deliveries", {"status": {"$eq": "failed"}})
    return DeliveryBacklog(pending, overdue, failed)


def _epoch(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    t = stored_time(value)
    return t.timestamp() if t is not None else None


def stuck_runs(store: Any, now: float, after: float = STUCK_AFTER) -> list[dict[str, Any]]:
    """Runs held by an agent (running, queued for a slot, claimed ahead) that it has not
    beaten for ``after`` seconds, and that no leader has judged lost yet: each with
    ``silent`` (seconds). The runs of a live agent are beaten every 2 s; a leader marks the
    runs of a departed one ``lost`` within its session and a grace."""
    found = []
    for status in RUNNING_STATUSES:
        for doc in store.list_runs(status=status, limit=STUCK_READ_MOST):
            if not doc.get("agent"):
                continue  # waiting for an agent to take it (a manual run, a released claim)
            last = _epoch(doc.get("beat")) or _epoch(doc.get("started_at"))
            last = last or _epoch(doc.get("claimed_at"))
            if last is not None and now - last > after:
                found.append({**doc, "silent": now - last})
    return found


LOST_READ_MOST = 1_000  # the newest lost runs read to count the recent ones


def lost_run_count(store: Any, now: float, seconds: float) -> int:
    """Runs recorded ``lost`` in the last ``seconds``, by when they were judged (among the
    ``LOST_READ_MOST`` newest lost runs; the times are compared here: the embedded wire
    server's aggregation does not range dates)."""
    found = 0
    for doc in store.list_runs(status="lost", limit=LOST_READ_MOST):
        judged = _epoch(doc.get("finished_at"))
        if judged is not None and judged >= now - seconds:
            found += 1
    return found

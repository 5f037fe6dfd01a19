"""Agent firing benchmark: how late do fires start, and how fast does a burst get going?

1,000 tasks on one standalone agent, each running ``date +%s.%N`` (the child prints its own
clock, so lateness is measured where it matters: when the process runs).

(a) spread: every task ``every: 10s``, their phases spread evenly over 10 s (anchors 10 ms
    apart); lateness = child's clock - scheduled time, p50 and p99 over two rounds.
(b) burst: 1,000 tasks due in the same second (``every: 1h`` anchored at that second); the time from that second until the
    last child started.
Also printed, for scale: this machine's serial process-spawn rate.

Usage: python bench/agent_fire.py [--tasks 1000] [--max-parallel 16]
The last line is one JSON object: spread_p50_ms, spread_p99_ms, burst_last_start_s, spawn_rate_per_s.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudtask.agent.agent import Agent  # noqa: E402
from cloudtask.config import Config  # noqa: E402
from cloudtask.localservers import MongoServer  # noqa: E402
from cloudtask.store import Store  # noqa: E402


def spawn_rate(seconds: float = 2.0) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        subprocess.run(["true"], check=True)
        n += 1
    return n / (time.perf_counter() - start)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def child_times(store: Store, query: dict) -> list[tuple[datetime, float]]:
    out = []
    for run in store.runs.find(
        {**query, "status": "succeeded"}, {"scheduled_for": 1, "output_tail": 1}
    ):
        try:
            out.append((run["scheduled_for"], float(run["output_tail"].strip())))
        except ValueError:
            continue
    return out


def run_agent(store: Store, cfg: Config, until: float) -> None:
    agent = Agent(cfg, store, agent_id="bench")
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    while time.time() < until:
        time.sleep(0.1)
    agent.stop()
    thread.join(timeout=60)


def wait_quiet(store: Store, expected: int, query: dict, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if store.runs.count_documents({**query, "status": "succeeded"}) >= expected:
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--max-parallel", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = args.tasks

    rate = spawn_rate()
    print(f"serial spawn rate: {rate:.0f} processes/s")

    with tempfile.TemporaryDirectory() as tmp:
        mongo = MongoServer(Path(tmp) / "mongo")
        mongo.start()
        try:
            store = Store(mongo.uri, "bench")
            cfg = Config().with_section(
                "agent",
                data_dir=str(Path(tmp) / "agent"),
                max_parallel=args.max_parallel,
                poll_interval=60.0,
            )
            date = ["date", "+%s.%N"]

            # (a) spread: phases 10 s / n apart, two rounds
            base = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=3)
            step = 10.0 / n
            for i in range(n):
                start = base + timedelta(seconds=i * step)
                store.create_task(
                    {
                        "name": f"spread-{i}",
                        "schedule": {"every": "10s", "start": start.isoformat()},
                        "command": date,
                    }
                )
            run_agent(store, cfg, until=base.timestamp() + 20.5)
            wait_quiet(store, 2 * n, {})
            late = [(t - s.timestamp()) * 1000 for s, t in child_times(store, {})]
            p50, p99 = percentile(late, 0.5), percentile(late, 0.99)
            print(
                f"(a) spread: {len(late)} fires, lateness p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(late):.1f} ms"
            )
            store.close()

            # a fresh database: nx-27017's write cost grows with the collection (MongoDB's does not)
            store = Store(mongo.uri, "bench_burst")
            # (b) burst: n tasks due in the same second, as n cron jobs at 03:00:00 would be
            due = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=4)
            for i in range(n):
                schedule = {"every": "1h", "start": due.isoformat()}
                store.create_task({"name": f"burst-{i}", "schedule": schedule, "command": date})
            run_agent(store, cfg, until=due.timestamp() + 6)
            wait_quiet(store, n, {"scheduled_for": due})
            starts = [t for _, t in child_times(store, {"scheduled_for": due})]
            burst = max(starts) - due.timestamp() if starts else float("nan")
            print(
                f"(b) burst: {len(starts)}/{n} ran; last child started {burst:.3f} s after the due second "
                f"(median {statistics.median(starts) - due.timestamp():.3f} s)"
            )
            store.close()
        finally:
            mongo.stop()

    print(
        json.dumps(
            {
                "spread_p50_ms": round(p50, 1),
                "spread_p99_ms": round(p99, 1),
                "burst_last_start_s": round(burst, 3),
                "spawn_rate_per_s": round(rate),
            }
        )
    )


if __name__ == "__main__":
    main()

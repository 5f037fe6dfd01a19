"""Plans benchmark: items dispatched to free agents (cloudtask/store/plans.py, agent/planitems.py).

A real cluster (ZooKeeper, the MongoDB wire server, one center, 3 agents as processes, each
``max_parallel`` 8) runs one plan of N items (default 5,000) that each sleep 1 s. The items
record their own start and end (cloudtask/testing/records.py), and the figures come from
those records:

* **dispatch latency**: how long a free slot waits for its next item: for each start on an
  agent, the time since the slot it took became free (the end of the run before it there,
  or the submission for the first ones), p50 and p99;
* **total over ideal**: from the submission to the last end, over the ideal
  ``items x duration / slots`` (every slot busy from the submission on).

Usage: python bench/plans.py [--items 5000] [--duration 1] [--agents 3] [--slots 8]
The last line is one JSON object: dispatch_p50_ms, dispatch_p99_ms, total_over_ideal (and
the counts: items, runs, twice).
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kazoo.client import KazooClient  # noqa: E402

from cloudtask.localservers import MongoServer, ZooKeeperServer  # noqa: E402
from cloudtask.operations import Operations  # noqa: E402
from cloudtask.store import Store  # noqa: E402
from cloudtask.testing.records import read_records, recording_command  # noqa: E402
from cloudtask.zkpaths import ZkPaths  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def dispatch_latencies(records, submitted: float, slots: int) -> list[float]:
    """Per agent, replay its runs in start order: each start takes the slot that became free
    first (a slot is free from the submission, then from each end)."""
    by_agent = defaultdict(list)
    for r in records:
        if r.kind in ("start", "end"):
            by_agent[r.agent].append(r)
    out = []
    for runs in by_agent.values():
        free = [submitted] * slots
        heapq.heapify(free)
        events = sorted(runs, key=lambda r: (r.time, 0 if r.kind == "end" else 1))
        for r in events:
            if r.kind == "end":
                heapq.heappush(free, r.time)
            elif free:
                out.append(max(0.0, r.time - heapq.heappop(free)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        zk_server = ZooKeeperServer(tmp_path / "zk")
        mongo = MongoServer(tmp_path / "mongo")
        zk_server.start()
        mongo.start()
        procs: dict[str, subprocess.Popen] = {}
        env = {
            **os.environ,
            "CLOUDTASK_ZK_HOSTS": zk_server.hosts,
            "CLOUDTASK_ZK_ROOT": "/bench-plans",
            "CLOUDTASK_MONGO_URI": mongo.uri,
            "CLOUDTASK_MONGO_DATABASE": "plans",
            "CLOUDTASK_AGENT_GROUP": "work",
            "CLOUDTASK_AGENT_MAX_PARALLEL": str(args.slots),
            "CLOUDTASK_CONFIG": "",
        }
        store = Store(mongo.uri, "plans")
        zk = KazooClient(zk_server.hosts)
        zk.start()
        try:
            with open(tmp_path / "cluster.log", "ab") as log:
                procs["c1"] = subprocess.Popen(
                    [sys.executable, "-m", "cloudtask", "center", "--id", "c1"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                for i in range(args.agents):
                    name = f"a{i + 1}"
                    procs[name] = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "cloudtask",
                            "agent",
                            "--id",
                            name,
                            "--data-dir",
                            str(tmp_path / name),
                        ],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
            paths = ZkPaths("/bench-plans")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                group = paths.agent_group("work")
                if zk.exists(group) and len(zk.get_children(group)) >= args.agents:
                    break
                time.sleep(0.2)
            else:
                raise SystemExit("the agents did not register")
            time.sleep(2.0)  # (their first steps done)
            records = tmp_path / "records"
            command = recording_command(records, work=f"sleep {args.duration:g}")
            items = [
                {"type": "work", "name": f"item-{i:05d}", "command": command}
                for i in range(args.items)
            ]
            ops = Operations(store, zk, paths)
            submitted = time.time()
            receipt = ops.submit_plan("bench", {"name": "bench", "items": items})
            took_submit = time.time() - submitted
            print(f"submitted {args.items} items in {took_submit:.2f} s")
            ideal = args.items * args.duration / (args.agents * args.slots)
            deadline = time.monotonic() + ideal * 3 + 120
            # (watched through the items' own records: reading the plan from the store every
            # few seconds would load the store the bench measures)
            while time.monotonic() < deadline:
                ends = sum(1 for r in read_records(records) if r.kind == "end")
                if ends >= args.items:
                    break
                time.sleep(1.0)
            while time.monotonic() < deadline:
                plan = store.get_plan(receipt["plan_id"])
                if plan["done"]:
                    break
                time.sleep(1.0)
            else:
                raise SystemExit(f"the plan did not complete: {plan['counts']}")
            seen = read_records(records)
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
            zk.stop()
            zk.close()
            store.close()
            zk_server.stop()
            mongo.stop()
    starts = Counter(r.task for r in seen if r.kind == "start")
    last_end = max(r.time for r in seen if r.kind == "end")
    total = last_end - submitted
    latencies = dispatch_latencies(seen, submitted, args.slots)
    figures = {
        "dispatch_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "dispatch_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "total_over_ideal": round(total / ideal, 3),
        "items": args.items,
        "runs": sum(starts.values()),
        "twice": sum(1 for n in starts.values() if n > 1),
        "total_s": round(total, 1),
        "ideal_s": round(ideal, 1),
    }
    print(
        f"{args.items} items of {args.duration:g} s over {args.agents} agents x {args.slots} slots:"
        f" {total:.1f} s (ideal {ideal:.1f} s, x{figures['total_over_ideal']}); dispatch p50"
        f" {figures['dispatch_p50_ms']} ms, p99 {figures['dispatch_p99_ms']} ms; items run"
        f" twice: {figures['twice']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

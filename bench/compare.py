"""CloudTask against APScheduler 3 on the same workloads, in one run, side by side.

Both schedulers run in a process of their own on this machine, one after the other, against
the same nx-27017 server (a fresh database each time), and every job starts
``date +%s.%N`` as a child process: lateness is the child's own clock minus the time the
fire was due, so it counts everything a scheduler does before the job really runs.

* CloudTask: one standalone agent (``cloudtask.agent.Agent``, its run guard, the run
  writer), ``max_parallel`` = ``--workers``; every fire is claimed once in MongoDB and
  recorded as a run.
* APScheduler 3: ``BackgroundScheduler`` with its ``MongoDBJobStore`` and a
  ``ThreadPoolExecutor`` of ``--workers`` threads; each job runs the child with
  ``subprocess.run``.

Workloads:

* spread: 1,000 jobs ``every 10s``, their phases spread evenly over 10 s, for 60 s;
  lateness p50 / p99 / max.
* burst: 1,000 jobs due in the same second, 3 rounds 20 s apart; the time from the due
  second until the last child of the round started (the median round is the figure).
* idle: 10,000 jobs that do not fire in the window: the time the scheduler takes to hold them
  all (settle), then its CPU (% of one core) over 60 s and its memory (RSS, CloudTask's run
  guard included).

CloudTask's agent reads the other agents' runs at each start of a ``forbid`` task (the
default) for its arrival window, the first ``STANDALONE_SILENT_AFTER`` + 5 s (65 s) after its
tasks came to it (a former owner may still be finishing a run: docs/architecture.md, "`forbid`
across agents"), so its
figures are taken after that window, as a scheduler that has held its tasks for a while:
spread fires in the window are reported on a line of their own (and as
``arrival_spread_p99_ms``), burst rounds begin after it.

Each scheduler's own CPU seconds over the measured window (its process, and CloudTask's run
guard; not the jobs' children, not the set-up) are printed per workload; ``cpu_s`` /
``aps_cpu_s`` are the sums over spread and burst.

Usage: python bench/compare.py [--tasks 1000] [--idle-tasks 10000] [--workers 64]
       [--only spread,burst,idle] [--window 60]
Needs the ``bench`` extra (``pip install -e '.[bench,embedded]'``: APScheduler 3).
The last line is one JSON object: spread_p99_ms, aps_spread_p99_ms, burst_last_start_s,
aps_burst_last_start_s, idle_cpu_pct, idle_rss_mb, settle_10k_s, cpu_s, aps_cpu_s (and
arrival_spread_p99_ms, per_task_kb: the idle RSS over the same with one task, per task).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

DATE = ["date", "+%s.%N"]
SPREAD_EVERY = 10.0
BURST_ROUNDS = 3
BURST_EVERY = 20.0
LEAD = 5.0  # seconds between a child's start and the first fire (its set-up is not measured)


# --- figures ----------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    if not values:
        return math.nan
    k = (len(values) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def own_cpu(proc: psutil.Process, helpers: list[psutil.Process]) -> float:
    """CPU seconds of ``proc`` and of its helper processes (not of waited-for children)."""
    total = 0.0
    for p in (proc, *helpers):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def cpu_at(proc: psutil.Process, when: float | None) -> dict[str, float]:
    """The scheduler's CPU seconds at the epoch time ``when`` (taken by a thread then): the
    figure of a workload is its CPU from there on (not its set-up, not an arrival window)."""
    box: dict[str, float] = {}
    if when is None:
        return box

    def take() -> None:
        time.sleep(max(0.0, when - 0.2 - time.time()))
        box["cpu"] = own_cpu(proc, helper_processes(proc))

    threading.Thread(target=take, daemon=True).start()
    return box


def helper_processes(proc: psutil.Process) -> list[psutil.Process]:
    """CloudTask's run guard (a Python child of the agent); jobs' children are not helpers."""
    out = []
    for child in proc.children(recursive=False):
        try:
            if "python" in os.path.basename(child.exe()):
                out.append(child)
        except psutil.Error:
            continue
    return out


def rss_mb(proc: psutil.Process, helpers: list[psutil.Process]) -> float:
    total = 0
    for p in (proc, *helpers):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


# --- the children: one scheduler, one workload ------------------------------------------------


def plan(workload: str, n: int, start: float) -> list[tuple[str, float, float]]:
    """(job name, first due time as epoch seconds, interval seconds) for every job."""
    if workload == "spread":
        return [(f"spread-{i}", start + i * SPREAD_EVERY / n, SPREAD_EVERY) for i in range(n)]
    if workload == "burst":
        return [(f"burst-{i}", start, BURST_EVERY) for i in range(n)]
    # idle: nothing due for a day
    return [(f"idle-{i}", start + 86_400 + i, 86_400.0) for i in range(n)]


def child_cloudtask(args: argparse.Namespace) -> dict[str, Any]:
    from cloudtask.agent.agent import Agent
    from cloudtask.config import Config
    from cloudtask.store import Store

    store = Store(args.uri, args.db)
    jobs = plan(args.workload, args.tasks, args.start)
    for name, first, every in jobs:
        store.create_task(
            {
                "name": name,
                "schedule": {
                    "every": f"{int(every)}s",
                    "start": datetime.fromtimestamp(first, timezone.utc).isoformat(),
                },
                "command": DATE,
                "misfire_grace": "1h",
            }
        )
    cfg = Config().with_section(
        "agent",
        data_dir=str(Path(args.tmp) / "agent"),
        max_parallel=args.workers,
        poll_interval=600.0,
    )
    me = psutil.Process()
    agent = Agent(cfg, store, agent_id="bench")
    cpu_from = cpu_at(me, args.measure_from)
    began = time.monotonic()
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    out: dict[str, Any] = {}
    if args.workload == "idle":
        while len(agent.scheduler.task_ids()) < len(jobs):
            time.sleep(0.05)
        out["settle_s"] = time.monotonic() - began
        time.sleep(5.0)  # the first writes and reads of a start are not idle
        helpers = helper_processes(me)
        cpu0, t0 = own_cpu(me, helpers), time.monotonic()
        time.sleep(args.window)
        out["idle_cpu_pct"] = 100 * (own_cpu(me, helpers) - cpu0) / (time.monotonic() - t0)
        out["rss_mb"] = rss_mb(me, helpers)
    else:
        time.sleep(max(0.0, args.until - time.time()))
        expected = fires_expected(args.workload, jobs, args.until)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if store.runs.count_documents({"status": {"$in": ["succeeded", "failed"]}}) >= expected:
                break
            time.sleep(0.2)
        helpers = helper_processes(me)
        out["cpu_s"] = own_cpu(me, helpers) - cpu_from.get("cpu", 0.0)
        out["rss_mb"] = rss_mb(me, helpers)
        out["starts"] = [
            (run["scheduled_for"].timestamp(), float(run["output_tail"].strip()))
            for run in store.runs.find(
                {"status": "succeeded"}, {"scheduled_for": 1, "output_tail": 1}
            )
            if (run.get("output_tail") or "").strip()
        ]
    agent.stop()
    thread.join(timeout=60)
    store.close()
    return out


def fires_expected(workload: str, jobs: list[tuple[str, float, float]], until: float) -> int:
    return sum(int((until - first) // every) + 1 for _, first, every in jobs if first <= until)


def child_apscheduler(args: argparse.Namespace) -> dict[str, Any]:
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.mongodb import MongoDBJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger
    from pymongo import MongoClient

    client = MongoClient(args.uri)
    starts: list[tuple[float, float]] = []
    lock = threading.Lock()
    scheduler = BackgroundScheduler(
        jobstores={"default": MongoDBJobStore(database=args.db, collection="jobs", client=client)},
        executors={"default": ThreadPoolExecutor(args.workers)},
        job_defaults={"coalesce": False, "max_instances": 1, "misfire_grace_time": 3600},
        timezone="UTC",
    )
    jobs = plan(args.workload, args.tasks, args.start)
    for name, first, every in jobs:
        scheduler.add_job(
            run_date_child,
            IntervalTrigger(
                seconds=int(every), start_date=datetime.fromtimestamp(first, timezone.utc)
            ),
            args=[first, every],
            id=name,
            name=name,
        )
    me = psutil.Process()
    cpu_from = cpu_at(me, args.measure_from)
    began = time.monotonic()
    out: dict[str, Any] = {}
    RECORD["sink"], RECORD["lock"] = starts, lock
    scheduler.start()
    if args.workload == "idle":
        out["settle_s"] = time.monotonic() - began
        time.sleep(5.0)
        cpu0, t0 = own_cpu(me, []), time.monotonic()
        time.sleep(args.window)
        out["idle_cpu_pct"] = 100 * (own_cpu(me, []) - cpu0) / (time.monotonic() - t0)
        out["rss_mb"] = rss_mb(me, [])
    else:
        time.sleep(max(0.0, args.until - time.time()))
        expected = fires_expected(args.workload, jobs, args.until)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(starts) < expected:
            time.sleep(0.2)
        out["cpu_s"] = own_cpu(me, []) - cpu_from.get("cpu", 0.0)
        out["rss_mb"] = rss_mb(me, [])
        with lock:
            out["starts"] = list(starts)
    scheduler.shutdown(wait=True)  # its job store closes the client
    return out


RECORD: dict[str, Any] = {}


def run_date_child(first: float, every: float) -> None:
    """An APScheduler job: start the child; its clock and the fire it belongs to are kept."""
    done = subprocess.run(DATE, capture_output=True, text=True, check=False)
    started = float(done.stdout.strip())
    due = first + math.floor((started - first) / every + 1e-9) * every
    with RECORD["lock"]:
        RECORD["sink"].append((due, started))


# --- the parent -------------------------------------------------------------------------------


def run_child(kind: str, workload: str, args: argparse.Namespace, mongo_uri: str) -> dict:
    """Run one scheduler on one workload. CloudTask's figures are taken once its tasks have
    been its own for longer than its arrival window (see ``arrival_window``): spread fires
    from the start (those in the window are reported apart), burst rounds after it."""
    db = f"{kind}_{workload}_{int(time.time())}"
    start = math.ceil(time.time() + LEAD)
    warm = arrival_window() if kind == "cloudtask" and workload != "idle" else 0.0
    measure_from = start + warm
    if workload == "spread":
        until = measure_from + args.window - 0.5
    elif workload == "burst":
        start = measure_from  # no round in the arrival window
        until = start + (BURST_ROUNDS - 1) * BURST_EVERY + 0.5
    else:
        until = start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--workload",
            workload,
            "--uri",
            mongo_uri,
            "--db",
            db,
            "--tasks",
            str(args.idle_tasks if workload == "idle" else args.tasks),
            "--workers",
            str(args.workers),
            "--window",
            str(args.window),
            "--start",
            str(start),
            "--until",
            str(until),
            "--measure-from",
            str(measure_from),
            "--tmp",
            tmp,
            "--out",
            str(out),
        ]
        subprocess.run(cmd, check=True)
        result = json.loads(out.read_text())
        result.update(measure_from=measure_from, until=until)
        return result


def arrival_window() -> float:
    """Seconds after tasks come to an agent (here: after it starts) during which each start
    of a ``forbid`` task also reads the runs of other agents (a former owner may still be
    finishing one: docs/architecture.md, "`forbid` across agents"): a MongoDB read on the
    start path, which a scheduler that has held its tasks for longer does not make."""
    from cloudtask.agent.agent import FORBID_CHECK_SLACK, STANDALONE_SILENT_AFTER

    return STANDALONE_SILENT_AFTER + FORBID_CHECK_SLACK


def lateness(starts: list[list[float]]) -> dict[str, float]:
    late = [(child - due) * 1000 for due, child in starts]
    return {
        "fires": len(late),
        "p50_ms": percentile(late, 0.5),
        "p99_ms": percentile(late, 0.99),
        "max_ms": max(late) if late else math.nan,
    }


def burst_rounds(starts: list[list[float]], until: float) -> list[float]:
    rounds: dict[float, float] = {}
    for due, child in starts:
        if due <= until:  # (a round after the window may have begun while the last was read)
            rounds[due] = max(rounds.get(due, 0.0), child - due)
    return [rounds[due] for due in sorted(rounds)]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--idle-tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--only", default="spread,burst,idle")
    parser.add_argument("--child", choices=["cloudtask", "apscheduler"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--measure-from", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.child:
        child = child_cloudtask if args.child == "cloudtask" else child_apscheduler
        Path(args.out).write_text(json.dumps(child(args)))
        return

    from cloudtask.localservers import MongoServer

    workloads = [w for w in ("spread", "burst", "idle") if w in args.only.split(",")]
    print(
        f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
        f"load {os.getloadavg()[0]:.2f}; workers {args.workers}"
    )
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mongo = MongoServer(Path(tmp) / "mongo")
        mongo.start()
        try:
            for workload in workloads:
                ours = run_child("cloudtask", workload, args, mongo.uri)
                theirs = run_child("apscheduler", workload, args, mongo.uri)
                if workload == "idle":  # memory per task: the same with one task
                    ours["tasks"] = args.idle_tasks
                    one = argparse.Namespace(**{**vars(args), "idle_tasks": 1, "window": 5.0})
                    ours["rss_one_mb"] = run_child("cloudtask", workload, one, mongo.uri)["rss_mb"]
                    theirs["rss_one_mb"] = run_child("apscheduler", workload, one, mongo.uri)[
                        "rss_mb"
                    ]
                report(workload, ours, theirs, figures)
        finally:
            mongo.stop()
    keys = [
        "spread_p99_ms",
        "aps_spread_p99_ms",
        "burst_last_start_s",
        "aps_burst_last_start_s",
        "idle_cpu_pct",
        "idle_rss_mb",
        "settle_10k_s",
        "cpu_s",
        "aps_cpu_s",
        "arrival_spread_p99_ms",
        "per_task_kb",
    ]
    print(json.dumps({k: figures.get(k) for k in keys}))


def report(workload: str, ours: dict, theirs: dict, figures: dict[str, Any]) -> None:
    def r(x: float, nd: int = 1) -> float | None:
        return None if x is None or math.isnan(x) else round(x, nd)

    if workload == "spread":
        steady = [s for s in ours["starts"] if s[0] >= ours["measure_from"]]
        arriving = [s for s in ours["starts"] if s[0] < ours["measure_from"]]
        a, b = lateness(steady), lateness(theirs["starts"])
        print(f"spread ({a['fires']} / {b['fires']} fires):   CloudTask   APScheduler   ratio")
        for key in ("p50_ms", "p99_ms", "max_ms"):
            print(
                f"  lateness {key:7}        {a[key]:9.1f}   {b[key]:11.1f}   {ratio(a[key], b[key])}"
            )
        c = lateness(arriving)
        print(
            f"  CloudTask in its first {ours['measure_from'] - min(s[0] for s in ours['starts']):.0f}"
            f" s (arrival window, {c['fires']} fires): p50 {c['p50_ms']:.1f} ms, "
            f"p99 {c['p99_ms']:.1f} ms, max {c['max_ms']:.1f} ms"
        )
        figures["arrival_spread_p99_ms"] = r(c["p99_ms"])
        figures["spread_p99_ms"], figures["aps_spread_p99_ms"] = r(a["p99_ms"]), r(b["p99_ms"])
    elif workload == "burst":
        a, b = (
            burst_rounds(ours["starts"], ours["until"]),
            burst_rounds(theirs["starts"], theirs["until"]),
        )
        ma, mb = statistics.median(a) if a else math.nan, statistics.median(b) if b else math.nan
        print("burst (last child started, s after the due second):")
        print(f"  CloudTask   rounds {[round(x, 3) for x in a]}  median {ma:.3f}")
        print(
            f"  APScheduler rounds {[round(x, 3) for x in b]}  median {mb:.3f}  ratio {ratio(ma, mb)}"
        )
        figures["burst_last_start_s"], figures["aps_burst_last_start_s"] = r(ma, 3), r(mb, 3)
    else:
        print("idle:                  CloudTask   APScheduler")
        print(f"  settle s             {ours['settle_s']:9.2f}   {theirs['settle_s']:11.2f}")
        print(
            f"  CPU % of a core      {ours['idle_cpu_pct']:9.2f}   {theirs['idle_cpu_pct']:11.2f}"
        )
        print(f"  RSS MB               {ours['rss_mb']:9.1f}   {theirs['rss_mb']:11.1f}")
        n = ours["tasks"] - 1
        kb = [
            1024 * (x["rss_mb"] - x["rss_one_mb"]) / n if n > 0 else math.nan
            for x in (ours, theirs)
        ]
        print(
            f"  KB per task          {kb[0]:9.2f}   {kb[1]:11.2f}   (RSS with 1 task: "
            f"{ours['rss_one_mb']:.1f} / {theirs['rss_one_mb']:.1f} MB)"
        )
        figures["per_task_kb"] = r(kb[0], 2)
        figures["idle_cpu_pct"] = r(ours["idle_cpu_pct"], 2)
        figures["idle_rss_mb"] = r(ours["rss_mb"])
        figures["settle_10k_s"] = r(ours["settle_s"], 2)
    if workload != "idle":
        print(
            f"  scheduler CPU s      {ours['cpu_s']:9.2f}   {theirs['cpu_s']:11.2f}   "
            f"{ratio(ours['cpu_s'], theirs['cpu_s'])}   (RSS {ours['rss_mb']:.0f} / {theirs['rss_mb']:.0f} MB)"
        )
        figures["cpu_s"] = r((figures.get("cpu_s") or 0) + ours["cpu_s"], 2)
        figures["aps_cpu_s"] = r((figures.get("aps_cpu_s") or 0) + theirs["cpu_s"], 2)


if __name__ == "__main__":
    main()

"""Chaos: a whole cluster under random faults, judged by what the tasks themselves did.

A 3-node ZooKeeper ensemble, a MongoDB wire server, 2 centers and 3 agents, each agent behind
its own TCP proxies to ZooKeeper and MongoDB (so one agent can be cut off alone), run 51 tasks:
40 ``every`` 1-2 s, 4 cron with seconds, 2 keepalive services, 2 mode ``all`` (forbid), 2
``forbid`` tasks that run longer than their interval, and 1 that fails half the time with
retries. Every task appends its own execution record (cloudtask/testing/records.py). A fault
comes every few seconds, at random:

=================  ==========================================================================
agent_kill         kill -9 of an agent; started again after its session timeout
agent_term         SIGTERM of an agent; started again once it is gone
agent_stop         SIGSTOP of an agent past its session timeout, then SIGCONT
center_kill        kill -9 of the leading center; started again a few seconds later
zk_leader_kill     kill -9 of the ZooKeeper leader; started again a few seconds later
agent_zk_cut       one agent's links to ZooKeeper cut (sockets held open): shorter or longer
                   than its session
mongo_stall        SIGSTOP of the MongoDB server for 3-60 s
agent_mongo_cut    one agent's link to MongoDB cut for 3-20 s
clock_skew         one agent's clock 5 s ahead or behind for 10-30 s
=================  ==========================================================================

A fault cycle is a fault applied and healed. After the last one the cluster runs undisturbed
for a while, and then the evidence is read:

- ``duplicates``: fires (task, scheduled_for, attempt; and agent for mode ``all``) that started
  more than once, from the start records;
- ``overlaps``: runs of a ``forbid`` or keepalive task (of one agent's slot, for mode ``all``)
  that started while an earlier one still held its lock (``flock``: released only when every
  process of the earlier run is gone);
- ``unexplained_misses``: fires due while the faults ran that neither started nor have a run
  document saying why (missed, skipped), and failed attempts whose retry never came;
- ``stuck_runs``: runs claimed (or due, if later) 20 s or more before the end and still
  ``queued``, ``claimed`` or ``running`` (a keepalive service's one live instance excepted);
- ``lost_but_ran``: runs recorded ``lost`` whose process did end (its end record);
- ``mislabelled``: run documents that contradict the records (a ``succeeded`` run that never
  ended with 0, a ``missed`` fire that started, a started run with no document ...);
- ``missed_ratio``: fires recorded ``missed`` over fires due; ``missed_ratio_by_kind`` the
  same over the fires due while a fault of each kind was on or had healed less than 10 s
  before (``none``: no fault), so with ``--serial`` (one fault at a time) each fault kind's
  cost is its own;
- ``crashes``: agents or centers that ended with no fault on them (each is restarted), and
  faults that never healed (a SIGTERM that did not stop its agent within a minute).

It prints the counts per fault kind, the median and longest gap each kind caused (how much
longer than its interval a task went without starting, after a fault) and the figures; the
last line is one JSON object: ``fault_cycles``, ``fires``, ``duplicates``, ``overlaps``,
``unexplained_misses``, ``stuck_runs``, ``lost_but_ran``, ``missed_ratio`` (and more).

Usage::

    python bench/chaos.py --duration 600 --seed 7
    python bench/chaos.py --cycles 1000 --faults agent_kill=3,agent_stop=2,mongo_stall=1
    python bench/chaos.py --serial --every 10 --duration 300 --faults agent_kill=1
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kazoo.client import KazooClient  # noqa: E402
from pymongo import MongoClient  # noqa: E402

from cloudtask.localservers import MongoServer, ZooKeeperEnsemble  # noqa: E402
from cloudtask.store import Store  # noqa: E402
from cloudtask.task import parse_task  # noqa: E402
from cloudtask.testing import ProxyGroup, TcpProxy  # noqa: E402
from cloudtask.testing.records import (  # noqa: E402
    Record,
    duplicate_starts,
    overlaps,
    read_records,
    recording_command,
)
from cloudtask.zkpaths import ZkPaths  # noqa: E402

FAULTS = {
    "agent_kill": 3,
    "agent_term": 2,
    "agent_stop": 3,
    "center_kill": 1,
    "zk_leader_kill": 1,
    "agent_zk_cut": 3,
    "mongo_stall": 1,
    "agent_mongo_cut": 2,
    "clock_skew": 2,
}
AGENTS = ("a1", "a2", "a3")
RECOVERY_SLACK = 10.0  # seconds after a fault healed that its misses are still its own
CENTERS = ("c1", "c2")
DB = "chaos"


@dataclass
class Fault:
    kind: str
    target: str
    started: float  # epoch seconds
    heal_at: float  # monotonic
    heal: object
    ended: float | None = None


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = None
    faulted: str | None = None  # the fault holding it


@dataclass
class Task:
    name: str
    spec: dict
    kind: str  # interval | cron | keepalive | all | forbid | retry
    interval: float = 0.0


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    gaps: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


class Chaos:
    def __init__(self, work: Path, seed: int, session: float, verbose: bool) -> None:
        self.work = work
        self.rng = random.Random(seed)
        self.session = session
        self.verbose = verbose
        self.records = work / "records"
        self.locks = work / "locks"
        self.locks.mkdir(parents=True, exist_ok=True)
        self.ensemble = ZooKeeperEnsemble(work / "zk", size=3, tick_time_ms=200)
        self.mongo = MongoServer(work / "mongo")
        self.procs: dict[str, Proc] = {}
        self.zk_proxies: dict[str, ProxyGroup] = {}
        self.mongo_proxies: dict[str, TcpProxy] = {}
        self.clock_files = {a: work / f"{a}.clock" for a in AGENTS}
        self.faults: list[Fault] = []
        self.active: list[Fault] = []
        self.tasks: list[Task] = []
        self.busy: set[str] = set()  # targets with a fault in progress
        self.exits: list[str] = []  # processes that ended without a fault (each restarted)
        self.fault_log = work / "faults.log"

    # --- the cluster --------------------------------------------------------------------------

    def start(self) -> None:
        self.ensemble.start()
        self.mongo.start()
        self.zk = KazooClient(self.ensemble.hosts, timeout=10)
        self.zk.start(timeout=30)
        self.client = MongoClient(self.mongo.uri, tz_aware=True)
        self.store = Store(self.client, DB)
        base = {
            **os.environ,
            "CLOUDTASK_CONFIG": "",
            "CLOUDTASK_ZK_SESSION_TIMEOUT": f"{self.session}s",
            "CLOUDTASK_MONGO_DATABASE": DB,
            "CLOUDTASK_AGENT_KILL_GRACE": "1s",
            "PYTHONUNBUFFERED": "1",
        }
        mongo_addr = self.mongo.uri.removeprefix("mongodb://")
        for agent in AGENTS:
            zk_proxy = ProxyGroup(self.ensemble.hosts.split(","))
            zk_proxy.start()
            mongo_proxy = TcpProxy(mongo_addr)
            mongo_proxy.start()
            self.zk_proxies[agent], self.mongo_proxies[agent] = zk_proxy, mongo_proxy
            self.clock_files[agent].write_text("0")
            env = {
                **base,
                "CLOUDTASK_ZK_HOSTS": zk_proxy.hosts,
                "CLOUDTASK_MONGO_URI": mongo_proxy.mongo_uri,
                "CLOUDTASK_TEST_CLOCK_OFFSET_FILE": str(self.clock_files[agent]),
            }
            argv = ["agent", "--id", agent, "--data-dir", str(self.work / agent)]
            self.procs[agent] = Proc(agent, argv, env, self.work / f"{agent}.log")
        for center in CENTERS:
            env = {**base, "CLOUDTASK_ZK_HOSTS": self.ensemble.hosts}
            env["CLOUDTASK_MONGO_URI"] = self.mongo.uri
            self.procs[center] = Proc(
                center, ["center", "--id", center], env, self.work / f"{center}.log"
            )
        self.make_tasks()
        for proc in self.procs.values():
            self.spawn(proc)

    def spawn(self, proc: Proc) -> None:
        with open(proc.log, "ab") as out:
            proc.popen = subprocess.Popen(
                [sys.executable, "-m", "cloudtask", *proc.argv],
                env=proc.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def make_tasks(self) -> None:
        def add(name: str, kind: str, spec: dict, interval: float = 0.0, **cmd: object) -> None:
            lock = self.locks / name if kind in ("keepalive", "all", "forbid") else None
            command = recording_command(
                self.records, lock=lock, lock_per_agent=kind == "all", **cmd
            )
            full = {"name": name, "command": command, **spec}
            self.store.create_task(full)
            self.tasks.append(Task(name, full, kind, interval))

        for i in range(40):
            every = 1 if i % 2 == 0 else 2
            policy = {"misfire": "skip"} if i % 5 == 4 else {"misfire_grace": "30s"}
            add(f"every-{i:02d}", "interval", {"schedule": {"every": f"{every}s"}, **policy}, every)
        crons = [
            ("*/2 * * * * *", "UTC", 2),
            ("*/3 * * * * *", "Europe/Berlin", 3),
            ("1-59/2 * * * * *", "America/New_York", 2),
            ("*/5 * * * * *", "Australia/Sydney", 5),
        ]
        for i, (expr, zone, step) in enumerate(crons):
            add(f"cron-{i}", "cron", {"schedule": {"cron": expr, "timezone": zone}}, step)
        for i in range(2):
            add(f"service-{i}", "keepalive", {"schedule": {"keepalive": True}}, work="sleep 3600")
        for i in range(2):
            spec = {"schedule": {"every": "2s"}, "mode": "all", "concurrency": "forbid"}
            add(f"all-{i}", "all", spec, 2, work="sleep 0.5")
        for i in range(2):
            spec = {"schedule": {"every": "1s"}, "concurrency": "forbid"}
            add(f"long-{i}", "forbid", spec, 1, work="sleep 2.5")
        spec = {"schedule": {"every": "2s"}, "retries": 2, "retry_delay": "1s"}
        add("flaky", "retry", spec, 2, work="test $((RANDOM % 2)) -eq 0")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)
        for name in (*AGENTS, *CENTERS):
            popen = self.procs[name].popen
            if popen is not None and popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
        for group in self.zk_proxies.values():
            group.stop()
        for proxy in self.mongo_proxies.values():
            proxy.stop()
        self.zk.stop()
        self.zk.close()
        self.client.close()
        self.mongo.stop()
        self.ensemble.stop()

    # --- faults -------------------------------------------------------------------------------

    def leader(self) -> str | None:
        try:
            contenders = self.zk.Election(ZkPaths("/cloudtask").election).contenders()
        except Exception:
            return None
        return contenders[0] if contenders else None

    def inject(self, kinds: dict[str, int]) -> Fault | None:
        """Apply one fault of a kind whose target is free; None if none can be applied now."""
        choices = list(kinds)
        weights = [kinds[k] for k in choices]
        for _ in range(10):
            kind = self.rng.choices(choices, weights)[0]
            fault = getattr(self, f"_{kind}")()
            if fault is not None:
                self.faults.append(fault)
                self.active.append(fault)
                self.busy.add(fault.target)
                self.note(f"fault {kind} on {fault.target}")
                return fault
        return None

    def heal_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        for fault in list(self.active):
            if everything or now >= fault.heal_at:
                done = fault.heal()
                if done is False:
                    continue  # not yet (an agent still stopping)
                fault.ended = time.time()
                self.active.remove(fault)
                self.busy.discard(fault.target)
                self.note(f"healed {fault.kind} on {fault.target}")

    def note(self, line: str) -> None:
        stamped = f"{datetime.now(timezone.utc).isoformat(timespec='milliseconds')} {line}"
        with open(self.fault_log, "a") as out:
            out.write(stamped + "\n")
        if self.verbose:
            print(stamped, flush=True)

    def restart_exited(self) -> None:
        """A process that ended with no fault on it crashed or gave up: noted, and restarted so
        the run goes on (the count is in the figures: it must be 0)."""
        for name in (*AGENTS, *CENTERS):
            proc = self.procs[name]
            if proc.faulted is None and proc.popen is not None and proc.popen.poll() is not None:
                self.exits.append(f"{name} ended by itself (exit {proc.popen.returncode})")
                self.note(self.exits[-1])
                self.spawn(proc)

    def _free_agent(self) -> str | None:
        down = sum(1 for a in AGENTS if self.procs[a].faulted)
        free = [a for a in AGENTS if a not in self.busy]
        if not free:
            return None
        agent = self.rng.choice(free)
        return agent if down < 2 else None

    def _fault(self, kind: str, target: str, duration: float, heal: object) -> Fault:
        return Fault(kind, target, time.time(), time.monotonic() + duration, heal)

    def _kill(self, proc: Proc) -> Callable[[], bool]:
        """kill -9 of ``proc``; the heal starts it again."""
        proc.popen.kill()
        proc.popen.wait()
        proc.faulted = "kill"

        def heal() -> bool:
            proc.faulted = None
            self.spawn(proc)
            return True

        return heal

    def _agent_kill(self) -> Fault | None:
        agent = self._free_agent()
        if agent is None:
            return None
        heal = self._kill(self.procs[agent])
        return self._fault("agent_kill", agent, self.session + self.rng.uniform(0.5, 3), heal)

    def _agent_term(self) -> Fault | None:
        agent = self._free_agent()
        if agent is None:
            return None
        proc = self.procs[agent]
        proc.popen.send_signal(signal.SIGTERM)
        proc.faulted = "term"

        def heal() -> bool:
            if proc.popen.poll() is None:
                return False
            proc.faulted = None
            self.spawn(proc)
            return True

        return self._fault("agent_term", agent, self.rng.uniform(1, 3), heal)

    def _agent_stop(self) -> Fault | None:
        agent = self._free_agent()
        if agent is None:
            return None
        proc = self.procs[agent]
        proc.popen.send_signal(signal.SIGSTOP)
        proc.faulted = "stop"

        def heal() -> bool:
            proc.popen.send_signal(signal.SIGCONT)
            proc.faulted = None
            return True

        return self._fault("agent_stop", agent, self.session + self.rng.uniform(1, 4), heal)

    def _center_kill(self) -> Fault | None:
        leader = self.leader()
        if leader not in CENTERS or any(c in self.busy for c in CENTERS):
            return None
        heal = self._kill(self.procs[leader])
        return self._fault("center_kill", leader, self.rng.uniform(1, 4), heal)

    def _zk_leader_kill(self) -> Fault | None:
        if "zookeeper" in self.busy or self.ensemble.leader() is None:
            return None
        if not all(node.is_running() for node in self.ensemble.nodes):
            return None
        index = self.ensemble.kill_leader()

        def heal() -> bool:
            self.ensemble.restart(index)
            return True

        return self._fault("zk_leader_kill", "zookeeper", self.rng.uniform(2, 6), heal)

    def _agent_zk_cut(self) -> Fault | None:
        free = [a for a in AGENTS if a not in self.busy]
        if not free:
            return None
        agent = self.rng.choice(free)
        self.zk_proxies[agent].cut()
        if self.rng.random() < 0.5:
            duration = self.rng.uniform(0.5, self.session * 0.8)
        else:
            duration = self.session + self.rng.uniform(1, 4)

        def heal() -> bool:
            self.zk_proxies[agent].forward()
            return True

        return self._fault("agent_zk_cut", agent, duration, heal)

    def _mongo_stall(self) -> Fault | None:
        if "mongodb" in self.busy:
            return None
        os.kill(self.mongo.pid, signal.SIGSTOP)
        duration = self.rng.uniform(15, 60) if self.rng.random() < 0.1 else self.rng.uniform(3, 15)

        def heal() -> bool:
            os.kill(self.mongo.pid, signal.SIGCONT)
            return True

        return self._fault("mongo_stall", "mongodb", duration, heal)

    def _agent_mongo_cut(self) -> Fault | None:
        free = [a for a in AGENTS if a not in self.busy]
        if not free:
            return None
        agent = self.rng.choice(free)
        self.mongo_proxies[agent].cut()

        def heal() -> bool:
            self.mongo_proxies[agent].forward()
            return True

        return self._fault("agent_mongo_cut", agent, self.rng.uniform(3, 20), heal)

    def _clock_skew(self) -> Fault | None:
        free = [a for a in AGENTS if f"clock:{a}" not in self.busy]
        if not free:
            return None
        agent = self.rng.choice(free)
        self.clock_files[agent].write_text(str(self.rng.choice([-5, 5])))

        def heal() -> bool:
            self.clock_files[agent].write_text("0")
            return True

        fault = self._fault("clock_skew", f"clock:{agent}", self.rng.uniform(10, 30), heal)
        return fault

    # --- evidence -----------------------------------------------------------------------------

    def judge(self, window: tuple[datetime, datetime], end: datetime) -> dict:
        # the documents first: a run that ends between the two reads has its end record; a run
        # claimed after the documents were read is not judged (it is past the window anyway)
        read_at = datetime.now(timezone.utc) - timedelta(seconds=5)  # before: the read is long
        runs = [d for d in self.client[DB]["runs"].find() if d["scheduled_for"] < read_at]
        records = [r for r in read_records(self.records) if r.scheduled_for < read_at]
        ids = {d["_id"]: d for d in runs}
        by_name = {t.name: t for t in self.tasks}
        per_agent = [t.name for t in self.tasks if t.kind == "all"]
        locked = [t.name for t in self.tasks if t.kind in ("keepalive", "all", "forbid")]
        out: dict = {}
        out["duplicates"] = len(duplicate_starts(records, per_agent))
        out["overlaps"] = len(overlaps(records, locked))
        starts = defaultdict(list)
        ends = {}
        for r in records:
            if r.kind == "start":
                starts[r.run_id].append(r)
            elif r.kind == "end":
                ends[r.run_id] = r
        started_fires = {r.fire for rs in starts.values() for r in rs}
        # runs as documents say
        lost_but_ran = lost_unstarted = mislabelled = stuck = 0
        problems: list[str] = []
        for d in runs:
            status, rid = d["status"], d["_id"]
            fire = (d["task_name"], d["scheduled_for"], d["attempt"])
            if status == "lost":
                if rid in ends:
                    lost_but_ran += 1
                    problems.append(f"lost but ran: {d['task_name']} {d['scheduled_for']}")
                elif rid not in starts:
                    lost_unstarted += 1
            elif status == "succeeded":
                if rid not in ends or ends[rid].exit_code != 0:
                    mislabelled += 1
                    problems.append(f"succeeded without a clean end: {rid}")
            elif status == "failed" and d.get("exit_code") is not None:
                if rid not in ends or ends[rid].exit_code == 0:
                    mislabelled += 1
                    problems.append(f"failed without a failing end: {rid}")
            elif (
                status in ("missed", "skipped")
                and fire in started_fires
                and by_name.get(d["task_name"], Task("", {}, "")).kind != "all"
            ):
                mislabelled += 1
                problems.append(f"{status} but started: {fire}")
            if status in ("queued", "claimed", "running"):
                # a claim made ahead waits for its due time by design: stuck counts from then
                claimed = max(d["claimed_at"], d["scheduled_for"])
                kind = by_name.get(d["task_name"], Task("", {}, "")).kind
                if claimed < end - timedelta(seconds=20) and kind != "keepalive":
                    stuck += 1
                    problems.append(f"stuck: {d['task_name']} {status} since {claimed}")
        for run_id in starts:
            if run_id not in ids:
                mislabelled += 1
                problems.append(f"a run started with no document: {run_id}")
            elif ids[run_id]["status"] in ("missed", "skipped"):
                mislabelled += 1
                problems.append(f"started under a {ids[run_id]['status']} document: {run_id}")
        for task in (t for t in self.tasks if t.kind == "keepalive"):
            live = [d for d in runs if d["task_name"] == task.name and d["status"] == "running"]
            if len(live) > 1:
                stuck += len(live) - 1
                problems.append(f"{task.name}: {len(live)} instances recorded running")
        out["stuck_runs"] = stuck
        out["lost_but_ran"] = lost_but_ran
        out["lost_never_started"] = lost_unstarted
        out["mislabelled"] = mislabelled
        # every fire due in the window: started, or recorded with the reason
        docs_by_fire = {(d["task_name"], d["scheduled_for"], d["attempt"]): d for d in runs}
        fires = unexplained = missed = 0
        # per fault kind: fires due while a fault of that kind was on (or within its recovery
        # slack after it healed), and how many of them were recorded missed
        spans = [
            (f.kind, f.started, (f.ended or end.timestamp()) + RECOVERY_SLACK) for f in self.faults
        ]
        due_by_kind: Counter[str] = Counter()
        missed_by_kind: Counter[str] = Counter()
        for task in self.tasks:
            if task.kind in ("keepalive", "all"):
                continue
            schedule = parse_task(task.spec).schedule
            t = schedule.next_after(window[0])
            while t is not None and t <= window[1]:
                fires += 1
                key = (task.name, t, 0)
                doc = docs_by_fire.get(key)
                during = {k for k, a, b in spans if a <= t.timestamp() <= b} or {"none"}
                due_by_kind.update(during)
                if key in started_fires:
                    pass
                elif doc is not None and doc["status"] in ("missed", "skipped"):
                    missed += doc["status"] == "missed"
                    if doc["status"] == "missed":
                        missed_by_kind.update(during)
                elif doc is not None and doc["status"] == "lost":
                    pass  # counted above (lost_never_started)
                else:
                    unexplained += 1
                    why = doc["status"] if doc else "no record at all"
                    problems.append(f"unexplained: {task.name} {t.isoformat()} ({why})")
                t = schedule.next_after(t)
        # failed attempts whose retry never came
        for r in records:
            task = by_name.get(r.task)
            if r.kind != "end" or task is None or task.kind != "retry" or not r.exit_code:
                continue
            if r.attempt >= 2 or not (window[0] <= r.scheduled_for <= window[1]):
                continue
            nxt = (r.task, r.scheduled_for, r.attempt + 1)
            if nxt not in started_fires and nxt not in docs_by_fire:
                unexplained += 1
                problems.append(f"retry never came: {nxt}")
        out["fires"] = fires
        out["unexplained_misses"] = unexplained
        out["missed_ratio"] = round(missed / fires, 4) if fires else 0.0
        out["missed_ratio_by_kind"] = {
            k: round(missed_by_kind[k] / n, 4) for k, n in sorted(due_by_kind.items())
        }
        out["problems"] = problems
        out["gaps"] = self.gaps(records)
        return out

    def gaps(self, records: list[Record]) -> dict[str, list[float]]:
        """For each fault, the longest time beyond its interval that an affected task went
        without starting a fire: the gap that spans the fault's start. A fault on one agent
        affects the tasks that agent started last before it; a fault of a shared part
        (center, ZooKeeper, MongoDB) affects every task."""
        starts: dict[str, list[tuple[float, str]]] = defaultdict(list)
        plain = {t.name: t.interval for t in self.tasks if t.kind in ("interval", "cron")}
        for r in records:
            if r.kind == "start" and r.task in plain and r.attempt == 0:
                starts[r.task].append((r.time, r.agent))
        for times in starts.values():
            times.sort()
        out: dict[str, list[float]] = defaultdict(list)
        for fault in self.faults:
            agent = fault.target.removeprefix("clock:")
            worst = 0.0
            for task, times in starts.items():
                i = bisect.bisect_left(times, (fault.started, ""))
                if i == 0 or i == len(times):
                    continue
                (before, owner), (after, _) = times[i - 1], times[i]
                if agent in AGENTS and owner != agent:
                    continue
                worst = max(worst, after - before - plain[task])
            out[fault.kind].append(round(max(worst, 0.0), 2))
        return out


def parse_faults(text: str | None) -> dict[str, int]:
    if not text:
        return dict(FAULTS)
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in FAULTS:
            raise SystemExit(f"unknown fault {name!r}: choose from {', '.join(FAULTS)}")
        out[name] = int(weight or 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults")
    parser.add_argument("--cycles", type=int, default=0, help="run until this many cycles")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", help="kinds and weights: agent_kill=3,mongo_stall=1,...")
    parser.add_argument("--every", type=float, default=3.0, help="mean seconds between faults")
    parser.add_argument("--session", type=float, default=3.0, help="ZooKeeper session (s)")
    parser.add_argument("--settle", type=float, default=30.0, help="quiet seconds at the end")
    parser.add_argument(
        "--serial",
        action="store_true",
        help="one fault at a time, the next one --every seconds after the last healed "
        "(gaps and misses then belong to one fault)",
    )
    parser.add_argument("--work", help="folder for servers, logs and records (kept)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)  # the bench's own client: faults
    kinds = parse_faults(args.faults)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cloudtask-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(work, args.seed, args.session, args.verbose)
    began = time.monotonic()

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt  # the cluster is stopped by the finally below

    signal.signal(signal.SIGTERM, interrupted)
    try:
        chaos.start()
        # warm up: every task placed and running before the first fault
        time.sleep(8.0)
        window_start = datetime.now(timezone.utc) + timedelta(seconds=1)
        deadline = time.monotonic() + args.duration
        while True:
            cycles = sum(1 for f in chaos.faults if f.ended is not None)
            if args.cycles and cycles >= args.cycles:
                break
            if not args.cycles and time.monotonic() >= deadline:
                break
            chaos.inject(kinds)
            pause = chaos.rng.uniform(0.5, 1.5) * args.every
            until = time.monotonic() + pause
            while time.monotonic() < until:
                chaos.heal_due()
                chaos.restart_exited()
                time.sleep(0.1)
                if args.serial and chaos.active:
                    until = time.monotonic() + pause  # the pause counts from the heal

        give_up = time.monotonic() + 60
        while chaos.active and time.monotonic() < give_up:  # an agent may still be stopping
            chaos.heal_due(everything=True)
            time.sleep(0.2)
        for fault in chaos.active:
            chaos.exits.append(f"{fault.kind} on {fault.target} never healed (a stop that hung)")
            chaos.note(chaos.exits[-1])
        chaos.restart_exited()
        faults_ended = datetime.now(timezone.utc)
        time.sleep(args.settle)
        end = datetime.now(timezone.utc)
        window = (window_start, faults_ended + timedelta(seconds=args.settle / 2))
        result = chaos.judge(window, end)
    finally:
        try:
            chaos.stop()
        except Exception as e:  # the figures are what matter; say so and go on
            print(f"stopping the cluster: {e}", file=sys.stderr)
    took = time.monotonic() - began
    kinds_seen = Counter(f.kind for f in chaos.faults)
    print(f"work folder: {work}")
    print(f"{'fault':<18}{'count':>7}{'median gap s':>14}{'longest gap s':>15}")
    for kind in FAULTS:
        gaps = result["gaps"].get(kind) or [0.0]
        print(f"{kind:<18}{kinds_seen[kind]:>7}{statistics.median(gaps):>14.2f}{max(gaps):>15.2f}")
    for problem in [*chaos.exits, *result["problems"]][:40]:
        print("  " + problem)
    figures = {
        "fault_cycles": sum(1 for f in chaos.faults if f.ended is not None),
        "fires": result["fires"],
        "duplicates": result["duplicates"],
        "overlaps": result["overlaps"],
        "unexplained_misses": result["unexplained_misses"],
        "stuck_runs": result["stuck_runs"],
        "lost_but_ran": result["lost_but_ran"],
        "missed_ratio": result["missed_ratio"],
        "mislabelled": result["mislabelled"],
        "crashes": len(chaos.exits),
        "lost_never_started": result["lost_never_started"],
        "seconds": round(took),
        "median_gap_s": {k: statistics.median(v) for k, v in sorted(result["gaps"].items()) if v},
        "missed_ratio_by_kind": result["missed_ratio_by_kind"],
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

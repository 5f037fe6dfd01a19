"""Assignments against ZooKeeper's request limit, on a real ZooKeeper (and, at the end, a real
center and agent): a server drops the connection of a client whose request is larger than
``jute.maxbuffer`` (0xfffff bytes by default). The leader writes each assignment (the task's
whole spec) into a node, and the task parser's limits do not keep a spec under that: fields
such as ``description`` have no limit, and JSON escapes a non-ASCII or control character as
``\\uXXXX`` (6 bytes for 1 or 2), so a task within every limit of ``cloudtask/task.py`` can
need 1.2 MB. Here: an assignment of ``ASSIGNMENT_MAX_BYTES`` is written (alone in its
transaction when the others already fill one), one byte more is never sent; its task is not
placed, a ``task.unassigned`` event (reason ``too_large``) and the log name it and its size,
and every other task is placed and runs as ever."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, NoNodeError
from test_cluster import Cluster, assignments
from test_writer import FENCE, PATHS, Recording

from cloudtask.center import tasks as center_tasks
from cloudtask.center.center import Center
from cloudtask.center.tasks import TaskRecord
from cloudtask.center.writer import (
    ASSIGNMENT_MAX_BYTES,
    TXN_MAX_BYTES,
    ZK_MAX_REQUEST,
    AssignmentTooLarge,
    FencedWriter,
    assignment_data,
)
from cloudtask.config import Config
from cloudtask.store import Store
from cloudtask.task import (
    MAX_COMMAND_BYTES,
    MAX_CWD_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VALUE_BYTES,
    MAX_HTTP_BODY_BYTES,
    MAX_HTTP_HEADERS_BYTES,
    MAX_SCHEDULES,
    validate_task,
)
from cloudtask.zkpaths import encode

# --- sizes --------------------------------------------------------------------------------------


def record(task_id: str, size: int, revision: int = 1) -> TaskRecord:
    """A task whose assignment (epoch 3, for the agent life 5) is exactly ``size`` bytes."""
    base = len(assignment_data(_record(task_id, "", revision), 3, 5))
    return _record(task_id, "x" * (size - base), revision)


def _record(task_id: str, description: str, revision: int) -> TaskRecord:
    spec = {"name": task_id, "description": description}
    return TaskRecord(task_id, "default", "one", revision, spec, None, 0.0)


def create(agent_id: str, task_id: str, size: int) -> tuple:
    data = assignment_data(record(task_id, size), 3, 5)
    assert len(data) == size
    return ("create", agent_id, task_id, data)


def stored_record(store: Store, task_id: str) -> TaskRecord:
    """The task as the center caches it (what its assignment carries)."""
    tasks: dict[str, TaskRecord] = {}
    center_tasks._take(tasks, store.get_task(task_id))
    return tasks[task_id]


def pad_to(store: Store, task_id: str, size: int, epoch: int, joined: int) -> int:
    """Pad the task's description so that its assignment (``epoch``, for the agent life
    ``joined``) is exactly ``size`` bytes; returns the revision that is. (A change moves
    ``updated_at``, whose text may get shorter by its microseconds: tried again.)"""
    for _ in range(5):
        rec = stored_record(store, task_id)
        now = len(assignment_data(rec, epoch, joined))
        if now == size:
            return rec.revision
        spec = dict(rec.spec)
        spec.pop("version", None)
        text = spec.get("description", "")
        spec["description"] = text + "x" * (size - now) if size > now else text[: size - now]
        store.replace_task(task_id, spec)
    raise AssertionError(f"could not pad task {task_id} to {size} bytes")


# --- the writer -------------------------------------------------------------------------------


@pytest.fixture
def writer(zk):
    for path in PATHS.persistent_folders():
        zk.ensure_path(path)
    zk.create(FENCE, b"")
    w = FencedWriter(Recording(zk), PATHS, garbage_after=0.0)
    w.fence = FENCE
    return w


@pytest.fixture
def states(zk):
    """Every state change of the test's ZooKeeper client (a dropped connection is one)."""
    seen: list[str] = []
    zk.add_listener(seen.append)
    yield seen
    zk.remove_listener(seen.append)


def test_zookeeper_drops_the_connection_of_a_request_over_its_limit(zk, states) -> None:
    """The premise: a request of more than ``ZK_MAX_REQUEST`` bytes is not refused, the
    server drops the connection (every request in flight on it fails)."""
    zk.ensure_path("/big")
    with pytest.raises(ConnectionLoss):
        zk.create("/big/node", b"x" * ZK_MAX_REQUEST)
    assert "SUSPENDED" in states
    wait_for(lambda: zk.connected, timeout=15)
    assert zk.exists("/big/node") is None


def test_the_largest_assignment_is_written_in_a_transaction_of_its_own(zk, writer, states) -> None:
    """Behind ~500 KB of other assignments (one transaction nearly full), an assignment of
    ``ASSIGNMENT_MAX_BYTES`` is sent alone: every transaction stays under the limit."""
    ops = [create("a1", f"t{i}", 100_000) for i in range(5)]
    ops.append(create("a1", "largest", ASSIGNMENT_MAX_BYTES))
    ops += [create("a1", f"u{i}", 1000) for i in range(3)]
    assert sum(len(op[3]) for op in ops[:5]) < TXN_MAX_BYTES  # room for more, not for it
    writer.write(ops)
    assert writer.writes == len(ops) and states == []  # never a dropped connection
    data, _ = zk.get(PATHS.assignment("a1", "largest"))
    assert len(data) == ASSIGNMENT_MAX_BYTES
    tasks = [[p.rsplit("/", 1)[1] for _, p in txn[1:]] for txn in writer.zk.transactions]
    assert tasks == [["t0", "t1", "t2", "t3", "t4"], ["largest"], ["u0", "u1", "u2"]]


def test_an_assignment_over_the_limit_is_never_sent(zk, writer, states) -> None:
    ops = [create("a1", "small", 1000), create("a1", "over", ASSIGNMENT_MAX_BYTES + 1)]
    with pytest.raises(AssignmentTooLarge) as refused:
        writer.write(ops)
    assert f"task over on a1 is {ASSIGNMENT_MAX_BYTES + 1:,} bytes" in str(refused.value)
    assert writer.zk.transactions == [] and writer.writes == 0 and states == []
    assert zk.connected and not zk.exists(PATHS.assignment_dir("a1"))


# --- the leader ---------------------------------------------------------------------------------


@pytest.fixture
def fake_agents(zk_hosts):
    clients: list[KazooClient] = []

    def join(agent_id: str) -> int:
        """Register ``agent_id``; its registration (czxid)."""
        client = KazooClient(hosts=zk_hosts, timeout=2)
        client.start()
        clients.append(client)
        client.ensure_path(PATHS.agent_group("default"))
        path = client.create(
            PATHS.agent("default", agent_id), encode({"weight": 1}), ephemeral=True
        )
        return client.exists(path).czxid

    yield join
    for client in clients:
        client.stop()
        client.close()


@pytest.fixture
def center(zk, zk_hosts, store):
    cfg = Config().with_section("zookeeper", hosts=zk_hosts)
    c = Center(cfg, store, zk, center_id="c1", resync_interval=0.3, garbage_after=1.0)
    thread = threading.Thread(target=c.run, daemon=True)
    yield c, thread
    c.stop()
    thread.join(timeout=30)


def placed(zk, agent_id: str) -> set[str]:
    try:
        return set(zk.get_children(PATHS.assignment_dir(agent_id)))
    except NoNodeError:  # none written yet
        return set()


def too_large_events(store: Store) -> dict[str, dict[str, Any]]:
    """The ``too_large`` events, by task name (the newest of each)."""
    found = store.events.find({"kind": "task.unassigned", "details.reason": "too_large"})
    return {e["task_name"]: e for e in sorted(found, key=lambda e: e["ts"])}


def test_a_task_too_large_for_zookeeper_is_not_placed_and_every_other_one_is(
    zk, store, center, fake_agents, states, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="cloudtask.center")
    joined = fake_agents("a1")  # the only agent: the ring's epoch is its registration
    spec = {"schedule": {"every": "1m"}, "command": "true"}
    small = [store.create_task({"name": f"small-{i}", **spec})["_id"] for i in range(3)]
    largest = store.create_task({"name": "largest", **spec})["_id"]
    over = store.create_task({"name": "over", **spec})["_id"]
    pad_to(store, largest, ASSIGNMENT_MAX_BYTES, joined, joined)
    over_revision = pad_to(store, over, ASSIGNMENT_MAX_BYTES + 1, joined, joined)
    everywhere = store.create_task(
        {"name": "everywhere", "mode": "all", "description": "é" * 200_000, **spec}
    )["_id"]  # 1.2 MB once escaped: the same on every agent
    c, thread = center
    thread.start()

    wait_for(lambda: placed(zk, "a1") == {*small, largest}, timeout=20)
    data, _ = zk.get(PATHS.assignment("a1", largest))
    assert len(data) == ASSIGNMENT_MAX_BYTES
    events = wait_for(lambda: (e := too_large_events(store)).keys() == {"over", "everywhere"} and e)
    assert events["over"]["task_id"] == over and events["over"]["severity"] == "error"
    assert events["over"]["details"] == {
        "reason": "too_large",
        "bytes": ASSIGNMENT_MAX_BYTES + 1,
        "limit": ASSIGNMENT_MAX_BYTES,
        "revision": over_revision,
        "group": "default",
    }
    assert f"its assignment is {ASSIGNMENT_MAX_BYTES + 1:,} bytes" in events["over"]["message"]
    assert events["everywhere"]["details"]["bytes"] > 1_200_000
    refusals = [r.getMessage() for r in caplog.records if "is not placed" in r.getMessage()]
    assert any(
        m.startswith(f"task over ({over}, revision {over_revision}) is not placed")
        and f"{ASSIGNMENT_MAX_BYTES + 1} bytes" in m
        for m in refusals
    )
    assert c.too_large == {
        over: (over_revision, ASSIGNMENT_MAX_BYTES + 1),
        everywhere: (1, events["everywhere"]["details"]["bytes"]),
    }
    # passes go on; the leader never lost its connection, nor stepped down, nor logs again
    passes = c.reconciles
    wait_for(lambda: c.reconciles >= passes + 3, timeout=10)
    assert c.leading and states == [] and len(refusals) == 2
    assert not [r for r in caplog.records if "stepping down" in r.getMessage()]

    # made smaller, it is placed; a placed task made too large leaves its agent
    store.replace_task(over, {"name": "over", **spec})
    grown = pad_to(store, small[0], ASSIGNMENT_MAX_BYTES + 10, joined, joined)
    wait_for(lambda: placed(zk, "a1") == {*small[1:], largest, over}, timeout=10)
    event = wait_for(lambda: too_large_events(store).get("small-0"))
    assert event["details"]["revision"] == grown
    assert store.events.count_documents({"details.reason": "too_large"}) == 3  # once each
    assert states == [] and c.leading


# --- end to end ---------------------------------------------------------------------------------


def at_every_limit(tmp: Path, name: str, text: str = "x") -> dict[str, Any]:
    """A command task at every size limit of cloudtask/task.py (``text`` repeated: ``x`` for
    ASCII; the cwd, a folder that exists, only ASCII) that prints ``<name> ran``."""
    per_char = len(text.encode())
    script = f"print({name + ' ran'!r})"
    head = [sys.executable, "-c", script]
    room = MAX_COMMAND_BYTES - sum(len(a.encode()) + 1 for a in head)  # joined by spaces
    env = {}
    for i in range(MAX_ENV_BYTES // MAX_ENV_VALUE_BYTES):  # NAME=value and its NUL, each
        value_bytes = MAX_ENV_VALUE_BYTES - len(f"PAD{i}") - 2
        env[f"PAD{i}"] = text * (value_bytes // per_char)
    folder = tmp.resolve()
    cwd = str(folder) + "/." * ((MAX_CWD_BYTES - 1 - len(str(folder))) // 2)  # PATH_MAX: 4095
    spec = {
        "name": name,
        "schedule": [{"every": f"{n}s"} for n in range(2, 2 + MAX_SCHEDULES)],
        "command": [*head, text * (room // per_char)],
        "env": env,
        "cwd": cwd,
    }
    assert validate_task(spec) == []
    return spec


def at_every_http_limit(name: str, text: str) -> dict[str, Any]:
    """An http task at every size limit of cloudtask/task.py, ``text`` repeated."""
    per_char = len(text.encode())
    spec = {
        "name": name,
        "schedule": {"every": "1h"},
        "http": {
            "url": "http://127.0.0.1:9/",
            "method": "POST",
            "body": text * (MAX_HTTP_BODY_BYTES // per_char),
            "headers": {
                f"X-Pad{i}": text * ((MAX_HTTP_HEADERS_BYTES // 4 - 10) // per_char)
                for i in range(4)
            },
        },
        "env": {
            f"PAD{i}": text * ((MAX_ENV_VALUE_BYTES - 6) // per_char)
            for i in range(MAX_ENV_BYTES // MAX_ENV_VALUE_BYTES)
        },
    }
    assert validate_task(spec) == []
    return spec


def ran(store: Store, task_id: str, line: str) -> bool:
    return bool(
        store.runs.find_one({"task_id": task_id, "status": "succeeded", "output_tail": line})
    )


@pytest.mark.timeout(180)
def test_the_largest_assignments_are_placed_and_run_and_larger_ones_are_refused(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, zk, store
) -> None:
    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    try:
        cluster.agent("a1")
        agent = PATHS.agent("default", "a1")
        joined = wait_for(lambda: (s := zk.exists(agent)) and s.czxid, timeout=30)
        limits = store.create_task(at_every_limit(tmp_path, "at-limits"))["_id"]
        largest = store.create_task(
            {
                "name": "largest",
                "schedule": {"every": "2s"},
                "command": [sys.executable, "-c", "print('largest ran')"],
            }
        )["_id"]
        pad_to(store, largest, ASSIGNMENT_MAX_BYTES, joined, joined)
        over = store.create_task({"name": "over", "schedule": {"every": "2s"}, "command": "true"})
        pad_to(store, over["_id"], ASSIGNMENT_MAX_BYTES + 1, joined, joined)
        store.create_task(at_every_http_limit("escaped", "é"))
        plain = store.create_task(
            {
                "name": "plain",
                "schedule": {"every": "2s"},
                "command": [sys.executable, "-c", "print('plain ran')"],
            }
        )["_id"]
        cluster.center("c1")

        wait_for(lambda: assignments(zk) == {"a1": {limits, largest, plain}}, timeout=30)
        for task_id, name in ((largest, "largest"), (plain, "plain")):
            line = f"{name} ran\n"
            wait_for(lambda t=task_id, x=line: ran(store, t, x), timeout=30, message=name)
        # the agent took the task at every limit and runs it (whether its start request fits
        # the run guard's socket is the agent's business, not the placement's)
        wait_for(lambda: store.runs.find_one({"task_id": limits, "agent": "a1"}), timeout=30)
        events = wait_for(
            lambda: (e := too_large_events(store)).keys() == {"over", "escaped"} and e
        )
        sizes = {
            name: len(zk.get(PATHS.assignment("a1", task_id))[0])
            for task_id, name in ((limits, "at-limits"), (largest, "largest"), (plain, "plain"))
        }
        assert sizes["largest"] == ASSIGNMENT_MAX_BYTES
        assert 300_000 < sizes["at-limits"] < TXN_MAX_BYTES  # ASCII: ~336 KB
        assert events["over"]["details"]["bytes"] == ASSIGNMENT_MAX_BYTES + 1
        assert events["escaped"]["details"]["bytes"] > 1_150_000  # "é": 6 bytes for 2
        log = cluster.log("c1")
        assert "task over (" in log and "task escaped (" in log and "stepping down" not in log
    finally:
        cluster.stop_all()

"""The leader's fenced writer (cloudtask.center.writer) on a real ZooKeeper: every transaction
checks the election node first, deletions go first, chunks stay small, a stale view is not
forced, and the garbage of departed agents goes later."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kazoo.exceptions import NoNodeError

from cloudtask.center.tasks import TaskRecord
from cloudtask.center.writer import (
    TXN_MAX_OPS,
    FencedWriter,
    LeadershipLost,
    Placed,
    StaleView,
    assignment_data,
)
from cloudtask.zkpaths import ZkPaths, decode

PATHS = ZkPaths("/cloudtask")
FENCE = f"{PATHS.election}/leader-0000000001"


class Recording:
    """A KazooClient whose transactions are recorded: (kind, path) per operation."""

    def __init__(self, zk: Any) -> None:
        self._zk = zk
        self.transactions: list[list[tuple[str, str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._zk, name)

    def transaction(self) -> Any:
        real = self._zk.transaction()
        ops: list[tuple[str, str]] = []
        self.transactions.append(ops)

        def recorded(kind: str) -> Any:
            def call(path: str, *args: Any) -> Any:
                ops.append((kind, path))
                return getattr(real, kind)(path, *args)

            return call

        return SimpleNamespace(
            check=recorded("check"),
            create=recorded("create"),
            set_data=recorded("set_data"),
            delete=recorded("delete"),
            commit=real.commit,
            commit_async=real.commit_async,
        )


@pytest.fixture
def writer(zk):
    for path in PATHS.persistent_folders():
        zk.ensure_path(path)
    zk.create(FENCE, b"")
    w = FencedWriter(Recording(zk), PATHS, garbage_after=0.0)
    w.fence = FENCE
    return w


def record(task_id: str, revision: int = 1) -> TaskRecord:
    return TaskRecord(task_id, "default", "one", revision, {"name": task_id}, None, 0.0)


def create(agent_id: str, task_id: str, revision: int = 1, joined: int = 5) -> tuple:
    return ("create", agent_id, task_id, assignment_data(record(task_id, revision), 3, joined))


def test_an_assignment_names_the_life_it_is_for() -> None:
    doc = decode(assignment_data(record("t1", 4), epoch=3, joined=77))
    assert doc == {
        "version": 1,
        "task_id": "t1",
        "revision": 4,
        "epoch": 3,
        "for_agent": 77,
        "updated_at": None,
        "spec": {"name": "t1"},
    }


def test_placed_read_from_zookeeper_is_valid_only_if_written_after_the_registration() -> None:
    assert Placed(1, 1, mzxid=10).valid(9)
    assert not Placed(1, 1, mzxid=10).valid(10)
    written = Placed(1, 1, valid_for=9)
    assert written.valid(9) and not written.valid(12)


def test_every_transaction_is_fenced_chunked_and_deletes_first(zk, writer) -> None:
    writer.write([create("a1", f"t{i:03d}") for i in range(TXN_MAX_OPS + 50)])
    assert writer.writes == TXN_MAX_OPS + 50
    assert len(zk.get_children(PATHS.assignment_dir("a1"))) == TXN_MAX_OPS + 50
    writer.zk.transactions.clear()
    ops = [create("a2", f"t{i:03d}", joined=6) for i in range(TXN_MAX_OPS)]
    ops += [("delete", "a1", f"t{i:03d}", None) for i in range(TXN_MAX_OPS)]
    writer.write(ops)
    kinds = [kind for txn in writer.zk.transactions for kind, _ in txn[1:]]
    assert kinds == ["delete"] * TXN_MAX_OPS + ["create"] * TXN_MAX_OPS
    for txn in writer.zk.transactions:
        assert txn[0] == ("check", FENCE)
        assert len(txn) - 1 <= TXN_MAX_OPS
    assert set(writer.placed["a1"]) == {f"t{i:03d}" for i in range(TXN_MAX_OPS, TXN_MAX_OPS + 50)}
    assert writer.placed["a2"]["t000"] == Placed(1, 3, valid_for=6)


def test_a_deposed_leader_writes_nothing(zk, writer) -> None:
    writer.write([create("a1", "t1")])
    zk.delete(FENCE)
    with pytest.raises(LeadershipLost):
        writer.write([create("a1", "t2"), ("delete", "a1", "t1", None)])
    assert zk.get_children(PATHS.assignment_dir("a1")) == ["t1"]
    with pytest.raises(LeadershipLost):
        writer.check_fence()
    with pytest.raises(LeadershipLost):
        writer.put_status({"leader": "c1"})
    assert not zk.exists(PATHS.status)
    writer.garbage["a1"] = (0.0, {"t1"})
    with pytest.raises(LeadershipLost):
        writer.collect_garbage()
    assert zk.exists(PATHS.assignment("a1", "t1"))
    assert writer.writes == 1


def test_a_stale_view_is_not_forced(zk, writer) -> None:
    writer.write([create("a1", "t1")])
    zk.delete(PATHS.assignment("a1", "t1"))  # behind the leader's back
    with pytest.raises(StaleView):
        writer.write([create("a1", "t2"), ("set", "a1", "t1", b"{}")])
    assert zk.get_children(PATHS.assignment_dir("a1")) == []  # all or nothing
    assert writer.writes == 1
    writer.rebuild()
    assert writer.placed == {"a1": {}}


def test_transactions_in_flight_the_view_holds_exactly_what_committed(zk, writer) -> None:
    """Several transactions are in flight at once; one fails (a node made behind the
    leader's back): StaleView, and the view holds every node the others wrote, no other."""
    behind = f"t{2 * TXN_MAX_OPS + 7:04d}"  # in the third of five transactions
    zk.ensure_path(PATHS.assignment_dir("a1"))
    zk.create(PATHS.assignment("a1", behind), b"{}")
    with pytest.raises(StaleView):
        writer.write([create("a1", f"t{i:04d}") for i in range(5 * TXN_MAX_OPS)])
    there = set(zk.get_children(PATHS.assignment_dir("a1"))) - {behind}
    assert len(there) == 4 * TXN_MAX_OPS  # the other four committed
    assert set(writer.placed["a1"]) == there
    assert writer.writes == len(there)


def test_rebuild_reads_every_assignment_as_stale_until_its_agent_is_seen(zk, writer) -> None:
    writer.write([create("a1", "t1", revision=7)])
    stat = zk.exists(PATHS.assignment("a1", "t1"))
    writer.rebuild()
    assert writer.placed == {"a1": {"t1": Placed(7, 3, mzxid=stat.mzxid)}}
    assert writer.garbage == {}


def test_garbage_goes_later_and_comes_back_stale_with_its_agent(zk, writer) -> None:
    writer.write([create("a1", "t1"), create("a1", "t2"), create("a2", "t3")])
    a2 = SimpleNamespace(leaving=False)
    writer.garbage_after = 3600.0
    writer.sort_departed({"a2": a2})  # a1 is gone
    assert set(writer.placed) == {"a2"} and writer.garbage["a1"][1] == {"t1", "t2"}
    writer.collect_garbage()
    assert zk.get_children(PATHS.assignment_dir("a1"))  # not yet
    # back before its garbage went: its assignments are stale, to be rewritten or deleted
    writer.sort_departed({"a1": SimpleNamespace(leaving=False), "a2": a2})
    assert writer.placed["a1"] == {"t1": Placed(0, 0, valid_for=-1), "t2": Placed(0, 0, -1)}
    assert not writer.garbage
    # gone again (a leaving agent counts as gone), then collected: one already deleted
    writer.sort_departed({"a1": SimpleNamespace(leaving=True), "a2": a2})
    zk.delete(PATHS.assignment("a1", "t1"))
    writer.garbage_after = 0.0
    writer.collect_garbage()
    with pytest.raises(NoNodeError):
        zk.get_children(PATHS.assignment_dir("a1"))
    assert writer.garbage == {} and writer.garbage_deleted == 2
    assert zk.exists(PATHS.assignment("a2", "t3"))


def test_status_is_written_fenced(zk, writer) -> None:
    assert writer.put_status({"leader": "c1"})
    assert writer.put_status({"leader": "c1", "unassigned": {}})
    assert decode(zk.get(PATHS.status)[0]) == {"version": 1, "leader": "c1", "unassigned": {}}
    assert writer.zk.transactions[-1][0] == ("check", FENCE)

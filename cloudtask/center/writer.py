"""The leader's writes to ZooKeeper, in fenced transactions: assignments, ``/status``, garbage.

:class:`FencedWriter` keeps the leader's view of ``/assignments`` (``placed``: what is
there; ``garbage``: what departed agents left behind) and is the only way the leader changes
them. The cluster's once-only guarantee rests on the rules it keeps:

* **Fencing.** Every transaction first checks the leader's own election node (``check``,
  version 0), so it applies only while this center still leads. A leader paused past its
  session lost that node with its session: its transactions fail as a whole, and
  :class:`LeadershipLost` makes it step down. A MongoDB write made in the leader's name is
  preceded by :meth:`FencedWriter.check_fence`, the same check outside a transaction.
* **Chunks.** At most ``TXN_MAX_OPS`` operations and ``TXN_MAX_BYTES`` (counted with
  some room per operation) per transaction, well under ZooKeeper's 1 MB request limit; an
  assignment larger than that is written in a transaction of its own.
* **No assignment larger than a request.** ZooKeeper drops the connection of a client that
  sends a request over ``jute.maxbuffer`` (``ZK_MAX_REQUEST`` by default): a session
  suspended, the leader stepping down, and the same write again at its next leadership. An
  assignment over ``ASSIGNMENT_MAX_BYTES`` (the limit, less room for the path, the ACL, the
  fence check and the framing) is never sent: the center does not place its task
  (:class:`AssignmentTooLarge` if one reaches :meth:`FencedWriter.write`).
* **Deletions first.** The deletions of a pass are written before its creations and
  updates, so a moved task leaves its old agent no later than it reaches the new one.
* **Stale views are not forced.** A transaction that fails for another reason (a node
  already there, or gone) wrote nothing: it raises :class:`StaleView`, and the center reads
  every assignment again (:meth:`FencedWriter.rebuild`) before it writes anything else.
* **Assignments name the life they are for.** An assignment carries ``for_agent``, the
  registration (czxid) of the agent it was written for; an agent acts only on assignments
  last written after it registered, so one left for an earlier life is never trusted: the
  leader rewrites (or deletes) it (:meth:`Placed.valid`).
* **Garbage off the failover path.** The assignments of an agent that is gone (or leaving)
  are not deleted when its tasks move: the new owners are written first and the leftovers
  deleted ``garbage_after`` seconds later (fenced too; ones already gone one by one, then
  the agent's folder if it is empty). An agent back before that gets them back as stale,
  to be rewritten or deleted at once.

Outside a transaction the writer only creates an agent's (empty) assignments folder, and
deletes garbage: one node at a time after a fenced transaction of deletions failed only
because some were gone already, and an emptied folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from kazoo.exceptions import BadVersionError, KazooException, NoNodeError, RolledBackError

from ..exceptions import CloudTaskError
from ..registry import LiveAgent
from ..zkpaths import ZkPaths, decode, encode
from .multiread import read_many
from .tasks import TaskRecord

log = logging.getLogger(__name__)

TXN_MAX_OPS = 200  # operations per ZooKeeper transaction
TXN_MAX_BYTES = 512 * 1024  # well under ZooKeeper's 1 MB request limit
OP_ROOM = 200  # bytes counted per operation besides its data (path, ACL, headers)
# the largest request a ZooKeeper server reads (jute.maxbuffer, 0xfffff by default): a larger
# one makes the server drop the connection, every request in flight on it failing
ZK_MAX_REQUEST = 0xFFFFF
# the largest assignment node written: alone in its transaction, with 4 KiB left for the
# fence check, the node's path and ACL and the request's framing
ASSIGNMENT_MAX_BYTES = ZK_MAX_REQUEST - 4096
TXN_IN_FLIGHT = 8  # transactions sent before the first one's answer is awaited
GARBAGE_AFTER = 60.0  # seconds before the assignments left by a departed agent are deleted

Op = tuple[str, str, str, bytes | None]  # (kind: create, set or delete; agent; task; data)


class LeadershipLost(CloudTaskError):
    """This center is no longer the leader (its session or election node is gone)."""


class StaleView(CloudTaskError):
    """A transaction failed because the assignments were not as the leader believed."""


class AssignmentTooLarge(CloudTaskError):
    """An assignment larger than ``ASSIGNMENT_MAX_BYTES`` was to be written (nothing was)."""


@dataclass
class Placed:
    """One assignment as it is in ZooKeeper.

    ``valid_for`` is the registration (czxid) of the agent it was written for: an agent acts
    only on assignments written after it registered, so one written for an earlier life of a
    restarted agent is stale and is rewritten (or deleted), never trusted. ``mzxid`` is set
    when the node was read rather than written by this leader; ``valid_for`` is then resolved
    against the agent's registration when the agent is next seen.
    """

    revision: int
    epoch: int
    valid_for: int | None = None
    mzxid: int = 0
    shard: tuple[int, int] | None = None  # a mode-all task's (index, total) on this agent

    def valid(self, joined: int) -> bool:
        if self.valid_for is None:
            self.valid_for = joined if self.mzxid > joined else -1
        return self.valid_for == joined


class AssignmentData(bytes):
    """An assignment node's bytes, with what the leader's view keeps of it (so a committed
    write is not decoded again)."""

    revision: int
    epoch: int
    for_agent: int
    shard: tuple[int, int] | None


def assignment_data(
    record: TaskRecord, epoch: int, joined: int, shard: tuple[int, int] | None = None
) -> AssignmentData:
    """The assignment node of ``record`` for the agent life registered as ``joined``; a
    mode-all task's carries the agent's ``shard``: ``{"index": i, "total": n}``."""
    doc: dict[str, Any] = {
        "task_id": record.task_id,
        "revision": record.revision,
        "epoch": epoch,
        "for_agent": joined,
        "updated_at": record.updated_at,
        "spec": record.spec,
    }
    if shard is not None:
        doc["shard"] = {"index": shard[0], "total": shard[1]}
    data = AssignmentData(encode(doc))
    data.revision, data.epoch, data.for_agent = record.revision, epoch, joined
    data.shard = shard
    return data


def shard_of(doc: Any) -> tuple[int, int] | None:
    """The ``(index, total)`` an assignment document carries, or None (none, or not valid)."""
    shard = doc.get("shard") if isinstance(doc, dict) else None
    if not isinstance(shard, dict):
        return None
    index, total = shard.get("index"), shard.get("total")
    if type(index) is not int or type(total) is not int or not 0 <= index < total:
        return None
    return index, total


def _placed(data: bytes) -> Placed:
    if isinstance(data, AssignmentData):
        return Placed(data.revision, data.epoch, valid_for=data.for_agent, shard=data.shard)
    doc = decode(data) or {}
    return Placed(
        int(doc["revision"]),
        int(doc["epoch"]),
        valid_for=int(doc["for_agent"]),
        shard=shard_of(doc),
    )


class FencedWriter:
    def __init__(self, zk: Any, paths: ZkPaths, garbage_after: float = GARBAGE_AFTER) -> None:
        self.zk = zk
        self.paths = paths
        self.garbage_after = garbage_after
        self.fence: str | None = None  # our election node, while we lead
        self.placed: dict[str, dict[str, Placed]] = {}  # agent id -> task id -> placed
        # assignments left by departed agents: agent id -> (since, task ids); deleted later,
        # off the failover path, or rewritten if the agent comes back first
        self.garbage: dict[str, tuple[float, set[str]]] = {}
        self.writes = 0  # assignment operations written (for tests and benches)
        self.garbage_deleted = 0  # assignments of departed agents deleted later

    # --- the fence ----------------------------------------------------------------------------

    def fenced(self) -> Any:
        """A transaction that applies only while our election node exists (we still lead)."""
        assert self.fence is not None
        txn = self.zk.transaction()
        txn.check(self.fence, 0)
        return txn

    @staticmethod
    def commit_fenced(txn: Any) -> list[Any]:
        """Commit; LeadershipLost if the fence failed (other failures are the caller's)."""
        results = txn.commit()
        if isinstance(results[0], (NoNodeError, BadVersionError)):
            raise LeadershipLost("the election node is gone: another center may lead")
        return results

    def check_fence(self) -> None:
        """LeadershipLost unless our election node still exists: a deposed leader writes
        nothing, to MongoDB either."""
        assert self.fence is not None
        if not self.zk.exists(self.fence):
            raise LeadershipLost("the election node is gone: another center may lead")

    # --- the view -----------------------------------------------------------------------------

    def rebuild(self) -> None:
        """Read every assignment from ZooKeeper: the only view a new leader starts from.
        The folders' children are listed in one go, and the nodes read 50 a request
        (:mod:`cloudtask.center.multiread`)."""
        self.placed = {}
        self.garbage = {}
        agents = self.zk.get_children(self.paths.assignments)
        listings = [(a, self.zk.get_children_async(self.paths.assignment_dir(a))) for a in agents]
        paths: list[str] = []
        for agent_id, listing in listings:
            try:
                children = listing.get()
            except NoNodeError:
                continue
            self.placed[agent_id] = {}
            paths += [self.paths.assignment(agent_id, t) for t in children]
        for path, data, stat in read_many(self.zk, paths):
            agent_id, task_id = path.rsplit("/", 2)[-2:]
            doc = decode(data) or {}
            self.placed[agent_id][task_id] = Placed(
                int(doc.get("revision", 0)),
                int(doc.get("epoch", 0)),
                mzxid=stat.mzxid,
                shard=shard_of(doc),
            )
        log.info(
            "rebuilt the placement of %d tasks on %d agents from ZooKeeper",
            sum(len(p) for p in self.placed.values()),
            len(self.placed),
        )

    def sort_departed(self, agents: dict[str, LiveAgent]) -> None:
        """Assignments of agents that are gone (or leaving) become garbage, not deletions: the
        agents that take over their tasks are written first, and the rest is deleted later. A
        returning agent's garbage is placed again as stale (rewritten or deleted now)."""
        now = time.monotonic()
        for agent_id in list(self.placed):
            agent = agents.get(agent_id)
            if agent is None or agent.leaving:
                since, tasks = self.garbage.get(agent_id, (now, set()))
                self.garbage[agent_id] = (since, tasks | set(self.placed.pop(agent_id)))
        for agent_id in list(self.garbage):
            agent = agents.get(agent_id)
            if agent is not None and not agent.leaving:
                _, tasks = self.garbage.pop(agent_id)
                placed = self.placed.setdefault(agent_id, {})
                for task_id in tasks:
                    placed.setdefault(task_id, Placed(0, 0, valid_for=-1))

    # --- assignments --------------------------------------------------------------------------

    def write(self, ops: list[Op]) -> None:
        """Write ``ops``, deletions first, in fenced transactions; the view follows each one
        that commits. StaleView if one failed (the view is then to be rebuilt).

        The deletions are all committed before any creation or update is sent. Within each of
        the two phases up to ``TXN_IN_FLIGHT`` transactions are in flight at once: ZooKeeper
        applies one session's requests in the order they were sent, and each transaction
        stands alone (a failed one wrote nothing; the others are kept in the view)."""
        if not ops:
            return
        too_large = [op for op in ops if len(op[3] or b"") > ASSIGNMENT_MAX_BYTES]
        if too_large:  # sent, it would drop the connection (and every request in flight)
            _, agent_id, task_id, data = too_large[0]
            raise AssignmentTooLarge(
                f"the assignment of task {task_id} on {agent_id} is {len(data or b''):,} bytes; "
                f"at most {ASSIGNMENT_MAX_BYTES:,} are written ({len(too_large)} too large)"
            )
        deletions = [op for op in ops if op[0] == "delete"]
        writes = [op for op in ops if op[0] != "delete"]
        for agent_id in {op[1] for op in writes if op[0] == "create"}:
            if agent_id not in self.placed:
                self.zk.ensure_path(self.paths.assignment_dir(agent_id))
                self.placed[agent_id] = {}
        for phase in (deletions, writes):
            self._commit_all(self._chunks(phase))

    @staticmethod
    def _chunks(ops: list[Op]) -> list[list[Op]]:
        """``ops`` in transactions of at most ``TXN_MAX_OPS`` operations and ``TXN_MAX_BYTES``
        (an operation larger than that alone): a transaction never exceeds the largest
        request ZooKeeper reads, since no operation is larger than ``ASSIGNMENT_MAX_BYTES``."""
        chunks: list[list[Op]] = []
        batch: list[Op] = []
        size = 0
        for op in ops:
            cost = len(op[3] or b"") + OP_ROOM
            if batch and (len(batch) >= TXN_MAX_OPS or size + cost > TXN_MAX_BYTES):
                chunks.append(batch)
                batch, size = [], 0
            batch.append(op)
            size += cost
        if batch:
            chunks.append(batch)
        return chunks

    def _commit_all(self, chunks: list[list[Op]]) -> None:
        """Commit ``chunks``, several in flight; every answer is read before anything is
        raised, so the view holds exactly what committed."""
        in_flight: list[tuple[list[Op], Any]] = []
        failure: Exception | None = None
        for batch in chunks:
            if failure is not None:
                break
            in_flight.append((batch, self._send(batch)))
            if len(in_flight) >= TXN_IN_FLIGHT:
                failure = self._settle(*in_flight.pop(0)) or failure
        for batch, answer in in_flight:
            failure = self._settle(batch, answer) or failure
        if failure is not None:
            raise failure

    def _send(self, batch: list[Op]) -> Any:
        txn = self.fenced()
        for kind, agent_id, task_id, data in batch:
            path = self.paths.assignment(agent_id, task_id)
            if kind == "create":
                txn.create(path, data)
            elif kind == "set":
                txn.set_data(path, data)
            else:
                txn.delete(path)
        return txn.commit_async()

    def _settle(self, batch: list[Op], answer: Any) -> Exception | None:
        """The outcome of one sent transaction: the view follows it if it committed, else the
        error to raise (LeadershipLost, StaleView, or the connection's)."""
        try:
            results = answer.get()
        except Exception as e:  # the connection's: raised as it is, as a call would raise it
            return e
        if isinstance(results[0], (NoNodeError, BadVersionError)):
            return LeadershipLost("the election node is gone: another center may lead")
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            failures = [r for r in failures if not isinstance(r, RolledBackError)] or failures
            # the view was stale (a node already there or gone): read it again and retry
            return StaleView(f"assignments changed under the leader: {failures[0]!r}")
        self.writes += len(batch)
        for kind, agent_id, task_id, data in batch:
            placed = self.placed.setdefault(agent_id, {})
            if kind == "delete":
                placed.pop(task_id, None)
            else:
                placed[task_id] = _placed(data)
        return None

    # --- garbage ------------------------------------------------------------------------------

    def collect_garbage(self) -> None:
        """Delete what departed agents left ``garbage_after`` seconds ago, and their folders."""
        due = [
            a
            for a, (since, _) in self.garbage.items()
            if time.monotonic() - since >= self.garbage_after
        ]
        for agent_id in due:
            _, tasks = self.garbage[agent_id]
            ops = [("delete", agent_id, task_id, None) for task_id in sorted(tasks)]
            for i in range(0, len(ops), TXN_MAX_OPS):
                self._commit_garbage(ops[i : i + TXN_MAX_OPS])
            try:
                self.zk.delete(self.paths.assignment_dir(agent_id))
            except (NoNodeError, KazooException):
                pass  # not empty (the agent is back) or gone already
            self.garbage.pop(agent_id, None)

    def _commit_garbage(self, ops: list[Op]) -> None:
        txn = self.fenced()
        for _, agent_id, task_id, _ in ops:
            txn.delete(self.paths.assignment(agent_id, task_id))
        if any(
            isinstance(r, Exception) for r in self.commit_fenced(txn)
        ):  # some were gone already: one by one
            for _, agent_id, task_id, _ in ops:
                try:
                    self.zk.delete(self.paths.assignment(agent_id, task_id))
                except NoNodeError:
                    pass
        self.garbage_deleted += len(ops)

    # --- the leader's summary -----------------------------------------------------------------

    def put_status(self, status: dict[str, Any]) -> bool:
        """Write ``/status`` (fenced); whether it was written."""
        txn = self.fenced()
        if self.zk.exists(self.paths.status):
            txn.set_data(self.paths.status, encode(status))
        else:
            txn.create(self.paths.status, encode(status))
        return not any(isinstance(r, Exception) for r in self.commit_fenced(txn))

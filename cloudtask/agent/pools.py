"""Concurrency pools: at most ``size`` runs at once, across the whole cluster, of every task
and plan item that names the pool (``"pool": "db-heavy"``); the others wait their turn.

Sizes are stored in MongoDB (``pools``: ``{_id: name, size}``; the API, the CLI). A run that
names a pool asks for a place just before it starts (the agent's ``begin``, on a starter
thread: it may wait) and gives it back when it ends.

**In a cluster** (:class:`ZkPools`) a place is an ephemeral sequential node under
``/pools/<name>``: the runs holding a place are the ``size`` oldest nodes, and a run waits
until its node is among them. Waiting is in order (the sequence), a place is given back by
deleting the node, and a place whose agent died goes with its ZooKeeper session (the agent's
guard ends the run's processes by then, see guard.py). A run that waits longer than its
task's ``pool_wait`` (10 minutes unless given) gives up its node and is recorded ``skipped``
with the reason. A size changed takes effect at the next change of the pool's waiters.

**A standalone agent** (:class:`LocalPools`) is the only one running its tasks: a counting
condition per pool, in order of arrival, does the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kazoo.exceptions import KazooException, NoNodeError

log = logging.getLogger(__name__)

SIZE_TTL = 5.0  # seconds a pool's size read from MongoDB is used again
DEFAULT_POOL_WAIT = 600.0  # seconds a run waits for its pool unless its task says


class PoolError(Exception):
    """The pool cannot be used (no such pool, ZooKeeper does not answer)."""


class PoolTimeout(Exception):
    """The run waited for its pool longer than it may."""


class Sizes:
    """Pool sizes, read from the store and kept SIZE_TTL seconds."""

    def __init__(self, read: Callable[[str], int | None]) -> None:
        self._read = read
        self._known: dict[str, tuple[float, int | None]] = {}
        self._lock = threading.Lock()

    def size(self, name: str) -> int:
        with self._lock:
            known = self._known.get(name)
        if known is None or time.monotonic() - known[0] > SIZE_TTL:
            known = (time.monotonic(), self._read(name))
            with self._lock:
                self._known[name] = known
        if known[1] is None:
            raise PoolError(f"no pool named {name!r} (cloudtask pool set {name} SIZE)")
        return known[1]


class LocalPools:
    """Pools of one standalone agent."""

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self._cond = threading.Condition()
        self._held: dict[str, int] = {}
        self._queue: dict[str, deque[object]] = {}

    def acquire(self, name: str, run_id: str, timeout: float, cancelled: Callable[[], bool]) -> Any:
        me = object()
        deadline = time.monotonic() + timeout
        with self._cond:
            queue = self._queue.setdefault(name, deque())
            queue.append(me)
            try:
                while True:
                    size = self.sizes.size(name)
                    if queue[0] is me and self._held.get(name, 0) < size:
                        queue.popleft()
                        self._held[name] = self._held.get(name, 0) + 1
                        self._cond.notify_all()
                        return name
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise PoolTimeout(f"waited {timeout:g}s for a place in pool {name!r}")
                    if cancelled():
                        raise PoolTimeout(f"killed while waiting for pool {name!r}")
                    self._cond.wait(min(left, 1.0))
            except BaseException:
                if me in queue:
                    queue.remove(me)
                    self._cond.notify_all()
                raise

    def release(self, token: Any) -> None:
        with self._cond:
            self._held[token] = max(0, self._held.get(token, 0) - 1)
            self._cond.notify_all()


class ZkPools:
    """Pools across a cluster, in ZooKeeper (see the module notes)."""

    def __init__(self, zk: Any, root: str, sizes: Sizes) -> None:
        self.zk = zk
        self.root = root  # <zookeeper root>/pools
        self.sizes = sizes

    def acquire(self, name: str, run_id: str, timeout: float, cancelled: Callable[[], bool]) -> Any:
        folder = f"{self.root}/{name}"
        deadline = time.monotonic() + timeout
        try:
            self.sizes.size(name)  # (no such pool: said before anything is written)
            self.zk.ensure_path(folder)
            node = self.zk.create(f"{folder}/w-", run_id.encode(), ephemeral=True, sequence=True)
        except KazooException as e:
            raise PoolError(f"cannot ask pool {name!r} for a place: {e!r}") from e
        mine = node.rsplit("/", 1)[1]
        changed = threading.Event()
        try:
            while True:
                changed.clear()
                waiters = sorted(self.zk.get_children(folder, watch=lambda _event: changed.set()))
                size = self.sizes.size(name)
                if mine not in waiters:
                    raise PoolError(f"the place asked of pool {name!r} is gone (session lost)")
                if waiters.index(mine) < size:
                    return node
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolTimeout(f"waited {timeout:g}s for a place in pool {name!r}")
                if cancelled():
                    raise PoolTimeout(f"killed while waiting for pool {name!r}")
                changed.wait(min(left, SIZE_TTL))  # (a size change is read again)
        except BaseException:
            self.release(node)
            raise

    def release(self, token: Any) -> None:
        try:
            self.zk.delete(token)
        except NoNodeError:
            pass
        except KazooException as e:  # the session ends with the agent: the node goes then
            log.warning("cannot give back pool place %s yet: %r", token, e)

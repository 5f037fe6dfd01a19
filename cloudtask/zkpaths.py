"""Where CloudTask keeps its live coordination state in ZooKeeper (root configurable).

```
<root>/agents/<group>/<agent_id>        ephemeral: the agent's registration (JSON)
<root>/election                         kazoo Election among centers
<root>/centers/<center_id>              ephemeral: a running center (JSON)
<root>/assignments/<agent_id>           persistent: its data is the leader's change counter
<root>/assignments/<agent_id>/<task_id> persistent: the task spec, revision and ring epoch (JSON)
<root>/signals/tasks                    its version is bumped after every task change
<root>/signals/runs                     bumped when a manual run waits for an agent to take it
<root>/status                           the leader's summary: who leads, unassigned tasks (JSON)
<root>/kills/<agent_id>/<run_id>        persistent: a request to kill a run (JSON: reason, by)
```

ZooKeeper holds only small, live state; everything that must be kept is in MongoDB. Every JSON
document carries a schema ``version``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kazoo.exceptions import ConnectionLoss, OperationTimeoutError, SessionExpiredError
from kazoo.handlers.threading import KazooTimeoutError

from .exceptions import CloudTaskError
from .retry import Backoff, Stopped, retry

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class ZkPaths:
    """Path names under one root, e.g. ``ZkPaths("/cloudtask").agent("default", "a1")``."""

    def __init__(self, root: str = "/cloudtask") -> None:
        self.root = root.rstrip("/") or "/"
        base = "" if self.root == "/" else self.root
        self.agents = f"{base}/agents"
        self.election = f"{base}/election"
        self.centers = f"{base}/centers"
        self.assignments = f"{base}/assignments"
        self.signals = f"{base}/signals"
        self.task_signal = f"{base}/signals/tasks"
        self.run_signal = f"{base}/signals/runs"
        self.status = f"{base}/status"
        self.kills = f"{base}/kills"
        self.pools = f"{base}/pools"  # concurrency pools' places (cloudtask/agent/pools.py)

    def agent_group(self, group: str) -> str:
        return f"{self.agents}/{group}"

    def agent(self, group: str, agent_id: str) -> str:
        return f"{self.agents}/{group}/{agent_id}"

    def center(self, center_id: str) -> str:
        return f"{self.centers}/{center_id}"

    def assignment_dir(self, agent_id: str) -> str:
        return f"{self.assignments}/{agent_id}"

    def assignment(self, agent_id: str, task_id: str) -> str:
        return f"{self.assignments}/{agent_id}/{task_id}"

    def kill_dir(self, agent_id: str) -> str:
        return f"{self.kills}/{agent_id}"

    def kill(self, agent_id: str, run_id: str) -> str:
        return f"{self.kills}/{agent_id}/{run_id}"

    def persistent_folders(self) -> list[str]:
        return [
            self.agents,
            self.election,
            self.centers,
            self.assignments,
            self.signals,
            self.kills,
        ]


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps({"version": SCHEMA_VERSION, **doc}, separators=(",", ":")).encode()


def decode(data: bytes | None) -> dict[str, Any] | None:
    """The JSON document in a znode, or None for an empty or unreadable one."""
    if not data:
        return None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def connect(
    hosts: str,
    session_timeout: float,
    *,
    start_timeout: float = 15.0,
    credential: Any = None,
    root: str | None = None,
) -> Any:
    """A started KazooClient that keeps reconnecting; a clear error if ZooKeeper is unreachable.

    With a ``credential`` (:class:`cloudtask.zkauth.Credential`) the client authenticates with
    it (digest) and every node it creates gets its ACL (no one else may read or change it);
    without, nodes get the open ACL. With ``root``, the client checks that it may read it
    (:class:`~cloudtask.zkauth.AccessDenied`, at once, when a credential is missing or wrong).
    Every KazooClient of CloudTask's programs is made here (:func:`connect_config`)."""
    from kazoo.client import KazooClient
    from kazoo.handlers.threading import KazooTimeoutError

    from .exceptions import CloudTaskError
    from .zkauth import acl_of, check_access

    if not hosts:
        raise CloudTaskError(
            "no ZooKeeper configured: set zookeeper.hosts or CLOUDTASK_ZK_HOSTS "
            "(or run a standalone agent with --standalone)"
        )
    retry = {"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 1.0}
    try:
        zk = KazooClient(
            hosts=hosts,
            timeout=session_timeout,
            connection_retry=retry,
            auth_data=credential.auth_data() if credential is not None else None,
            default_acl=acl_of(credential),
        )
    except ValueError as e:
        raise CloudTaskError(f"zookeeper.hosts {hosts!r} is not a list of host:port: {e}") from None
    try:
        zk.start(timeout=start_timeout)
    except KazooTimeoutError:
        zk.stop()
        zk.close()
        raise ClusterUnavailable(
            f"cannot reach ZooKeeper at {hosts} within {start_timeout:g} s: "
            "check that it runs and that zookeeper.hosts points at it"
        ) from None
    if root is not None:
        try:
            check_access(zk, root, credential)
        except BaseException:
            zk.stop()
            zk.close()
            raise
    return zk


def connect_config(cfg: Any, *, start_timeout: float = 15.0) -> Any:
    """:func:`connect` to the ZooKeeper of ``cfg`` (a :class:`~cloudtask.config.Config`): its
    hosts, session timeout, the credential ``zookeeper.auth`` names (read now, from the
    environment or a file when it refers to one) and the access check of its root."""
    from .zkauth import credential

    zk_cfg = cfg.zookeeper
    return connect(
        zk_cfg.hosts,
        zk_cfg.session_timeout,
        start_timeout=start_timeout,
        credential=credential(zk_cfg.auth),
        root=zk_cfg.root,
    )


# how long a request made for a person (a signal, a kill request) may wait for ZooKeeper:
# kazoo queues a request while the connection is down and would wait for ever
ZK_REQUEST_TIMEOUT = 5.0


class ClusterUnavailable(CloudTaskError):
    """ZooKeeper cannot be reached now; what needed it was not done."""


# what a later try may not meet: no answer in time, a dropped link, a session that ended
ZK_TRANSIENT = (ClusterUnavailable, ConnectionLoss, SessionExpiredError, OperationTimeoutError)


# ZooKeeper is tried again every half second while it does not answer
KEEP_TRYING = Backoff(first=0.5)


def keep_trying(what: str, step: Callable[[], Any], stop: threading.Event) -> bool:
    """``step()`` (ZooKeeper calls), tried again every half second while ZooKeeper does not
    answer, until ``stop`` is set: a daemon started while its ensemble elects a leader must
    not give up. Says so at the first failure and every 30th. Returns whether it was done."""

    def say(tries: int, e: BaseException) -> None:
        if tries == 1 or tries % 30 == 0:
            log.warning("cannot %s yet (%s: %s); trying again", what, type(e).__name__, e)

    try:
        retry(step, backoff=KEEP_TRYING, retry_on=ZK_TRANSIENT, stop=stop, on_retry=say)
    except Stopped:
        return False
    return True


def _call(zk: Any, what: str, async_result: Any, timeout: float = ZK_REQUEST_TIMEOUT) -> Any:
    try:
        return async_result.get(timeout=timeout)
    except KazooTimeoutError:
        raise ClusterUnavailable(
            f"ZooKeeper did not answer within {timeout:g} s to {what}"
        ) from None


def bounded(zk: Any, what: str, request: Any, timeout: float = ZK_REQUEST_TIMEOUT) -> Any:
    """Make one ZooKeeper request and wait at most ``timeout`` for its answer.

    ``request`` starts it (``lambda: zk.get_async(path)``). kazoo queues a request made while
    the connection is down and waits for ever; this raises :class:`ClusterUnavailable` at
    once instead, and after ``timeout`` when no answer comes (the request may still be
    carried out later). kazoo's own errors (NoNodeError, ...) are raised as they are."""
    if not zk.connected:
        raise ClusterUnavailable(f"not connected to ZooKeeper: cannot {what} now")
    return _call(zk, what, request(), timeout)


def _bumper(zk: Any, path: str, timeout: float) -> Any:
    from kazoo.exceptions import NoNodeError

    def bump() -> None:
        try:
            bounded(zk, "signal the change", lambda: zk.set_async(path, b""), timeout)
        except NoNodeError:
            bounded(
                zk, "signal the change", lambda: zk.create_async(path, b"", makepath=True), timeout
            )

    return bump


def task_signal(zk: Any, paths: ZkPaths, timeout: float = ZK_REQUEST_TIMEOUT) -> Any:
    """A function that bumps ``/signals/tasks``, so the leading center reconciles at once."""
    return _bumper(zk, paths.task_signal, timeout)


def run_signal(zk: Any, paths: ZkPaths, timeout: float = ZK_REQUEST_TIMEOUT) -> Any:
    """A function that bumps ``/signals/runs``, so agents look for waiting runs at once."""
    return _bumper(zk, paths.run_signal, timeout)


def request_kill(zk: Any, paths: ZkPaths, agent_id: str, run_id: str, reason: str) -> None:
    """Ask the agent running ``run_id`` to kill it (its whole process tree)."""
    from kazoo.exceptions import NodeExistsError

    if not zk.connected:
        raise ClusterUnavailable(
            "not connected to ZooKeeper: the kill request cannot reach the run's agent now; "
            "try again when the cluster is reachable"
        )
    try:
        _call(
            zk,
            "the kill request",
            zk.create_async(
                paths.kill(agent_id, run_id), encode({"reason": reason}), makepath=True
            ),
        )
    except NodeExistsError:
        pass  # asked already

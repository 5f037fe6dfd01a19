"""An agent's presence in ZooKeeper, and the lease that fences its claims.

The agent registers an ephemeral node ``/agents/<group>/<agent_id>``; the leading center
places tasks on the agents it sees there. The node lives exactly as long as the agent's
session, so when the agent dies its tasks move once the session has expired.

States (changed only under the lock; ``state_id`` counts changes so late callbacks are ignored)::

    NEW -> REGISTERED -> SUSPENDED -> REGISTERED      (connection back within the session)
                      -> SUSPENDED -> LOST -> REGISTERED (a new session: registered again)
    any -> CLOSED

The lease: a claim may be made only if this process heard from ZooKeeper within the session
timeout minus a margin. A heartbeat thread makes one cheap round trip every quarter of the
lease and records when it *started*; a process that was paused (SIGSTOP, a frozen VM) for
longer than that wakes up with an old timestamp and fires nothing until a new round trip has
succeeded, by which time its expired session has been noticed and its tasks are gone.

Example::

    reg = Registration(zk, ZkPaths("/cloudtask"), "a1", "default", info, session_timeout=10)
    reg.start()
    if reg.may_claim(): ...
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError

from ..exceptions import CloudTaskError
from ..retry import Backoff, Stopped, TryAgain, retry
from ..zkpaths import ZK_TRANSIENT, ClusterUnavailable, ZkPaths, bounded, decode, encode

log = logging.getLogger(__name__)

NEW, REGISTERED, SUSPENDED, LOST, CLOSED = "new", "registered", "suspended", "lost", "closed"
STOP_BUDGET = 1.0  # seconds the calls of a clean stop may wait for ZooKeeper each
# registering is tried again every half second, for as long as ZooKeeper does not answer
REGISTER_RETRY = Backoff(first=0.5)


class DuplicateAgent(CloudTaskError):
    """Another live agent already uses this agent id."""


class Registration:
    def __init__(
        self,
        zk: KazooClient,
        paths: ZkPaths,
        agent_id: str,
        group: str,
        info: dict[str, Any],
        *,
        session_timeout: float,
        margin: float | None = None,
        load: Callable[[], dict[str, Any]] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.zk = zk
        self.paths = paths
        self.agent_id = agent_id
        self.group = group
        self.info = dict(info)
        self.session_timeout = session_timeout
        # the lease ends this much before the session could have expired on the server
        self.margin = margin if margin is not None else max(0.5, session_timeout / 5)
        self.load = load
        self.on_lost = on_lost
        self.path = paths.agent(group, agent_id)
        self.state = NEW
        self.state_id = 0
        self.session_id: str | None = None
        # the zxid that created our node: assignments written before it were for an earlier life
        self.czxid = 0
        self._lock = threading.Lock()
        self._last_contact = 0.0
        self._published: bytes | None = None
        self._stop = threading.Event()
        self._needs_register = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="zk-heartbeat", daemon=True)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, wait_for_predecessor: float | None = None) -> None:
        """Register, waiting for a crashed predecessor's session to expire (saying so).

        Raises :class:`DuplicateAgent` if a live agent holds the id, and CloudTaskError if
        ZooKeeper fails meanwhile.
        """
        self.zk.add_listener(self._on_state)
        try:
            self._register(wait_for_predecessor, make_group=True)
        except KazooException as e:
            raise CloudTaskError(f"cannot register in ZooKeeper: {type(e).__name__} {e}") from None
        self._thread.start()

    def leaving(self) -> None:
        """Say we are leaving (a clean stop): the leader moves our tasks but does not take our
        runs for lost while they finish. The node itself goes in :meth:`stop`."""
        with self._lock:
            if self.state == CLOSED:
                return
        self.info["leaving"] = True
        data = self._document()
        try:
            bounded(
                self.zk,
                "mark the registration leaving",
                lambda: self.zk.set_async(self.path, data),
                STOP_BUDGET,
            )
        except (KazooException, ClusterUnavailable) as e:
            log.info("cannot mark the registration leaving (it ends with the session): %s", e)

    def stop(self) -> None:
        """Leave at once: deleting the node lets the leader move our tasks within a second.
        Waits at most ``STOP_BUDGET`` for ZooKeeper (the node goes with the session anyway)."""
        with self._lock:
            self._set_state(CLOSED)
        self._stop.set()
        self.zk.remove_listener(self._on_state)
        try:
            bounded(
                self.zk,
                "delete the registration",
                lambda: self.zk.delete_async(self.path),
                STOP_BUDGET,
            )
        except (KazooException, ClusterUnavailable):
            pass

    def fence(self) -> tuple[str | None, float]:
        """``(session, until)``: claims made under ``session`` may start until the monotonic
        time ``until`` (for the guard process, which enforces it if this process freezes)."""
        with self._lock:
            if self.state not in (REGISTERED, SUSPENDED):
                return self.session_id, 0.0
            return self.session_id, self._last_contact + self.session_length() - self.margin

    def registered_since(self, czxid: int) -> bool:
        """Whether the agent is registered now, with a registration other than ``czxid``."""
        with self._lock:
            return self.state == REGISTERED and self.czxid != czxid

    def session_length(self) -> float:
        """The session timeout the server granted (it may cap what we asked for), in seconds."""
        negotiated = getattr(self.zk, "_session_timeout", None)  # kazoo keeps it in ms
        if isinstance(negotiated, (int, float)) and negotiated > 0:
            return min(self.session_timeout, negotiated / 1000.0)
        return self.session_timeout

    def heartbeat_interval(self) -> float:
        return max(0.2, (self.session_timeout - self.margin) / 4)

    def out_of_touch(self) -> bool:
        """Whether two heartbeats in a row have not reached ZooKeeper: a change of our
        assignments may not have reached us yet."""
        with self._lock:
            last = self._last_contact
        return time.monotonic() - last > 2 * self.heartbeat_interval()

    def may_claim(self) -> bool:
        """The fencing lease: heard from ZooKeeper recently enough, and registered."""
        with self._lock:
            if self.state not in (REGISTERED, SUSPENDED):
                return False
        return time.monotonic() - self._last_contact < self.session_length() - self.margin

    # --- internals --------------------------------------------------------------------------

    def _document(self) -> bytes:
        doc = dict(self.info)
        if self.load is not None:
            try:
                doc["load"] = self.load()
            except Exception:  # load figures are informative; never fail registration on them
                log.exception("cannot read load figures")
        return encode(doc)

    def _register(self, wait_for_predecessor: float | None, make_group: bool = False) -> None:
        """Create our node; while ZooKeeper does not answer, keep trying (saying so): an agent
        that cannot register claims nothing, and giving up would only need a restart. Ends
        when registered, when stopped, or with :class:`DuplicateAgent` (a live holder, or a
        predecessor whose session outlived ``wait_for_predecessor``)."""
        deadline = time.monotonic() + (
            wait_for_predecessor if wait_for_predecessor is not None else self.session_timeout + 5
        )
        said = False

        def attempt() -> tuple[float, bytes, Any]:
            nonlocal make_group, said
            started = time.monotonic()
            data = self._document()
            try:
                if make_group:
                    group = self.paths.agent_group(self.group)
                    bounded(
                        self.zk,
                        "create the agent group",
                        lambda: self.zk.ensure_path_async(group),
                        self.session_timeout,
                    )
                    make_group = False
                _, stat = bounded(
                    self.zk,
                    "register",
                    lambda: self.zk.create_async(
                        self.path, data, ephemeral=True, include_data=True
                    ),
                    self.session_timeout,
                )
            except NodeExistsError:
                try:
                    holder, stat = self._holder()
                except ZK_TRANSIENT:
                    raise TryAgain from None
                if stat is None:
                    raise TryAgain(0.0) from None  # gone meanwhile: try again at once
                if stat.ephemeralOwner != self.zk.client_id[0]:
                    self._wait_for_holder(holder, deadline, said)
                    said = True
                    raise TryAgain from None
                # ours already: a retried create whose first try had landed
            return started, data, stat

        def say(tries: int, e: BaseException) -> None:
            nonlocal unanswered
            if isinstance(e, TryAgain):
                return  # the node is held, or could not be read: only ZooKeeper's silence counts
            unanswered += 1
            if unanswered == 1 or unanswered % 30 == 0:
                log.warning("cannot register yet, trying again: %s", e)

        unanswered = 0
        try:
            started, data, stat = retry(
                attempt,
                backoff=REGISTER_RETRY,
                retry_on=ZK_TRANSIENT,
                stop=self._stop,
                on_retry=say,
            )
        except Stopped:
            return
        self._published = data
        with self._lock:
            self._last_contact = started
            self.session_id = f"{self.zk.client_id[0]:x}"
            self.czxid = stat.czxid
            self._set_state(REGISTERED)
        log.info("registered as %s (session %s)", self.path, self.session_id)

    def _wait_for_holder(self, holder: dict[str, Any] | None, deadline: float, said: bool) -> None:
        """Another session holds our node: refuse a live duplicate, and a predecessor whose
        session outlived ``deadline``; else say once that we wait (the next try comes after
        ``REGISTER_RETRY``'s wait)."""
        self._refuse_if_live(holder)
        if time.monotonic() > deadline:
            raise DuplicateAgent(
                f"agent id {self.agent_id!r} is still registered by another session "
                f"({_describe(holder)}); give each agent its own id"
            )
        if not said:
            log.warning(
                "agent id %s is still registered by an earlier session (%s); waiting for it "
                "to expire (up to %.0f s)",
                self.agent_id,
                _describe(holder),
                max(0.0, deadline - time.monotonic()),
            )

    def _holder(self) -> tuple[dict[str, Any] | None, Any]:
        try:
            data, stat = bounded(
                self.zk, "read the registration", lambda: self.zk.get_async(self.path), 5.0
            )
        except NoNodeError:
            return None, None
        return decode(data), stat

    def _refuse_if_live(self, holder: dict[str, Any] | None) -> None:
        """A holder on this host whose process still runs is a live duplicate, not a crash."""
        if not holder or holder.get("host") != socket.gethostname():
            return
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and psutil.pid_exists(pid):
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if alive:
                raise DuplicateAgent(
                    f"agent id {self.agent_id!r} is in use by a running agent on this host "
                    f"(pid {pid}); give each agent its own id"
                )

    def _set_state(self, state: str) -> None:
        if self.state != CLOSED:
            self.state = state
            self.state_id += 1

    def _on_state(self, state: str) -> None:
        """kazoo's connection listener: never blocks."""
        with self._lock:
            if self.state == CLOSED:
                return
            if state == KazooState.SUSPENDED:
                self._set_state(SUSPENDED)
            elif state == KazooState.LOST:
                self._set_state(LOST)
                self._needs_register.set()
            elif state == KazooState.CONNECTED and self.state == SUSPENDED:
                self._set_state(REGISTERED)
        if state == KazooState.LOST and self.on_lost is not None:
            self.on_lost()

    def _heartbeat(self) -> None:
        interval = self.heartbeat_interval()
        last_load = 0.0
        while not self._stop.wait(interval):
            started = time.monotonic()
            if not self.zk.connected:
                continue  # no contact: the fence runs out by itself
            try:
                if self._needs_register.is_set():
                    self._needs_register.clear()
                    self._register(self.session_timeout + 5)
                    continue
                stat = bounded(
                    self.zk,
                    "check the registration",
                    lambda: self.zk.exists_async(self.path),
                    interval,
                )
                client_id = self.zk.client_id
                if client_id is None:
                    continue  # the connection dropped meanwhile: as above
                if stat is None or stat.ephemeralOwner != client_id[0]:
                    # a new session (after LOST): the old node is gone; register again
                    with self._lock:
                        self._set_state(LOST)
                    if self.on_lost is not None:
                        self.on_lost()
                    self._register(self.session_timeout + 5)
                    continue
                with self._lock:
                    self._last_contact = started
                if started - last_load >= 5.0:
                    last_load = started
                    data = self._document()
                    if data != self._published:  # refresh figures only when they changed
                        bounded(
                            self.zk,
                            "publish load figures",
                            lambda data=data: self.zk.set_async(self.path, data),
                            interval,
                        )
                        self._published = data
            except DuplicateAgent as e:
                log.error("%s", e)
            except (KazooException, CloudTaskError) as e:
                log.debug("heartbeat failed: %s", e)
            except Exception:
                log.exception("heartbeat failed")


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "unknown holder"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started_at')}"

"""A ZooKeeper ensemble on this machine, for failover tests: members that can be killed.

:class:`ZooKeeperEnsemble` runs several :class:`ZooKeeperQuorumPeer` (``QuorumPeerMain``)
on loopback, each on ports kept across restarts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from cloudtask.exceptions import ServerStartError

from .base import POLL_INTERVAL, _client_host, _host_port, _port_is_free
from .zookeeper import ZooKeeperServer, find_java, find_zookeeper_classpath

logger = logging.getLogger("cloudtask.localservers")

# Options for each JVM of an ensemble: three run at once, on machines with two cores.
ENSEMBLE_JVM_OPTIONS = [
    "-Xms16m",
    "-Xmx128m",
    "-XX:+UseSerialGC",
    # The quick JIT only: a JVM starts faster and takes less CPU from its neighbours.
    "-XX:TieredStopAtLevel=1",
    "-Dzookeeper.admin.enableServer=false",
    "-Dzookeeper.jmx.log4j.disable=true",
    # A member alone waits between election rounds twice as long each time, up to 60 s by
    # default: cap it so that a member started late or restarted joins within seconds.
    "-Dzookeeper.fastleader.maxNotificationInterval=2000",
]

# What ``srvr`` says a member does ("Mode: ..."); a member that serves clients is one of
# these. Without a quorum it answers "This ZooKeeper instance is not currently serving".
SERVING_MODES = ("leader", "follower", "observer")


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports: all are held open while chosen, so none repeats."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ZooKeeperQuorumPeer(ZooKeeperServer):
    """One member of a :class:`ZooKeeperEnsemble` (``QuorumPeerMain``), in its own folder.

    Besides its client port it has a quorum port (followers to leader) and an election
    port; ``peers`` lists ``(client, quorum, election)`` ports of every member, in server id
    order (``server_id`` counts from 1). :meth:`start` returns once the process answers on
    its client port: it serves clients only once it belongs to a quorum (:meth:`mode`).
    """

    log_name = "zookeeper.log"

    def __init__(
        self,
        data_dir: Path | str,
        server_id: int,
        peers: list[tuple[int, int, int]],
        host: str = "127.0.0.1",
        tick_time_ms: int = 2000,
        min_session_timeout_ms: int | None = None,
        max_session_timeout_ms: int = 60000,
    ) -> None:
        if not 1 <= server_id <= len(peers):
            raise ValueError(f"server_id {server_id} is not between 1 and {len(peers)}")
        client_port, self.quorum_port, self.election_port = peers[server_id - 1]
        super().__init__(
            data_dir,
            port=client_port,  # never changed: the other members and the clients know it
            host=host,
            tick_time_ms=tick_time_ms,
            min_session_timeout_ms=min_session_timeout_ms,
            max_session_timeout_ms=max_session_timeout_ms,
        )
        self.server_id = server_id
        self.peers = list(peers)
        self.name = f"ZooKeeper member {server_id}"

    @property
    def snapshot_dir(self) -> Path:
        return self.data_dir / "data"

    def start(self, timeout: float = 60.0) -> None:
        """Start the member (same ports, same data) and wait until its client port answers."""
        with self._lock:
            if not self.is_running():
                for what, port in (("quorum", self.quorum_port), ("election", self.election_port)):
                    if not _port_is_free(self.host, port):
                        raise ServerStartError(
                            f"{self.name} cannot use its {what} port "
                            f"{_host_port(self.host, port)}: it is in use; stop what uses it"
                        )
            super().start(timeout)

    def kill(self) -> None:
        """Kill the member's process group at once (SIGKILL), like a machine that dies."""
        with self._lock:
            process = self._process
            if process is None or self._stopped:
                return
            if process.poll() is None:
                logger.info("killing %s (pid %s)", self.name, process.pid)
                self._signal(process, kill=True)
                process.wait(10)
            self.stop()  # nothing left to signal: marks it stopped

    def mode(self, timeout: float = 2.0) -> str | None:
        """``"leader"``, ``"follower"``... as ``srvr`` says; None when it does not serve."""
        answer = self.four_letter_word("srvr", timeout)
        for line in (answer or "").splitlines():
            if line.startswith("Mode:"):
                return line.partition(":")[2].strip()
        return None

    def is_serving(self) -> bool:
        return self.mode() in SERVING_MODES

    def _command(self) -> list[str]:
        java = find_java()
        classpath = os.pathsep.join(find_zookeeper_classpath())
        return [
            java,
            *ENSEMBLE_JVM_OPTIONS,
            "-cp",
            classpath,
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(self.config_path),
        ]

    def _prepare(self) -> None:
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        # QuorumPeerMain reads its server id from "myid" in dataDir.
        (self.snapshot_dir / "myid").write_text(f"{self.server_id}\n", encoding="ascii")
        # initLimit/syncLimit are in ticks: keep them about 10 s and 5 s whatever the tick,
        # since a JVM that syncs on a busy machine can be slow; a follower notices a killed
        # leader at once anyway (its connection closes).
        init_limit = max(10, -(-10_000 // self.tick_time_ms))
        sync_limit = max(5, -(-5_000 // self.tick_time_ms))
        peer_host = _client_host(self.host)
        lines = [
            f"dataDir={self.snapshot_dir.as_posix()}",
            f"clientPort={self._port}",
            f"clientPortAddress={self.host}",
            f"tickTime={self.tick_time_ms}",
            f"initLimit={init_limit}",
            f"syncLimit={sync_limit}",
            f"minSessionTimeout={self.min_session_timeout_ms}",
            f"maxSessionTimeout={self.max_session_timeout_ms}",
            "maxClientCnxns=0",
            "admin.enableServer=false",
            "4lw.commands.whitelist=ruok,srvr,stat",
            # A static membership: no dynamic configuration file rewritten behind our back.
            "reconfigEnabled=false",
        ]
        for server_id, (_, quorum_port, election_port) in enumerate(self.peers, start=1):
            lines.append(f"server.{server_id}={peer_host}:{quorum_port}:{election_port}")
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


class ZooKeeperEnsemble:
    """A ZooKeeper ensemble of ``size`` members on this machine, for failover tests.

    Each member runs in ``data_dir/node<N>`` (configuration, data, ``zookeeper.log``). Its
    ports (client, quorum, election) are chosen when the ensemble is made and kept across
    restarts. :meth:`start` returns once every member serves (a leader was elected and the
    others follow it).

    Example::

        with ZooKeeperEnsemble(Path("/tmp/zk3"), tick_time_ms=200) as ensemble:
            zk = KazooClient(ensemble.hosts, timeout=10)  # "127.0.0.1:P1,127.0.0.1:P2,..."
            zk.start()
            old = ensemble.kill_leader()  # the two others elect a new leader
            ensemble.wait_for_quorum()  # ... its index
            ensemble.restart(old)  # it comes back as a follower
            zk.stop()
    """

    name = "ZooKeeper ensemble"

    def __init__(
        self,
        data_dir: Path | str,
        size: int = 3,
        tick_time_ms: int = 2000,
        min_session_timeout_ms: int | None = None,
        max_session_timeout_ms: int = 60000,
        host: str = "127.0.0.1",
    ) -> None:
        if size < 2:
            raise ValueError(f"an ensemble needs at least 2 members (3 to survive one), not {size}")
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        ports = _free_ports(3 * size, _client_host(host))
        peers = [(ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]) for i in range(size)]
        self.nodes = [
            ZooKeeperQuorumPeer(
                self.data_dir / f"node{i + 1}",
                server_id=i + 1,
                peers=peers,
                host=host,
                tick_time_ms=tick_time_ms,
                min_session_timeout_ms=min_session_timeout_ms,
                max_session_timeout_ms=max_session_timeout_ms,
            )
            for i in range(size)
        ]

    @property
    def hosts(self) -> str:
        """The connection string for kazoo: ``"127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3"``."""
        return ",".join(node.hosts for node in self.nodes)

    @property
    def quorum_size(self) -> int:
        """How many members must serve for the ensemble to serve: a majority."""
        return len(self.nodes) // 2 + 1

    def start(self, timeout: float = 90.0) -> None:
        """Start every member and wait until all serve; raises ServerStartError otherwise.

        The members start together (none serves before a majority runs). On failure every
        member is stopped.
        """
        deadline = time.monotonic() + timeout
        errors: list[BaseException] = []

        def start_node(node: ZooKeeperQuorumPeer) -> None:
            try:
                node.start(timeout)
            except BaseException as e:  # reported by the caller's thread
                errors.append(e)

        threads = [
            threading.Thread(target=start_node, args=(node,), name=f"start-{node.name}")
            for node in self.nodes
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            self.wait_for_quorum(max(1.0, deadline - time.monotonic()))
        except BaseException:  # also Ctrl+C: leave no member behind
            for thread in threads:
                thread.join()
            self.stop()
            raise
        logger.info("%s is ready on %s", self.name, self.hosts)

    def stop(self, timeout: float = 10) -> None:
        """Stop every member (SIGTERM to all first, so none waits for the others)."""
        threads = [
            threading.Thread(target=node.stop, args=(timeout,), name=f"stop-{node.name}")
            for node in self.nodes
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def modes(self) -> list[str | None]:
        """Each member's mode as ``srvr`` says (None: stopped, or not serving)."""
        return [node.mode() if node.is_running() else None for node in self.nodes]

    def leader(self) -> int | None:
        """The index in :attr:`nodes` of the member that leads now, or None."""
        for index, mode in enumerate(self.modes()):
            if mode == "leader":
                return index
        return None

    def wait_for_quorum(self, timeout: float = 60.0) -> int:
        """Wait until every running member serves, one of them leading; return its index.

        Raises ServerStartError after ``timeout`` seconds (with each member's mode and the end
        of its log), or at once when fewer than a majority of the members run.
        """
        deadline = time.monotonic() + timeout
        while True:
            running = [node for node in self.nodes if node.is_running()]
            if len(running) < self.quorum_size:
                raise ServerStartError(
                    f"{self.name} cannot serve: {len(running)} of {len(self.nodes)} members "
                    f"run, a quorum needs {self.quorum_size}"
                )
            modes = self.modes()
            serving = [
                mode in SERVING_MODES for node, mode in zip(self.nodes, modes) if node.is_running()
            ]
            if all(serving) and modes.count("leader") == 1:
                return modes.index("leader")
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} did not elect a leader served by every running member "
                    f"within {timeout:g} s (modes: {modes}); the end of each log:\n"
                    + self.log_tail(15)
                )
            time.sleep(POLL_INTERVAL)

    def kill_leader(self, timeout: float = 30.0) -> int:
        """SIGKILL the leader (waiting up to ``timeout`` s for one); return its index."""
        deadline = time.monotonic() + timeout
        while True:
            index = self.leader()
            if index is not None:
                break
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} has no leader to kill after {timeout:g} s (modes: {self.modes()})"
                )
            time.sleep(POLL_INTERVAL)
        self.nodes[index].kill()
        return index

    def restart(self, index: int, timeout: float = 60.0) -> None:
        """Stop member ``index`` if it runs, start it again and wait until it serves."""
        node = self.nodes[index]
        node.stop()
        node.start(timeout)
        deadline = time.monotonic() + timeout
        while not node.is_serving():
            if not node.is_running():
                raise ServerStartError(
                    f"{node.name} exited while rejoining; the end of {node.log_path}:\n"
                    f"{node.log_tail(30)}"
                )
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{node.name} did not rejoin {self.name} within {timeout:g} s "
                    f"(modes: {self.modes()}); the end of {node.log_path}:\n{node.log_tail(30)}"
                )
            time.sleep(POLL_INTERVAL)

    def log_tail(self, n_lines: int = 50) -> str:
        """The last ``n_lines`` lines of each member's log, one section per member."""
        return "\n".join(
            f"---- {node.name} ({node.log_path})\n{node.log_tail(n_lines)}" for node in self.nodes
        )

    def __enter__(self) -> ZooKeeperEnsemble:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.hosts} modes {self.modes()}>"

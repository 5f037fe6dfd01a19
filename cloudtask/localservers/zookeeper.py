"""A standalone ZooKeeper server, and how the local Java runtime and ZooKeeper are found.

ZooKeeper comes from ``$ZOOKEEPER_HOME`` (an Apache tarball folder) or Debian's ``zookeeper``
package (``/usr/share/java/zookeeper.jar``); Java from ``$JAVA_HOME`` or PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from cloudtask.exceptions import ServerStartError

from .base import _client_host, _host_port, _LocalServer

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

# Options for the ZooKeeper JVM: it starts small and may grow to 1 GiB. Every assignment
# carries its task's spec, so the heap grows with the tasks: 100,000 tasks ran a 256 MiB heap
# out of memory while writing a snapshot.
ZOOKEEPER_JVM_OPTIONS = [
    "-Xms32m",
    "-Xmx1g",
    "-XX:+UseSerialGC",
    "-Dzookeeper.admin.enableServer=false",
    "-Dzookeeper.jmx.log4j.disable=true",
]


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

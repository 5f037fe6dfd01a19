"""A MongoDB wire-protocol server for local use and tests: nx-27017, backed by SQLite."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudtask.exceptions import ServerStartError

from .base import _client_host, _host_port, _LocalServer

if TYPE_CHECKING:
    from pymongo import MongoClient

EMBEDDED_MISSING = (
    "the embedded MongoDB server needs the 'embedded' extra: pip install 'cloudtask[embedded]'"
)

# Runs nx-27017 with this interpreter. ``python -m nx_27017.nx_27017`` works too, but runpy
# warns because the package's __init__ already imports that module.
_NX_27017_LAUNCHER = "import sys; from nx_27017.nx_27017 import main; sys.exit(main())"


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

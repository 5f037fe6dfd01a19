"""What every local server shares: free ports, the child-process wrapper, the stop at exit.

:class:`_LocalServer` runs a server as a child process in its own process group, logging to a
file in its data folder, and waits until it answers; subclasses say how to run and probe it.
Servers still running when the interpreter exits are stopped then.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from cloudtask.exceptions import ServerStartError

logger = logging.getLogger("cloudtask.localservers")

POLL_INTERVAL = 0.1
"""Seconds between two readiness probes while a server starts."""


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

"""Supervision of the processes ``cloudtask up`` runs: a child that dies is started again.

A child that exits (``kill -9``, a crash, any exit while we are not stopping) is logged with
its name, pid, exit code or signal and log file, and started again with the same command
line (an agent keeps its id and data dir: both come from its config file) after a backoff:
1 s, doubling up to 30 s while it keeps dying; a child that stayed up 60 s starts again
from 1 s. The others keep running. :meth:`Supervisor.stop` stops them all (SIGTERM, then
SIGKILL after a grace); :meth:`Supervisor.kill` kills them at once (safe in a signal
handler: it only sends signals).

Time is passed in (``clock``), and so is the way a child is started (``start``), so the
restart logic is tested without sleeping and without processes. :meth:`Supervisor.poll` is
one pass; the caller loops::

    sup = Supervisor()
    sup.spawn("center", [sys.executable, "-m", "cloudtask", "center"], Path("center.log"))
    while not stopping:
        sup.poll()
        time.sleep(0.2)
    sup.stop(grace=30)

Children run in a session of their own (POSIX), as the embedded servers do: a Ctrl-C in the
terminal reaches only the supervisor, which stops each child once, itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

FIRST_DELAY = 1.0  # seconds before the first restart of a child that died
MAX_DELAY = 30.0  # the backoff doubles up to this
RESET_AFTER = 60.0  # a child that stayed up this long starts again from FIRST_DELAY
# Windows has no SIGKILL: there a Popen.send_signal(SIGTERM) is TerminateProcess, as final
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)


class Process(Protocol):
    """What the supervisor needs of a process (``subprocess.Popen`` is one)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


Starter = Callable[[Sequence[str], Path, "dict[str, str] | None"], Process]


def start_process(argv: Sequence[str], log_path: Path, env: dict[str, str] | None) -> Process:
    """Start ``argv`` with its output appended to ``log_path``, in a session of its own."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(
            f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode()
        )
        out.flush()
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=os.name == "posix",
        )


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: Process | None = None
    started_at: float = 0.0  # supervisor clock
    delay: float = FIRST_DELAY  # the wait before its next restart
    restart_at: float | None = None  # set while it is dead and waiting to start again
    restarts: int = 0
    exits: list[int] = field(default_factory=list)  # exit codes, oldest first (the last 20)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        start: Starter = start_process,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        reset_after: float = RESET_AFTER,
    ) -> None:
        self.clock = clock
        self._start = start
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.reset_after = reset_after
        self.children: dict[str, Child] = {}
        self.stopping = False

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | str,
        env: dict[str, str] | None = None,
    ) -> Child:
        """Start a child and supervise it from now on. Names are unique."""
        if name in self.children:
            raise ValueError(f"a child named {name!r} is supervised already")
        child = Child(name, list(argv), Path(log_path), env, delay=self.first_delay)
        self._launch(child)
        self.children[name] = child
        return child

    def poll(self) -> list[Child]:
        """One pass: note the children that died (and when each starts again), start those
        whose backoff is over. Returns the children started again in this pass."""
        restarted: list[Child] = []
        for child in list(self.children.values()):
            if self.stopping:
                break
            now = self.clock()
            if child.restart_at is None:
                code = child.process.poll() if child.process is not None else -1
                if code is None:
                    continue
                self._died(child, code, now)
            if child.restart_at is not None and now >= child.restart_at:
                try:
                    self._launch(child)
                except OSError as e:
                    log.error("cannot start the %s again: %s", child.name, e)
                    self._schedule(child, now)
                    continue
                child.restarts += 1
                restarted.append(child)
                log.info(
                    "the %s runs again (pid %s, restart %d)", child.name, child.pid, child.restarts
                )
        return restarted

    def stop(self, grace: float = 30.0) -> None:
        """Stop every child: SIGTERM to each at once, then up to ``grace`` seconds (real
        time) for all of them; whatever still runs then is killed. No child is started again
        afterwards (nor is one that was waiting for its restart)."""
        self.stopping = True
        for child in self.children.values():
            child.restart_at = None
            if child.running():
                log.info("stopping the %s (pid %s)", child.name, child.pid)
                _signal(child, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.running() for c in self.children.values()):
            time.sleep(0.05)
        left = [c for c in self.children.values() if c.running()]
        for child in left:
            log.warning(
                "the %s (pid %s) did not stop within %g s; killing it", child.name, child.pid, grace
            )
        self.kill()
        for child in self.children.values():
            if child.process is not None:
                try:
                    child.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.error("the %s (pid %s) does not die", child.name, child.pid)

    def kill(self) -> None:
        """Kill every child and whatever it started (its runs) at once, with SIGKILL; none
        is started again. Only sends signals: safe in a signal handler."""
        self.stopping = True
        for child in self.children.values():
            child.restart_at = None
            if child.running():
                for pid in _descendants(child.pid):
                    try:
                        os.kill(pid, KILL)
                    except OSError:
                        pass
                _signal(child, KILL)

    # --- internals ----------------------------------------------------------------------------

    def _launch(self, child: Child) -> None:
        child.process = self._start(child.argv, child.log_path, child.env)
        child.started_at = self.clock()
        child.restart_at = None

    def _died(self, child: Child, code: int, now: float) -> None:
        up_for = now - child.started_at
        child.exits = [*child.exits[-19:], code]
        if up_for >= self.reset_after:
            child.delay = self.first_delay
        self._schedule(child, now)
        log.warning(
            "the %s (pid %s) %s after %.1f s; starting it again in %g s (its log: %s)",
            child.name,
            child.pid,
            describe_exit(code),
            up_for,
            child.restart_at - now if child.restart_at is not None else 0,
            child.log_path,
        )

    def _schedule(self, child: Child, now: float) -> None:
        child.restart_at = now + child.delay
        child.delay = min(child.delay * 2, self.max_delay)


def _signal(child: Child, sig: int) -> None:
    if child.process is None:
        return
    try:
        child.process.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass


def _descendants(pid: int | None) -> list[int]:
    if pid is None:
        return []
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:  # gone meanwhile, or no psutil: the child itself is still killed
        return []

"""The run guard: a small process beside each agent that starts the agent's runs and ends them
when the agent can no longer answer for them.

An agent can be killed (kill -9), frozen (SIGSTOP, a paused VM) or stuck, and its runs would
go on as orphans: a keepalive service would run twice once its task moves, a ``forbid`` task
would overlap, and a run marked ``lost`` would finish unrecorded. A thread of the agent cannot
prevent that (it dies or freezes with the agent), so the guard is a process of its own
(POSIX; on Windows the agent starts runs itself). It is the parent of every run process:

- **Start under the fence.** The agent asks the guard to start a run; the guard starts it only
  if the ZooKeeper session the run was claimed under is the agent's current one and its fence
  (the last contact with ZooKeeper + the session - a margin, which the agent pulses to the guard
  several times a second) has not run out. An agent frozen between its own check and the start
  of the process therefore cannot start a stale claim when it wakes up: the guard, which was not
  frozen, refuses it.
- **Agent gone.** When the agent's end of the socket closes (it exited or was killed), the guard
  ends every run (their whole process trees, a grace period, then SIGKILL) and exits.
- **Agent silent.** When the agent has not pulsed for its session timeout (frozen past its
  session: its tasks are moving to other agents), the guard ends every run.
- **Deadlines.** A keepalive run has a deadline (its lease must be renewed by then); the guard
  ends the run at that deadline if the agent has not moved it, so a frozen agent's service is
  gone before another agent may take its lease over.

The guard reports each run's exit status (it reaps them) and the runs it ended, and notes each
exit in the agent's run journal (journal.py) before it reports it: if the agent dies before it
records an exit, its next start still knows how the run ended. Messages are
JSON over a ``SOCK_SEQPACKET`` socket pair; a run's output pipe is handed over with the start
request (``SCM_RIGHTS``), so the agent reads the output as if it had started the process. The
environment every run starts from is sent once (and again to a new guard); a start request
carries only what its run adds. On the agent's side the answers are read on the run loop
(run.py), the thread that also reads the runs' output: a start request does not wait for its
answer (:meth:`GuardClient.start_run`), so the executor keeps many in flight.

Example (the agent's side)::

    guard = GuardClient(fence=registration.fence, silent_after=10.0, kill_grace=5.0)
    guard.start()
    proc = guard.spawn(run_id, session, argv, env, cwd)  # Popen-like: pid, stdout, poll, wait
    guard.start_run(run_id, session, argv, None, cwd, answer, env_over={"X": "1"})  # no wait
"""

from __future__ import annotations

import array
import collections
import errno
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .journal import end_state, entry_line

if TYPE_CHECKING:  # (the guard process itself needs no run loop, nor what run.py imports)
    from .run import RunLoop

log = logging.getLogger(__name__)

PULSE_EVERY = 0.25  # seconds between the agent's pulses
MAX_MESSAGE = 1024 * 1024  # a start request carries argv and environment
BATCH_MOST = 256  # answers the guard sends in one message at most
# in a burst the guard answers every FLUSH_EVERY starts (each message it sends may wake the
# agent's loop: a cross-CPU wake-up, 80 us a send under a profiler on a 2-core VM)
FLUSH_EVERY = 4
SPAWNS_MOST = 32  # start requests in one message at most (when the guard's queue was full)
SPAWNS_BYTES = 65536  # and at most this many bytes of them
# up to SPAWNS_MOST descriptors a message (a start request's output pipe each)
# (and one more: the payload of a large message, see LARGE_MESSAGE)
# POSIX only (Windows has no guard: its agent starts runs itself), so not looked up there
FDS_SPACE = (
    socket.CMSG_SPACE((SPAWNS_MOST + 1) * array.array("i").itemsize)
    if hasattr(socket, "CMSG_SPACE")
    else 0
)
# a message longer than this (a start request with a big command or environment) goes as a
# file whose descriptor is passed: a datagram of a SOCK_SEQPACKET pair may be no longer than
# the socket's send buffer (about 208 KiB by default), and a task's command and environment
# may together be several hundred KiB
LARGE_MESSAGE = 64 * 1024
CLOEXEC_FDS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)  # descriptors received are not inherited
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # (one: json.dumps makes one a call)
_DECODER = json.JSONDecoder()


def _encode(msg: dict[str, Any]) -> bytes:
    return _ENCODER.encode(msg).encode()


def _decode(data: bytes | bytearray) -> Any:
    """A message (``ValueError`` if it is not one): ASCII JSON, as :func:`_encode` makes."""
    try:
        return _DECODER.raw_decode(data.decode())[0]
    except UnicodeDecodeError as e:
        raise ValueError(str(e)) from None


def _payload_file(data: bytes) -> int:
    """An anonymous file holding ``data``, read from its start: its descriptor."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cloudtask-guard-message", os.MFD_CLOEXEC)
    else:  # (not Linux)
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_payload(fd: int) -> bytes:
    """What a large message's file holds (the guard's side); the descriptor is closed."""
    try:
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


class SpawnRefused(Exception):
    """The guard did not start the run: the fence it was claimed under is gone."""


class GuardGone(Exception):
    """The guard process is not there (it died); the agent starts a new one."""


# --- the agent's side -----------------------------------------------------------------------


class GuardedProcess:
    """A run process the guard started: what the executor and proctree use of ``Popen``.

    ``stdout_fd`` is the read end of its output pipe (``stdout``, a file object over it, is
    made when asked for). ``on_exit``, when set, is called once its exit is known (on the run
    loop's thread, or on the thread that ends the runs of a guard that died)."""

    def __init__(self, client: GuardClient, run_id: str, pid: int, stdout_fd: int) -> None:
        self._client = client
        self.run_id = run_id
        self.pid = pid
        self.stdout_fd = stdout_fd
        self._stdout: Any = None
        self.returncode: int | None = None
        self.ended_by_guard: str | None = None
        self.on_exit: Callable[[], None] | None = None
        self._exited: threading.Event | None = None  # made for a wait (most runs have none)

    @property
    def stdout(self) -> Any:
        if self._stdout is None:
            self._stdout = os.fdopen(self.stdout_fd, "rb")
        return self._stdout

    def close_stdout(self) -> None:
        """Close the read end of the output pipe (once)."""
        if self._stdout is not None:
            self._stdout.close()
        elif self.stdout_fd >= 0:
            os.close(self.stdout_fd)
        self.stdout_fd = -1

    def _set_exit(self, code: int) -> None:
        with self._client._lock:
            self.returncode = code
            exited = self._exited
        if exited is not None:
            exited.set()
        if self.on_exit is not None:
            self.on_exit()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self._client._lock:
            if self.returncode is not None:
                return self.returncode
            if self._exited is None:
                self._exited = threading.Event()
            exited = self._exited
        if not exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"run {self.run_id}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                self._client._send({"op": "signal", "id": self.run_id, "sig": int(sig)})
            except GuardGone:
                pass  # a guard that is gone ended its runs (or its agent ends them: _guard_died)

    def ending(self, status: str, error: str) -> None:
        """Tell the guard why the agent is about to end this run, before it signals it: if the
        agent dies before it records the end, the guard's journal line says the same."""
        if self.returncode is None:
            try:
                self._client._send(
                    {"op": "ending", "id": self.run_id, "status": status, "error": error}
                )
            except GuardGone:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# what a start request's answer is given to: the process, or why there is none
Started = Callable[["GuardedProcess | BaseException"], None]


class GuardClient:
    """The agent's end: starts the guard, pulses it, asks it to start runs, hears exits.

    The guard's answers are read on a :class:`RunLoop` (its own, or the one given), the same
    thread that follows the runs' output in the executor: a burst of starts and exits costs
    no thread switch per run."""

    def __init__(
        self,
        *,
        fence: Callable[[], tuple[str | None, float]],
        silent_after: Callable[[], float] | float,
        kill_grace: float,
        loop: RunLoop | None = None,
    ) -> None:
        self.fence = fence  # (session, fence runs out at: monotonic) of claims started now
        self.silent_after = silent_after  # seconds without a pulse before the guard ends runs
        self.kill_grace = kill_grace
        if loop is None:
            from .run import RunLoop

            loop = RunLoop("run-loop")
            self._own_loop = True
        else:
            self._own_loop = False
        self.loop = loop
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # the maps below (never held while sending)
        self._send_lock = threading.Lock()  # one message at a time, and the socket
        # run id -> (answer to, read end of its output pipe, program, working directory)
        self._pending: dict[str, tuple[Started, int]] = {}
        # start requests the run loop could not send at once: (message, pipe's write end)
        self._outbox: collections.deque[tuple[bytes, int]] = collections.deque()
        self._procs: dict[str, GuardedProcess] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._journal: str | None = None
        self._base_env: dict[str, str] | None = None
        self._buf = bytearray(MAX_MESSAGE)  # one buffer: a fresh 1 MiB per message costs a mmap
        self.restarts = 0

    def start(self) -> None:
        self._launch()
        pulse = threading.Thread(target=self._pulse, name="guard-pulse", daemon=True)
        pulse.start()
        self._threads.append(pulse)

    def _launch(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cloudtask.agent.guard", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        first = [self._pulse_message()]
        if self._journal is not None:
            first.append({"op": "journal", "path": self._journal})
        if self._base_env is not None:
            first.append({"op": "env", "env": self._base_env})
        with self._send_lock:  # before any start request reaches the new guard
            for msg in first:
                mine.send(_encode(msg))
            self._sock = mine
        self.loop.call_soon(self.loop.add_reader, mine.fileno(), lambda _: self._readable(mine))
        self.loop.start()
        log.info("run guard started (pid %s)", self._proc.pid)

    def stop(self) -> None:
        """Close the socket: the guard ends what still runs and exits."""
        self._stop.set()
        with self._send_lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=self.kill_grace + 5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._own_loop:
            self.loop.stop()
        if sock is not None:
            with self._send_lock:
                self._sock = None
            if self.loop.in_loop() or not self._own_loop:
                self.loop.call_soon(self._close, sock)
            else:
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        self.loop.remove_reader(sock.fileno())
        self._drop_outbox(sock)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # --- requests ---------------------------------------------------------------------------

    def spawn(
        self,
        run_id: str,
        session: str | None,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        timeout: float = 30.0,
        journal: str | None = None,
        user: list[Any] | None = None,
    ) -> GuardedProcess:
        """Start a run through the guard and wait for it. Raises SpawnRefused (its fence is
        gone), OSError (the program could not be started: errno and message as Popen gives
        them; or the guard could not note the start in ``journal``, the agent's journal
        segment, where it writes ``spawn`` before it starts anything) or GuardGone. Not on the
        run loop's thread (which reads the answer): see :meth:`start_run`."""
        if self.loop.in_loop():
            raise RuntimeError("spawn() would wait for itself on the run loop: use start_run()")
        done = threading.Event()
        box: list[GuardedProcess | BaseException] = []

        def answered(result: GuardedProcess | BaseException) -> None:
            box.append(result)
            done.set()

        self.start_run(run_id, session, argv, env, cwd, answered, journal=journal, user=user)
        if not done.wait(timeout):
            self._take_pending(run_id)
            raise GuardGone(f"the run guard did not answer within {timeout:g} s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def start_run(
        self,
        run_id: str,
        session: str | None,
        argv: list[str],
        env: dict[str, str] | None,
        cwd: str | None,
        answer: Started,
        *,
        journal: str | None = None,
        env_over: dict[str, str] | None = None,
        on_loop: bool = False,
        user: list[Any] | None = None,
    ) -> None:
        """Ask the guard to start a run, and return: ``answer`` is called on the run loop's
        thread with the :class:`GuardedProcess`, or with the exception :meth:`spawn` would
        raise. The run's environment is ``env``, or the base environment given once with
        :meth:`set_base_env` updated with ``env_over``. Raises GuardGone when the request
        cannot be sent. ``on_loop``: called on the run loop's thread, which never waits for
        the guard (the guard may be waiting for it to read): a request that cannot go at once
        (the guard's queue is full, another thread is sending) waits in an outbox, sent in
        order as the socket takes it. ``user``: ``[uid, gid, [groups]]`` to start it as
        (the guard runs as root), None for the guard's own user."""
        read_end, write_end = os.pipe()
        msg: dict[str, Any] = {
            "op": "spawn",
            "id": run_id,
            "session": session,
            "argv": argv,
            "cwd": cwd,
            "grace": self.kill_grace,
            "journal": journal,
        }
        if user is not None:
            msg["user"] = user
        if env_over is not None and self._base_env is not None:
            msg["env_over"] = env_over
        else:
            msg["env"] = env if env is not None else {**(self._base_env or {}), **(env_over or {})}
        data = _encode(msg)
        with self._lock:
            self._pending[run_id] = (answer, read_end)
        queued = False
        try:
            if on_loop:
                if not self._outbox and self._send_data(data, [write_end], nowait=True):
                    return
                sock = self._sock
                if sock is None:
                    raise GuardGone("the run guard is not running")
                self._outbox.append((data, write_end))
                queued = True
                if len(self._outbox) == 1:
                    self.loop.add_writer(sock.fileno(), lambda: self._writable(sock))
                return
            self._send_data(data, [write_end])
        except BaseException:
            if self._take_pending(run_id, read_end):
                raise
            # (a guard that died meanwhile answered it: GuardGone)
        finally:
            if not queued:
                os.close(write_end)

    def _writable(self, sock: socket.socket) -> None:
        """The run loop: send what waits in the outbox, in order, while the socket takes it;
        several requests (and their pipes) in one message."""
        while self._outbox:
            n, size = 0, 0
            for data, _ in self._outbox:
                if n == SPAWNS_MOST or (n and size + len(data) > SPAWNS_BYTES):
                    break
                n, size = n + 1, size + len(data) + 1
            batch = [self._outbox[i] for i in range(n)]
            if n == 1:
                data = batch[0][0]
            else:
                data = b'{"op":"spawns","reqs":[' + b",".join(d for d, _ in batch) + b"]}"
            try:
                if not self._send_data(data, [w for _, w in batch], nowait=True):
                    return
            except GuardGone:
                break  # (their answers come from _guard_died)
            for _ in range(n):
                os.close(self._outbox.popleft()[1])
        self.loop.remove_writer(sock.fileno())

    def _take_pending(self, run_id: str, read_end: int | None = None) -> bool:
        """Take back a start request nobody answered yet (True), closing its pipe's read end;
        False if it was answered (or is being answered) meanwhile."""
        with self._lock:
            pending = self._pending.get(run_id)
            if pending is None or (read_end is not None and pending[1] != read_end):
                return False
            del self._pending[run_id]
        os.close(pending[1])
        return True

    def set_base_env(self, env: dict[str, str]) -> None:
        """The environment every run gets, sent to the guard once (and to every new guard);
        a start then sends only what it adds (``env_over`` of :meth:`start_run`)."""
        self._base_env = dict(env)
        if self._sock is not None:
            try:
                self._send({"op": "env", "env": self._base_env})
            except GuardGone:
                pass  # sent again when the guard is started anew

    def set_journal(self, path: str) -> None:
        """Where the guard notes the exits it sees (the journal's current segment)."""
        self._journal = path
        if self._sock is not None:
            try:
                self._send({"op": "journal", "path": path})
            except GuardGone:
                pass  # sent again when the guard is started anew

    def set_deadline(self, run_id: str, until: float | None) -> None:
        """End the run at the monotonic time ``until`` unless moved again (None: no deadline)."""
        try:
            self._send({"op": "deadline", "id": run_id, "until": until})
        except GuardGone:
            pass

    def _send(self, msg: dict[str, Any]) -> None:
        self._send_data(_encode(msg))

    def _send_data(self, data: bytes, fds: list[int] | None = None, nowait: bool = False) -> bool:
        """Send one message (GuardGone if the guard is not there). ``nowait``: False, and
        nothing sent, when it would have to wait (for the socket, or for room in it)."""
        if not self._send_lock.acquire(blocking=not nowait):
            return False
        try:
            sock = self._sock
            if sock is None:
                raise GuardGone("the run guard is not running")
            flags = socket.MSG_DONTWAIT if nowait else 0
            payload = -1
            try:
                if len(data) > LARGE_MESSAGE:
                    payload = _payload_file(data)
                    socket.send_fds(
                        sock, [_encode({"op": "large"})], [payload, *(fds or [])], flags
                    )
                elif fds:
                    socket.send_fds(sock, [data], fds, flags)
                else:
                    sock.send(data, flags)
            except BlockingIOError:
                return False
            except OSError as e:
                raise GuardGone(f"the run guard is gone: {e}") from None
            finally:
                if payload >= 0:
                    os.close(payload)
            return True
        finally:
            self._send_lock.release()

    def _pulse_message(self) -> dict[str, Any]:
        session, until = self.fence()
        after = self.silent_after() if callable(self.silent_after) else self.silent_after
        return {
            "op": "pulse",
            "session": session,
            "fence_until": until,
            "alive_until": time.monotonic() + after,
        }

    def _send_pulse(self) -> None:
        self._send(self._pulse_message())

    def _pulse(self) -> None:
        while not self._stop.wait(PULSE_EVERY):
            try:
                self._send_pulse()
            except GuardGone:
                pass  # the loop restarts it
            except Exception:
                log.exception("cannot pulse the run guard")

    # --- answers (on the run loop) ----------------------------------------------------------

    def _readable(self, sock: socket.socket) -> None:
        """Every answer waiting (up to a bound: the loop has other descriptors to serve)."""
        buf = self._buf
        for _ in range(256):
            try:
                size = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                size = 0
            if not size:
                self.loop.remove_reader(sock.fileno())
                if self._stop.is_set():
                    return
                threading.Thread(
                    target=self._guard_died, args=(sock,), name="guard-died", daemon=True
                ).start()
                return
            try:
                msg = _decode(buf[:size])
            except ValueError:
                continue
            self._on_message(msg)

    def _on_message(self, msg: dict[str, Any]) -> None:
        op, run_id = msg.get("op"), str(msg.get("id"))
        if op == "batch":  # the answers of one pass of the guard, in order
            for one in msg.get("msgs") or ():
                self._on_message(one)
            return
        if op in ("spawned", "refused", "failed"):
            with self._lock:
                pending = self._pending.pop(run_id, None)
            if pending is None:  # (its caller gave up waiting)
                return
            answer, read_end = pending
            result: GuardedProcess | BaseException
            if op == "spawned":
                result = GuardedProcess(self, run_id, msg["pid"], read_end)
                with self._lock:
                    self._procs[run_id] = result
            else:
                os.close(read_end)
                if op == "refused":
                    result = SpawnRefused(msg["why"])
                else:
                    result = OSError(msg.get("errno") or 0, msg.get("error") or "cannot start")
            answer(result)
            return
        with self._lock:
            proc = self._procs.get(run_id)
            if op == "exited" and proc is not None:
                del self._procs[run_id]
        if proc is None:
            return
        if op == "exited":
            proc._set_exit(int(msg["code"]))
        elif op == "ended":
            proc.ended_by_guard = str(msg.get("why"))
            log.warning("the run guard ended run %s: %s", run_id, msg.get("why"))

    def _drop_outbox(self, sock: socket.socket) -> None:
        """(On the loop.) The requests a dead guard never got: their answers are GuardGone."""
        self.loop.remove_writer(sock.fileno())
        sock.close()
        while self._outbox:
            os.close(self._outbox.popleft()[1])

    def _guard_died(self, sock: socket.socket) -> None:
        """The guard died under us: its runs were orphaned. They are ended here (found by
        their run id), reported killed, and a new guard is started (on a thread of its own:
        the run loop goes on)."""
        from .proctree import end_run_processes

        code = self._proc.poll() if self._proc is not None else None
        log.error("the run guard died (exit %s); ending its runs and starting a new one", code)
        with self._send_lock:
            if self._sock is sock:
                self._sock = None
        with self._lock:
            procs, self._procs = self._procs, {}
            pending, self._pending = self._pending, {}
        self.loop.call_soon(self._drop_outbox, sock)
        for answer, read_end in pending.values():
            os.close(read_end)
            self.loop.call_soon(answer, GuardGone("the run guard died"))
        for proc in procs.values():
            proc.ended_by_guard = "its agent's run guard died"
            end_run_processes(proc.run_id, self.kill_grace)
            self.loop.call_soon(proc._set_exit, -signal.SIGKILL)
        if not self._stop.is_set():
            self.restarts += 1
            self._launch()


# --- the guard process ----------------------------------------------------------------------


class _Child:
    """A run process started with ``posix_spawn``: what the guard uses of ``Popen`` (it reaps
    its children itself)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None


# reset in a run to what a program expects (Python ignores SIGPIPE; ignored stays ignored)
_DEFAULT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, n))


FOUND_FOR = 1.0  # seconds a PATH search is used again (a program installed since: seen then)
_found: dict[tuple[str, str], tuple[float, list[str]]] = {}


def _candidates(name: str, env: dict[str, str] | None) -> list[str]:
    """The files ``subprocess.Popen`` would try for ``name``, in order: each folder of the
    run's own PATH (not the guard's), the ones that exist. A search that found something is
    used again for FOUND_FOR seconds (a burst of a task's runs looks once, not once a run)."""
    if os.sep in name:
        return [name]
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    now = time.monotonic()
    known = _found.get((name, path))
    if known is not None and now < known[0]:
        return known[1]
    found = [os.path.join(folder or ".", name) for folder in path.split(os.pathsep)]
    found = [f for f in found if os.path.lexists(f)]
    if found:
        if len(_found) >= 1024:
            _found.clear()
        _found[(name, path)] = (now + FOUND_FOR, found)
    return found


def _start(
    argv: list[str],
    env: dict[str, str] | None,
    cwd: str | None,
    out: int | None,
    user: list[Any] | None = None,
) -> Any:
    """Start a run process in a session of its own, output to ``out``, input from /dev/null.

    ``posix_spawn`` (a vfork and an exec, no Python in between) is several times cheaper than
    ``subprocess.Popen`` in this loop, which starts every run of the agent one after the
    other; Popen is kept for what posix_spawn cannot do here (a working directory). Like
    Popen, each candidate of the PATH search is tried in turn, and the first error other than
    "not found" is the one reported. (glibc leaves its two internal signals ignored in the
    process; Python cannot reset those, and programs do not use them.) A run started as
    another ``user`` ([uid, gid, [groups]]) goes through Popen too: posix_spawn cannot
    change the user."""
    if cwd is None and user is None and hasattr(os, "POSIX_SPAWN_DUP2"):
        actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        if out is not None:
            actions += [(os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)]
            if out > 2:  # (a descriptor 1 or 2 is the output itself)
                actions.append((os.POSIX_SPAWN_CLOSE, out))
        first: OSError | None = None
        for program in _candidates(argv[0], env):
            try:
                pid = os.posix_spawn(
                    program,
                    argv,
                    env if env is not None else os.environ,
                    file_actions=actions,
                    setsid=True,
                    setsigdef=_DEFAULT_SIGNALS,
                )
            except NotImplementedError:  # no setsid for posix_spawn on this system
                break
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    _found.clear()  # (a program gone since the search: look again next time)
                elif first is None:
                    first = e
                continue
            return _Child(pid)
        else:
            raise first or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        cwd=cwd,
        env=env,
        start_new_session=True,
        **user_kwargs(user),
    )


def user_kwargs(user: list[Any] | None) -> dict[str, Any]:
    """Popen's arguments that start a process as ``user`` ([uid, gid, [groups]]): the
    groups first, then the group, then the user (as Popen applies them)."""
    if user is None:
        return {}
    uid, gid, groups = user
    return {"user": int(uid), "group": int(gid), "extra_groups": [int(g) for g in groups]}


class _Run:
    def __init__(self, run_id: str, proc: Any, grace: float) -> None:
        self.run_id = run_id
        self.proc = proc
        self.grace = grace
        self.ending = False
        self.why: str | None = None  # why the guard (or the agent, before it did) ended it
        self.status = "killed"  # or "timed_out": the status ``why`` goes with
        self.cause: str | None = None  # "agent": ended because its agent died or went silent
        self.started = time.time()


class Guard:
    """The guard's loop (``python -m cloudtask.agent.guard FD``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.runs: dict[str, _Run] = {}
        self.by_pid: dict[int, _Run] = {}
        self.deadlines: dict[str, float] = {}
        self.session: str | None = None
        self.fence_until = 0.0
        self.alive_until = time.monotonic() + 60.0
        self.silent = False
        self.journal: int | None = None  # the agent's current journal segment (O_APPEND)
        self.journal_path: str | None = None
        self.base_env: dict[str, str] | None = None  # what every run's environment starts from
        self._send_lock = threading.Lock()
        self._out: list[dict[str, Any]] = []  # answers of this pass, not sent yet (_flush)
        # start requests received, not served yet: (request, its pipe's write end)
        self._todo: collections.deque[tuple[dict[str, Any], list[int]]] = collections.deque()
        self._buf = bytearray(MAX_MESSAGE)  # each request is read into this one buffer
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)

    def serve(self) -> None:
        # the agent decides when runs stop: a Ctrl-C or SIGTERM to the group is not for us.
        # Handled, not ignored: an ignored signal would stay ignored in every run started here
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "agent")
        sel.register(self._wake_r, selectors.EVENT_READ, "child")
        while True:
            for key, _ in sel.select(self._timeout()):
                if key.data == "child":
                    try:
                        while os.read(self._wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                # every request waiting is served before the next reap (a burst of starts)
                more: bool | None = self._receive()
                started = 0
                while more:
                    while self._todo:
                        self._spawn(*self._todo.popleft())
                        self._reap()  # exits are told between the starts
                        self._enforce()
                        started += 1
                        if started % FLUSH_EVERY == 0:
                            self._flush()  # these starts and exits, in one message
                    self._reap()
                    self._enforce()
                    more = self._receive(socket.MSG_DONTWAIT)
                self._flush()  # (nothing more waiting: all that is left to tell)
                if more is False:
                    self._agent_gone()
                    return
            self._reap()
            self._enforce()
            self._flush()

    def _timeout(self) -> float:
        now = time.monotonic()
        ends = [self.alive_until] if self.runs and not self.silent else []
        ends += [d for r, d in self.deadlines.items() if r in self.runs]
        wait = 0.5
        if ends:
            wait = min(wait, max(0.0, min(ends) - now))
        return wait

    def _send(self, msg: dict[str, Any]) -> None:
        """An answer, sent with the others of this pass by :meth:`_flush` (one message)."""
        self._out.append(msg)
        if len(self._out) >= BATCH_MOST:
            self._flush()

    def _flush(self) -> None:
        if not self._out:
            return
        out, self._out = self._out, []
        data = _encode(out[0] if len(out) == 1 else {"op": "batch", "msgs": out})
        try:
            with self._send_lock:
                self.sock.send(data)
        except OSError:
            pass  # the agent is gone: its end is noticed by the loop

    def _receive(self, flags: int = 0) -> bool | None:
        """Serve one request: False when the agent is gone, None when none is waiting (with
        ``MSG_DONTWAIT``)."""
        try:
            size, ancillary, _, _ = self.sock.recvmsg_into(
                [self._buf], FDS_SPACE, flags | CLOEXEC_FDS
            )
        except BlockingIOError:
            return None
        except OSError:
            return False
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not size:
            for fd in fds:
                os.close(fd)
            return False
        try:
            msg = _decode(self._buf[:size])
            if msg.get("op") == "large" and fds:  # the message is in the file passed first
                payload, fds = fds[0], fds[1:]
                msg = _decode(_read_payload(payload))
        except (ValueError, OSError):
            msg = {}
        op = msg.get("op")
        if op == "pulse":
            self.session = msg.get("session")
            self.fence_until = float(msg.get("fence_until") or 0.0)
            self.alive_until = float(msg["alive_until"])
            self.silent = False
        elif op == "spawn":  # started by the loop, between reaps (serve)
            self._todo.append((msg, list(fds)))
            fds = array.array("i")
        elif op == "spawns":  # several, each with its pipe, in order
            reqs = msg.get("reqs") or []
            for i, req in enumerate(reqs):
                self._todo.append((req, [fds[i]] if i < len(fds) else []))
            fds = fds[len(reqs) :]
        elif op == "deadline":
            if msg.get("until") is None:
                self.deadlines.pop(str(msg["id"]), None)
            else:
                self.deadlines[str(msg["id"])] = float(msg["until"])
        elif op == "journal":
            self._open_journal(str(msg["path"]))
        elif op == "env":
            self.base_env = dict(msg.get("env") or {})
        elif op == "ending":
            run = self.runs.get(str(msg["id"]))
            if run is not None and run.why is None:
                run.why = str(msg.get("error") or "ended by its agent")
                run.status = "timed_out" if msg.get("status") == "timed_out" else "killed"
        elif op == "signal":
            run = self.runs.get(str(msg["id"]))
            if run is not None and run.proc.returncode is None:
                try:
                    os.kill(run.proc.pid, int(msg["sig"]))
                except OSError:
                    pass
        for fd in fds:
            os.close(fd)
        return True

    def _spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        run_id = str(msg["id"])
        out = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        try:
            now = time.monotonic()
            session = msg.get("session")
            if session is not None and (session != self.session or now >= self.fence_until):
                why = (
                    "its agent's ZooKeeper session changed since it was claimed"
                    if session != self.session
                    else "its agent's ZooKeeper fence ran out before it started"
                )
                self._send({"op": "refused", "id": run_id, "why": why})
                return
            if msg.get("journal") and not self._note_spawn(str(msg["journal"]), run_id):
                return
            env = msg.get("env")
            if env is None and "env_over" in msg:  # on the base the agent sent once
                env = dict(self.base_env if self.base_env is not None else os.environ)
                env.update(msg["env_over"])
            try:
                proc = _start(msg["argv"], env, msg.get("cwd"), out, msg.get("user"))
            except OSError as e:
                self._send(
                    {"op": "failed", "id": run_id, "errno": e.errno, "error": e.strerror or str(e)}
                )
                return
            run = _Run(run_id, proc, float(msg.get("grace") or 5.0))
            self.runs[run_id] = run
            self.by_pid[proc.pid] = run
            self._send({"op": "spawned", "id": run_id, "pid": proc.pid})
        finally:
            if out is not None:
                os.close(out)

    def _reap(self) -> None:
        while self.by_pid:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.by_pid.pop(pid, None)
            if run is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            run.proc.returncode = code
            self.runs.pop(run.run_id, None)
            self.deadlines.pop(run.run_id, None)
            self._note_exit(run, code)
            self._send({"op": "exited", "id": run.run_id, "pid": pid, "code": code})

    def _note_spawn(self, path: str, run_id: str) -> bool:
        """``spawn`` in the agent's journal segment ``path``, before the process starts: a
        restart that finds the agent's ``start`` without it knows nothing started. A start that
        cannot be noted is refused (False; the agent records the run failed with why)."""
        try:
            if path == self.journal_path and self.journal is not None:
                os.write(self.journal, entry_line({"spawn": run_id}))
            else:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, entry_line({"spawn": run_id}))
                finally:
                    os.close(fd)
        except OSError as e:
            error = f"cannot note its start in the run journal: {e.strerror or e}"
            self._send({"op": "failed", "id": run_id, "errno": e.errno, "error": error})
            return False
        return True

    def _open_journal(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return
        if self.journal is not None:
            os.close(self.journal)
        self.journal, self.journal_path = fd, path

    def _note_exit(self, run: _Run, code: int) -> None:
        """The run's end as the guard saw it, in the agent's journal (the agent's own line, if
        it lives to write it, comes later and says more: a timeout, an HTTP status)."""
        if self.journal is None:
            return
        if run.why is not None and not (code == 0 and run.cause == "agent"):
            status, error = run.status, run.why
        elif code == 0:  # (one that ended cleanly as its agent died is a success)
            status, error = "succeeded", None
        else:
            status, error = "failed", f"ended by signal {-code}" if code < 0 else None
        state = end_state(status, error, run.started, time.time(), exit_code=code, cause=run.cause)
        try:
            os.write(self.journal, entry_line({"end": run.run_id, "state": state}))
        except OSError:
            pass

    def _enforce(self) -> None:
        now = time.monotonic()
        if self.runs and not self.silent and now >= self.alive_until:
            self.silent = True
            for run in list(self.runs.values()):
                run.cause = "agent"
                self._end(run, "its agent stopped answering for its session timeout")
        for run_id, until in list(self.deadlines.items()):
            run = self.runs.get(run_id)
            if run is not None and now >= until:
                del self.deadlines[run_id]
                self._end(run, "its keepalive lease ran out while its agent did not renew it")

    def _end(self, run: _Run, why: str) -> None:
        if run.ending:
            return
        run.ending = True
        run.why = why
        self._send({"op": "ended", "id": run.run_id, "why": why})
        threading.Thread(target=_end_tree, args=(run,), daemon=True).start()

    def _agent_gone(self) -> None:
        """The agent's end closed: end every run, wait for them, and exit."""
        while self._todo:  # (nothing more starts)
            for fd in self._todo.popleft()[1]:
                os.close(fd)
        self._reap()  # (a run that has just ended on its own is recorded as it ended)
        enders = []
        for run in list(self.runs.values()):
            run.ending = True
            if run.why is None:
                run.why, run.cause = "its agent ended while it ran", "agent"
            t = threading.Thread(target=_end_tree, args=(run,), daemon=True)
            t.start()
            enders.append(t)
        deadline = time.monotonic() + max([r.grace for r in self.runs.values()] or [0]) + 5
        while self.by_pid and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for t in enders:
            t.join(timeout=1.0)


def _end_tree(run: _Run) -> None:
    """Terminate a run's whole tree (process group, descendants, and processes tagged with its
    run id), then kill what is left after its grace. Never waits on the process itself: the
    guard's loop reaps it."""
    from .proctree import IS_POSIX, run_processes

    pid = run.proc.pid
    others = run_processes(run.proc, run.run_id)
    for p in others:
        try:
            p.terminate()
        except Exception:
            pass
    if IS_POSIX:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + run.grace
    while time.monotonic() < deadline and run.proc.returncode is None:
        time.sleep(0.05)
    others = [p for p in others if p.is_running()] + [
        p for p in run_processes(run.proc, run.run_id) if p not in others
    ]
    if IS_POSIX:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    if run.proc.returncode is None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for p in others:
        try:
            p.kill()
        except Exception:
            pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    sock.set_inheritable(False)  # (it was passed to this process) never to a run
    Guard(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

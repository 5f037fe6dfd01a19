"""The run journal: what this agent's processes really did, kept on the agent's own disk.

MongoDB holds the history, but an agent can die between writing a claim and starting its
process, or between the end of a process and the write that records it. So the agent appends
``claim`` (the run ids) before it writes claims, the executor ``start`` just before a run's
process starts, and ``end`` with the run's final state when it is over. An agent that starts
again after such a death reads the journal and tells the truth about the runs its earlier
life left unfinished, or that the leader has marked ``lost`` meanwhile (see
:meth:`Earlier.verdict`):

- ``claim`` without ``start``: it never started, so it is released, and the task's owner runs
  it as a catch-up within ``misfire_grace`` or records it missed;
- an ``end``: the outcome it really had;
- a ``start`` the run guard was to note (``"noted": true``: a process started through the
  guard), without the guard's ``spawn`` line and without an ``end``: it never started either
  (the agent died between its ``start`` line and its request to the guard, or the guard
  refused), so it is released too. The guard writes ``spawn`` *before* it starts the process,
  into the segment the agent names in its request (never older than the run's claim, so it
  is kept as long as the claim), and refuses to start a process it cannot note;
- a ``start`` without an ``end`` otherwise, or no ``claim`` at all: ``lost`` (its processes
  were ended by the run guard or at the restart, at an unknown point; or the journal was
  lost).

Each entry is one ``write`` to a file opened ``O_APPEND``: a kill -9 of the agent loses none
of it (the kernel has it); a power cut may lose the last lines, and those runs stay ``lost``,
which is what is known about them. The journal is cut in segments (a new file every
``SEGMENT_SECONDS``); the oldest segment is deleted once no run claimed before the next one
opened is still unsettled, so a run's lines are never split from its claim's, and the
journal stays small: a few lines per run in flight.

Example::

    journal = Journal(data_dir / "journal")
    earlier = journal.read_earlier()
    journal.open()
    journal.claimed([run_id])
    journal.started(run_id)
    journal.ended(run_id, {"status": "succeeded", "exit_code": 0, ...})
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..clock import from_epoch, to_bson_time

log = logging.getLogger(__name__)

SEGMENT_SECONDS = 120.0
PREFIX = "runs-"


def end_state(
    status: str,
    error: str | None,
    started: float | None,
    finished: float | None,
    exit_code: int | None = None,
    http_status: int | None = None,
    cause: str | None = None,
) -> dict[str, Any]:
    """A run's final state as an ``end`` entry keeps it (times as epoch seconds): written by
    the executor, and by the run guard for the exits it sees. ``cause``: ``agent`` for a run
    the guard ended because its agent died or stopped answering (a plan item is then tried
    again, like a lost one)."""
    state: dict[str, Any] = {"status": status, "error": error}
    if cause is not None:
        state["cause"] = cause
    if exit_code is not None:
        state["exit_code"] = exit_code
    if http_status is not None:
        state["http_status"] = http_status
    if started is not None:
        state["started_at"] = started
    if finished is not None:
        state["finished_at"] = finished
        if started is not None:
            state["duration"] = round(finished - started, 3)
    return state


def end_fields(state: dict[str, Any]) -> dict[str, Any]:
    """An ``end`` entry's state (see :func:`end_state`) as run document fields."""
    out = {k: state[k] for k in ("status", "exit_code", "error", "http_status") if k in state}
    for key in ("started_at", "finished_at"):
        if state.get(key) is not None:
            out[key] = to_bson_time(from_epoch(state[key]))
    if state.get("duration") is not None:
        out["duration"] = state["duration"]
    if state.get("cause"):
        out["ended_by"] = state["cause"]
    return out


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # (json.dumps makes one a call)


def entry_line(entry: dict[str, Any]) -> bytes:
    """One journal entry as the line appended for it."""
    return (_ENCODE(entry) + "\n").encode()


def _unlink(path: Path) -> bool:
    """Delete a segment; False (said in the log) if it cannot be deleted."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot delete the run journal %s: %s", path, e)
        return False
    return True


@dataclass
class Earlier:
    """What the journal says about the runs of earlier lives."""

    claimed: set[str] = field(default_factory=set)
    started: set[str] = field(default_factory=set)
    noted: set[str] = field(default_factory=set)  # started through a guard that notes spawns
    spawned: set[str] = field(default_factory=set)  # the guard's notes
    ended: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def never_started(self) -> set[str]:
        """Every run id :meth:`verdict` calls never started."""
        unstarted = (self.claimed - self.started) | (self.noted - self.spawned)
        return unstarted - self.ended.keys()

    def verdict(self, run_id: str) -> tuple[str, dict[str, Any] | None]:
        """``("ended", state)``, ``("never started", None)`` or ``("unknown", None)``."""
        if run_id in self.ended:
            return "ended", self.ended[run_id]
        if run_id in self.claimed and run_id not in self.started:
            return "never started", None
        if run_id in self.noted and run_id not in self.spawned:
            return "never started", None
        return "unknown", None


class Journal:
    def __init__(self, folder: Path, clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self.clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._opened = 0.0  # epoch seconds
        # this life's segments, oldest first: (path, the run ids claimed in it)
        self._segments: list[tuple[Path, set[str]]] = []
        # told each new segment: the run guard notes the exits it sees there too
        self.on_segment: Callable[[Path], None] | None = None

    # --- this life ------------------------------------------------------------------------

    def read_earlier(self) -> Earlier:
        """The segments earlier lives left (this life's own are skipped). A segment that cannot
        be read makes every run unknown: nothing is taken for never started on a guess."""
        out = Earlier()
        with self._lock:
            own = {path for path, _ in self._segments}
        try:
            files = sorted(p for p in self.folder.glob(f"{PREFIX}*.log") if p not in own)
        except OSError:
            return out
        for path in files:
            out.files.append(path)
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                log.warning("cannot read the run journal %s: %s", path, e)
                return Earlier(files=files)
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # cut short by a crash
                if "claim" in entry:
                    out.claimed.update(entry["claim"])
                elif "start" in entry:
                    out.started.add(entry["start"])
                    if entry.get("noted"):
                        out.noted.add(entry["start"])
                elif "spawn" in entry:
                    out.spawned.add(entry["spawn"])
                elif "end" in entry:
                    out.ended[entry["end"]] = entry.get("state") or {}
        return out

    def open(self) -> None:
        """Start this life's first segment."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._rotate()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def claimed(self, run_ids: list[str]) -> None:
        """Before claims are written (one line for a whole chunk)."""
        if run_ids:
            self._append({"claim": list(run_ids)}, claims=run_ids)

    def own_claims(self) -> set[str]:
        """The runs this life claimed (in its segments not yet deleted as settled)."""
        with self._lock:
            return set().union(*(claims for _, claims in self._segments))

    def started(self, run_id: str, noted: bool = False) -> None:
        """Before the run's process starts (a run journaled so may have started). ``noted``:
        it is started through the run guard, which notes ``spawn`` before it starts it."""
        self._append({"start": run_id, "noted": True} if noted else {"start": run_id})

    def current_path(self) -> str | None:
        """This life's current segment (None before :meth:`open`)."""
        with self._lock:
            return str(self._segments[-1][0]) if self._fd is not None else None

    def ended(self, run_id: str, state: dict[str, Any]) -> None:
        """After the run's end, with its final state (JSON-safe: times as epoch seconds)."""
        self._append({"end": run_id, "state": state})

    def forget_earlier(self, earlier: Earlier) -> None:
        """The earlier lives' segments, once their runs are settled in MongoDB."""
        for path in earlier.files:
            _unlink(path)

    def tidy(self, unsettled: Callable[[str], bool]) -> None:
        """Start a new segment when the current one is old, and delete the oldest segments
        whose claims are all settled (``unsettled(run_id)`` is False for each: the final
        state, a release or a takeover is stored)."""
        with self._lock:
            if self._fd is None:
                return
            if self.clock() - self._opened >= SEGMENT_SECONDS:
                self._rotate()
            while len(self._segments) > 1:
                path, claims = self._segments[0]
                if any(unsettled(r) for r in claims) or not _unlink(path):
                    break
                self._segments.pop(0)

    # --- internals --------------------------------------------------------------------------

    def _rotate(self) -> None:
        opened = self.clock()
        stamp = from_epoch(opened).strftime("%Y%m%dT%H%M%S%f")
        path = self.folder / f"{PREFIX}{stamp}-{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, entry_line({"opened": opened}))
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._opened = fd, opened
        self._segments.append((path, set()))
        if self.on_segment is not None:
            self.on_segment(path)

    def _append(self, entry: dict[str, Any], claims: list[str] | None = None) -> None:
        line = entry_line(entry)
        with self._lock:
            if self._fd is None:
                return
            if claims:
                self._segments[-1][1].update(claims)
            try:
                os.write(self._fd, line)
            except OSError as e:  # a full disk must not stop runs; the run may end up lost
                log.warning("cannot write the run journal: %s", e)

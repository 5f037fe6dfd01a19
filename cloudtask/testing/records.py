"""Execution records: what the tasks themselves did, as evidence for once-only and no-overlap.

A test task runs :func:`recording_command`: a small bash script that appends one line to a
shared file when it starts and one when it ends (and one when it finds another instance
still holding its lock). Appends of a short line to a file opened ``O_APPEND`` are atomic, so
any number of processes on any agent can share the file. Assertions are then made on this
record, never on the run documents alone: a unique index keeps the documents unique whatever
the processes did, so counting documents under it proves nothing.

A line is ``task scheduled_for attempt run_id agent kind time [exit_code]`` where ``kind`` is
``start``, ``end`` or ``overlap`` and ``time`` is the real clock (epoch seconds) of the
process that wrote it. ``overlap`` is written when ``flock -n`` on the task's lock file fails:
the kernel holds that lock for as long as any process of an earlier instance is alive (even
one killed with SIGKILL releases it only when it is really gone), so an overlap cannot hide.

Example::

    command = recording_command(Path("/tmp/records"), work="sleep 2", lock=Path("/tmp/t1.lock"))
    store.create_task({"name": "t1", "schedule": {"every": "1s"}, "command": command})
    ...
    records = read_records(Path("/tmp/records"))
    assert not duplicate_starts(records)
    assert not overlaps(records)
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

__all__ = [
    "Record",
    "duplicate_starts",
    "overlaps",
    "read_records",
    "recording_command",
    "starts_by_fire",
]

_RECORD = (
    'rec() { printf "%s %s %s %s %s %s %s%s\\n" "$CLOUDTASK_TASK" "$CLOUDTASK_SCHEDULED_FOR" '
    '"$CLOUDTASK_ATTEMPT" "$CLOUDTASK_RUN_ID" "$CLOUDTASK_AGENT" "$1" "$EPOCHREALTIME" '
    '"${2:+ $2}" >> "$CT_RECORDS"; }'
)


def recording_command(
    records: Path, work: str = "true", lock: Path | None = None, lock_per_agent: bool = False
) -> list[str]:
    """A task command (argv) that records its own start and end around ``work`` (a bash
    snippet whose status is the run's: it must not call ``exit``). With ``lock``, the run
    holds ``flock`` on that file while it runs and records ``overlap`` if another instance
    holds it already (it runs anyway, so the overlap is visible, not avoided);
    ``lock_per_agent`` gives each agent a lock file of its own (``<lock>.<agent>``: the slots
    of a mode ``all`` task)."""
    lines = [f"CT_RECORDS={shlex.quote(str(records))}", _RECORD]
    if lock is not None:
        target = shlex.quote(str(lock)) + ('."$CLOUDTASK_AGENT"' if lock_per_agent else "")
        lines.append(f"exec 9>>{target}; flock -n 9 || rec overlap")
    lines += ["rec start", work, "code=$?", 'rec end "$code"', 'exit "$code"']
    return ["bash", "-c", "\n".join(lines)]


@dataclass(frozen=True)
class Record:
    task: str
    scheduled_for: datetime
    attempt: int
    run_id: str
    agent: str
    kind: str  # start | end | overlap
    time: float  # epoch seconds, the process's own clock
    exit_code: int | None = None

    @property
    def fire(self) -> tuple[str, datetime, int]:
        return (self.task, self.scheduled_for, self.attempt)


def _parse(line: str) -> Record | None:
    parts = line.split()
    if len(parts) not in (7, 8):
        return None
    task, when, attempt, run_id, agent, kind, at = parts[:7]
    try:
        return Record(
            task,
            datetime.fromisoformat(when.replace("Z", "+00:00")),
            int(attempt),
            run_id,
            agent,
            kind,
            float(at),
            int(parts[7]) if len(parts) == 8 else None,
        )
    except ValueError:
        return None


def read_records(path: Path) -> list[Record]:
    """Every well-formed record in ``path`` (a line cut short by a killed writer is skipped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [r for r in map(_parse, text.splitlines()) if r is not None]


def starts_by_fire(
    records: Iterable[Record], per_agent: Iterable[str] = ()
) -> dict[tuple, list[Record]]:
    """Start records by fire: ``(task, scheduled_for, attempt)``, plus the agent for the tasks
    in ``per_agent`` (mode ``all``: each agent has a slot of its own)."""
    each = set(per_agent)
    out: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        if r.kind == "start":
            key = (*r.fire, r.agent) if r.task in each else r.fire
            out[key].append(r)
    return out


def duplicate_starts(records: Iterable[Record], per_agent: Iterable[str] = ()) -> list[tuple]:
    """Fires that started more than once (the evidence of a doubled execution)."""
    return [key for key, starts in starts_by_fire(records, per_agent).items() if len(starts) > 1]


def overlaps(records: Iterable[Record], tasks: Iterable[str] | None = None) -> list[Record]:
    """``overlap`` records (of ``tasks`` only, when given): a run that started while another
    instance of its task (of its agent's slot, for mode ``all``: give each slot its own lock)
    still held the lock."""
    wanted = None if tasks is None else set(tasks)
    return [r for r in records if r.kind == "overlap" and (wanted is None or r.task in wanted)]

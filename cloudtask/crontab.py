"""Crontab lines as CloudTask tasks: what ``cloudtask crontab`` converts, line by line.

A user's crontab (``crontab -l``) or, with ``system``, a system one (``/etc/crontab``,
``/etc/cron.d/*``: a user field before the command) becomes task definitions that
``cloudtask apply`` reads. What cron means is kept:

* the five time fields (names, ranges, steps, and a day-of-month *or* day-of-week match when
  both are restricted, as Vixie cron does) become ``{"cron": ...}`` in the crontab's time zone:
  ``CRON_TZ``/``TZ`` in the file, else the one given (cron runs in the machine's local time);
  ``@hourly`` ... ``@yearly`` become their five fields;
* the command runs through ``/bin/sh -c`` (``shell: true``), or through the crontab's
  ``SHELL`` (``[SHELL, "-c", command]``); ``\\%`` becomes ``%``;
* ``PATH`` and other assignments become the task's ``env``, ``HOME`` its ``cwd`` (cron starts
  commands there), ``MAILTO`` its ``notify.emails``; a system crontab's user its ``run_as``;
* the comment lines right above an entry become its ``description``.

Some lines cannot be said as a task, and are reported with the reason, never guessed at:
``@reboot`` (no fire time: a ``keepalive`` task or a service is the answer), a command with an
unescaped ``%`` (cron feeds what follows to its standard input), and anything CloudTask's own
checks refuse (the message names the field).

Cron starts a fire while the previous run still runs; a converted task keeps CloudTask's
default ``concurrency: forbid`` (that fire is recorded skipped), and a fire missed while no
agent ran is caught up within ``misfire_grace``. Both are noted in the report.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .exceptions import ValidationError
from .task import parse_task

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
# commands that wrap the one that names the job (their own options are skipped too)
_WRAPPERS = {"sudo", "nice", "ionice", "flock", "timeout", "env", "exec", "nohup", "chronic"}
_TAKES_ARGUMENT = {"cd", "flock", "timeout"}  # their next word is not the job either
_SHELLS = {"sh", "bash", "dash", "zsh", "-c"}
NAME_MAX = 128


@dataclass
class Entry:
    """One crontab line that is an entry: the task made of it, or why there is none."""

    line: int
    text: str
    task: dict[str, Any] | None = None
    problem: str | None = None


@dataclass
class Conversion:
    """A whole crontab: its entries in order, and what applies to all of them."""

    source: str
    timezone: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def tasks(self) -> list[dict[str, Any]]:
        return [e.task for e in self.entries if e.task is not None]

    @property
    def refused(self) -> list[Entry]:
        return [e for e in self.entries if e.task is None]


def convert_crontab(
    text: str,
    *,
    source: str,
    timezone: str,
    system: bool = False,
    group: str | None = None,
    prefix: str = "",
    requires: dict[str, str] | None = None,
    taken: set[str] | None = None,
) -> Conversion:
    """Convert a crontab's text (see the module's notes). ``taken``: task names already used
    (by other crontabs of the same run), added to as names are made."""
    out = Conversion(source, timezone)
    taken = set() if taken is None else taken
    env: dict[str, str] = {}
    shell = "/bin/sh"
    home: str | None = None
    mailto: list[str] | None = None
    zone = timezone
    comments: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            comments = []
            continue
        if line.startswith("#"):
            comments.append(line.lstrip("#").strip())
            continue
        assignment = _ASSIGNMENT.match(line)
        if assignment:
            name, value = assignment.group(1), _unquote(assignment.group(2).strip())
            if name == "SHELL":
                shell = value or "/bin/sh"
            elif name == "HOME":
                home = value or None
            elif name == "MAILTO":
                mailto = [a.strip() for a in value.split(",") if a.strip()]
            elif name in ("CRON_TZ", "TZ"):
                zone = value or timezone
                if name == "TZ":
                    env["TZ"] = value
            else:
                env[name] = value
            comments = []
            continue
        entry = Entry(number, raw.rstrip("\n"))
        out.entries.append(entry)
        description = " ".join(c for c in comments if c)
        comments = []
        try:
            expr, user, command = _split_entry(line, system)
            command = _command_text(command)
        except ValueError as e:
            entry.problem = str(e)
            continue
        name = _unique(_job_name(command, prefix), taken)
        task: dict[str, Any] = {
            "name": name,
            "description": (description or f"from {source}, line {number}")[:500],
            "schedule": {"cron": expr, "timezone": zone},
        }
        if shell in ("/bin/sh", "sh"):
            task.update(command=command, shell=True)
        else:
            task["command"] = [shell, "-c", command]
        if group:
            task["group"] = group
        if requires:
            task["requires"] = dict(requires)
        if env:
            task["env"] = dict(env)
        if home:
            task["cwd"] = home
        if mailto:
            task["notify"] = {"emails": list(mailto)}
        if user:
            task["run_as"] = user
        try:
            parse_task(task)
        except ValidationError as e:
            taken.discard(name)
            entry.problem = "; ".join(f"{p.path}: {p.message}" for p in e.problems)
            continue
        entry.task = task
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _split_entry(line: str, system: bool) -> tuple[str, str | None, str]:
    """(five cron fields, the user of a system crontab or None, the command)."""
    want_user = 1 if system else 0
    if line.startswith("@"):
        macro, _, rest = line.partition(" ")
        macro = macro.lower()
        if macro == "@reboot":
            raise ValueError(
                '@reboot has no fire time: make it a task with schedule {"keepalive": true} '
                "if it must always run, or a service of the machine"
            )
        if macro not in MACROS:
            raise ValueError(f"unknown {macro}: expected one of {', '.join(sorted(MACROS))}")
        parts = rest.split(None, want_user)
        expr = MACROS[macro]
    else:
        parts = line.split(None, 5 + want_user)
        if len(parts) < 6 + want_user:
            fields = "five time fields, a user" if system else "five time fields"
            raise ValueError(f"expected {fields} and a command")
        expr = " ".join(parts[:5])
        parts = parts[5:]
    if len(parts) < 1 + want_user or not parts[-1].strip():
        raise ValueError("no command")
    user = parts[0] if system else None
    return expr, user, parts[-1].strip()


def _command_text(command: str) -> str:
    """The command as sh gets it: ``\\%`` is ``%``; an unescaped ``%`` is refused."""
    out, i = [], 0
    while i < len(command):
        c = command[i]
        if c == "\\" and command[i + 1 : i + 2] == "%":
            out.append("%")
            i += 2
            continue
        if c == "%":
            raise ValueError(
                "an unescaped % in the command: cron ends the command there and feeds the rest "
                "to its standard input (write \\% for a literal %, or move the input into the "
                "command)"
            )
        out.append(c)
        i += 1
    return "".join(out)


def _job_name(command: str, prefix: str) -> str:
    """A task name from the command: the program or script it is about, as a slug."""
    try:
        words = shlex.split(command, comments=False)
    except ValueError:
        words = command.split()
    skip_next = False
    stem = ""
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if word in ("&&", "||", ";", "|") or word.startswith("-") or _ASSIGNMENT.match(word):
            continue
        base = PurePosixPath(word).name
        if base in _TAKES_ARGUMENT:
            skip_next = True
            continue
        if base in _WRAPPERS or base in _SHELLS:
            continue
        stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
        if stem:
            break
    slug = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "job"
    name = f"{prefix}-{slug}" if prefix else slug
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "job"
    return name[: NAME_MAX - 5]


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate = f"{name}-{n}"
        n += 1
    taken.add(candidate)
    return candidate

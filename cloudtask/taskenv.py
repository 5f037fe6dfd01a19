"""What a task process gets of its agent: a clean environment, and the user it runs as.

**The environment.** A task process never inherits the agent's environment, which may hold
the agent's credentials (``CLOUDTASK_MONGO_URI``, ``CLOUDTASK_ZK_AUTH``, a key ring given as
``env:``) and whatever else the agent was started with. It gets the variables the allow-list
names, taken from the agent's environment (:data:`DEFAULT_ENV_ALLOW`, plus the names or
``*`` patterns of ``agent.env_allow``), then the task's own ``env`` (its stored secrets
opened), then the run's ``CLOUDTASK_*`` variables. No variable of the agent beginning with
``CLOUDTASK_`` passes, whatever the allow-list says: those are the agent's configuration.

**The user.** An agent running as root starts each task as ``run_as`` (``user`` or
``user:group``): the task's own, when ``agent.run_as_allowed`` lists it (``*``: any user but
root), else the agent's ``agent.run_as``. The process gets the user's uid, group (its
primary one unless given) and supplementary groups, and ``HOME``, ``USER``, ``LOGNAME`` and
``SHELL`` from its passwd entry. An agent that is not root runs tasks as itself; a task
asking for someone else then fails, saying why, rather than run as the wrong user.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# every task gets these from the agent's environment (when the agent has them)
DEFAULT_ENV_ALLOW: tuple[str, ...] = (
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "USER",
    "LOGNAME",
    "SHELL",
)
# what Windows programs cannot start without
WINDOWS_ENV_ALLOW: tuple[str, ...] = (
    "SYSTEMROOT",
    "SYSTEMDRIVE",
    "WINDIR",
    "COMSPEC",
    "PATHEXT",
    "TEMP",
    "TMP",
    "USERPROFILE",
    "PROGRAMDATA",
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AGENT_PREFIX = "CLOUDTASK_"  # the agent's own configuration: never passed on

_ALLOW_ENTRY = re.compile(r"[A-Za-z_*][A-Za-z0-9_*]*")
# a user or group: a name as useradd takes it, or a number
_ACCOUNT = r"(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10})"
RUN_AS_PATTERN = re.compile(rf"({_ACCOUNT})(?::({_ACCOUNT}))?")
RUN_AS_RULE = "expected 'user' or 'user:group' (names or numbers)"


def check_env_allow(v: Any) -> tuple[str, ...]:
    """``agent.env_allow``: variable names or ``*`` patterns (from the environment also
    "A, B")."""
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            try:
                v = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"expected a JSON list of variable names: {e.msg}") from None
        else:
            v = [p.strip() for p in text.split(",") if p.strip()]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"expected a list of variable names, got {json.dumps(v)}")
    out: list[str] = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or not _ALLOW_ENTRY.fullmatch(item):
            raise ValueError(
                f"[{i}]: expected a variable name or a pattern with '*' (letters, digits, "
                f"'_'), got {json.dumps(item)}"
            )
        if item.upper().startswith(AGENT_PREFIX) or fnmatch.fnmatchcase(AGENT_PREFIX + "X", item):
            raise ValueError(
                f"[{i}]: {item!r} would pass the agent's own configuration (CLOUDTASK_*) to "
                "every task; it never does"
            )
        out.append(item)
    return tuple(out)


def check_run_as(v: Any) -> str:
    """``agent.run_as``: empty (the agent's own user), ``user`` or ``user:group``."""
    if not isinstance(v, str):
        raise ValueError(f"{RUN_AS_RULE}, got {json.dumps(v)}")
    v = v.strip()
    if v and not RUN_AS_PATTERN.fullmatch(v):
        raise ValueError(f"{RUN_AS_RULE}, got {json.dumps(v)}")
    return v


def check_run_as_allowed(v: Any) -> tuple[str, ...]:
    """``agent.run_as_allowed``: the users (or ``user:group``) a task may name; ``*``: any
    user but root."""
    if isinstance(v, str):
        v = [p.strip() for p in v.split(",") if p.strip()]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"expected a list of users, got {json.dumps(v)}")
    out: list[str] = []
    for i, item in enumerate(v):
        if item != "*" and not (isinstance(item, str) and RUN_AS_PATTERN.fullmatch(item)):
            raise ValueError(f"[{i}]: {RUN_AS_RULE} or '*', got {json.dumps(item)}")
        out.append(item)
    return tuple(out)


def task_environment(
    environ: Mapping[str, str], allow: tuple[str, ...] = (), *, windows: bool = os.name == "nt"
) -> dict[str, str]:
    """The variables of the agent's ``environ`` a task process gets (before its own)."""
    exact: set[str] = set()
    patterns: list[str] = []
    for entry in (*DEFAULT_ENV_ALLOW, *(WINDOWS_ENV_ALLOW if windows else ()), *allow):
        if "*" in entry:
            patterns.append(entry)
        else:
            exact.add(entry)
    out: dict[str, str] = {}
    for name, value in environ.items():
        key = name.upper() if windows else name
        if key.startswith(AGENT_PREFIX):
            continue
        if key in exact or name in exact or any(fnmatch.fnmatchcase(key, p) for p in patterns):
            out[name] = value
    if not windows:
        out.setdefault("PATH", DEFAULT_PATH)
    return out


@dataclass(frozen=True)
class RunUser:
    """Whom a task process runs as (POSIX), and the variables that go with the user."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    def environment(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell}

    def wire(self) -> list[Any]:
        """For the run guard's start request: [uid, gid, [groups]]."""
        return [self.uid, self.gid, list(self.groups)]


class RunAsError(Exception):
    """A task cannot run as the user it names here (the message says why)."""


def choose_run_as(task_run_as: str | None, default: str, allowed: tuple[str, ...]) -> str:
    """The ``user[:group]`` a task runs as on this agent ('' for the agent's own user)."""
    if not task_run_as:
        return default
    if task_run_as == default or task_run_as in allowed:
        return task_run_as
    user = task_run_as.split(":", 1)[0]
    if "*" in allowed and user not in ("root", "0"):
        return task_run_as
    shown = ", ".join(allowed) if allowed else "none"
    raise RunAsError(
        f"the task asks to run as {task_run_as!r}, which this agent's agent.run_as_allowed "
        f"does not list ({shown})"
    )


def resolve_user(run_as: str) -> RunUser:
    """The account ``user[:group]`` names on this host (RunAsError when there is none)."""
    import grp
    import pwd

    match = RUN_AS_PATTERN.fullmatch(run_as)
    if match is None:
        raise RunAsError(f"run_as {run_as!r}: {RUN_AS_RULE}")
    user, group = match.group(1), match.group(2)
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise RunAsError(f"there is no user {user!r} on this agent's host") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise RunAsError(f"there is no group {group!r} on this agent's host") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    return RunUser(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=gid,
        groups=groups,
        home=entry.pw_dir,
        shell=entry.pw_shell or "/bin/sh",
    )


def run_user(task_run_as: str | None, default: str, allowed: tuple[str, ...]) -> RunUser | None:
    """Whom a task process is started as: None for the agent's own user. RunAsError when
    the task may not, or cannot, run as the user it asks for here."""
    chosen = choose_run_as(task_run_as, default, allowed)
    if not chosen:
        return None
    if os.name == "nt":
        raise RunAsError("run_as is not available on Windows agents")
    target = resolve_user(chosen)
    if os.geteuid() != 0:
        if target.uid == os.geteuid():
            return None  # (the agent's own user, named)
        raise RunAsError(
            f"cannot run as {chosen!r}: the agent does not run as root (it runs as uid "
            f"{os.geteuid()})"
        )
    return target

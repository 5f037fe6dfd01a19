"""Every error CloudTask raises on purpose derives from :class:`CloudTaskError`.

Messages say what is wrong, where, and what to do; the CLI prints them as they
are, without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class CloudTaskError(Exception):
    """Root of CloudTask's own errors."""


@dataclass(frozen=True)
class Problem:
    """One validation problem: where (a dotted path such as ``schedule[1].cron``) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class ValidationError(CloudTaskError):
    """Input (a task spec, a config file, an API body) has one or more problems.

    All problems are collected before raising, so a user fixes them in one go.
    """

    def __init__(self, problems: list[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source} is invalid" if source else "invalid input"
        lines = [f"{head} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class ConfigError(CloudTaskError):
    """The configuration file or the environment holds an unusable value."""


class StoreError(CloudTaskError):
    """MongoDB could not be reached or refused an operation."""


class NotFound(CloudTaskError):
    """A task, run or file that was asked for does not exist."""


class Conflict(CloudTaskError):
    """The change collides with what is stored (a task name already taken, a stale revision).

    ``problems`` says where when a field is the cause (a name taken: ``name``), so a form or
    the API can show it at that field."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class ServerStartError(CloudTaskError):
    """An embedded server (ZooKeeper, the MongoDB wire server) could not be started."""

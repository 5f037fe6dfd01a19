"""Changes made by people, the same from the web site, the REST API, the CLI and
``cloudtask up``: the one door.

Every change goes through :class:`Operations`, which validates it once (the store is handed
parsed input), stores it, tells the cluster through one path (``/signals/tasks`` for task
changes, ``/signals/runs`` for run requests; best effort, the leader and the agents also look
every resync), and writes an audit entry: who, what, when, and the state before and after.
Errors are typed: ValidationError (every problem, with its path), Conflict (a name taken,
with the problem at ``name``; a stale revision; a run that is not running), NotFound.

``actor`` names who acts: a user name for the web site and the API, ``cli:<login>`` for the
command line (``cloudtask up`` too).

=============  ============================================================================
``tasks``      create, replace, patch, apply, pause and resume, clone, delete
``runs``       run now, kill (or cancel a run no agent took)
``files``      upload a version, roll back
``users``      accounts, roles, passwords, API tokens
``settings``   the alert settings of the settings page
``secrets``    stored secrets: set or replace, delete, rotate (values never read back)
``plans``      plans from other systems: submit (all or nothing), cancel a plan or an item
``pools``      concurrency pools: set a size, delete
``calendars``  calendars (set, import an iCalendar file, delete) and blackout windows
=============  ============================================================================
"""

from __future__ import annotations

from .base import OperationsBase, find_task, task_target
from .calendars import CalendarOperations
from .files import FileOperations
from .plans import PlanOperations
from .pools import PoolOperations
from .runs import RunOperations
from .secrets import SecretOperations
from .settings import SettingsOperations
from .tasks import Applied, TaskOperations, task_warnings
from .users import UserOperations

__all__ = ["Applied", "Operations", "OperationsBase", "find_task", "task_target", "task_warnings"]


class Operations(
    TaskOperations,
    RunOperations,
    FileOperations,
    UserOperations,
    SettingsOperations,
    SecretOperations,
    PlanOperations,
    PoolOperations,
    CalendarOperations,
):
    """Validated, signalled, audited changes (see the module's notes)."""

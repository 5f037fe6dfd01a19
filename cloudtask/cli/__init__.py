"""The ``cloudtask`` command.

Errors CloudTask raises on purpose are printed as they are (what is wrong, where, what to do),
never as a traceback. Logging is configured in this package, at the entry point
(:mod:`~cloudtask.cli.common`), and nowhere else.

This module holds the root group ``cli`` and ``main``, and adds to ``cli`` the commands of
one module per family:

* :mod:`~cloudtask.cli.servers`: the programs, ``agent``, ``web``, ``center`` and ``up``;
* :mod:`~cloudtask.cli.authoring`: ``validate``, ``apply`` and ``export`` (task files) and
  ``next``;
* :mod:`~cloudtask.cli.admin`: the ``task``, ``run``, ``user``, ``token`` and ``file`` groups;
* :mod:`~cloudtask.cli.zookeeper`: ``zk-acl`` (the ACL of ``zookeeper.auth`` on every node);
* :mod:`~cloudtask.cli.secrets`: the ``secrets`` group (stored secrets and their keys).
* :mod:`~cloudtask.cli.plans`: the ``plan`` group (submit a plan, its state, cancel it).
* :mod:`~cloudtask.cli.pools`: the ``pool`` group (concurrency pools).
* :mod:`~cloudtask.cli.status`: ``status`` (is the cluster well? exit 1 when not).
* :mod:`~cloudtask.cli.calendars`: the ``calendar`` and ``blackout`` groups.
* :mod:`~cloudtask.cli.api_commands`: the ``tasks``, ``runs``, ``agents``, ``events`` and
  ``plans`` groups, which talk to the web site's REST API (:mod:`~cloudtask.cli.remote`: the
  client, the site's address and token), and :mod:`~cloudtask.cli.login`: ``login``,
  ``logout`` and ``whoami``.

What they share (the config, logging, the ``--config`` and ``--verbose`` options, who acts,
the store and the operations a command works on) is in :mod:`~cloudtask.cli.common`.
"""

from __future__ import annotations

import os
from typing import Any

import click

from .. import __version__
from ..exceptions import CloudTaskError, ValidationError
from . import admin, authoring, calendars, plans, pools, secrets, servers, zookeeper
from .api_commands import GROUPS as API_GROUPS
from .crontab import crontab_cmd
from .login import COMMANDS as LOGIN_COMMANDS
from .status import status


class _Group(click.Group):
    """Turns CloudTask's own errors into a clean message and exit code 2 (bad input) or 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValidationError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except CloudTaskError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cloudtask")
def cli() -> None:
    """CloudTask: a distributed task scheduler that replaces per-machine crontabs."""


for _command in (
    servers.agent,
    servers.web,
    servers.center,
    authoring.validate,
    authoring.apply,
    authoring.export,
    crontab_cmd,
    admin.task_group,
    admin.run_group,
    admin.user_group,
    admin.token_group,
    admin.file_group,
    authoring.next_cmd,
    servers.up,
    zookeeper.zk_acl,
    secrets.secrets_group,
    plans.plan_group,
    pools.pool_group,
    status,
    calendars.calendar_group,
    calendars.blackout_group,
):
    cli.add_command(_command)
for _command in (*API_GROUPS, *LOGIN_COMMANDS):  # through the web site's API
    cli.add_command(_command)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="cloudtask")

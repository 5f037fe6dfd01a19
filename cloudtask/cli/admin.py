"""The commands that act on what is stored: the ``task``, ``run``, ``user``, ``token`` and
``file`` groups."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from ..exceptions import ValidationError
from .common import _load, _operations, _store, cli_actor, config_option


@click.group("task")
def task_group() -> None:
    """Act on stored tasks."""


@task_group.command("delete")
@config_option
@click.argument("name_or_id")
@click.option("--kill-running", is_flag=True, help="Also kill its runs that are still going.")
def task_delete(config_path: str | None, name_or_id: str, kill_running: bool) -> None:
    """Delete a task; its running runs finish unless --kill-running."""
    from ..operations import find_task

    with _operations(config_path, cluster="required") as ops:
        task = find_task(ops.store, name_or_id)
        task, killed = ops.delete_task(cli_actor(), task["_id"], kill_running)
    click.echo(f"deleted {task['name']}" + (f"; killing {len(killed)} runs" if killed else ""))


@task_group.command("run")
@config_option
@click.argument("name_or_id")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="A run parameter.")
def task_run(config_path: str | None, name_or_id: str, env: tuple[str, ...]) -> None:
    """Run a task now, with parameters (environment values on top of its own)."""
    params = {}
    for item in env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--env")
        params[name] = value
    from ..operations import find_task

    with _operations(config_path, cluster="optional") as ops:
        task = find_task(ops.store, name_or_id)
        run = ops.run_now(cli_actor(), task["_id"], env=params or None)
    click.echo(f"run {run['_id']} of {task['name']} queued")


@task_group.command("backfill")
@config_option
@click.argument("name_or_id")
@click.option("--from", "start", required=True, help="The first fire time (ISO 8601).")
@click.option("--to", "end", required=True, help="The last fire time (ISO 8601, not future).")
def task_backfill(config_path: str | None, name_or_id: str, start: str, end: str) -> None:
    """Run a task for each of its fire times in a past range that has no run yet."""
    from ..operations import find_task

    with _operations(config_path, cluster="optional") as ops:
        task = find_task(ops.store, name_or_id)
        result = ops.backfill(cli_actor(), task["_id"], start, end)
    click.echo(
        f"backfill of {task['name']}: {result['queued']} runs queued"
        + (f", {result['existing']} fires had run already" if result["existing"] else "")
    )


@click.group("run")
def run_group() -> None:
    """Act on runs."""


@run_group.command("kill")
@config_option
@click.argument("run_id")
def run_kill(config_path: str | None, run_id: str) -> None:
    """Kill a running run and its whole process tree."""
    with _operations(config_path, cluster="required") as ops:
        run = ops.kill_run(cli_actor(), run_id)
    if run.get("agent"):
        click.echo(f"asked agent {run['agent']} to kill run {run_id}")
    else:
        click.echo(f"cancelled run {run_id} (no agent had taken it)")


@click.group("user")
def user_group() -> None:
    """Users of the web site and the API."""


@user_group.command("add")
@config_option
@click.argument("username")
@click.option(
    "--role",
    type=click.Choice(["admin", "operator", "viewer"]),
    default="viewer",
    show_default=True,
)
def user_add(config_path: str | None, username: str, role: str) -> None:
    """Add a user. The password is asked for (or read from standard input when piped)."""
    password = _read_password()
    with _operations(config_path) as ops:
        ops.add_user(cli_actor(), username, password, role)
    click.echo(f"added {username} ({role})")


@user_group.command("list")
@config_option
def user_list(config_path: str | None) -> None:
    """List users: name, role, state, created."""
    from ..users import describe

    with _store(config_path) as store:
        for doc in store.list_user_docs():
            click.echo(describe(doc))


@click.group("token")
def token_group() -> None:
    """API tokens."""


@token_group.command("create")
@config_option
@click.argument("username")
@click.option("--name", default="cli", show_default=True, help="What the token is for.")
@click.option(
    "--expires-in", "expires_in", type=int, default=None, help="Expire after this many days."
)
@click.option("--read-only", is_flag=True, help="The token may only GET and HEAD.")
def token_create(
    config_path: str | None, username: str, name: str, expires_in: int | None, read_only: bool
) -> None:
    """Create an API token for a user; it is shown once (only its hash is kept)."""
    with _operations(config_path) as ops:
        _, token = ops.add_token(
            cli_actor(),
            username,
            name,
            expires_in_days=expires_in,
            scope="read" if read_only else "all",
        )
    click.echo(token)


def _read_password() -> str:
    if sys.stdin.isatty():
        return click.prompt("password", hide_input=True, confirmation_prompt=True)
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise click.UsageError("no password on standard input")
    return password


@click.group("file")
def file_group() -> None:
    """Task files: scripts, binaries or .zip/.tar.gz packages that tasks run with."""


@file_group.command("put")
@config_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Name to store it under (default: the file's own name).")
def file_put(config_path: str | None, path: str, name: str | None) -> None:
    """Store a new version of a task file; tasks naming it run the latest version.

    An archive (.zip, .tar.gz, .tgz, .tar) is checked first: one that does not open, or holds
    a member that would land outside the run's folder (or a link, or a device), is refused.
    The newest web.file_versions_kept versions of each name are kept, and every pinned one.
    """
    web = _load(config_path).web
    name = name or Path(path).name
    with _operations(config_path) as ops:
        meta = ops.put_file(
            cli_actor(),
            name,
            Path(path).read_bytes(),
            keep=web.file_versions_kept,
            max_bytes=web.max_upload_bytes,
        )
    if meta["created"]:
        click.echo(f"stored {meta['name']}: {meta['size']} bytes, sha256 {meta['sha256']}")
    else:
        click.echo(
            f"unchanged {meta['name']}: {meta['size']} bytes, sha256 {meta['sha256']} "
            "is the latest version already"
        )


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(value, datetime) else "-"


@file_group.command("list")
@config_option
def file_list(config_path: str | None) -> None:
    """List stored task files: name, size, sha256, uploaded at and by of the latest version,
    and how many versions are stored (tab-separated)."""

    with _store(config_path) as store:
        for meta in store.list_files():
            click.echo(
                f"{meta['name']}\t{meta['size']}\t{meta['sha256']}\t{_when(meta['uploaded_at'])}"
                f"\t{meta['uploaded_by'] or '-'}\t{meta['versions']} version"
                + ("" if meta["versions"] == 1 else "s")
            )


@file_group.command("versions")
@config_option
@click.argument("name")
def file_versions(config_path: str | None, name: str) -> None:
    """List the stored versions of a task file, newest first: sha256, size, uploaded at and
    by, then ``latest``, ``pinned by TASK,...`` and ``rollback of SHA256`` where they apply."""

    with _store(config_path) as store:
        versions = store.list_file_versions(name)
    for v in versions:
        notes = []
        if v["latest"]:
            notes.append("latest")
        if v["pinned_by"]:
            notes.append("pinned by " + ",".join(v["pinned_by"]))
        if v["rolled_back_from"]:
            notes.append(f"rollback from {v['rolled_back_from'][:12]}")
        click.echo(
            f"{v['sha256']}\t{v['size']}\t{_when(v['uploaded_at'])}\t{v['uploaded_by'] or '-'}"
            f"\t{'; '.join(notes)}".rstrip("\t")
        )


@file_group.command("rollback")
@config_option
@click.argument("name")
@click.argument("sha256")
def file_rollback(config_path: str | None, name: str, sha256: str) -> None:
    """Make an older version of a task file the latest again (stored as a new upload of its
    bytes, so the history shows the rollback). SHA256 may be abbreviated to 8 or more digits,
    as `cloudtask file versions NAME` prints them."""
    import re

    from ..exceptions import NotFound, Problem

    text = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", text):
        raise ValidationError(
            [
                Problem(
                    "SHA256",
                    f"expected the sha256 of a version (8 to 64 hex digits), got {sha256!r}",
                )
            ],
            source="the rollback",
        )
    web = _load(config_path).web
    with _operations(config_path) as ops:
        versions = ops.store.list_file_versions(name)
        matches = sorted({v["sha256"] for v in versions if v["sha256"].startswith(text)})
        if not matches:
            raise NotFound(
                f"file {name!r} has no stored version {text}; "
                "list them with `cloudtask file versions NAME`"
            )
        if len(matches) > 1:
            raise ValidationError(
                [Problem("SHA256", f"{text} names {len(matches)} versions: give more digits")],
                source="the rollback",
            )
        meta = ops.rollback_file(cli_actor(), name, matches[0], keep=web.file_versions_kept)
    click.echo(f"rolled back {name}: version {meta['sha256']} is the latest again")

"""The ``secrets`` group: stored secrets (set, list, delete, rotate) and new keys.

A value is read from standard input (or a file), never from the command line, where other
users of the machine could see it in the process list; and nothing prints one back."""

from __future__ import annotations

import sys

import click

from ..exceptions import Problem, ValidationError
from ..secretbox import load_box, new_key
from .common import _load, _operations, _store, cli_actor, config_option


@click.group("secrets")
def secrets_group() -> None:
    """Stored secrets, encrypted at rest; tasks refer to them as {"secret": "NAME"}."""


@secrets_group.command("set")
@config_option
@click.argument("name")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Read the value from this file (default: standard input).",
)
@click.option("--description", default=None, help="What the secret is for.")
def secrets_set(
    config_path: str | None, name: str, from_file: str | None, description: str | None
) -> None:
    """Set or replace NAME's value (read from standard input, one trailing newline dropped)."""
    if from_file:
        with open(from_file, encoding="utf-8") as f:
            value = f.read()
    else:
        if sys.stdin.isatty():
            click.echo(f"value of {name} (then Ctrl-D):", err=True)
        value = sys.stdin.read()
    if value.endswith("\n"):
        value = value[:-1]
    if not value:
        raise ValidationError([Problem("value", "the value is empty")])
    box = load_box(_load(config_path).secrets.keys)
    with _operations(config_path, cluster="none") as ops:
        info = ops.set_secret(cli_actor(), box, name, value, description)
    click.echo(f"stored secret {info['name']} (sealed under key {info['key_id']})")


@secrets_group.command("list")
@config_option
def secrets_list(config_path: str | None) -> None:
    """Every secret's name, who changed it last and when, and the tasks using it."""
    with _store(config_path) as store:
        rows = store.list_secrets()
    if not rows:
        click.echo("no secrets")
        return
    for row in rows:
        when = row.get("updated_at")
        used = ", ".join(t["name"] for t in row["used_by"]) or "-"
        click.echo(
            f"{row['name']}\tkey {row.get('key_id')}\t{row.get('updated_by', '')}\t"
            f"{when.isoformat() if when else ''}\tused by: {used}"
        )


@secrets_group.command("delete")
@config_option
@click.argument("name")
def secrets_delete(config_path: str | None, name: str) -> None:
    """Delete NAME (refused while a task uses it)."""
    with _operations(config_path, cluster="none") as ops:
        ops.delete_secret(cli_actor(), name)
    click.echo(f"deleted secret {name}")


@secrets_group.command("rotate")
@config_option
def secrets_rotate(config_path: str | None) -> None:
    """Seal every value again under the key ring's first (primary) key."""
    box = load_box(_load(config_path).secrets.keys)
    with _operations(config_path, cluster="none") as ops:
        count = ops.rotate_secrets(cli_actor(), box)
    click.echo(f"{count} secret(s) sealed again under key {box.primary if box else '?'}")


@secrets_group.command("new-key")
@click.option("--id", "key_id", default=None, help="The key's id (default: a random one).")
def secrets_new_key(key_id: str | None) -> None:
    """Print a new key line for the key ring (put it first to make it the primary)."""
    try:
        click.echo(new_key(key_id))
    except ValueError as e:
        raise ValidationError([Problem("id", str(e))]) from None

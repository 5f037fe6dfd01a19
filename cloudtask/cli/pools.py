"""The ``pool`` group: concurrency pools (at most SIZE runs at once, across the cluster, of the
tasks naming the pool)."""

from __future__ import annotations

import click

from .common import _operations, _store, cli_actor, config_option


@click.group("pool")
def pool_group() -> None:
    """Concurrency pools shared by tasks ("pool": "NAME" in a task)."""


@pool_group.command("set")
@config_option
@click.argument("name")
@click.argument("size", type=int)
def pool_set(config_path: str | None, name: str, size: int) -> None:
    """Create pool NAME, or change its size, to SIZE runs at once."""
    with _operations(config_path, cluster="none") as ops:
        pool = ops.set_pool(cli_actor(), name, size)
    click.echo(f"pool {pool['name']}: {pool['size']} at once")


@pool_group.command("list")
@config_option
def pool_list(config_path: str | None) -> None:
    """Every pool and its size."""
    with _store(config_path) as store:
        pools = store.list_pools()
    if not pools:
        click.echo("no pools")
    for pool in pools:
        click.echo(f"{pool['name']}\t{pool['size']}")


@pool_group.command("delete")
@config_option
@click.argument("name")
def pool_delete(config_path: str | None, name: str) -> None:
    """Delete pool NAME (refused while a task names it)."""
    with _operations(config_path, cluster="none") as ops:
        ops.delete_pool(cli_actor(), name)
    click.echo(f"deleted pool {name}")

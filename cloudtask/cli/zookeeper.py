"""``cloudtask zk-acl``: the ACL of ``zookeeper.auth`` on every node of an existing cluster.

Nodes keep the ACL they were created with: when ``zookeeper.auth`` is set on a cluster that ran
without it, what its processes create from then on is protected, but the nodes made before
(the root, its folders, assignments, kill requests, ``/status``) stay open to anyone until
this command sets the ACL on the whole tree under ``zookeeper.root``."""

from __future__ import annotations

import click

from ..exceptions import CloudTaskError
from .common import _load, config_option


@click.command("zk-acl")
@config_option
@click.option(
    "--dry-run", is_flag=True, help="Count the nodes whose ACL would change; change nothing."
)
@click.option(
    "--open",
    "open_acl",
    is_flag=True,
    help="Give every node the open ACL (world:anyone) instead: undoes it, before zookeeper.auth "
    "is removed from the configuration.",
)
def zk_acl(config_path: str | None, dry_run: bool, open_acl: bool) -> None:
    """Set the digest ACL of zookeeper.auth on the CloudTask root and every node under it.

    For a cluster whose nodes were created before zookeeper.auth was set: first give every
    agent, center and web process zookeeper.auth and restart them, then run this once."""
    from kazoo.security import OPEN_ACL_UNSAFE

    from ..zkauth import acl_of, credential, set_tree_acl
    from ..zkpaths import connect

    cfg = _load(config_path)
    cred = credential(cfg.zookeeper.auth)
    if cred is None:
        raise CloudTaskError(
            "zookeeper.auth is not set: give it the digest credential (user:password, "
            "env:VARIABLE or file:/path) the cluster's processes use, then run this again"
        )
    root = cfg.zookeeper.root
    zk = connect(
        cfg.zookeeper.hosts,
        cfg.zookeeper.session_timeout,
        start_timeout=10,
        credential=cred,
        root=root,
    )
    try:
        acl = list(OPEN_ACL_UNSAFE) if open_acl else acl_of(cred)
        result = set_tree_acl(zk, root, acl or [], dry_run=dry_run)
    finally:
        zk.stop()
        zk.close()
    what = "the open ACL (world:anyone)" if open_acl else f"the digest ACL of user {cred.user!r}"
    verb = "would be given" if dry_run else "given"
    click.echo(f"{root}: {result.changed} node(s) {verb} {what}; {result.unchanged} had it already")
    if result.refused:
        shown = ", ".join(result.refused[:10]) + (" ..." if len(result.refused) > 10 else "")
        raise CloudTaskError(
            f"{len(result.refused)} node(s) refused this credential (another credential's "
            f"ACL; change them with that one or as ZooKeeper's super user): {shown}"
        )

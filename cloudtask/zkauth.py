"""ZooKeeper digest authentication and the ACL of every node CloudTask creates.

``zookeeper.auth`` (or ``CLOUDTASK_ZK_AUTH``) names the digest credential ``user:password``
every CloudTask client sends (agents, centers, the web site, the CLI). It is written one of
three ways, so the password need not stand in the JSON config in clear:

* ``"user:password"``: in clear;
* ``"env:VARIABLE"``: the environment variable ``VARIABLE`` holds ``user:password``;
* ``"file:/path/to/file"``: the file holds ``user:password`` (one line; keep it mode 0600).

The reference is kept in the configuration as written and read only when a client connects
(:func:`credential`), so ``cloudtask up`` hands its children the reference, not the secret.

With a credential, every node a client creates (``create``, ``ensure_path``, transactions,
ephemeral and sequence nodes, kazoo's election and lock nodes) gets :func:`acl_of`: all
permissions to that digest identity and none to anyone else (kazoo's ``default_acl``). Without
one, nodes keep ZooKeeper's open ACL (``world:anyone``), as before: fine for the embedded
single-machine mode, not for production. Nodes created before the credential was set keep
their open ACL until ``cloudtask zk-acl`` sets it on the whole tree (:func:`set_tree_acl`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from .authconfig import read_secret
from .exceptions import CloudTaskError, ConfigError

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FORMS = "'user:password', 'env:VARIABLE' or 'file:/path/to/file'"


class Credential(NamedTuple):
    user: str
    password: str

    def auth_data(self) -> list[tuple[str, str]]:
        """kazoo's ``auth_data``: the digest scheme with ``user:password``."""
        return [("digest", f"{self.user}:{self.password}")]

    def __repr__(self) -> str:  # never the password in a log or a traceback
        return f"Credential(user={self.user!r}, password='***')"


def _pair_problem(text: str) -> str | None:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        return "expected user:password (a user name, a colon, a password), both not empty"
    if any(c.isspace() or ord(c) < 32 for c in user):
        return "the user name must not contain spaces or control characters"
    if any(c in password for c in "\r\n\0"):
        return "the password must be one line"
    return None


def check_setting(v: Any) -> str:
    """The config check of ``zookeeper.auth`` (raises ValueError saying what is expected; the
    value is never shown: it may be the password)."""
    if not isinstance(v, str):
        raise ValueError(f"expected a string: {FORMS}")
    if not v:
        return v
    kind, _, rest = v.partition(":")
    if kind == "env":
        if not _ENV_NAME.fullmatch(rest):
            raise ValueError(
                f"env: must be followed by the name of an environment variable: {FORMS}"
            )
    elif kind == "file":
        if not rest.strip():
            raise ValueError(f"file: must be followed by a path: {FORMS}")
    elif problem := _pair_problem(v):
        raise ValueError(f"{problem}; expected {FORMS}")
    return v


def credential(setting: str, environ: Mapping[str, str] | None = None) -> Credential | None:
    """The credential ``zookeeper.auth`` names, or None when it is empty (open ACLs). Raises
    :class:`ConfigError` when the variable is not set, the file cannot be read or what they
    hold is not ``user:password``."""
    if not setting:
        return None
    kind, _, rest = setting.partition(":")
    if kind in ("env", "file"):
        text = read_secret(setting, "zookeeper.auth", environ)
        where = f"the environment variable {rest}" if kind == "env" else rest
    else:
        text, where = setting, ""
    if problem := _pair_problem(text):
        raise ConfigError(
            f"zookeeper.auth: {where + ' holds no usable credential: ' if where else ''}{problem}"
        )
    user, _, password = text.partition(":")
    return Credential(user, password)


def acl_of(cred: Credential | None) -> list[Any] | None:
    """The ACL of every node created with ``cred``: all permissions to its digest identity,
    nothing to anyone else. None without a credential (kazoo's open ACL)."""
    if cred is None:
        return None
    from kazoo.security import make_digest_acl

    return [make_digest_acl(cred.user, cred.password, all=True)]


class AccessDenied(CloudTaskError):
    """ZooKeeper refused this client the CloudTask root: a credential is missing or wrong."""


def check_access(zk: Any, root: str, cred: Credential | None) -> None:
    """Read ``root``'s children once, so a client without the right credential is told at
    start, in words, rather than failing at its first write deep in a loop."""
    from kazoo.exceptions import NoAuthError, NoNodeError

    try:
        zk.get_children(root)
    except NoNodeError:
        return  # a new cluster: the first center creates it
    except NoAuthError:
        if cred is None:
            raise AccessDenied(
                f"ZooKeeper refused access to {root}: its nodes have a digest ACL; set "
                "zookeeper.auth (or CLOUDTASK_ZK_AUTH) to the credential this cluster uses"
            ) from None
        raise AccessDenied(
            f"ZooKeeper refused the digest user {cred.user!r} (zookeeper.auth) access to "
            f"{root}: the password is wrong, or its nodes were given another credential's ACL"
        ) from None


class TreeResult(NamedTuple):
    changed: int  # nodes whose ACL was set
    unchanged: int  # nodes that had it already
    refused: list[str]  # nodes this client may not change (another credential's ACL)


IN_FLIGHT = 1000  # requests sent before their answers are read


def set_tree_acl(zk: Any, root: str, acl: list[Any], *, dry_run: bool = False) -> TreeResult:
    """Give ``root`` and every node under it ``acl`` (ephemeral nodes included; nodes that go
    away meanwhile are passed over). Reads and writes a level at a time, up to
    :data:`IN_FLIGHT` requests at once. Nodes created meanwhile by a client without the
    credential are not seen: run it once every process has ``zookeeper.auth``. With root
    ``/`` (and no chroot), ZooKeeper's own ``/zookeeper`` is left alone."""
    from kazoo.exceptions import NoAuthError, NoNodeError

    wanted = sorted((a.id.scheme, a.id.id, a.perms) for a in acl)
    changed = unchanged = 0
    refused: list[str] = []
    level = [root] if zk.exists(root) else []
    while level:
        next_level: list[str] = []
        for start in range(0, len(level), IN_FLIGHT):
            chunk = level[start : start + IN_FLIGHT]
            reads = [(path, zk.get_acls_async(path), zk.get_children_async(path)) for path in chunk]
            updates = []
            for path, acls, children in reads:
                try:
                    current, _ = acls.get()
                    names = children.get()
                except NoNodeError:
                    continue  # gone meanwhile (an ephemeral node, a deleted assignment)
                except NoAuthError:
                    refused.append(path)
                    continue
                base = "" if path == "/" else path
                next_level.extend(
                    f"{base}/{name}"
                    for name in names
                    if f"{base}/{name}" != "/zookeeper" or zk.chroot
                )
                if sorted((a.id.scheme, a.id.id, a.perms) for a in current) == wanted:
                    unchanged += 1
                elif dry_run:
                    changed += 1
                else:
                    updates.append((path, zk.set_acls_async(path, acl)))
            for path, pending in updates:
                try:
                    pending.get()
                    changed += 1
                except NoNodeError:
                    continue
                except NoAuthError:
                    refused.append(path)
        level = next_level
    return TreeResult(changed, unchanged, refused)

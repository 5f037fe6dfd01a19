"""Login against an LDAP directory (``auth.ldap``), with ``ldap3``.

:meth:`Directory.authenticate` checks a name and password by binding to the directory as the
user (the password goes to the directory only: it is never logged nor stored), then reads the
user's groups; :meth:`Directory.lookup` reads a user's entry and groups again without their
password (with the service account), for the periodic re-check of a directory user's
sessions. Both give a :class:`DirectoryUser` (its DN, its name, its groups, the role the
groups map to, None when no mapped group), or None when the directory does not know the
name (or the password is wrong: a bind cannot tell the two apart, and the answer must not).

How a user is found, one of two ways:

* **search** (``base_dn`` and ``user_filter``, default ``(uid={username})``): the service
  account (``bind_dn`` and ``bind_password``; anonymous without them) searches for exactly one
  entry, then the user's DN is bound with their password. More than one entry for a name is
  refused (the filter is wrong), never guessed;
* **template** (``user_dn_template``, such as ``uid={username},ou=people,dc=example,dc=org``):
  the DN is made from the name (escaped) and bound at once; the entry is then read as the
  user.

Groups: ``group_attribute`` (such as ``memberOf``) lists them on the user's entry, or they are
searched under ``group_base_dn`` with ``group_filter`` (``{user_dn}`` and ``{username}``,
escaped). A group counts by its DN or its name (``group_name_attribute``, ``cn``);
``role_map`` maps either to a role and the highest role wins.

The name is escaped wherever it goes into a filter or a DN, an empty password is refused
before anything is sent (an LDAP bind with a DN and no password is an anonymous bind that
"succeeds"), and the servers are tried in turn, each with ``timeout``. A directory that cannot
be reached (or whose certificate is not trusted) raises :class:`DirectoryUnavailable`; a
directory that answers something unusable (the service account refused, the filter matches
two entries) raises :class:`DirectoryError`: both say what in words.
"""

from __future__ import annotations

import logging
import math
import re
import ssl
from dataclasses import dataclass, field
from typing import Any

from .authconfig import LdapSettings, role_for
from .exceptions import CloudTaskError, ConfigError

log = logging.getLogger(__name__)

MAX_NAME = 256
MAX_PASSWORD = 1024
INVALID_CREDENTIALS = 49
NO_SUCH_OBJECT = 32
REFUSED_BINDS = {INVALID_CREDENTIALS, 53}  # wrong password; unwilling (a locked account)


class DirectoryError(CloudTaskError):
    """The directory answered, but not as the configuration expects."""


class DirectoryUnavailable(DirectoryError):
    """No server of ``auth.ldap.servers`` could be reached (or trusted)."""


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    username: str  # the entry's username_attribute (or the name given)
    groups: tuple[str, ...] = ()  # the groups found: their DNs and names
    role: str | None = None  # what role_map gives the groups; None: no mapped group
    mapped: tuple[str, ...] = field(default=())  # the groups that gave a role


def _ldap3() -> Any:
    try:
        import ldap3
    except ImportError:
        raise ConfigError(
            "auth.ldap needs the ldap3 package: pip install 'cloudtask[ldap]'"
        ) from None
    return ldap3


class Directory:
    """One configured directory (``auth.ldap``); ``bind_password`` is the service account's
    password, read from its reference (see :func:`cloudtask.authconfig.read_secret`)."""

    def __init__(self, settings: LdapSettings, bind_password: str = "") -> None:
        self.settings = settings
        self._bind_password = bind_password
        self._ldap3 = _ldap3()
        ldap3 = self._ldap3
        self._tls = None
        if any(u.startswith("ldaps:") for u in settings.servers) or settings.start_tls:
            try:
                self._tls = ldap3.Tls(
                    validate=ssl.CERT_REQUIRED if settings.tls_verify else ssl.CERT_NONE,
                    ca_certs_file=settings.ca_file or None,
                )
            except ldap3.core.exceptions.LDAPException as e:
                raise ConfigError(f"auth.ldap.ca_file: {settings.ca_file}: {e}") from None
        self._servers = [
            ldap3.Server(
                url,
                get_info=ldap3.NONE,
                connect_timeout=settings.timeout,
                tls=self._tls,
            )
            for url in settings.servers
        ]

    def __repr__(self) -> str:  # never the service password
        return f"Directory(servers={list(self.settings.servers)!r})"

    @property
    def can_recheck(self) -> bool:
        """Whether users can be looked up without their password (a service account)."""
        return bool(self.settings.bind_dn)

    # --- connections -------------------------------------------------------------------------

    def _connect(self, dn: str | None, password: str | None) -> tuple[Any, bool]:
        """A connection to the first server that answers, bound as ``dn`` (anonymous when
        None): (the connection, whether the bind succeeded). Raises DirectoryUnavailable when
        no server answers, DirectoryError for a bind refused for another reason than the
        credentials."""
        ldap3 = self._ldap3
        problems = []
        for server in self._servers:
            conn = ldap3.Connection(
                server,
                user=dn,
                password=password,
                authentication=ldap3.SIMPLE if dn else ldap3.ANONYMOUS,
                read_only=True,
                receive_timeout=max(1, math.ceil(self.settings.timeout)),  # whole seconds
                raise_exceptions=False,
                auto_referrals=False,
            )
            try:
                conn.open()
                if self.settings.start_tls and not server.ssl and not conn.start_tls():
                    raise DirectoryUnavailable(
                        f"{server.name} refused StartTLS: {conn.result.get('description')}"
                    )
                bound = conn.bind()
            except ldap3.core.exceptions.LDAPException as e:
                _close(conn)
                problems.append(f"{server.name}: {_reason(e)}")
                continue
            except DirectoryUnavailable as e:
                _close(conn)
                problems.append(str(e))
                continue
            if bound:
                return conn, True
            code = conn.result.get("result")
            if code in REFUSED_BINDS:
                _close(conn)
                return None, False
            description = conn.result.get("description") or code
            message = conn.result.get("message") or ""
            _close(conn)
            if code is None:  # no answer: the server went away
                problems.append(f"{server.name}: no answer to the bind")
                continue
            raise DirectoryError(
                f"the directory refused the bind of {dn or 'an anonymous user'}: "
                f"{description} {message}".strip()
            )
        raise DirectoryUnavailable(
            "the directory (auth.ldap.servers) cannot be reached: " + "; ".join(problems)
        )

    def _service(self) -> Any:
        """A connection bound as the service account (anonymous without one)."""
        if not self.settings.bind_dn:
            conn, _ = self._connect(None, None)
            return conn
        conn, bound = self._connect(self.settings.bind_dn, self._bind_password)
        if not bound:
            raise DirectoryError(
                "the directory refused the service account auth.ldap.bind_dn "
                f"({self.settings.bind_dn}): check it and auth.ldap.bind_password"
            )
        return conn

    # --- what callers use --------------------------------------------------------------------

    def authenticate(self, username: str, password: str) -> DirectoryUser | None:
        """The user, if the directory accepts this name and password; None otherwise (an
        unknown name and a wrong password alike). Never sends an empty password."""
        if not _plausible(username) or not isinstance(password, str):
            return None
        if not password or len(password) > MAX_PASSWORD or "\0" in password:
            return None
        s = self.settings
        attributes = self._attributes()
        if s.search_mode:
            service = self._service()
            try:
                entry = self._find(service, username, attributes)
                if entry is None:
                    return None
                user, bound = self._connect(entry["dn"], password)
                if not bound:
                    return None
                try:
                    reader = service if s.bind_dn else user
                    return self._user(reader, entry, username)
                finally:
                    _close(user)
            finally:
                _close(service)
        dn = s.user_dn_template.replace("{username}", self._escape_rdn(username))
        user, bound = self._connect(dn, password)
        if not bound:
            return None
        try:
            entry = self._read(user, dn, attributes) or {"dn": dn, "attributes": {}}
            return self._user(user, entry, username)
        finally:
            _close(user)

    def lookup(self, username: str, dn: str | None = None) -> DirectoryUser | None:
        """The user as the directory shows them now (for a re-check, with the service
        account): None when there is no such entry any more."""
        if not _plausible(username):
            return None
        s = self.settings
        service = self._service()
        try:
            attributes = self._attributes()
            if s.search_mode:
                entry = self._find(service, username, attributes)
            else:
                dn = dn or s.user_dn_template.replace("{username}", self._escape_rdn(username))
                entry = self._read(service, dn, attributes)
            if entry is None:
                return None
            return self._user(service, entry, username)
        finally:
            _close(service)

    # --- reading -----------------------------------------------------------------------------

    def _attributes(self) -> list[str]:
        names = [self.settings.username_attribute]
        if self.settings.group_attribute:
            names.append(self.settings.group_attribute)
        return names

    def _escape_filter(self, value: str) -> str:
        return self._ldap3.utils.conv.escape_filter_chars(value)

    def _escape_rdn(self, value: str) -> str:
        return self._ldap3.utils.dn.escape_rdn(value)

    def _search(self, conn: Any, base: str, query: str, scope: str, attributes: list[str]) -> Any:
        try:
            conn.search(base, query, search_scope=scope, attributes=attributes, size_limit=50)
        except self._ldap3.core.exceptions.LDAPException as e:
            raise DirectoryUnavailable(f"the directory failed a search: {_reason(e)}") from None
        code = conn.result.get("result")
        if code == NO_SUCH_OBJECT:
            return []
        if code not in (0, 4):  # success; size limit exceeded (the entries are still read)
            description = conn.result.get("description") or code
            raise DirectoryError(f"the directory refused a search under {base}: {description}")
        return [e for e in conn.response or () if e.get("type") == "searchResEntry"]

    def _find(self, conn: Any, username: str, attributes: list[str]) -> dict[str, Any] | None:
        s = self.settings
        query = s.user_filter.replace("{username}", self._escape_filter(username))
        entries = self._search(conn, s.base_dn, query, self._ldap3.SUBTREE, attributes)
        if len(entries) > 1:
            raise DirectoryError(
                f"auth.ldap.user_filter {s.user_filter} finds {len(entries)} entries for one "
                "name under auth.ldap.base_dn: make it match one user"
            )
        return entries[0] if entries else None

    def _read(self, conn: Any, dn: str, attributes: list[str]) -> dict[str, Any] | None:
        entries = self._search(conn, dn, "(objectClass=*)", self._ldap3.BASE, attributes)
        return entries[0] if entries else None

    def _user(self, conn: Any, entry: dict[str, Any], username: str) -> DirectoryUser:
        s = self.settings
        attributes = entry.get("attributes") or {}
        names = _values(attributes, s.username_attribute)
        name = next((n for n in names if n.lower() == username.lower()), None)
        name = name or (names[0] if len(names) == 1 else username)
        groups: list[str] = []
        if s.group_attribute:
            for dn in _values(attributes, s.group_attribute):
                groups.extend([dn, _first_value(dn)])
        if s.group_base_dn:
            query = s.group_filter.replace("{user_dn}", self._escape_filter(entry["dn"])).replace(
                "{username}", self._escape_filter(name)
            )
            found = self._search(
                conn, s.group_base_dn, query, self._ldap3.SUBTREE, [s.group_name_attribute]
            )
            for group in found:
                groups.append(group["dn"])
                groups.extend(_values(group.get("attributes") or {}, s.group_name_attribute))
        groups = list(dict.fromkeys(g for g in groups if g))
        role = role_for(groups, s.role_map)
        mapped = tuple(g for g in groups if role_for([g], s.role_map))
        return DirectoryUser(entry["dn"], name, tuple(groups), role, mapped)


def _plausible(username: Any) -> bool:
    return (
        isinstance(username, str)
        and 0 < len(username) <= MAX_NAME
        and username == username.strip()
        and all(ord(c) >= 32 and ord(c) != 127 for c in username)
    )


def _values(attributes: dict[str, Any], name: str) -> list[str]:
    """An attribute's values as text (attribute names compared without regard to case)."""
    for key, value in attributes.items():
        if key.lower() == name.lower():
            values = value if isinstance(value, list) else [value]
            return [v for v in values if isinstance(v, str) and v]
    return []


def _first_value(dn: str) -> str:
    """``ops`` of ``cn=ops,ou=groups,dc=example,dc=org``."""
    first = dn.split(",", 1)[0]
    return first.partition("=")[2].strip()


def _close(conn: Any) -> None:
    """Unbind and close, whatever state the connection is in."""
    try:
        conn.unbind()
    except Exception:
        pass


def _reason(error: Exception) -> str:
    """What went wrong in words: ldap3 wraps the cause in tuples of one string."""
    text: Any = error
    for _ in range(10):
        if isinstance(text, BaseException) and text.args:
            text = text.args[0]
        elif isinstance(text, tuple) and len(text) == 1:
            text = text[0]
        else:
            break
    text = str(text) or type(error).__name__
    text = re.sub(r"""^\(\s*["'](.*)["'],?\s*\)$""", r"\1", text)  # "('...',)" as ldap3 says it
    return text if len(text) <= 300 else text[:297] + "..."

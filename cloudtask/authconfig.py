"""The ``auth`` section of the configuration: login through an LDAP directory
(``auth.ldap``) and through an OpenID Connect provider (``auth.oidc``).

Both are off while their object is empty (the default). Each key is checked when the
configuration is read; a bad value names its key (``auth.ldap.servers[1]: ...``). The checked
object is kept as a plain dict with every key filled in (so ``cloudtask up`` hands it to its
children as JSON), and read back as :class:`LdapSettings` / :class:`OidcSettings`.

Passwords never stand in the configuration in clear: ``auth.ldap.bind_password`` and
``auth.oidc.client_secret`` are references, ``env:VARIABLE`` or ``file:/path/to/file`` (as
``secrets.keys``), read by :func:`read_secret` when the web site starts.

Example::

    "auth": {
      "ldap": {
        "servers": ["ldaps://ldap1.example.org", "ldaps://ldap2.example.org"],
        "bind_dn": "cn=cloudtask,ou=services,dc=example,dc=org",
        "bind_password": "env:CLOUDTASK_LDAP_PASSWORD",
        "base_dn": "ou=people,dc=example,dc=org",
        "user_filter": "(uid={username})",
        "group_base_dn": "ou=groups,dc=example,dc=org",
        "role_map": {"cloudtask-admins": "admin", "cloudtask-operators": "operator"}
      },
      "oidc": {
        "name": "Example SSO",
        "issuer": "https://sso.example.org/realms/main",
        "client_id": "cloudtask",
        "client_secret": "file:/etc/cloudtask/oidc-secret",
        "groups_claim": "groups",
        "role_map": {"cloudtask-admins": "admin", "cloudtask-viewers": "viewer"}
      }
    }
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .durations import parse_duration
from .exceptions import ConfigError

ROLES = ("admin", "operator", "viewer")  # the same as cloudtask.users.ROLES
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
SECRET_FORMS = "'env:VARIABLE' or 'file:/path/to/file'"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CLAIM = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
DEFAULT_GROUP_FILTER = "(|(member={user_dn})(uniqueMember={user_dn})(memberUid={username}))"


class SubkeyError(ValueError):
    """A bad value inside the object: ``subpath`` (``.servers[1]``) says where (the config
    reader puts it after the section's key)."""

    def __init__(self, subpath: str, message: str) -> None:
        super().__init__(message)
        self.subpath = subpath


@dataclass(frozen=True)
class LdapSettings:
    """``auth.ldap``, checked (see the README's table for each key)."""

    servers: tuple[str, ...] = ()
    start_tls: bool = False
    ca_file: str = ""
    tls_verify: bool = True
    allow_plaintext: bool = False
    user_dn_template: str = ""
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)  # a reference: env: or file:
    base_dn: str = ""
    user_filter: str = "(uid={username})"
    username_attribute: str = "uid"
    group_attribute: str = ""
    group_base_dn: str = ""
    group_filter: str = DEFAULT_GROUP_FILTER
    group_name_attribute: str = "cn"
    role_map: dict[str, str] = field(default_factory=dict)
    timeout: float = 5.0
    recheck_interval: float = 15 * 60.0

    @property
    def search_mode(self) -> bool:
        """Users are found by a search (else their DN is ``user_dn_template``)."""
        return not self.user_dn_template


@dataclass(frozen=True)
class OidcSettings:
    """``auth.oidc``, checked (see the README's table for each key)."""

    name: str = "single sign-on"
    issuer: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)  # a reference: env: or file:
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    username_claim: str = "preferred_username"
    groups_claim: str = "groups"
    role_map: dict[str, str] = field(default_factory=dict)
    token_auth_method: str = "client_secret_basic"
    timeout: float = 10.0


@dataclass(frozen=True)
class AuthConfig:
    """The ``auth`` section: each object empty (off) by default."""

    ldap: dict[str, Any] = field(default_factory=dict)
    oidc: dict[str, Any] = field(default_factory=dict)


# --- reading the checked objects back ---------------------------------------------------------


def ldap_settings(value: Mapping[str, Any] | None) -> LdapSettings | None:
    """The checked ``auth.ldap`` object as settings, or None when LDAP login is off."""
    if not value:
        return None
    return LdapSettings(**_settings_of(LdapSettings, value))


def oidc_settings(value: Mapping[str, Any] | None) -> OidcSettings | None:
    """The checked ``auth.oidc`` object as settings, or None when OpenID Connect is off."""
    if not value:
        return None
    return OidcSettings(**_settings_of(OidcSettings, value))


def _settings_of(cls: type, value: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    out = {k: v for k, v in value.items() if k in names}
    for key in ("servers", "scopes"):
        if key in out:
            out[key] = tuple(out[key])
    return out


def read_secret(reference: str, key: str, environ: Mapping[str, str] | None = None) -> str:
    """The secret a reference names (``env:VARIABLE`` or ``file:/path``; one line, trailing
    whitespace dropped). Raises :class:`ConfigError` naming ``key`` when the variable is not
    set or the file cannot be read (the value itself is never shown)."""
    environ = os.environ if environ is None else environ
    kind, _, rest = reference.partition(":")
    if kind == "env":
        if rest not in environ:
            raise ConfigError(f"{key} names the environment variable {rest}, which is not set")
        text = environ[rest]
    elif kind == "file":
        try:
            text = Path(rest).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {rest}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{key}: {rest} is not UTF-8 text") from None
    else:
        raise ConfigError(f"{key}: expected {SECRET_FORMS}")
    text = text.strip()
    if not text:
        raise ConfigError(f"{key}: {reference} holds an empty value")
    return text


def role_for(names: Any, role_map: Mapping[str, str]) -> str | None:
    """The highest role ``role_map`` gives any of ``names`` (groups or claim values; compared
    without regard to case, and DNs without regard to spaces after commas), or None."""
    wanted = {_fold(k): v for k, v in role_map.items()}
    best: str | None = None
    for name in names or ():
        role = wanted.get(_fold(name)) if isinstance(name, str) else None
        if role and (best is None or ROLE_RANK[role] > ROLE_RANK[best]):
            best = role
    return best


def _fold(name: str) -> str:
    return re.sub(r"\s*([,=])\s*", r"\1", name.strip()).lower()


# --- the checks -----------------------------------------------------------------------------


def _show(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _object(v: Any, what: str) -> dict[str, Any]:
    if isinstance(v, str) and v.strip()[:1] == "{":  # from the environment
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"expected {what} as JSON: {e.msg} at column {e.colno}") from None
    if v is None or v == "":
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"expected {what}, got {_show(v)}")
    return {k: x for k, x in v.items() if k != "$comment"}


def _text(key: str, v: Any, *, required: bool = False) -> str:
    if not isinstance(v, str):
        raise SubkeyError(f".{key}", f"expected a string, got {_show(v)}")
    if required and not v.strip():
        raise SubkeyError(f".{key}", "required")
    if any(c in v for c in "\r\n\0"):
        raise SubkeyError(f".{key}", "must be one line")
    return v.strip()


def _flag(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise SubkeyError(f".{key}", f"expected true or false, got {_show(v)}")


def _duration(key: str, v: Any, lo: float, hi: float) -> float:
    try:
        seconds = parse_duration(v)
    except ValueError as e:
        raise SubkeyError(f".{key}", f"expected a duration such as '10s': {e}") from None
    if not lo <= seconds <= hi:
        raise SubkeyError(f".{key}", f"expected a duration from {lo:g}s to {hi:g}s, got {v!r}")
    return seconds


def _reference(key: str, v: Any) -> str:
    v = _text(key, v)
    if not v:
        return v
    kind, _, rest = v.partition(":")
    if (kind == "env" and _ENV_NAME.fullmatch(rest)) or (kind == "file" and rest.strip()):
        return v
    raise SubkeyError(
        f".{key}", f"expected {SECRET_FORMS} (a password never stands in the config in clear)"
    )


def _role_map(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not v:
        raise SubkeyError(
            ".role_map",
            "required: an object of group names (or claim values) to roles, such as "
            '{"cloudtask-admins": "admin", "cloudtask-operators": "operator"}',
        )
    out: dict[str, str] = {}
    for name, role in v.items():
        if not name.strip():
            raise SubkeyError(".role_map", "a group name must not be empty")
        if role not in ROLES:
            raise SubkeyError(
                f".role_map.{name}", f"expected one of {', '.join(ROLES)}, got {_show(role)}"
            )
        out[name.strip()] = role
    return out


def _unknown(given: dict[str, Any], cls: type) -> None:
    known = [f.name for f in fields(cls)]
    for key in given:
        if key not in known:
            raise SubkeyError(f".{key}", f"unknown key; expected one of {', '.join(known)}")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ldap_servers(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [p.strip() for p in v.split(",") if p.strip()]
    if not isinstance(v, list) or not v:
        raise SubkeyError(
            ".servers", "required: a list of ldap:// or ldaps:// URLs, such as ['ldaps://ldap1']"
        )
    out = []
    for i, url in enumerate(v):
        try:
            parts = urlsplit(url.strip()) if isinstance(url, str) else None
            ok = parts is not None and parts.scheme in ("ldap", "ldaps") and bool(parts.hostname)
            _ = parts.port if parts is not None else None  # a bad port raises ValueError
        except ValueError:
            ok = False
        if not ok or parts is None or parts.path not in ("", "/") or parts.query:
            raise SubkeyError(
                f".servers[{i}]",
                f"expected ldap://host[:port] or ldaps://host[:port], got {_show(url)}",
            )
        out.append(url.strip())
    return tuple(out)


def check_ldap(v: Any) -> dict[str, Any]:
    """The config check of ``auth.ldap``: {} (off), or every key checked and filled in."""
    given = _object(v, "an object (see README: auth.ldap)")
    if not given:
        return {}
    _unknown(given, LdapSettings)
    d = LdapSettings()
    out: dict[str, Any] = {}
    out["servers"] = list(_ldap_servers(given.get("servers")))
    out["start_tls"] = _flag("start_tls", given.get("start_tls", d.start_tls))
    out["ca_file"] = _text("ca_file", given.get("ca_file", d.ca_file))
    out["tls_verify"] = _flag("tls_verify", given.get("tls_verify", d.tls_verify))
    out["allow_plaintext"] = _flag("allow_plaintext", given.get("allow_plaintext", False))
    for i, url in enumerate(out["servers"]):
        parts = urlsplit(url)
        plain = parts.scheme == "ldap" and not out["start_tls"]
        if plain and not out["allow_plaintext"] and not is_loopback(parts.hostname):
            raise SubkeyError(
                f".servers[{i}]",
                f"{url} would carry passwords in clear: use ldaps://, set start_tls, or set "
                "allow_plaintext to true if the network is trusted",
            )
    template = _text("user_dn_template", given.get("user_dn_template", ""))
    if template and "{username}" not in template:
        raise SubkeyError(
            ".user_dn_template",
            "must contain {username}, such as 'uid={username},ou=people,dc=example,dc=org'",
        )
    out["user_dn_template"] = template
    out["bind_dn"] = _text("bind_dn", given.get("bind_dn", ""))
    out["bind_password"] = _reference("bind_password", given.get("bind_password", ""))
    if out["bind_dn"] and not out["bind_password"]:
        raise SubkeyError(".bind_password", f"required with bind_dn: {SECRET_FORMS}")
    if out["bind_password"] and not out["bind_dn"]:
        raise SubkeyError(".bind_dn", "required with bind_password: the DN to bind as")
    out["base_dn"] = _text("base_dn", given.get("base_dn", ""))
    if not template and not out["base_dn"]:
        raise SubkeyError(
            ".base_dn",
            "required to search for users (or give user_dn_template to bind without a search)",
        )
    out["user_filter"] = _text("user_filter", given.get("user_filter", d.user_filter))
    if "{username}" not in out["user_filter"] or not out["user_filter"].startswith("("):
        raise SubkeyError(
            ".user_filter", "expected an LDAP filter with {username}, such as '(uid={username})'"
        )
    out["username_attribute"] = _text(
        "username_attribute", given.get("username_attribute", d.username_attribute)
    )
    out["group_attribute"] = _text("group_attribute", given.get("group_attribute", ""))
    out["group_base_dn"] = _text("group_base_dn", given.get("group_base_dn", ""))
    if not out["group_attribute"] and not out["group_base_dn"]:
        raise SubkeyError(
            ".group_base_dn",
            "give group_base_dn (groups are searched there) or group_attribute (such as "
            "memberOf: the user's entry lists its groups)",
        )
    out["group_filter"] = _text("group_filter", given.get("group_filter", d.group_filter))
    if not out["group_filter"].startswith("(") or not (
        "{user_dn}" in out["group_filter"] or "{username}" in out["group_filter"]
    ):
        raise SubkeyError(
            ".group_filter",
            "expected an LDAP filter with {user_dn} or {username}, such as '(member={user_dn})'",
        )
    out["group_name_attribute"] = _text(
        "group_name_attribute", given.get("group_name_attribute", d.group_name_attribute)
    )
    out["role_map"] = _role_map(given.get("role_map"))
    out["timeout"] = _duration("timeout", given.get("timeout", d.timeout), 0.5, 120)
    out["recheck_interval"] = _duration(
        "recheck_interval", given.get("recheck_interval", d.recheck_interval), 0, 7 * 86400
    )
    if out["recheck_interval"] and 0 < out["recheck_interval"] < 10:
        raise SubkeyError(".recheck_interval", "expected 0 (only at login) or at least 10s")
    return out


def check_oidc(v: Any) -> dict[str, Any]:
    """The config check of ``auth.oidc``: {} (off), or every key checked and filled in."""
    given = _object(v, "an object (see README: auth.oidc)")
    if not given:
        return {}
    _unknown(given, OidcSettings)
    d = OidcSettings()
    out: dict[str, Any] = {}
    out["name"] = _text("name", given.get("name", d.name)) or d.name
    if len(out["name"]) > 64:
        raise SubkeyError(".name", "at most 64 characters (it is shown on the login button)")
    issuer = _text("issuer", given.get("issuer", ""), required=True)
    try:
        parts = urlsplit(issuer)
        host = parts.hostname
    except ValueError:
        parts, host = None, None
    if parts is None or parts.scheme not in ("https", "http") or not host or parts.query:
        raise SubkeyError(".issuer", f"expected the provider's https:// URL, got {_show(issuer)}")
    if parts.scheme == "http" and not is_loopback(host):
        raise SubkeyError(".issuer", "expected https:// (http:// only for localhost)")
    out["issuer"] = issuer
    out["client_id"] = _text("client_id", given.get("client_id", ""), required=True)
    out["client_secret"] = _reference("client_secret", given.get("client_secret", ""))
    scopes = given.get("scopes", list(d.scopes))
    if isinstance(scopes, str):
        scopes = scopes.replace(",", " ").split()
    if not isinstance(scopes, list) or not all(
        isinstance(s, str) and s and not any(c.isspace() for c in s) for s in scopes
    ):
        raise SubkeyError(".scopes", f"expected a list of scope names, got {_show(scopes)}")
    out["scopes"] = ["openid"] + [s for s in dict.fromkeys(scopes) if s != "openid"]
    for key in ("username_claim", "groups_claim"):
        value = _text(key, given.get(key, getattr(d, key)), required=True)
        if not _CLAIM.fullmatch(value):
            raise SubkeyError(f".{key}", f"expected the name of a claim, got {_show(value)}")
        out[key] = value
    out["role_map"] = _role_map(given.get("role_map"))
    methods = ("client_secret_basic", "client_secret_post", "none")
    default_method = d.token_auth_method if out["client_secret"] else "none"
    method = given.get("token_auth_method", default_method)
    if method not in methods:
        raise SubkeyError(
            ".token_auth_method", f"expected one of {', '.join(methods)}, got {_show(method)}"
        )
    if method != "none" and not out["client_secret"]:
        raise SubkeyError(".client_secret", f"required with {method}: {SECRET_FORMS}")
    out["token_auth_method"] = method
    out["timeout"] = _duration("timeout", given.get("timeout", d.timeout), 0.5, 120)
    return out

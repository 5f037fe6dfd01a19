"""Configuration: a JSON file, then environment variables, each key checked against a schema.

The file has sections (``zookeeper``, ``mongodb``, ``agent``, ``center``, ``runs``, ``web``, ``alerts``,
``security``, ``secrets``, ``auth``); every key is optional and has a default. An environment variable ``CLOUDTASK_<SECTION>_<KEY>``
overrides a key (``CLOUDTASK_ZK_*`` and ``CLOUDTASK_MONGO_*`` are short forms of the first two
sections); lists and objects are given to it as JSON (a list of addresses also as "a, b").

Example::

    cfg = load_config("conf/cloudtask.json")
    cfg.mongodb.uri, cfg.agent.max_parallel
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .authconfig import AuthConfig, check_ldap, check_oidc
from .durations import parse_duration
from .events import KINDS as EVENT_KINDS
from .exceptions import ConfigError
from .netpolicy import check_networks
from .secretbox import check_setting as secretbox_setting
from .task import SECRET_NAME_PATTERN, SECRET_NAME_RULE
from .taskenv import check_env_allow, check_run_as, check_run_as_allowed
from .zkauth import check_setting as check_zk_auth

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_EMAIL = re.compile(r"[^@\s,;<>\"]+@[^@\s,;<>\"]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

SMTP_SECURITY = ("starttls", "ssl", "none")


@dataclass(frozen=True)
class ZooKeeperConfig:
    hosts: str = ""  # empty: `cloudtask up` starts an embedded server
    root: str = "/cloudtask"
    session_timeout: float = 10.0
    # digest credential of every client: "user:password", "env:VARIABLE" or "file:/path"
    # (see cloudtask/zkauth.py); empty: nodes get open ACLs (the embedded single-machine mode)
    auth: str = field(default="", repr=False)


@dataclass(frozen=True)
class MongoConfig:
    uri: str = ""  # empty: `cloudtask up` starts an embedded server
    database: str = "cloudtask"
    # write concern of run claims and their state changes: "auto" (majority on a replica set,
    # else the server's default), "majority", or a number of members
    claim_write_concern: str = "auto"


@dataclass(frozen=True)
class AgentConfig:
    id: str = ""  # empty: generated once and kept in <data_dir>/agent-id
    group: str = "default"
    weight: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    max_parallel: int = 16
    data_dir: str = ".cloudtask/agent"
    log_dir: str = ""  # empty: <data_dir>/logs
    log_retention_days: int = 14
    kill_grace: float = 5.0
    poll_interval: float = 2.0  # standalone mode: how often tasks are re-read from MongoDB
    # schedule fires are claimed this long before they are due (0: at the due time); see
    # agent/armed.py
    claim_ahead: float = 2.0
    # what tasks get of the agent's environment beyond PATH, HOME, LANG, LC_*, TZ, TMPDIR,
    # USER, LOGNAME, SHELL: names or '*' patterns, never CLOUDTASK_* (cloudtask/taskenv.py)
    env_allow: tuple[str, ...] = ()
    run_as: str = ""  # the user[:group] tasks run as when the agent is root; '': its own
    run_as_allowed: tuple[str, ...] = ()  # users a task may name in run_as ('*': any but root)
    # the Docker engine of container tasks: unix://, tcp://, npipe:// or ssh:// ('': the
    # agent's DOCKER_HOST, else the engine's default socket); see cloudtask/agent/container.py
    docker_host: str = ""
    # the agent's Prometheus metrics at http://metrics_host:metrics_port/metrics (0: none)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0


@dataclass(frozen=True)
class CenterConfig:
    # the center's Prometheus metrics at http://metrics_host:metrics_port/metrics (0: none)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0


@dataclass(frozen=True)
class RunsConfig:
    retention_days: int = 90


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    secret_key: str = ""  # empty: generated once and kept in <data_dir>/secret-key
    data_dir: str = ".cloudtask/web"
    max_upload_bytes: int = 50 * 1024 * 1024  # task files (scripts, binaries, archives)
    file_versions_kept: int = 20  # per file name; older versions are deleted unless pinned
    base_url: str = ""  # how users reach the site, for links in mail (empty: http://host:port)
    # sessions (kept in MongoDB): end after this long unused, and this long after the login
    session_idle_timeout: float = 12 * 3600.0
    session_max_age: float = 7 * 86400.0
    secure_cookies: bool | None = None  # the cookie's Secure flag; None: when base_url is https
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-For is believed


@dataclass(frozen=True)
class AlertsConfig:
    """Mail and webhooks for events (the notifier of the leading center). Settings stored in
    MongoDB (the settings page) override these; see cloudtask/notify/settings.py."""

    smtp_host: str = ""  # empty: no mail
    smtp_port: int = 587
    smtp_security: str = "starttls"  # starttls | ssl | none
    smtp_user: str = ""  # empty: no login
    smtp_password: str = ""
    smtp_password_env: str = ""  # the name of an environment variable holding the password
    smtp_password_secret: str = ""  # the name of a stored secret holding it (cloudtask secrets)
    smtp_timeout: float = 20.0  # every SMTP network call
    mail_from: str = ""  # empty: cloudtask@<this host>
    operators: tuple[str, ...] = ()  # mailed what went wrong (events.OPERATOR_KINDS)
    operators_by_kind: dict[str, tuple[str, ...]] = field(default_factory=dict)
    operators_by_group: dict[str, tuple[str, ...]] = field(default_factory=dict)
    alert_interval: float = 15 * 60.0  # a failing task mails at most one digest this often
    # {"url" or "url_secret", "secret" or "secret_secret", "kinds": None | (...)}; a *_secret
    # key names a stored secret holding that value (a Slack-style URL is itself a secret)
    webhooks: tuple[dict[str, Any], ...] = ()
    webhook_timeout: float = 10.0


DEFAULT_SMTP_ENV_PREFIX = "CLOUDTASK_SMTP_"


@dataclass(frozen=True)
class SecurityConfig:
    """What admins of the web site cannot change (the file and the environment only)."""

    # alerts.smtp_password_env may only name a variable starting with this ("": any)
    smtp_password_env_prefix: str = DEFAULT_SMTP_ENV_PREFIX
    # on: webhooks, SMTP and HTTP tasks may not connect to the cloud metadata addresses nor to
    # egress_deny (cloudtask/netpolicy.py)
    egress_filter: bool = False
    egress_deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecretsConfig:
    """Where the key ring of the stored secrets is (cloudtask/secretbox.py): 'file:/path' or
    'env:VARIABLE'; empty: this process opens no secret (tasks that use one fail to start)."""

    keys: str = ""


@dataclass(frozen=True)
class Config:
    zookeeper: ZooKeeperConfig = field(default_factory=ZooKeeperConfig)
    mongodb: MongoConfig = field(default_factory=MongoConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    center: CenterConfig = field(default_factory=CenterConfig)
    runs: RunsConfig = field(default_factory=RunsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)  # LDAP and OpenID Connect login
    source: str = "defaults"

    def with_section(self, name: str, **changes: Any) -> Config:
        """A copy with some keys of one section changed (used by `cloudtask up` and tests)."""
        return replace(self, **{name: replace(getattr(self, name), **changes)})


# ``cloudtask up`` runs its processes on config files it writes into its data dir at each
# start; this variable names, for them, the file those were made from: the one to edit
CONFIG_ORIGIN_VAR = "CLOUDTASK_CONFIG_ORIGIN"


def config_origin(cfg: Config, environ: Mapping[str, str] | None = None) -> str:
    """The config file an operator edits to change ``cfg``: its own file, or the one
    ``cloudtask up`` made it from ("defaults" when there was none)."""
    environ = os.environ if environ is None else environ
    return environ.get(CONFIG_ORIGIN_VAR) or cfg.source


# --- value checkers: each returns the converted value or raises ValueError("expected ...") ---


class SubkeyError(ValueError):
    """A bad value inside a list or an object: ``subpath`` (``[1].url``) says where."""

    def __init__(self, subpath: str, message: str) -> None:
        super().__init__(message)
        self.subpath = subpath


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {json.dumps(v)}")
    return v


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected a whole number from {lo} to {hi}, got {json.dumps(v)}")
        if not lo <= v <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}, got {v}")
        return v

    return check


def _duration_range(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        try:
            seconds = parse_duration(v)
        except ValueError as e:
            raise ValueError(f"expected a duration such as '10s': {e}") from None
        if not lo <= seconds <= hi:
            raise ValueError(f"expected a duration from {lo:g}s to {hi:g}s, got {v!r}")
        return seconds

    return check


def _zk_root(v: Any) -> str:
    v = _string(v)
    if not v.startswith("/") or (len(v) > 1 and v.endswith("/")) or "//" in v:
        raise ValueError(f"expected an absolute ZooKeeper path such as '/cloudtask', got {v!r}")
    return v


def _mongo_uri(v: Any) -> str:
    v = _string(v)
    if v and not v.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError(f"expected a URI starting with mongodb:// or mongodb+srv://, got {v!r}")
    return v


def _identifier(allow_empty: bool) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        v = _string(v)
        if (v or not allow_empty) and not _ID.match(v):
            raise ValueError(
                f"expected letters, digits, '.', '_' or '-' (starting with a letter or digit), got {v!r}"
            )
        return v

    return check


def _docker_host(v: Any) -> str:
    v = _string(v).strip()
    if v and not re.fullmatch(r"(unix|npipe|tcp|ssh|http|https)://\S+", v):
        raise ValueError(
            "expected an engine address such as unix:///var/run/docker.sock, "
            f"tcp://host:2376, npipe:////./pipe/docker_engine or ssh://user@host, got {v!r}"
        )
    return v


def _labels(v: Any) -> dict[str, str]:
    if isinstance(v, str):  # from the environment: "k=v,k2=v2"
        pairs = [p for p in v.split(",") if p.strip()]
        if any("=" not in p for p in pairs):
            raise ValueError(f"expected key=value pairs separated by commas, got {v!r}")
        return {k.strip(): val.strip() for k, val in (p.split("=", 1) for p in pairs)}
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise ValueError(f"expected an object of string values, got {json.dumps(v)}")
    return dict(v)


_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _listen_host(v: Any) -> str:
    """An address to listen on: an IP address (``0.0.0.0``: every interface) or a host name."""
    import ipaddress

    v = _string(v).strip()
    try:
        return str(ipaddress.ip_address(v.strip("[]")))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(v) or len(v) > 253:
        raise ValueError(
            f"expected an address to listen on such as 127.0.0.1, 0.0.0.0 or a host name, got {v!r}"
        )
    return v


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {json.dumps(v)}")
        return str(v)

    return check


def _write_concern(v: Any) -> str:
    text = str(v).strip() if isinstance(v, (str, int)) and not isinstance(v, bool) else ""
    if text in ("auto", "majority") or (text.isdigit() and 1 <= int(text) <= 50):
        return text
    raise ValueError(f'expected "auto", "majority" or a number of members (1-50), got {v!r}')


def _bool_or_auto(v: Any) -> bool | None:
    """true, false, or null / "auto" (decided from other keys); from the environment also
    1/0, yes/no, on/off."""
    if v is None or isinstance(v, bool):
        return v
    text = str(v).strip().lower() if isinstance(v, str) else None
    if text in ("auto", ""):
        return None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f'expected true, false or "auto", got {json.dumps(v)}')


def _networks(v: Any) -> tuple[str, ...]:
    """IP addresses and networks (``10.0.0.1``, ``10.0.0.0/8``, ``::1``); from the
    environment also "a, b"."""
    import ipaddress

    v = _from_json_text(v, "a list of addresses or networks")
    if isinstance(v, str):
        v = [p.strip() for p in v.split(",") if p.strip()]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"expected a list of IP addresses or networks, got {json.dumps(v)}")
    out: list[str] = []
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise SubkeyError(f"[{i}]", f"expected a string, got {json.dumps(item)}")
        try:
            out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise SubkeyError(
                f"[{i}]", f"expected an IP address or network such as 10.0.0.0/8, got {item!r}"
            ) from None
    return tuple(out)


def _env_name(v: Any) -> str:
    v = _string(v)
    if v and not _ENV_NAME.fullmatch(v):
        raise ValueError(
            f"expected the name of an environment variable (letters, digits, '_'), got {v!r}"
        )
    return v


def _secret_name(v: Any) -> str:
    """The name of a stored secret (empty: none)."""
    v = _string(v)
    if v and not SECRET_NAME_PATTERN.fullmatch(v):
        raise ValueError(f"expected the name of a stored secret ({SECRET_NAME_RULE}), got {v!r}")
    return v


def _on_off(v: Any) -> bool:
    """true or false; from the environment also 1/0, yes/no, on/off."""
    if isinstance(v, bool):
        return v
    text = v.strip().lower() if isinstance(v, str) else None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {json.dumps(v)}")


def _env_prefix(v: Any) -> str:
    v = _string(v)
    if v and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        raise ValueError(f"expected the start of a variable name (letters, digits, '_'), got {v!r}")
    return v


def email_problem(v: Any) -> str | None:
    """Why ``v`` is not one plain email address (``name@example.com``), or None."""
    if not isinstance(v, str):
        return f"expected an email address, got {json.dumps(v)}"
    if not _EMAIL.fullmatch(v) or len(v) > 254:
        return f"{v!r} is not an email address such as ops@example.com"
    return None


def _mail_from(v: Any) -> str:
    v = _string(v).strip()
    if not v:
        return ""
    if any(c in v for c in "\r\n\0"):
        raise ValueError("must be one line")
    name, address = parseaddr(v)
    if email_problem(address) or (not name and address != v):
        raise ValueError(
            f"expected an address such as 'cloudtask@example.com' or "
            f"'CloudTask <cloudtask@example.com>', got {v!r}"
        )
    return v


def _from_json_text(v: Any, what: str) -> Any:
    """Lists and objects given as text (an environment variable) are JSON."""
    if isinstance(v, str) and v.strip()[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"expected {what} as JSON: {e.msg} at column {e.colno}") from None
    return v


def _emails(v: Any, subpath: str = "") -> tuple[str, ...]:
    """A list of addresses; from the environment also "a@x.org, b@y.org"."""
    v = _from_json_text(v, "a list of email addresses")
    if isinstance(v, str):
        v = [p.strip() for p in v.split(",") if p.strip()]
    if not isinstance(v, list):
        raise SubkeyError(subpath, f"expected a list of email addresses, got {json.dumps(v)}")
    out: list[str] = []
    for i, item in enumerate(v):
        if problem := email_problem(item):
            raise SubkeyError(f"{subpath}[{i}]", problem)
        if item.lower() not in (o.lower() for o in out):
            out.append(item)
    return tuple(out)


def _emails_by(key_check: Callable[[str], str | None], what: str) -> Callable[[Any], Any]:
    def check(v: Any) -> dict[str, tuple[str, ...]]:
        v = _from_json_text(v, f"an object of {what} to lists of email addresses")
        if not isinstance(v, dict):
            raise ValueError(
                f"expected an object of {what} to lists of email addresses, got {json.dumps(v)}"
            )
        out: dict[str, tuple[str, ...]] = {}
        for key, emails in v.items():
            if problem := key_check(key):
                raise SubkeyError(f".{key}", problem)
            out[key] = _emails(emails, f".{key}")
        return out

    return check


def _kind_problem(kind: Any) -> str | None:
    if kind not in EVENT_KINDS:
        return f"{json.dumps(kind)} is not an event kind; expected one of {', '.join(EVENT_KINDS)}"
    return None


def _group_problem(group: Any) -> str | None:
    if not isinstance(group, str) or not _ID.match(group):
        return f"{json.dumps(group)} is not a group name (letters, digits, '.', '_', '-')"
    return None


def _show(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


_HOOK_KEYS = ("url", "url_secret", "secret", "secret_secret")


def _webhooks(v: Any) -> tuple[dict[str, Any], ...]:
    v = _from_json_text(v, "a list of webhooks")
    if not isinstance(v, list):
        raise ValueError(
            'expected a list of webhooks such as [{"url": "https://...", "secret": "..."}], '
            f"got {json.dumps(v)}"
        )
    out = []
    for i, hook in enumerate(v):
        at = f"[{i}]"
        if not isinstance(hook, dict):
            raise SubkeyError(at, f'expected an object {{"url", "secret"}}, got {_show(hook)}')
        for key in hook:
            if key not in (*_HOOK_KEYS, "kinds", "$comment"):
                raise SubkeyError(
                    f"{at}.{key}", f"unknown key; expected one of {', '.join(_HOOK_KEYS)}, kinds"
                )
        named = {}  # url, secret -> the stored secret holding it (a *_secret key)
        for key in ("url", "secret"):
            if key in hook and f"{key}_secret" in hook:
                raise SubkeyError(f"{at}.{key}_secret", f"give either {key} or {key}_secret")
            if f"{key}_secret" in hook:
                try:
                    named[key] = _secret_name(hook[f"{key}_secret"]) or None
                except ValueError as e:
                    raise SubkeyError(f"{at}.{key}_secret", str(e)) from None
        url = hook.get("url")
        if "url" not in named:
            try:
                parts = urlsplit(url) if isinstance(url, str) else None
                url_ok = parts is not None and parts.scheme in ("http", "https") and parts.hostname
            except ValueError:
                url_ok = False
            if not url_ok or any(c.isspace() for c in url):
                raise SubkeyError(f"{at}.url", f"expected an http:// or https:// URL, got {url!r}")
        secret = hook.get("secret")
        if "secret" not in named and (not isinstance(secret, str) or not secret):
            raise SubkeyError(
                f"{at}.secret",
                "required: the shared secret the receiver checks signatures with (or "
                "secret_secret: the name of a stored secret holding it)",
            )
        kinds = hook.get("kinds")
        if kinds is not None:
            if not isinstance(kinds, list):
                raise SubkeyError(
                    f"{at}.kinds", f"expected a list of event kinds, got {_show(kinds)}"
                )
            for j, kind in enumerate(kinds):
                if problem := _kind_problem(kind):
                    raise SubkeyError(f"{at}.kinds[{j}]", problem)
            kinds = tuple(dict.fromkeys(kinds))
        entry = {"url": url, "secret": secret, "kinds": kinds}
        for key, name in named.items():
            if name is None:
                raise SubkeyError(f"{at}.{key}_secret", "expected the name of a stored secret")
            del entry[key]
            entry[f"{key}_secret"] = name
        out.append(entry)
    return tuple(out)


# The checks of the alerts section, also used for the settings stored in MongoDB.
ALERTS_CHECKS: dict[str, Callable[[Any], Any]] = {
    "smtp_host": _string,
    "smtp_port": _int_range(1, 65535),
    "smtp_security": _choice(SMTP_SECURITY),
    "smtp_user": _string,
    "smtp_password": _string,
    "smtp_password_env": _env_name,
    "smtp_password_secret": _secret_name,
    "smtp_timeout": _duration_range(0.5, 300),
    "mail_from": _mail_from,
    "operators": _emails,
    "operators_by_kind": _emails_by(_kind_problem, "event kinds"),
    "operators_by_group": _emails_by(_group_problem, "agent groups"),
    "alert_interval": _duration_range(0, 7 * 86400),
    "webhooks": _webhooks,
    "webhook_timeout": _duration_range(0.1, 300),
}

_SECTIONS: dict[str, tuple[type, dict[str, Callable[[Any], Any]], tuple[str, ...]]] = {
    "zookeeper": (
        ZooKeeperConfig,
        {
            "hosts": _string,
            "root": _zk_root,
            "session_timeout": _duration_range(1, 600),
            "auth": check_zk_auth,
        },
        ("ZK", "ZOOKEEPER"),
    ),
    "mongodb": (
        MongoConfig,
        {
            "uri": _mongo_uri,
            "database": _identifier(allow_empty=False),
            "claim_write_concern": _write_concern,
        },
        ("MONGO", "MONGODB"),
    ),
    "agent": (
        AgentConfig,
        {
            "id": _identifier(allow_empty=True),
            "group": _identifier(allow_empty=False),
            "weight": _int_range(1, 1000),
            "labels": _labels,
            "max_parallel": _int_range(1, 10000),
            "data_dir": _string,
            "log_dir": _string,
            "log_retention_days": _int_range(1, 3650),
            "kill_grace": _duration_range(0, 600),
            "poll_interval": _duration_range(0.1, 3600),
            "claim_ahead": _duration_range(0, 30),
            "env_allow": check_env_allow,
            "run_as": check_run_as,
            "run_as_allowed": check_run_as_allowed,
            "docker_host": _docker_host,
            "metrics_host": _listen_host,
            "metrics_port": _int_range(0, 65535),
        },
        ("AGENT",),
    ),
    "center": (
        CenterConfig,
        {"metrics_host": _listen_host, "metrics_port": _int_range(0, 65535)},
        ("CENTER",),
    ),
    "runs": (RunsConfig, {"retention_days": _int_range(1, 36500)}, ("RUNS", "RUN")),
    "web": (
        WebConfig,
        {
            "host": _string,
            "port": _int_range(0, 65535),
            "secret_key": _string,
            "data_dir": _string,
            "max_upload_bytes": _int_range(1, 16 * 1024**3),
            "file_versions_kept": _int_range(1, 1000),
            "base_url": _string,
            "session_idle_timeout": _duration_range(60, 30 * 86400),
            "session_max_age": _duration_range(300, 365 * 86400),
            "secure_cookies": _bool_or_auto,
            "trusted_proxies": _networks,
        },
        ("WEB",),
    ),
    "alerts": (AlertsConfig, ALERTS_CHECKS, ("ALERTS",)),
    "security": (
        SecurityConfig,
        {
            "smtp_password_env_prefix": _env_prefix,
            "egress_filter": _on_off,
            "egress_deny": check_networks,
        },
        ("SECURITY",),
    ),
    "secrets": (SecretsConfig, {"keys": secretbox_setting}, ("SECRETS",)),
    "auth": (AuthConfig, {"ldap": check_ldap, "oidc": check_oidc}, ("AUTH",)),
}


def config_keys() -> dict[str, list[str]]:
    """Every section and its keys, for documentation and error messages."""
    return {name: list(spec[1]) for name, spec in _SECTIONS.items()}


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (optional), apply environment overrides, and check every value.

    Raises :class:`ConfigError` naming the file (or variable), the key and what is expected.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{source}: cannot read the config file: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text (byte {e.start}): {e.reason}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{source}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object with sections at the top")

    problems: list[str] = []
    sections: dict[str, Any] = {}
    for key in raw:
        if key not in _SECTIONS and key not in ("version", "$comment"):
            problems.append(
                f"{source}: unknown section {key!r}; expected one of {', '.join(_SECTIONS)}"
            )
    for name, (cls, checks, env_prefixes) in _SECTIONS.items():
        given = raw.get(name, {})
        if not isinstance(given, dict):
            problems.append(f"{source}: {name}: expected an object, got {json.dumps(given)}")
            given = {}
        values: dict[str, Any] = {}
        for key, value in given.items():
            if key == "$comment":
                continue
            if key not in checks:
                problems.append(
                    f"{source}: {name}.{key}: unknown key; expected one of {', '.join(checks)}"
                )
                continue
            try:
                values[key] = checks[key](value)
            except ValueError as e:
                problems.append(f"{source}: {name}.{key}{getattr(e, 'subpath', '')}: {e}")
        for key, check in checks.items():
            for prefix in env_prefixes:
                var = f"CLOUDTASK_{prefix}_{key.upper()}"
                if var in environ:
                    try:
                        values[key] = check(environ[var])
                    except ValueError as e:
                        where = f" at {e.subpath}" if getattr(e, "subpath", "") else ""
                        problems.append(f"environment variable {var}{where}: {e}")
                    break
        sections[name] = cls(**values)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return Config(**sections, source=source)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The configuration as the JSON a config file would hold (for `cloudtask up`'s children)."""
    out: dict[str, Any] = {}
    for name in _SECTIONS:
        section = getattr(cfg, name)
        out[name] = {f.name: getattr(section, f.name) for f in fields(section)}
    return out

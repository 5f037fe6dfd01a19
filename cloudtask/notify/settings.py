"""The effective alert settings: the config file's ``alerts`` section, overridden key by key by
the document ``settings/alerts`` in MongoDB (written by the settings page).

Both are checked by the same functions (:data:`cloudtask.config.ALERTS_CHECKS`), so a value the
page saves is one the file would accept. The stored document holds only the keys the page set;
a key left out falls back to the file.

**Stored secrets.** The SMTP password and each webhook's URL and signing secret may be kept in
the secret store (:mod:`cloudtask.store.secrets`, sealed under ``secrets.keys``) and named
here: ``smtp_password_secret``, and a webhook's ``url_secret`` (a Slack-style URL is itself
the secret) and ``secret_secret``. :func:`load_settings` only names them; the leading center
opens them with its key ring (:func:`resolve_secrets`, the notifier) when it sends. A
webhook whose URL is a stored secret is named ``secret:NAME`` in its deliveries, errors and
logs, never by its URL. The web process opens none of them: a test mail whose password is a
stored secret is sent by the leading center (:mod:`cloudtask.operations.settings`).

What an admin may not change is in the file's ``security`` section: ``smtp_password_env`` is
read only when it names a variable starting with ``security.smtp_password_env_prefix``
(``CLOUDTASK_SMTP_``), so the page cannot mail another variable of the center's environment
(the database URI, a key) to a server of the admin's choosing; the network policy
(``security.egress_filter``) is the one every SMTP and webhook connection keeps to.

Example::

    settings = load_settings(store, cfg)
    save_settings(store, {"smtp_host": "mail.example.com", "operators": ["ops@example.com"]})
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, fields, replace
from typing import Any

from ..clock import to_bson_time, utcnow
from ..config import ALERTS_CHECKS, DEFAULT_SMTP_ENV_PREFIX, AlertsConfig, Config
from ..exceptions import Problem, ValidationError
from ..netpolicy import NetworkPolicy
from ..runmodel import SCHEMA_VERSION
from ..secretbox import SecretBox, SecretError
from ..store import Store

log = logging.getLogger(__name__)

SETTINGS_ID = "alerts"
SETTING_KEYS = tuple(ALERTS_CHECKS)


@dataclass(frozen=True)
class Webhook:
    """A webhook. ``url`` and ``secret`` are empty until :func:`resolve_secrets` opens the
    stored secrets ``url_secret`` and ``secret_secret`` name (``problem``: why it could not)."""

    url: str
    secret: str
    kinds: tuple[str, ...] | None = None  # None: every kind
    url_secret: str = ""
    secret_secret: str = ""
    problem: str = ""

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    @property
    def label(self) -> str:
        """How deliveries, errors and logs name it: its URL, or ``secret:NAME`` when the URL
        is a stored secret (never written anywhere)."""
        return f"secret:{self.url_secret}" if self.url_secret else self.url

    def secret_names(self) -> list[str]:
        return [n for n in (self.url_secret, self.secret_secret) if n]


@dataclass(frozen=True)
class AlertSettings:
    """What the notifier uses. ``smtp_password`` is resolved (from ``smtp_password_env`` when
    that names a variable that is set); ``password_problem`` says why a login cannot work."""

    smtp_host: str = ""
    smtp_port: int = 587
    smtp_security: str = "starttls"
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_password_env: str = ""
    smtp_password_secret: str = ""
    smtp_timeout: float = 20.0
    mail_from: str = ""
    operators: tuple[str, ...] = ()
    operators_by_kind: dict[str, tuple[str, ...]] | None = None
    operators_by_group: dict[str, tuple[str, ...]] | None = None
    alert_interval: float = 900.0
    webhooks: tuple[Webhook, ...] = ()
    webhook_timeout: float = 10.0
    base_url: str = "http://127.0.0.1:8080"
    from_database: tuple[str, ...] = ()  # the keys the stored settings override
    password_problem: str = ""
    egress: NetworkPolicy = NetworkPolicy()  # where mail and webhooks may connect

    @property
    def mail_enabled(self) -> bool:
        return bool(self.smtp_host)

    @property
    def sender(self) -> str:
        return self.mail_from or f"CloudTask <cloudtask@{_host_name()}>"

    def by_kind(self, kind: str) -> tuple[str, ...]:
        return (self.operators_by_kind or {}).get(kind, ())

    def by_group(self, group: str | None) -> tuple[str, ...]:
        return (self.operators_by_group or {}).get(group or "", ())


def _host_name() -> str:
    name = socket.getfqdn() or socket.gethostname() or "localhost"
    return name if "." in name else f"{name}.localdomain"


def base_url(cfg: Config) -> str:
    """Where people reach the web site, for links: ``web.base_url``, else http://host:port."""
    if cfg.web.base_url:
        return cfg.web.base_url.rstrip("/")
    host = cfg.web.host
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: name this machine
        host = _host_name()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.web.port}"


def password_env_problem(name: str, prefix: str = DEFAULT_SMTP_ENV_PREFIX) -> str | None:
    """Why ``smtp_password_env`` may not name ``name`` (it lacks the prefix), or None."""
    if not name or name.startswith(prefix):
        return None
    return (
        f"may only name an environment variable starting with {prefix} "
        f"(security.smtp_password_env_prefix), got {name!r}: put the password in such a "
        "variable of the center's environment"
    )


def validate_settings(
    data: object, *, env_prefix: str | None = None
) -> tuple[dict[str, Any], list[Problem]]:
    """Check settings as the page sends them: the known keys, each as the config file checks
    it. Returns the converted values and every problem (path such as ``webhooks[0].url``).
    With ``env_prefix`` (the config's ``security.smtp_password_env_prefix``), a
    ``smtp_password_env`` without it is a problem too (it is never read either way)."""
    if not isinstance(data, dict):
        return {}, [Problem("", "expected an object of alert settings")]
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for key, value in data.items():
        check = ALERTS_CHECKS.get(key) if isinstance(key, str) else None
        if check is None:
            problems.append(
                Problem(str(key), f"unknown key; expected one of {', '.join(SETTING_KEYS)}")
            )
            continue
        try:
            values[key] = check(value)
        except ValueError as e:
            problems.append(Problem(f"{key}{getattr(e, 'subpath', '')}", str(e)))
    name = values.get("smtp_password_env")
    if env_prefix is not None and name and (problem := password_env_problem(name, env_prefix)):
        problems.append(Problem("smtp_password_env", problem))
    return values, problems


def stored_settings(store: Store) -> dict[str, Any]:
    """The keys the settings page saved (empty when none), as converted values."""
    doc = store.read_settings_doc(SETTINGS_ID)
    if not doc:
        return {}
    values, problems = validate_settings(
        {k: v for k, v in doc.items() if k in SETTING_KEYS and v is not None}
    )
    for p in problems:  # edited by hand, or by another version: keep the file's value
        log.warning("ignoring the stored alert setting %s", p)
    return values


def save_settings(
    store: Store, data: object, *, by: str = "", env_prefix: str | None = None
) -> dict[str, Any]:
    """Replace the stored settings with ``data`` (the keys it has; the others come from the
    file again). Raises ValidationError listing every problem; returns the stored values.
    ``env_prefix``: as :func:`validate_settings`."""
    values, problems = validate_settings(data, env_prefix=env_prefix)
    if problems:
        raise ValidationError(problems, source="the alert settings")
    doc = {
        "_id": SETTINGS_ID,
        "version": SCHEMA_VERSION,
        "updated_at": to_bson_time(utcnow()),
        "updated_by": by,
        **values,
    }
    store.write_settings_doc(doc)
    return values


def load_settings(
    store: Store | None, cfg: Config, environ: dict[str, str] | None = None
) -> AlertSettings:
    """The effective settings: the file's ``alerts``, then the stored document key by key."""
    file_values = {f.name: getattr(cfg.alerts, f.name) for f in fields(AlertsConfig)}
    stored = stored_settings(store) if store is not None else {}
    values = {**file_values, **stored}
    environ = os.environ if environ is None else environ
    password, problem = values["smtp_password"], ""
    prefix = cfg.security.smtp_password_env_prefix
    if values["smtp_password_env"]:
        name = values["smtp_password_env"]
        if denied := password_env_problem(name, prefix):  # never read, whatever it holds
            problem = f"alerts.smtp_password_env {denied}"
        elif name in environ:
            password = environ[name]
        elif not password:
            problem = (
                f"alerts.smtp_password_env names the environment variable {name}, "
                "which is not set in the center's environment"
            )
    hooks = tuple(
        Webhook(
            h.get("url") or "",
            h.get("secret") or "",
            h.get("kinds"),
            url_secret=h.get("url_secret") or "",
            secret_secret=h.get("secret_secret") or "",
        )
        for h in values["webhooks"]
    )
    if values["smtp_password_secret"]:  # a stored secret wins: opened when mail is sent
        password = ""
        problem = (
            f"the SMTP password is the stored secret {values['smtp_password_secret']!r}, "
            "which only the leading center opens"
        )  # until resolve_secrets opens it
    return AlertSettings(
        **{k: v for k, v in values.items() if k not in ("webhooks", "smtp_password")},
        smtp_password=password,
        webhooks=hooks,
        base_url=base_url(cfg),
        from_database=tuple(sorted(stored)),
        password_problem=problem,
        egress=NetworkPolicy.from_config(cfg),
    )


def secret_names(values: dict[str, Any] | AlertSettings) -> list[str]:
    """The stored secrets that settings (stored values, or AlertSettings) name."""
    if isinstance(values, AlertSettings):
        names = [values.smtp_password_secret] if values.smtp_password_secret else []
        for hook in values.webhooks:
            names += hook.secret_names()
    else:
        names = [values.get("smtp_password_secret") or ""]
        for h in values.get("webhooks") or ():
            names += [h.get("url_secret") or "", h.get("secret_secret") or ""]
    return sorted({n for n in names if n})


def missing_secrets(store: Store, values: dict[str, Any]) -> list[Problem]:
    """A problem at each setting naming a stored secret that does not exist (the settings
    page refuses to save those)."""
    names = secret_names(values)
    if not names:
        return []
    known = {s["name"] for s in store.list_secrets()}
    problems = []
    name = values.get("smtp_password_secret")
    if name and name not in known:
        problems.append(Problem("smtp_password_secret", f"no secret named {name!r}"))
    for i, hook in enumerate(values.get("webhooks") or ()):
        for key in ("url_secret", "secret_secret"):
            if (name := hook.get(key)) and name not in known:
                problems.append(Problem(f"webhooks[{i}].{key}", f"no secret named {name!r}"))
    return problems


def resolve_secrets(
    settings: AlertSettings, store: Store, box: SecretBox | None, box_problem: str = ""
) -> AlertSettings:
    """``settings`` with the stored secrets they name opened (by the leading center, just
    before it sends): the SMTP password, or ``password_problem`` saying why it cannot be
    opened; each webhook's URL and secret, or its ``problem``. ``box_problem``: why this
    process has no key ring (its config's ``secrets.keys`` could not be read)."""
    if not secret_names(settings):
        return settings

    def value(name: str) -> tuple[str, str]:
        if box is None and box_problem:
            return "", f"secret {name!r} cannot be opened: {box_problem}"
        try:
            return store.secret_values(box, [name])[name], ""
        except SecretError as e:
            return "", str(e)

    changes: dict[str, Any] = {}
    if settings.smtp_password_secret:
        password, problem = value(settings.smtp_password_secret)
        changes["smtp_password"] = password
        changes["password_problem"] = f"alerts.smtp_password_secret: {problem}" if problem else ""
    hooks = []
    for hook in settings.webhooks:
        opened: dict[str, Any] = {}
        problems = []
        for key in ("url", "secret"):
            name = getattr(hook, f"{key}_secret")
            if name:
                opened[key], problem = value(name)
                if problem:
                    problems.append(problem)
        hooks.append(replace(hook, **opened, problem="; ".join(problems)))
    changes["webhooks"] = tuple(hooks)
    return replace(settings, **changes)


# --- the audit entry of a change -----------------------------------------------------------

HIDDEN = "(hidden)"  # secrets in the audit entry


def plain(value: Any) -> Any:
    """A converted setting as JSON takes it (tuples as lists), to show, save or compare."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def hidden_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """Stored settings for the audit log: the password and webhook secrets as (hidden)."""
    out = plain(values)
    if out.get("smtp_password"):
        out["smtp_password"] = HIDDEN
    for hook in out.get("webhooks", []):
        if "secret" in hook:
            hook["secret"] = HIDDEN
    return out


def changed_secrets(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The secrets a save changed (hidden, they would not show in the audit entry's diff)."""
    out = []
    if before.get("smtp_password", "") != after.get("smtp_password", ""):
        out.append("smtp_password")
    old = {_hook_key(h): h.get("secret") for h in before.get("webhooks", ())}
    for i, hook in enumerate(after.get("webhooks", ())):
        key = _hook_key(hook)
        if "secret" in hook and key in old and old[key] != hook["secret"]:
            out.append(f"webhooks[{i}].secret")
    return out


def _hook_key(hook: dict[str, Any]) -> str:
    return hook.get("url") or f"secret:{hook.get('url_secret')}"

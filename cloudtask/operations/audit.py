"""What the audit log may hold: credentials and webhook URLs masked in every entry.

Every audit entry is written by :meth:`~cloudtask.operations.base.OperationsBase.audit`,
which passes its ``before`` and ``after`` through :func:`mask_pair` first (and the audit
page shows entries written before through :func:`mask` again). Masked are:

* the value of every key named like a credential (:func:`is_secret_key`: ``password``,
  ``secret``, ``token``, ``api_key``, ``authorization``, ``cookie``, ``*_key`` ... in any
  case, with ``-``, ``_`` or none: an env variable ``DB_PASSWORD``, a header
  ``Authorization`` or ``X-Api-Key``), but names of things (``*_id``, ``*_name``,
  ``*_env``: ``smtp_password_env`` names a variable) and flags (``password_changed``:
  True) are not. A reference to a stored secret (``{"secret": "NAME"}``) names no value and
  is kept;
* webhook URLs (the ``url`` of an entry of ``webhooks``, any key naming a webhook): for
  Slack-style hooks the URL is the secret; only the scheme and host are kept;
* in any text: a URL's password (``https://user:***@host``), the values of its query
  parameters named like credentials (``?token=***``), ``Bearer <token>`` and CloudTask's own
  API tokens (``ct_...``).

A masked value reads ``***``; in ``after``, ``*** (changed)`` when it differs from the value
at the same place in ``before``, so the audit page still says that a secret changed, never
to what.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
CHANGED = "*** (changed)"
HIDDEN = "(hidden)"  # what hid a value before it got here (the alert settings' secrets)

_SECRET_WORDS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "credential",
    "authorization",
    "cookie",
    "privatekey",
    "accesskey",
    "signature",
)
_SECRET_NAMES = {"pwd", "pass", "auth", "key", "sig", "dsn", "hash", "password_hash"}
_SECRET_ENDINGS = ("key", "pass", "pwd", "auth", "hash")
# names of things, flags and counts: never a credential, whatever word they hold
_PLAIN_ENDINGS = (
    "id",
    "ids",
    "name",
    "names",
    "env",
    "changed",
    "at",
    "count",
    "epoch",
    "scope",
    "kind",
    "type",
    "file",
    "header",
    "expires",
    "in",
)
_BEARER = re.compile(r"(?i)\b(bearer)(\s+)([A-Za-z0-9._~+/=-]{6,})")
_API_TOKEN = re.compile(r"\bct_[A-Za-z0-9_-]{16,}")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_MISSING = object()


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # camelCase → camel_Case
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: Any) -> bool:
    """Whether a value under ``key`` is a credential (see the module's notes)."""
    if not isinstance(key, str) or not key:
        return False
    words = _words(key)
    if not words or words[-1] in _PLAIN_ENDINGS:
        return False
    joined = "".join(words)
    if "_".join(words) in _SECRET_NAMES or joined in _SECRET_NAMES:
        return True
    if any(word in joined for word in _SECRET_WORDS):
        return True
    return len(words) > 1 and words[-1] in _SECRET_ENDINGS


def _is_webhook_key(key: Any) -> bool:
    return isinstance(key, str) and "webhook" in key.lower().replace("_", "").replace("-", "")


def _is_reference(value: Any) -> bool:
    """``{"secret": "NAME"}``: a stored secret named, not a value."""
    return isinstance(value, dict) and set(value) == {"secret"} and isinstance(value["secret"], str)


def mask_url(url: str) -> str:
    """A webhook URL as the audit log keeps it: its scheme and host only."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return MASK
    return f"{parts.scheme}://{host}/{MASK}" if parts.scheme and host else MASK


def _scrub_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:{MASK}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(is_secret_key(k) for k, _ in pairs):
                query = urlencode(
                    [(k, MASK if is_secret_key(k) else v) for k, v in pairs], safe="*"
                )
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return url


def scrub_text(text: str) -> str:
    """``text`` with URL passwords, credential query values and bearer tokens masked."""
    if "://" in text:
        text = _URL.sub(lambda m: _scrub_url(m.group(0)), text)
    text = _API_TOKEN.sub(MASK, text)
    return _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


def _hidden(value: Any, other: Any) -> Any:
    if value is None or value in ("", HIDDEN, MASK) or isinstance(value, bool):
        return value
    if isinstance(value, (dict, list)) and not value:
        return value
    if other is _MISSING or other == value:
        return MASK
    return CHANGED


def _mask(value: Any, other: Any, key: Any, webhooks: bool) -> Any:
    if _is_reference(value):
        return dict(value)
    if key is not None and is_secret_key(key):
        return _hidden(value, other)
    if isinstance(value, dict):
        others = other if isinstance(other, dict) else {}
        return {
            k: _mask(
                v,
                others.get(k, _MISSING) if other is not _MISSING else _MISSING,
                k,
                webhooks or _is_webhook_key(k),
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        others = other if isinstance(other, (list, tuple)) else []
        return [
            _mask(
                v,
                others[i] if other is not _MISSING and i < len(others) else _MISSING,
                None,
                webhooks,
            )
            for i, v in enumerate(value)
        ]
    if isinstance(value, str):
        if webhooks and (key in (None, "url") or _is_webhook_key(key)) and "://" in value:
            masked = mask_url(value)
            changed = other is not _MISSING and other != value
            return f"{masked} (changed)" if changed and isinstance(other, str) else masked
        return scrub_text(value)
    return value


def mask(value: Any) -> Any:
    """``value`` (an entry's before or after) with credentials and webhook URLs masked."""
    return _mask(value, _MISSING, None, False)


def mask_pair(before: Any, after: Any) -> tuple[Any, Any]:
    """``before`` and ``after`` masked; a masked value of ``after`` that differs from
    ``before``'s reads ``*** (changed)``."""
    other = before if before is not None else _MISSING
    return mask(before), _mask(after, other, None, False)

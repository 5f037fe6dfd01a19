"""The settings page (admin only): the alert settings (SMTP, recipients, webhooks) and a test mail.

The page shows each key's effective value (the config file's ``alerts``, or the database's
where the settings page saved one: see :mod:`cloudtask.notify.settings`), says where it comes
from, and shows the file's value next to a key the database overrides. Saving stores a key in
the database only when its value differs from the file's: a key typed back to the file's
value, or marked "use the config file's value", is left out and follows the file again.

Lists are plain text, one item a line, so an error can name its line: recipients per kind
``run.failed: a@example.com, b@example.com``, per group ``batch: ...``, webhooks
``URL SECRET [kind,kind...]``. A line rather than JSON: a URL holds no spaces and a secret
typed here is one word, a mistake is reported at its line, and a masked secret is one word to
leave alone (in JSON it would be a value to keep intact among quotes and braces).

Secrets are never sent back: the SMTP password field is always empty (blank keeps the
current one; a checkbox removes the stored one), and webhook secrets are shown as
:data:`MASK`, which on saving keeps the secret of the webhook with the same URL (or, on a
line whose URL was edited, of the webhook whose URL is gone from the list). The audit entry
(``settings.alerts``) replaces both with ``(hidden)``.

Stored secrets (the Secrets page, ``cloudtask secrets set``) are the better place: the SMTP
password may be one (``smtp_password_secret``, a choice of the stored secrets' names; naming
one drops a password stored here), and on a webhook line the URL, the secret or both may be
``secret:NAME`` (``url_secret``, ``secret_secret``: a Slack-style URL is itself the secret).
A name is shown as it is (it is no value); a name that is not stored is refused at its
field. Only the leading center opens them.

The test mail uses the saved settings (the web server's environment for
``smtp_password_env``), waits at most :data:`TEST_MAIL_TIMEOUT` seconds, flashes either
success or the exact failure, and is audited either way (``settings.test_mail``). When the
SMTP password is a stored secret, the leading center sends it (the web process opens no
secret): the page waits for its answer as long.
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields, replace
from typing import Any

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for

from cloudtask.config import SMTP_SECURITY, AlertsConfig, Config, config_origin, email_problem
from cloudtask.durations import format_duration
from cloudtask.events import KINDS as EVENT_KINDS
from cloudtask.events import OPERATOR_KINDS
from cloudtask.exceptions import CloudTaskError, Problem, ValidationError
from cloudtask.notify import load_settings, stored_settings
from cloudtask.notify.settings import ALERTS_CHECKS, validate_settings
from cloudtask.operations.settings import follow_file

from .auth import requires
from .context import actor, ops, store

log = logging.getLogger(__name__)

bp = Blueprint("settings", __name__, url_prefix="/settings")

MASK = "********"  # a webhook secret as the page shows it; kept as it is, the secret is kept
TEST_MAIL_TIMEOUT = 30.0  # the test mail holds a web request: never wait longer than this
DURATION_KEYS = ("smtp_timeout", "alert_interval", "webhook_timeout")
TEXT_KEYS = ("smtp_host", "smtp_user", "smtp_password_env", "smtp_password_secret", "mail_from")
SECRET_PREFIX = "secret:"  # a webhook's URL or secret given as a stored secret's name
BY_KEYS = {"operators_by_kind": "event kind", "operators_by_group": "agent group"}
LINE_KEYS = ("operators", *BY_KEYS, "webhooks")  # textareas: problems name their line
# the keys the form edits, in the order their problems are listed
FORM_KEYS = tuple(k for k in ALERTS_CHECKS if k != "smtp_password")
_ADDRESS_SEPARATORS = re.compile(r"[,;\s]+")
_PATH_KEY = re.compile(r"^([a-z_]+)(.*)$")
_INDEX = re.compile(r"^\[(\d+)\]")
_SUBKEY = re.compile(r"^\.(.*?)(?:\[(\d+)\])?$")


@bp.after_request
def _no_store(answer: Any) -> Any:
    # a page answering a failed save holds what was typed, new webhook secrets included
    answer.headers["Cache-Control"] = "no-store"
    return answer


def _config() -> Config:
    return current_app.config["CLOUDTASK"]


def file_values(cfg: Config) -> dict[str, Any]:
    """The config file's alert settings (with its environment overrides and defaults)."""
    return {f.name: getattr(cfg.alerts, f.name) for f in fields(AlertsConfig)}


# --- values as the form shows them -----------------------------------------------------------


def hook_key(hook: dict[str, Any]) -> str:
    """A webhook's first word on its line: its URL, or ``secret:NAME``."""
    return hook.get("url") or f"{SECRET_PREFIX}{hook.get('url_secret')}"


def webhook_line(hook: dict[str, Any]) -> str:
    kinds = hook.get("kinds")
    secret = MASK if hook.get("secret") else f"{SECRET_PREFIX}{hook.get('secret_secret')}"
    return f"{hook_key(hook)} {secret}" + (f" {','.join(kinds)}" if kinds else "")


def form_text(key: str, value: Any) -> str:
    """A converted setting as its field holds it (secrets masked)."""
    if key in DURATION_KEYS:
        return format_duration(float(value))
    if key == "operators":
        return "\n".join(value)
    if key in BY_KEYS:
        return "\n".join(f"{k}: {', '.join(v)}" for k, v in (value or {}).items())
    if key == "webhooks":
        return "\n".join(webhook_line(h) for h in value)
    return str(value)


def shown_value(key: str, value: Any) -> str:
    """A setting on one line, for "config file: ..." next to a field the database overrides."""
    if key == "smtp_password":
        return "a password" if value else "no password"
    if key == "webhooks":
        return "; ".join(webhook_line(h) for h in value) or "none"
    if key in BY_KEYS:
        return "; ".join(f"{k}: {', '.join(v)}" for k, v in (value or {}).items()) or "none"
    if key == "operators":
        return ", ".join(value) or "none"
    text = form_text(key, value)
    return text if text else "empty"


def initial_form(values: dict[str, Any]) -> dict[str, Any]:
    form: dict[str, Any] = {k: form_text(k, values[k]) for k in FORM_KEYS}
    form.update(reset=set(), remove_password=False, password_typed=False)
    return form


# --- the posted form -> settings -------------------------------------------------------------


class LineMap:
    """Which line of a textarea each list item came from, to name it in an error."""

    def __init__(self) -> None:
        self.items: dict[str, list[int]] = {"operators": [], "webhooks": []}
        self.keys: dict[str, dict[str, tuple[int, list[int]]]] = {k: {} for k in BY_KEYS}

    def line_of(self, key: str, rest: str) -> int | None:
        """The line of the problem at ``key`` + ``rest`` (``[2]``, ``.run.failed[0]``)."""
        if key in self.items:
            found = _INDEX.match(rest)
            lines = self.items[key]
            if found and int(found.group(1)) < len(lines):
                return lines[int(found.group(1))]
            return None
        if key in self.keys:
            found = _SUBKEY.match(rest)
            entry = self.keys[key].get(found.group(1)) if found else None
            if entry is None:
                return None
            key_line, address_lines = entry
            if found.group(2) is not None and int(found.group(2)) < len(address_lines):
                return address_lines[int(found.group(2))]
            return key_line
        return None


def _text_lines(text: str) -> list[tuple[int, str]]:
    """The non-blank lines of a textarea, stripped, with their numbers (from 1)."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_addresses(text: str, lines: list[int]) -> list[str]:
    """Addresses separated by commas, semicolons, spaces or new lines."""
    out: list[str] = []
    for n, line in _text_lines(text):
        for address in _ADDRESS_SEPARATORS.split(line):
            if address:
                out.append(address)
                lines.append(n)
    return out


def parse_recipients_by(
    text: str, what: str, key_lines: dict[str, tuple[int, list[int]]], errors: list[str]
) -> dict[str, list[str]]:
    """Lines ``key: a@example.com, b@example.com`` (a key given twice gets both lists)."""
    out: dict[str, list[str]] = {}
    for n, line in _text_lines(text):
        key, colon, rest = line.partition(":")
        key = key.strip()
        if not colon or not key:
            errors.append(f"line {n}: expected '{what}: a@example.com, b@example.com'")
            continue
        _, address_lines = key_lines.setdefault(key, (n, []))
        addresses = out.setdefault(key, [])
        for address in _ADDRESS_SEPARATORS.split(rest.strip()):
            if address:
                addresses.append(address)
                address_lines.append(n)
    return out


def parse_webhooks(
    text: str, current: tuple[dict[str, Any], ...], lines: list[int], errors: list[str]
) -> list[dict[str, Any]]:
    """Lines ``URL SECRET [kind,kind...]``, the URL or the secret possibly ``secret:NAME``
    (a stored secret's name). A secret left as MASK is that of the current webhook with the
    same URL; on a line whose URL was edited, that of the first current webhook whose URL is
    no longer in the list (the next line of that kind gets the next)."""
    parsed: list[tuple[int, list[str]]] = [
        (n, line.split(None, 2)) for n, line in _text_lines(text)
    ]
    typed_urls = {parts[0] for _, parts in parsed}
    plain = [h for h in current if h.get("secret")]  # the secrets MASK can keep
    by_url = {hook_key(h): h["secret"] for h in plain}
    edited = [h["secret"] for h in plain if hook_key(h) not in typed_urls]
    hooks: list[dict[str, Any]] = []
    for n, parts in parsed:
        if len(parts) < 2:
            errors.append(
                f"line {n}: expected 'URL SECRET' and optionally event kinds "
                "(kind,kind): the secret is missing"
            )
            continue
        url, secret = parts[0], parts[1]
        if secret == MASK:
            if url in by_url:
                secret = by_url[url]
            elif edited:
                secret = edited.pop(0)
            else:
                errors.append(
                    f"line {n}: no stored secret to keep for this webhook ({MASK} keeps the "
                    "secret of the webhook with the same URL): type its secret"
                )
                continue
        hook: dict[str, Any] = {}
        if url.startswith(SECRET_PREFIX):
            hook["url_secret"] = url[len(SECRET_PREFIX) :]
        else:
            hook["url"] = url
        if secret.startswith(SECRET_PREFIX):
            hook["secret_secret"] = secret[len(SECRET_PREFIX) :]
        else:
            hook["secret"] = secret
        if len(parts) == 3:
            kinds = [k.strip() for k in parts[2].split(",") if k.strip()]
            if kinds:
                hook["kinds"] = kinds
        hooks.append(hook)
        lines.append(n)
    return hooks


def read_form(posted: Any) -> dict[str, Any]:
    """What the user typed (never the password: it is not shown again)."""
    form: dict[str, Any] = {k: posted.get(k, "") for k in FORM_KEYS}
    for key in (*TEXT_KEYS, "smtp_port", *DURATION_KEYS):
        form[key] = form[key].strip()
    form["reset"] = set(posted.getlist("reset")) & set(ALERTS_CHECKS)
    form["remove_password"] = posted.get("remove_password") == "on"
    form["password_typed"] = bool(posted.get("smtp_password", ""))
    return form


def form_settings(
    form: dict[str, Any],
    password: str,
    file: dict[str, Any],
    stored: dict[str, Any],
    effective: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, list[str]], LineMap]:
    """The settings to store (the keys that differ from the file's, unconverted), the
    problems found while reading the text fields (field -> messages), and their lines."""
    lines = LineMap()
    errors: dict[str, list[str]] = {}
    typed: dict[str, Any] = {}
    for key in FORM_KEYS:
        if key in form["reset"]:
            continue  # "use the config file's value", whatever the field holds
        text = form[key]
        field_errors: list[str] = []
        if key == "operators":
            typed[key] = parse_addresses(text, lines.items["operators"])
        elif key in BY_KEYS:
            typed[key] = parse_recipients_by(text, BY_KEYS[key], lines.keys[key], field_errors)
        elif key == "webhooks":
            typed[key] = parse_webhooks(
                text, effective["webhooks"], lines.items["webhooks"], field_errors
            )
        else:
            typed[key] = text
        if field_errors:
            errors[key] = field_errors
            typed.pop(key)
    remove = form["remove_password"] or "smtp_password" in form["reset"]
    named = typed.get("smtp_password_secret")  # a stored secret: the password stored here goes
    if remove and password:
        errors["smtp_password"] = ["either type a new password or remove the stored one, not both"]
    elif named and password:
        errors["smtp_password"] = [
            "either type a password or choose a stored secret, not both (the stored secret is "
            "kept encrypted: prefer it)"
        ]
    elif password:
        typed["smtp_password"] = password
    elif "smtp_password" in stored and not remove and not named:
        typed["smtp_password"] = stored["smtp_password"]  # blank: the stored one is kept
    return follow_file(typed, file), errors, lines


def place_problems(
    problems: list[Problem], lines: LineMap, errors: dict[str, list[str]]
) -> list[str]:
    """Put each problem next to its field (with the line, for the textareas); returns those
    of no field."""
    top: list[str] = []
    for p in problems:
        found = _PATH_KEY.match(p.path)
        key, rest = (found.group(1), found.group(2)) if found else ("", "")
        if key not in ALERTS_CHECKS:
            top.append(str(p))
            continue
        line = lines.line_of(key, rest) if key in LINE_KEYS else None
        errors.setdefault(key, []).append(f"line {line}: {p.message}" if line else p.message)
    return top


# --- the page --------------------------------------------------------------------------------


def render_page(
    form: dict[str, Any] | None = None,
    errors: dict[str, list[str]] | None = None,
    top_errors: list[str] | None = None,
    status: int = 200,
    to: str = "",
    to_error: str = "",
) -> Any:
    cfg = _config()
    file = file_values(cfg)
    stored = stored_settings(store())
    effective = load_settings(store(), cfg)
    secret_names = [s["name"] for s in store().list_secrets()]
    problem = effective.password_problem
    if effective.smtp_password_secret:  # opened by the leading center only: say if it is stored
        problem = ""
        if effective.smtp_password_secret not in secret_names:
            problem = (
                f"alerts.smtp_password_secret: no secret named {effective.smtp_password_secret!r}"
            )
    sources = {
        key: {"database": key in stored, "file": shown_value(key, file[key])}
        for key in ALERTS_CHECKS
    }
    page = render_template(
        "settings/index.html",
        form=form or initial_form({**file, **stored}),
        errors=errors or {},
        top_errors=top_errors or [],
        sources=sources,
        password={
            "stored": bool(stored.get("smtp_password")),
            "file": bool(file["smtp_password"]),
            "problem": problem,
            "secret": effective.smtp_password_secret,
        },
        secret_names=secret_names,
        effective=effective,
        config_source=config_origin(cfg),
        config_copy=cfg.source if config_origin(cfg) != cfg.source else None,
        securities=SMTP_SECURITY,
        kinds=EVENT_KINDS,
        operator_kinds=[k for k in EVENT_KINDS if k in OPERATOR_KINDS],
        mask=MASK,
        to=to,
        to_error=to_error,
    )
    return page, status


@bp.get("")
@requires("admin")
def index() -> Any:
    return render_page(to=request.args.get("to", "")[:254])


@bp.post("")
@requires("admin")
def save() -> Any:
    cfg = _config()
    file = file_values(cfg)
    before = stored_settings(store())
    form = read_form(request.form)
    data, errors, lines = form_settings(
        form, request.form.get("smtp_password", ""), file, before, {**file, **before}
    )
    top: list[str] = []
    prefix = cfg.security.smtp_password_env_prefix
    if errors:  # a text field could not be read: check the others too, save nothing
        _, problems = validate_settings(data, env_prefix=prefix)
        top = place_problems(problems, lines, errors)
        return render_page(form, errors, top, 422)
    try:
        before, after = ops().save_alert_settings(actor(), data, env_prefix=prefix)
    except ValidationError as e:
        top = place_problems(e.problems, lines, errors)
        return render_page(form, errors, top, 422)
    if after == before:
        flash("Nothing changed: the settings are as they were.", "ok")
        return redirect(url_for("settings.index"))
    kept = ", ".join(sorted(after)) or "none: every value comes from the config file"
    flash(
        f"Alert settings saved. Stored in the database: {kept}. "
        "The leading center uses them from its next pass.",
        "ok",
    )
    return redirect(url_for("settings.index"))


def send_test_mail_now(to: str) -> tuple[bool, str]:
    """Send a test mail to ``to`` (a checked address) with the effective settings, audited
    either way: (sent, what to tell). Never raises: whatever failed is the answer to the
    test (the page's and the API's)."""
    try:
        settings = load_settings(store(), _config())
        if settings.smtp_timeout > TEST_MAIL_TIMEOUT:
            settings = replace(settings, smtp_timeout=TEST_MAIL_TIMEOUT)
        wait = current_app.config.get("TEST_MAIL_WAIT", TEST_MAIL_TIMEOUT)
        ops().send_test_mail(actor(), settings, to, wait=wait)  # audited, sent or not
    except CloudTaskError as e:
        return False, str(e)
    except Exception as e:
        log.exception("the test mail to %s failed", to)
        return False, f"the test mail was not sent: {type(e).__name__}: {e}"
    by = " by the leading center" if settings.smtp_password_secret else ""
    return True, (
        f"Test mail sent to {to}{by} through {settings.smtp_host}:{settings.smtp_port} "
        f"from {settings.sender}: check that it arrived."
    )


@bp.post("/test-mail")
@requires("admin")
def test_mail() -> Any:
    to = request.form.get("to", "").strip()
    if not to:
        return render_page(status=422, to_error="type the address to send the test mail to")
    if problem := email_problem(to):
        return render_page(status=422, to=to, to_error=problem)
    sent, message = send_test_mail_now(to)
    flash(message, "test-mail-ok" if sent else "test-mail-error")
    # the result is shown in the test mail's own section, where the page lands (#test-mail)
    return redirect(url_for("settings.index", to=to, _anchor="test-mail"))

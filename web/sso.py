"""Directory (LDAP) and OpenID Connect login for the web site.

**LDAP** (``auth.ldap``; :mod:`cloudtask.directory`). The login form first checks local
accounts; a name that is no local account (or is a directory user's) is then checked against
the directory by binding as the user (:func:`directory_login`). On success the user's record is
created or updated (source ``ldap``, no password, the role their groups map to: see
:meth:`cloudtask.users.Users.sign_in_external`). A wrong password is a failed login like any
other (the same message, the throttle counts it); a user in no mapped group is refused with a
message saying so; a directory that cannot be reached is a clear error (503), and local
accounts keep working.

Directory users lose access when the directory stops vouching for them: a session (or an API
token) of a directory user is re-checked against the directory at most every
``auth.ldap.recheck_interval`` (15 minutes; with the service account ``auth.ldap.bind_dn``),
and at their next login. A user whose entry is gone, or who is in no mapped group any more, is
marked refused and every session of theirs ends at once (the session store's "end all
sessions of the user"); a changed role ends them too (the user logs in again under the new
role). While the directory cannot be reached, sessions go on and the re-check is tried again
after :data:`RECHECK_PAUSE` seconds (an outage of the directory does not log everyone out).
Without a service account, users are re-checked only at their next login.

**OpenID Connect** (``auth.oidc``; :mod:`cloudtask.oidc`). "Log in with <name>" on the login
page leads to ``/login/oidc``, which sends the browser to the provider with a new state, nonce
and PKCE verifier kept in the (signed) pre-login session, at most :data:`PENDING_MAX` logins
at once, each for :data:`PENDING_TTL` seconds. The provider sends the browser back to
``/login/oidc/callback`` (the redirect URL, ``web.base_url`` + that path): the state must be
one this browser started (else 400), the code is exchanged and the ID token validated; the
user's record is created or updated (source ``oidc``, the role the groups claim maps to, the
provider's subject kept so another account of the provider can never take the name). A user
whose claim maps to no role is refused (and, if they had a record, their sessions end).

Every login, failure and refusal is audited through :class:`~cloudtask.operations.Operations`:
``auth.login`` (with ``via``: ``ldap`` or ``oidc``), ``auth.login_failed`` (with the reason:
``wrong password``, ``directory unavailable``, ``state mismatch``, ``id token: nonce`` ...),
``auth.login_refused`` (``no mapped group``, ``local_account``, ``disabled`` ...),
``auth.access_revoked`` (a re-check or a login found the user gone or in no mapped group),
and ``user.create`` / ``user.role`` when a login made or changed a record (actor ``(ldap)`` or
``(oidc)``). Passwords are never logged nor stored.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, flash, redirect, render_template, request, session, url_for

from cloudtask.authconfig import ldap_settings, oidc_settings, read_secret, role_for
from cloudtask.config import Config
from cloudtask.directory import Directory, DirectoryError, DirectoryUnavailable
from cloudtask.exceptions import NotFound
from cloudtask.oidc import OidcError, Provider, claim, claim_values
from cloudtask.operations.users import UNKNOWN_USER
from cloudtask.users import ExternalRefusal, Users, source_of

from .context import ops, store
from .security import client_address

log = logging.getLogger(__name__)

RECHECK_PAUSE = 60.0  # seconds without re-checks after the directory could not be reached
PENDING_KEY = "oidc_pending"
PENDING_MAX = 5  # logins through the provider started at once in one browser
PENDING_TTL = 600.0  # seconds a started login may take
CALLBACK_PATH = "/login/oidc/callback"


class SingleSignOn:
    """The app's directory and provider (each None when not configured). Made when the app
    is made, so a bad ``auth`` setting (a secret reference that cannot be read) stops the web
    site at start with a message naming the key."""

    def __init__(self, cfg: Config) -> None:
        self.directory: Directory | None = None
        self.provider: Provider | None = None
        self.base_url = (cfg.web.base_url or "").rstrip("/")
        self.paused_until = 0.0
        ldap = ldap_settings(cfg.auth.ldap)
        if ldap is not None:
            password = ""
            if ldap.bind_password:
                password = read_secret(ldap.bind_password, "auth.ldap.bind_password")
            self.directory = Directory(ldap, password)
            if ldap.recheck_interval and not self.directory.can_recheck:
                log.warning(
                    "auth.ldap has no bind_dn: directory users are re-checked only when they "
                    "log in, not every auth.ldap.recheck_interval"
                )
        oidc = oidc_settings(cfg.auth.oidc)
        if oidc is not None:
            secret = ""
            if oidc.client_secret:
                secret = read_secret(oidc.client_secret, "auth.oidc.client_secret")
            self.provider = Provider(oidc, secret)

    def redirect_uri(self) -> str:
        """Where the provider sends the browser back: ``web.base_url`` + the callback path
        (without a base URL, the address this request came to)."""
        if self.base_url:
            return self.base_url + CALLBACK_PATH
        return url_for("auth.oidc_callback", _external=True)


def init_app(app: Flask) -> None:
    """Make the app's :class:`SingleSignOn` (the routes are :mod:`web.auth`'s)."""
    sso = SingleSignOn(app.config["CLOUDTASK"])
    app.extensions["cloudtask"].sso = sso  # the app's one extension holds it
    app.jinja_env.globals["oidc_login_name"] = (
        sso.provider.settings.name if sso.provider is not None else None
    )
    app.jinja_env.globals["directory_login"] = sso.directory is not None


def current() -> SingleSignOn | None:
    return current_app.extensions["cloudtask"].sso


def _users() -> Users:
    return Users(store())


def _target(username: str) -> str:
    if isinstance(username, str) and username and store().find_user(username):
        return f"user:{username}"
    return UNKNOWN_USER


@dataclass(frozen=True)
class Refused:
    """A directory login that did not succeed: the message for the page, its status (401: a
    wrong name or password, said the same way as for local accounts) and the audit reason."""

    message: str
    status: int
    reason: str


# --- LDAP -------------------------------------------------------------------------------------


def directory_login(username: str, password: str) -> dict[str, Any] | Refused | None:
    """Check ``username`` and ``password`` against the directory: the user's record (made or
    updated), a :class:`Refused`, or None when the directory does not apply (none is
    configured, or the name is a local account's, which the directory never takes over)."""
    sso = current()
    if sso is None or sso.directory is None or not username:
        return None
    local = store().find_user(username)
    if local is not None and source_of(local) != "ldap":
        return None
    address = client_address()
    directory = sso.directory
    try:
        found = directory.authenticate(username, password)
    except DirectoryError as e:
        unavailable = isinstance(e, DirectoryUnavailable)
        log.warning("LDAP login of %r: %s", username, e)
        reason = "directory unavailable" if unavailable else "directory error"
        after = {"address": address, "during": "login", "via": "ldap", "reason": reason}
        ops().audit("anonymous", "auth.login_failed", _target(username), None, after)
        if unavailable:
            message = (
                "The directory (LDAP) cannot be reached right now, so directory accounts cannot "
                "log in; try again later. Local CloudTask accounts still can."
            )
        else:
            message = (
                "The directory (LDAP) did not answer as CloudTask expects, so directory "
                "accounts cannot log in; an admin must check auth.ldap (the web server's log "
                "says what went wrong)."
            )
        return Refused(message, 503, reason)
    if found is None:
        if local is not None:  # a known directory user: still in the directory at all?
            check_directory_user(local, during="login")
        return Refused("Wrong user name or password.", 401, "wrong password")
    if found.role is None:
        revoke(found.username, "ldap", "in no mapped group", "login")
        after = {"address": address, "via": "ldap", "reason": "no mapped group"}
        ops().audit("anonymous", "auth.login_refused", _target(found.username), None, after)
        return Refused(
            "Your directory account is in no group that gives access to CloudTask. Ask an "
            "admin to add you to one of the groups that auth.ldap.role_map names.",
            403,
            "no mapped group",
        )
    try:
        doc, changes = _users().sign_in_external(
            found.username, "ldap", found.role, subject=found.dn, groups=found.mapped
        )
    except ExternalRefusal as e:
        after = {"address": address, "via": "ldap", "reason": e.reason}
        ops().audit("anonymous", "auth.login_refused", _target(found.username), None, after)
        return Refused(f"You cannot log in: {e}.", 403, e.reason)
    _audit_record(doc, "ldap", changes, found.mapped)
    return doc


def _audit_record(doc: dict[str, Any], source: str, changes: dict[str, Any], groups: Any) -> None:
    """``user.create`` or ``user.role`` when a login or a re-check made or changed a record."""
    name, actor = doc["username"], f"({source})"
    if changes.get("created"):
        after = {"username": name, "role": doc["role"], "enabled": True, "source": source}
        after["groups"] = list(groups)[:20]
        ops().audit(actor, "user.create", f"user:{name}", None, after)
    elif changes.get("role"):
        old, new = changes["role"]
        ops().audit(actor, "user.role", f"user:{name}", {"role": old}, {"role": new})


def revoke(username: str, source: str, reason: str, during: str, subject: str = "") -> None:
    """The directory or provider no longer vouches for ``username``: their record is marked
    refused and every session of theirs ends (audited once). For OpenID Connect only the
    record of the same provider subject is touched."""
    users = _users()
    if subject:
        doc = store().find_user(username)
        if doc is None or doc.get("subject") != subject:
            return
    if users.refuse_external(username, source, reason):
        after = {"reason": reason, "during": during}
        ops().audit(f"({source})", "auth.access_revoked", f"user:{username}", None, after)


def check_directory_user(doc: dict[str, Any], during: str = "re-check") -> dict[str, Any] | None:
    """Ask the directory about a directory user now (with the service account): their
    record, updated, while a mapped group still holds them; None when they lost access (gone
    from the directory, in no mapped group, or another role: their sessions have ended). When
    the directory cannot be asked, the record as it is (and no re-check for a while)."""
    sso = current()
    if sso is None or sso.directory is None:
        return None
    directory = sso.directory
    if not directory.can_recheck:
        return doc
    name = doc["username"]
    try:
        found = directory.lookup(name, doc.get("subject") or None)
    except DirectoryError as e:
        sso.paused_until = time.time() + RECHECK_PAUSE
        log.warning("cannot re-check the directory user %r (tried again later): %s", name, e)
        return doc
    if found is None or found.role is None:
        reason = "no longer in the directory" if found is None else "in no mapped group"
        revoke(name, "ldap", reason, during)
        return None
    try:
        new, changes = _users().sign_in_external(
            name, "ldap", found.role, subject=found.dn, groups=found.mapped, create=False
        )
    except (ExternalRefusal, NotFound):
        return None
    _audit_record(new, "ldap", changes, found.mapped)
    return None if changes.get("role") else new


def recheck(doc: dict[str, Any]) -> dict[str, Any] | None:
    """For every request of a logged-in user (a session or an API token): a local or
    OpenID Connect user as they are; a directory user re-checked when their last check is
    older than ``auth.ldap.recheck_interval`` (None: they lost access). Directory users are
    out while LDAP login is not configured; refused ones stay out until a login succeeds."""
    source = source_of(doc)
    if source == "local":
        return doc
    if doc.get("refused"):
        return None
    if source != "ldap":
        return doc
    sso = current()
    if sso is None or sso.directory is None:
        return None
    interval = sso.directory.settings.recheck_interval
    if not interval or not sso.directory.can_recheck:
        return doc
    now = time.time()
    checked = doc.get("checked_at")
    if isinstance(checked, (int, float)) and now - checked < interval:
        return doc
    if now < sso.paused_until:
        return doc
    return check_directory_user(doc)


# --- OpenID Connect ---------------------------------------------------------------------------


def _page(message: str, status: int) -> Any:
    flash(message, "error")
    return render_template("login.html", username=""), status


def _failed(reason: str, username: str = "") -> None:
    after = {"address": client_address(), "during": "login", "via": "oidc", "reason": reason}
    target = _target(username) if username else UNKNOWN_USER
    ops().audit("anonymous", "auth.login_failed", target, None, after)


def _refused(reason: str, username: str) -> None:
    after = {"address": client_address(), "via": "oidc", "reason": reason}
    ops().audit("anonymous", "auth.login_refused", _target(username), None, after)


def oidc_begin(next_path: str) -> Any:
    """``/login/oidc``: send the browser to the provider, with a new state, nonce and PKCE
    verifier (``next_path``, a path on this site already checked, is where the login ends)."""
    sso = current()
    if sso is None or sso.provider is None:
        flash("Single sign-on (OpenID Connect) is not set up on this site.", "error")
        return redirect(url_for("auth.login"))
    try:
        url, pending = sso.provider.start(sso.redirect_uri())
    except OidcError as e:
        return _page(str(e), e.status)
    pending["next"] = next_path or ""
    now = time.time()
    kept = {
        state: entry
        for state, entry in (session.get(PENDING_KEY) or {}).items()
        if isinstance(entry, dict) and now - float(entry.get("at") or 0) < PENDING_TTL
    }
    kept = dict(sorted(kept.items(), key=lambda kv: kv[1].get("at") or 0)[-(PENDING_MAX - 1) :])
    kept[pending.pop("state")] = pending
    session[PENDING_KEY] = kept
    return redirect(url)


@dataclass(frozen=True)
class SignedIn:
    """The provider vouched for a user with a role: their record, and where to go next."""

    doc: dict[str, Any]
    next: str


def oidc_complete() -> SignedIn | Any:
    """``/login/oidc/callback``: the provider sent the browser back. Check the state,
    exchange the code, validate the ID token, map the groups claim to a role, make or update
    the record: :class:`SignedIn` (the caller logs the user in), or the page to answer."""
    sso = current()
    if sso is None or sso.provider is None:
        flash("Single sign-on (OpenID Connect) is not set up on this site.", "error")
        return redirect(url_for("auth.login"))
    provider = sso.provider
    name = provider.settings.name
    state = request.args.get("state", "")
    waiting = dict(session.get(PENDING_KEY) or {})
    entry = waiting.pop(state, None) if isinstance(state, str) and state else None
    if entry is not None:  # a state is used once
        if waiting:
            session[PENDING_KEY] = waiting
        else:
            session.pop(PENDING_KEY, None)
    if not isinstance(entry, dict) or time.time() - float(entry.get("at") or 0) > PENDING_TTL:
        _failed("state mismatch")
        return _page(
            "This sign-in answer does not belong to a login started in this browser, or it "
            f"expired (its state does not match). Start again with “Log in with {name}”.",
            400,
        )
    sent_issuer = request.args.get("iss")
    if sent_issuer is not None and sent_issuer != provider.settings.issuer:  # RFC 9207: mix-up
        _failed("issuer mismatch")
        return _page(f"This sign-in answer comes from another issuer than {name}.", 400)
    error = request.args.get("error")
    if error:
        error = error[:100]
        detail = (request.args.get("error_description") or "")[:200]
        _failed(f"provider said {error}")
        return _page(f"{name} did not sign you in ({error}{': ' + detail if detail else ''}).", 401)
    try:
        claims = provider.finish(request.args.get("code", ""), entry, sso.redirect_uri())
    except OidcError as e:
        _failed(e.reason)
        return _page(str(e), e.status)
    settings = provider.settings
    subject = f"{claims['iss']}#{claims['sub']}"
    username = claim(claims, settings.username_claim)
    if not isinstance(username, str) or not username:
        _failed(f"no {settings.username_claim} claim")
        return _page(
            f"{name} gave no user name (the claim {settings.username_claim}, "
            "auth.oidc.username_claim); ask an admin.",
            403,
        )
    username = username.strip()
    groups = claim_values(claim(claims, settings.groups_claim))
    role = role_for(groups, settings.role_map)
    if role is None:
        revoke(username, "oidc", "in no mapped group", "login", subject=subject)
        _refused("no mapped group", username)
        return _page(
            f"Your {name} account is in no group that gives access to CloudTask (the claim "
            f"{settings.groups_claim}). Ask an admin to add you to one of the groups that "
            "auth.oidc.role_map names.",
            403,
        )
    mapped = [g for g in groups if role_for([g], settings.role_map)]
    try:
        doc, changes = _users().sign_in_external(
            username, "oidc", role, subject=subject, groups=mapped
        )
    except ExternalRefusal as e:
        _refused(e.reason, username)
        return _page(f"You cannot log in: {e}.", 403)
    _audit_record(doc, "oidc", changes, mapped)
    return SignedIn(doc, str(entry.get("next") or ""))

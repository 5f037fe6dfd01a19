"""Sessions kept on the server (MongoDB), so that ending one really ends it.

A logged-in session lives in the ``sessions`` collection (:mod:`cloudtask.store.sessions`);
its cookie carries only a random id (``s.`` and 43 URL-safe characters: 256 random bits),
and the database only the sha256 of that id. A session ends:

* when it is idle for ``web.session_idle_timeout`` (12 h) or ``web.session_max_age`` (7 days)
  after the login, whatever happens (the idle time is noted at most once a minute);
* at logout (the stored session is deleted: a copy of the cookie stops working);
* when the user's password is changed or reset, the role changed, the account disabled or
  deleted (:class:`cloudtask.users.Users` deletes every session of the user; a user changing
  their own password keeps the session they did it from, under a new id).

Every login starts a new session under a new id with a new CSRF token (what the browser held
before is dropped: no session fixation); :func:`renew_session` does that, and
:func:`end_session` ends one. The session is stored as the login happens, in the view, so a
MongoDB failure there is a 503 like any other, never a half-made login.

Before login (the login form's CSRF token, a flashed message) the session holds nothing worth
a database write for every visitor: it is a small cookie signed with ``web.secret_key``,
exactly as Flask keeps sessions, and never holds a user (a user in the session always means a
stored session).

The cookie is HttpOnly, SameSite=Lax, Secure when ``web.secure_cookies`` says so (by default
when ``web.base_url`` starts with ``https://``), and lasts as long as the browser does.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Request, Response, session
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SecureCookieSessionInterface, SessionInterface, SessionMixin
from itsdangerous import BadSignature
from werkzeug.datastructures import CallbackDict

from cloudtask.clock import from_epoch
from cloudtask.exceptions import CloudTaskError
from cloudtask.runmodel import SCHEMA_VERSION

log = logging.getLogger(__name__)

COOKIE_NAME = "cloudtask_session"
ID_PREFIX = "s."
_ID = re.compile(r"^s\.[A-Za-z0-9_-]{43}$")
TOUCH_EVERY = 60.0  # seconds: how stale a session's last use may get before it is noted
SWEEP_EVERY = 300.0  # seconds: how often this process deletes idle sessions
USER_KEYS = ("_user_id", "_fresh", "_id")  # what flask-login keeps: only in a stored session

_serializer = TaggedJSONSerializer()


def session_key(session_id: str) -> str:
    """What the database keys a session by: the sha256 of the id its cookie carries."""
    return hashlib.sha256(session_id.encode("ascii", "replace")).hexdigest()


def user_of(data: Any) -> str | None:
    """The user name a session's data names (flask-login's ``name|epoch``), or None."""
    value = data.get("_user_id") if hasattr(data, "get") else None
    if not isinstance(value, str) or not value:
        return None
    name, _, _ = value.rpartition("|")
    return name or value


class WebSession(CallbackDict, SessionMixin):
    """A request's session: stored (``key`` set) or not yet (before login)."""

    def __init__(self, data: dict[str, Any] | None = None, key: str | None = None) -> None:
        def changed(_: Any) -> None:
            self.modified = True
            self.accessed = True

        super().__init__(data or {}, changed)
        self.key = key  # the stored session's key, None before login
        self.meta: dict[str, Any] = {}  # the stored document's times
        self.modified = False
        self.accessed = False
        self.new_id: str | None = None  # set when the session was (re)started: the cookie
        self.ended = False  # ended by logout: the cookie goes
        self.drop_cookie = False  # the cookie named a session that is gone or forged
        self.failure: CloudTaskError | None = None  # the store could not be read
        self.passive = False  # a static file: the session is neither read nor written


class ServerSessionInterface(SessionInterface):
    """Flask's session interface over :mod:`cloudtask.store.sessions`; ``store`` gives the
    app's store, ``clock`` epoch seconds (tests move it)."""

    def __init__(
        self,
        store: Callable[[], Any],
        idle_timeout: float,
        max_age: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.idle_timeout = float(idle_timeout)
        self.max_age = float(max_age)
        self.clock = clock
        self._swept = 0.0
        self._cookies = SecureCookieSessionInterface()
        self._cookies.salt = "cloudtask-anonymous-session"

    # --- reading -----------------------------------------------------------------------------

    def open_session(self, app: Flask, request: Request) -> WebSession:
        raw = request.cookies.get(self.get_cookie_name(app)) or ""
        if not raw:
            return WebSession()
        if app.static_url_path and request.path.startswith(app.static_url_path + "/"):
            passive = WebSession()  # a stylesheet or a script: no database read for it
            passive.passive = True
            return passive
        if raw.startswith(ID_PREFIX):
            return self._open_stored(raw)
        signer = self._cookies.get_signing_serializer(app)
        try:
            data = signer.loads(raw, max_age=int(self.idle_timeout)) if signer else None
        except BadSignature:
            data = None
        if not isinstance(data, dict):
            answer = WebSession()
            answer.drop_cookie = True
            return answer
        for key in USER_KEYS:  # never a user without a stored session
            data.pop(key, None)
        return WebSession(data)

    def _open_stored(self, raw: str) -> WebSession:
        answer = WebSession()
        if not _ID.fullmatch(raw):
            answer.drop_cookie = True
            return answer
        key = session_key(raw)
        try:
            doc = self.store().find_session(key)
        except CloudTaskError as e:
            answer.failure = e
            return answer
        now = self.clock()
        if doc is None or not self._alive(doc, now):
            answer.drop_cookie = True
            return answer
        try:
            data = _serializer.loads(doc.get("data") or "{}")
        except Exception:  # a damaged document: the session is over
            data = None
        if not isinstance(data, dict) or user_of(data) is None:
            answer.drop_cookie = True
            return answer
        stored = WebSession(data, key)
        stored.meta = {k: doc.get(k) for k in ("created", "seen", "absolute_until", "user")}
        return stored

    @staticmethod
    def _alive(doc: dict[str, Any], now: float) -> bool:
        idle, absolute = doc.get("idle_until"), doc.get("absolute_until")
        return (
            isinstance(idle, (int, float))
            and isinstance(absolute, (int, float))
            and now < idle
            and now < absolute
        )

    # --- starting and ending -----------------------------------------------------------------

    def start(self, current: WebSession, keep_created: bool = False) -> None:
        """Store ``current`` (which names its user) under a new id, ending the one it had."""
        user = user_of(current)
        if user is None:
            raise ValueError("a stored session names its user: log the user in first")
        store = self.store()
        if current.key:
            store.delete_session(current.key)
        now = self.clock()
        created = current.meta.get("created") if keep_created else None
        if not isinstance(created, (int, float)):
            created = now
        absolute = created + self.max_age
        new_id = ID_PREFIX + secrets.token_urlsafe(32)
        doc = {
            "_id": session_key(new_id),
            "version": SCHEMA_VERSION,
            "user": user,
            "data": _serializer.dumps(dict(current)),
            "created": created,
            "seen": now,
            "idle_until": min(now + self.idle_timeout, absolute),
            "absolute_until": absolute,
            "expire_at": from_epoch(absolute),
        }
        store.insert_session(doc)
        current.key, current.new_id = doc["_id"], new_id
        current.meta = {"created": created, "seen": now, "absolute_until": absolute, "user": user}
        current.modified = False
        current.ended = False

    def end(self, current: WebSession) -> None:
        """End ``current``: deleted from the store, its data forgotten, its cookie removed."""
        if current.key:
            self.store().delete_session(current.key)
        current.key = None
        current.new_id = None
        current.meta = {}
        current.clear()
        current.ended = True

    # --- writing -----------------------------------------------------------------------------

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        current = session if isinstance(session, WebSession) else None
        if current is None or current.failure is not None or current.passive:
            return
        if current.accessed:
            response.vary.add("Cookie")
        try:
            if current.key and user_of(current) is None:
                self.store().delete_session(current.key)  # its user was taken out of it
                current.key, current.new_id = None, None
                current.drop_cookie = True
            if current.key is None and user_of(current) is not None:
                self.start(current)  # a login made without renew_session: never in a cookie
            if current.key:
                self._save_stored(app, current, response)
                self._sweep()
            else:
                self._save_anonymous(app, current, response)
        except CloudTaskError as e:  # the answer is made: say it in the log, not a 500
            log.warning("cannot store the session: %s", e)

    def _save_stored(self, app: Flask, current: WebSession, response: Response) -> None:
        store = self.store()
        now = self.clock()
        absolute = current.meta.get("absolute_until") or now + self.max_age
        idle_until = min(now + self.idle_timeout, absolute)
        alive = True
        if current.modified:
            doc = {
                "_id": current.key,
                "version": SCHEMA_VERSION,
                "user": user_of(current),
                "data": _serializer.dumps(dict(current)),
                "created": current.meta.get("created") or now,
                "seen": now,
                "idle_until": idle_until,
                "absolute_until": absolute,
                "expire_at": from_epoch(absolute),
            }
            alive = store.replace_session(doc)
        elif current.new_id is None:
            seen = current.meta.get("seen")
            if not isinstance(seen, (int, float)) or now - seen >= TOUCH_EVERY:
                alive = store.touch_session(current.key, now, idle_until)
        if not alive:  # ended while this request ran (a logout elsewhere, a reset)
            self._delete_cookie(app, response)
        elif current.new_id:
            self._set_cookie(app, response, current.new_id)

    def _save_anonymous(self, app: Flask, current: WebSession, response: Response) -> None:
        data = {k: v for k, v in current.items() if k not in USER_KEYS}
        if not data:
            if current.modified or current.ended or current.drop_cookie:
                self._delete_cookie(app, response)
            return
        if current.modified or current.ended or current.drop_cookie:
            signer = self._cookies.get_signing_serializer(app)
            if signer is None:
                return
            self._set_cookie(app, response, signer.dumps(data))

    def _set_cookie(self, app: Flask, response: Response, value: str) -> None:
        response.set_cookie(
            self.get_cookie_name(app),
            value,
            httponly=True,
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
            path=self.get_cookie_path(app),
            domain=self.get_cookie_domain(app),
        )
        response.vary.add("Cookie")

    def _delete_cookie(self, app: Flask, response: Response) -> None:
        response.delete_cookie(
            self.get_cookie_name(app),
            path=self.get_cookie_path(app),
            domain=self.get_cookie_domain(app),
            secure=self.get_cookie_secure(app),
            httponly=True,
            samesite=self.get_cookie_samesite(app),
        )
        response.vary.add("Cookie")

    def _sweep(self) -> None:
        now = self.clock()
        if now - self._swept < SWEEP_EVERY:
            return
        self._swept = now
        self.store().sweep_sessions(now)


def _interface() -> ServerSessionInterface:
    from flask import current_app

    interface = current_app.session_interface
    if not isinstance(interface, ServerSessionInterface):
        raise RuntimeError("the app does not keep its sessions on the server")
    return interface


def renew_session(keep_created: bool = False) -> None:
    """Store this request's session (whose user was just logged in) under a new id, ending
    the one it had, with a new CSRF token. ``keep_created``: the absolute timeout still
    counts from the original login."""
    from .security import new_csrf_token

    current = session._get_current_object()  # type: ignore[attr-defined]
    new_csrf_token()
    _interface().start(current, keep_created=keep_created)


def end_session() -> None:
    """End this request's session (logout): deleted, forgotten, its cookie removed."""
    current = session._get_current_object()  # type: ignore[attr-defined]
    _interface().end(current)


def failure() -> CloudTaskError | None:
    """The store's failure when this request's session could not be read, else None."""
    current = session._get_current_object()  # type: ignore[attr-defined]
    return getattr(current, "failure", None)

"""CSRF tokens for forms and a login throttle (5 failures per user and address, counted in
MongoDB by every web process alike).

CSRF: a random token kept in the (signed, HttpOnly, SameSite) session; every form carries it
in a hidden field named ``csrf_token`` and every state-changing request without a matching
one is refused with 400. API requests authenticated by a Bearer token, and http-task
callbacks authenticated by their run's ``X-CloudTask-Token``, carry no cookie, so they are not
exposed to CSRF and are exempt (a cookie alone never authenticates them).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from flask import abort, request, session

from cloudtask.clock import from_epoch
from cloudtask.store import Store

CSRF_FIELD = "csrf_token"


def csrf_token() -> str:
    token = session.get(CSRF_FIELD)
    if not token:
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """Refuse a state-changing browser request without the session's CSRF token."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    if request.headers.get("Authorization", "").startswith("Bearer "):
        return
    if request.headers.get("X-CloudTask-Token"):
        return  # an http task's callback, authenticated by its run's token (no cookie)
    if request.path.startswith("/api/") and not session.get("_user_id"):
        return  # no logged-in session to abuse: the route answers 401 (or checks its token)
    sent = request.form.get(CSRF_FIELD) or request.headers.get("X-CSRF-Token", "")
    expected = session.get(CSRF_FIELD, "")
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        abort(
            400, description="the form is missing its security token or it expired; reload the page"
        )


class LoginThrottle:
    """After ``limit`` failures for the same user from the same address within ``window``
    seconds, refuse further tries until the oldest of them is ``window`` old.

    The failures live in MongoDB (collection ``login_failures``), so every web process behind
    a load balancer counts the same tries: N processes do not allow N times the guesses. One
    small document per (user, address) pair, keyed by a hash of both (a made-up name of any
    length costs the same), holding the times of its last ``limit`` failures; a TTL index
    drops it when it is ``window`` old, and this class also deletes expired ones at most once
    a minute (servers without TTL monitors). A MongoDB failure propagates: the login it
    guards cannot be checked without MongoDB either.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        limit: int = 5,
        window: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock  # epoch seconds (injected by tests)
        self._store = store
        self.limit = limit
        self.window = window
        self._swept = 0.0

    @staticmethod
    def _key(username: str, address: str) -> str:
        return hashlib.sha256(f"{username}\x00{address}".encode("utf-8", "replace")).hexdigest()

    def blocked(self, username: str, address: str) -> bool:
        times = self._store().login_failure_times(self._key(username, address))
        now = self.clock()
        recent = [t for t in times if isinstance(t, (int, float)) and now - t < self.window]
        return len(recent) >= self.limit

    def failed(self, username: str, address: str) -> None:
        now = self.clock()
        store = self._store()
        until = now + self.window  # a number too: numbers compare alike on every server
        store.add_login_failure(
            self._key(username, address), now, self.limit, from_epoch(until), until
        )
        if now - self._swept > 60:
            self._swept = now
            store.sweep_login_failures(now)

    def succeeded(self, username: str, address: str) -> None:
        self._store().clear_login_failures(self._key(username, address))

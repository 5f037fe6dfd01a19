"""CSRF tokens for forms and a login throttle (5 failures per user and address).

CSRF: a random token kept in the (signed, HttpOnly, SameSite) session; every form carries it
in a hidden field named ``csrf_token`` and every state-changing request without a matching
one is refused with 400. API requests authenticated by a Bearer token, and http-task
callbacks authenticated by their run's ``X-CloudTask-Token``, carry no cookie, so they are not
exposed to CSRF and are exempt (a cookie alone never authenticates them).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time

from flask import abort, request, session

CSRF_FIELD = "csrf_token"
MAX_TRACKED = 10_000  # (user, address) pairs with recent failures kept by the login throttle


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
    """After ``limit`` failures for the same user from the same address, refuse for ``window``."""

    def __init__(self, limit: int = 5, window: float = 300.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < self.window]
        self._failures[key] = times
        return times

    def blocked(self, username: str, address: str) -> bool:
        with self._lock:
            return len(self._recent((username, address), time.monotonic())) >= self.limit

    def failed(self, username: str, address: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._recent((username, address), now).append(now)
            if len(self._failures) > MAX_TRACKED:  # made-up names must not grow it for ever
                for key in [k for k, v in self._failures.items() if not v or now - v[-1] > 60]:
                    del self._failures[key]
                excess = len(self._failures) - MAX_TRACKED
                if excess > 0:  # the oldest that are not blocked go first; blocked ones stay
                    unblocked = [k for k, v in self._failures.items() if len(v) < self.limit]
                    for key in unblocked[:excess]:
                        del self._failures[key]

    def succeeded(self, username: str, address: str) -> None:
        with self._lock:
            self._failures.pop((username, address), None)

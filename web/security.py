"""What protects every request: CSRF tokens, the client's address (behind trusted proxies),
the login throttle, and the security headers of every answer.

**CSRF.** A random token kept in the session; every form carries it in a hidden field named
``csrf_token`` and every other state-changing browser request sends it as ``X-CSRF-Token``;
without a matching one the request is refused with 400. A login starts a new session with a
new token. The check is skipped only for a request that did authenticate by a valid API token
(``Authorization: Bearer``): :func:`web.auth.authenticate_token` sets ``g.token_user``
before the check, and the request then acts as the token's user, whatever cookie it also
carries. A junk or expired token is no exemption: with a session cookie the request is a
browser request like any other. The callbacks of http tasks (authenticated by their run's
``X-CloudTask-Token`` in the view, never by a cookie, and acting as no user) are exempt by
endpoint; the header exempts nothing elsewhere.

**Client address.** :func:`client_address`: the direct peer, unless it is one of
``web.trusted_proxies``; then ``X-Forwarded-For`` is read from the right, skipping trusted
proxies, and the first address that is not one is the client (an address a client wrote in
the header itself is further left and never read).

**Login throttle.** :class:`LoginThrottle`, counted in MongoDB so every web process behind a
balancer counts the same tries (see its notes for the rule).

**Headers.** Every answer carries ``Content-Security-Policy`` (:data:`CSP`: scripts, styles
and everything else from the site only, no framing), ``X-Content-Type-Options: nosniff``,
``Referrer-Policy: same-origin`` and ``X-Frame-Options: DENY``; every answer but static
files carries ``Cache-Control: no-store`` (pages and API answers hold what a logged-in user
may see; the login page holds a CSRF token).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import abort, current_app, g, request, session

from cloudtask.clock import from_epoch
from cloudtask.store import Store

CSRF_FIELD = "csrf_token"
# the endpoints whose requests carry no user and act on their own token, checked in the view
TOKEN_ENDPOINTS = {"api.run_progress", "api.run_result"}

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- CSRF -----------------------------------------------------------------------------------


def csrf_token() -> str:
    token = session.get(CSRF_FIELD)
    if not token:
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


def new_csrf_token() -> str:
    """A new CSRF token for the session (at login): a token seen before no longer counts."""
    token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """Refuse a state-changing browser request without the session's CSRF token."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    if g.get("token_user") is not None:
        return  # authenticated by a valid API token: it acts as that user, not the cookie's
    if request.endpoint in TOKEN_ENDPOINTS:
        return  # an http task's callback: its run's token is checked in the view; no user
    if request.path.startswith("/api/") and not session.get("_user_id"):
        return  # no logged-in session to abuse: the route answers 401
    sent = request.form.get(CSRF_FIELD) or request.headers.get("X-CSRF-Token", "")
    expected = session.get(CSRF_FIELD, "")
    if not expected or not hmac.compare_digest(
        sent.encode("utf-8", "replace"), expected.encode("utf-8", "replace")
    ):
        abort(
            400, description="the form is missing its security token or it expired; reload the page"
        )


# --- headers --------------------------------------------------------------------------------


def security_headers(answer: Any) -> Any:
    """The headers of every answer (see the module's notes)."""
    for name, value in SECURITY_HEADERS.items():
        answer.headers.setdefault(name, value)
    if request.endpoint != "static":
        answer.headers["Cache-Control"] = "no-store"
    return answer


# --- the client's address -------------------------------------------------------------------


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Addresses and networks (``10.0.0.1``, ``10.0.0.0/8``, ``::1``) as networks; a
    ValueError names the first bad one."""
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network") from None
    return tuple(out)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _trusted(address: Any, trusted: tuple[Network, ...]) -> bool:
    return address is not None and any(address in net for net in trusted)


def client_address_of(
    peer: str | None, forwarded: Iterable[str], trusted: tuple[Network, ...]
) -> str:
    """The client's address: ``peer`` (the direct peer) unless it is trusted; then the
    right-most address of ``forwarded`` (the ``X-Forwarded-For`` values, in order) that is
    not trusted. Pure: tested without a request."""
    peer = peer or "?"
    if not trusted or not _trusted(_address(peer), trusted):
        return peer
    hops = [h.strip() for value in forwarded for h in value.split(",") if h.strip()]
    client = peer
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return client  # garbage: trust nothing further left, keep the last good hop
        client = str(address)
        if not _trusted(address, trusted):
            return client
    return client


def trusted_proxies() -> tuple[Network, ...]:
    return current_app.config.get("TRUSTED_PROXIES", ())


def client_address() -> str:
    """This request's client address (see :func:`client_address_of`)."""
    cached = g.get("_client_address")
    if cached is None:
        cached = g._client_address = client_address_of(
            request.environ.get("REMOTE_ADDR"),
            request.headers.getlist("X-Forwarded-For"),
            trusted_proxies(),
        )
    return cached


def session_identifier() -> str:
    """What flask-login's session protection binds a session to: the client address (as
    :func:`client_address` finds it, never a forged header) and the user agent."""
    agent = request.headers.get("User-Agent", "")
    text = f"{client_address()}|{agent}"
    return hashlib.sha512(text.encode("utf-8", "replace")).hexdigest()


# --- the login throttle ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a login is refused before its password is checked, and for how long."""

    reason: str  # "address", "pair" or "account"
    retry_after: float  # seconds

    @property
    def message(self) -> str:
        minutes = max(1, round(self.retry_after / 60))
        return (
            "Too many failed attempts. Wait a few minutes and try again "
            f"(about {minutes} minute{'s' if minutes != 1 else ''})."
        )


class LoginThrottle:
    """Failed logins slow down guessing, and nobody can use them to lock another out.

    Three counts, each of the failures within ``window`` seconds (15 minutes):

    * **per address** (the client address, see :func:`client_address`): after
      ``address_limit`` (20) failures from one address, for any names, every login from it is
      refused until the oldest of them is ``window`` old;
    * **per user and address**: after ``pair_limit`` (5) failures for one user from one
      address, that address cannot try that user until the oldest is ``window`` old;
    * **per user** (backoff): after ``account_limit`` (10) failures for one user from
      anywhere, the user can be tried only from addresses that have no failure of their own
      in the window. A right password from an address that has not been failing still logs
      in, so strangers guessing cannot lock the user out; each guessing address gets one
      failure before it is refused too.

    A success forgets the failures of its user and address only (not the address's count,
    not the user's). The counts live in MongoDB (``login_failures``: one small document per
    count, under a hash, the times of its last failures, dropped by a TTL index and swept
    here at most once a minute for servers without one), so every web process behind a load
    balancer counts the same tries. A MongoDB failure propagates: the login it guards cannot
    be checked without MongoDB either.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        limit: int = 5,
        window: float = 900.0,
        clock: Callable[[], float] = time.time,
        address_limit: int = 20,
        account_limit: int = 10,
    ) -> None:
        self.clock = clock  # epoch seconds (injected by tests)
        self._store = store
        self.limit = limit  # per user and address
        self.address_limit = address_limit
        self.account_limit = account_limit
        self.window = window
        self._swept = 0.0

    @staticmethod
    def _key(*parts: str) -> str:
        text = "\x00".join(parts)
        return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()

    def _keys(self, username: str, address: str) -> dict[str, str]:
        return {
            "pair": self._key(username, address),
            "address": self._key("address", address),
            "account": self._key("account", username),
        }

    def _recent(self, key: str, now: float) -> list[float]:
        times = self._store().login_failure_times(key)
        return sorted(t for t in times if isinstance(t, (int, float)) and now - t < self.window)

    def check(self, username: str, address: str) -> Refusal | None:
        """Why a login of ``username`` from ``address`` is refused now, or None."""
        now = self.clock()
        keys = self._keys(username, address)
        from_address = self._recent(keys["address"], now)
        if len(from_address) >= self.address_limit:
            wait = from_address[-self.address_limit] + self.window - now
            return Refusal("address", wait)
        pair = self._recent(keys["pair"], now)
        if len(pair) >= self.limit:
            return Refusal("pair", pair[-self.limit] + self.window - now)
        if from_address:
            account = self._recent(keys["account"], now)
            if len(account) >= self.account_limit:
                wait = min(
                    account[-self.account_limit] + self.window, from_address[-1] + self.window
                )
                return Refusal("account", wait - now)
        return None

    def blocked(self, username: str, address: str) -> bool:
        return self.check(username, address) is not None

    def failed(self, username: str, address: str) -> Refusal | None:
        """Count a failed login; returns the refusal it starts now, if it starts one (the
        lockout the audit log records), else None."""
        now = self.clock()
        store = self._store()
        until = now + self.window
        keep = {"pair": self.limit, "address": self.address_limit, "account": self.account_limit}
        before = self.check(username, address)
        for kind, key in self._keys(username, address).items():
            store.add_login_failure(key, now, keep[kind], from_epoch(until), until)
        if now - self._swept > 60:
            self._swept = now
            store.sweep_login_failures(now)
        after = self.check(username, address)
        return after if before is None else None

    def succeeded(self, username: str, address: str) -> None:
        self._store().clear_login_failures(self._keys(username, address)["pair"])

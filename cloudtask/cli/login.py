"""``cloudtask login``, ``logout`` and ``whoami``: keep the web site's address and an API token
in the CLI's config file (:func:`~cloudtask.cli.remote.config_path`, mode 0600), so the API
commands need neither ``--url`` nor ``--token``.

``login`` asks for the user's password and has the site create an API token for the user
(the password is sent once, to the login form, and never stored); ``--with-token`` takes a
token made on the user's page or with ``cloudtask token create`` instead (read from standard
input, never from the command line). Either way the token is checked with ``GET /api/v1/me``
before it is saved.
"""

from __future__ import annotations

import getpass
import re
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

import click

from .remote import (
    BAD_INPUT,
    FAILED,
    NOT_ALLOWED,
    Api,
    ApiFailure,
    Target,
    check_token,
    config_path,
    forget_login,
    normalize_url,
    resolve,
    save_login,
    saved_login,
    segment,
    tls_verify,
)

_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
_CSRF_META = re.compile(r'name="csrf-token" content="([^"]+)"')
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _secret(prompt: str) -> str:
    """A line from the terminal without echo, or from standard input when it is piped."""
    if sys.stdin.isatty():
        return click.prompt(prompt, hide_input=True, err=True)
    value = sys.stdin.readline().strip()
    if not value:
        raise click.UsageError(f"no {prompt} on standard input")
    return value


def _site(url: str | None, insecure: bool) -> Target:
    """The site to log in to (``--url`` or the usual places), without needing a token."""
    target = resolve(url, None, insecure, need_token=False)
    return Target(target.url, None, target.url_from, None, target.verify)


def _warn_plain_http(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "http" and parts.hostname not in LOOPBACK:
        click.echo(
            f"warning: {url} is plain http: the password and the token cross the network "
            "unencrypted; use the site's https address",
            err=True,
        )


class _FormSession:
    """A browser-like session on the site: the login form, then the session's CSRF token for
    the API calls made with it, then the logout."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.base = api.target.url
        self.http = api.session  # no Authorization header: a session cookie instead

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.api.send(method, self.base + path, **kwargs)

    def log_in(self, username: str, password: str) -> str:
        """Log in through the form; returns the session's CSRF token."""
        page = self._request("GET", "/login")
        found = _CSRF_FIELD.search(page.text or "")
        if page.status_code != 200 or not found:
            raise ApiFailure(
                f"{self.base}/login is not CloudTask's login page (answer {page.status_code})",
                FAILED,
            )
        answer = self._request(
            "POST",
            "/login",
            data={"username": username, "password": password, "csrf_token": found[1]},
        )
        if answer.status_code == 429:
            wait = answer.headers.get("Retry-After", "a few")
            raise ApiFailure(
                f"too many failed logins for {username!r}: try again in {wait} s", FAILED
            )
        if answer.status_code in (401, 403):
            raise ApiFailure(
                f"the site refused the login of {username!r}: wrong user name "
                "or password, or no access",
                NOT_ALLOWED,
            )
        target = answer.headers.get("Location", "")
        if answer.status_code != 302 or urlsplit(target).path.endswith("/login"):
            raise ApiFailure(
                f"the login of {username!r} failed (answer {answer.status_code})", FAILED
            )
        home = self._request("GET", "/")
        meta = _CSRF_META.search(home.text or "")
        if not meta:
            raise ApiFailure(f"{self.base} did not give the logged-in session a CSRF token")
        self.http.headers["X-CSRF-Token"] = meta[1]
        return meta[1]

    def log_out(self, csrf: str) -> None:
        try:
            self._request("POST", "/logout", data={"csrf_token": csrf})
        except ApiFailure:
            pass  # the session expires on its own


def _create_token(
    api: Api, username: str, name: str, expires_in: int | None, read_only: bool
) -> str:
    """A new API token for ``username``, made by the logged-in session."""
    body: dict[str, Any] = {"name": name}
    if expires_in is not None:
        body["expires_in_days"] = expires_in
    if read_only:
        body["read_only"] = True
    ask = (
        f"ask an admin for an API token (the user's page on the site, or `cloudtask token "
        f"create {username}` on the server) and run `cloudtask login --with-token`"
    )
    try:  # every user makes their own (/me/tokens); a site older than that: the admins' route
        try:
            answer = api.post("/me/tokens", body)
        except ApiFailure as e:
            if "has no API route" not in e.format_message():
                raise
            answer = api.post(f"/users/{segment(username)}/tokens", body)
    except ApiFailure as e:
        if e.exit_code == NOT_ALLOWED:
            raise ApiFailure(
                f"{username} may not make API tokens on {api.target.url}: " + ask,
                NOT_ALLOWED,
            ) from None
        if "has no API route" in e.format_message():
            raise ApiFailure(
                f"{api.target.url} makes no API tokens through its API: " + ask, FAILED
            ) from None
        raise
    token = answer.get("token")
    if not isinstance(token, str) or not token:
        raise ApiFailure(f"{api.target.url} made no token (its answer had none)", FAILED)
    return token


def _default_token_name() -> str:
    try:
        return f"cli on {socket.gethostname()}"[:100]
    except OSError:
        return "cli"


@click.command("login")
@click.option(
    "--url",
    metavar="URL",
    help="The web site (else CLOUDTASK_URL, the saved one, "
    "or the cluster `cloudtask up` runs from this folder).",
)
@click.option("--user", "username", metavar="NAME", help="Your user name (asked otherwise).")
@click.option(
    "--with-token",
    is_flag=True,
    help="Save an existing API token, read from standard input (or asked), instead.",
)
@click.option(
    "--name",
    "token_name",
    metavar="TEXT",
    help="What the new token is called (default: cli on HOST).",
)
@click.option(
    "--expires-in",
    type=click.IntRange(1, 3650),
    metavar="DAYS",
    help="The new token expires after this many days.",
)
@click.option("--read-only", is_flag=True, help="The new token may only read (GET and HEAD).")
@click.option("--insecure", is_flag=True, help="Do not check the site's TLS certificate.")
def login(
    url: str | None,
    username: str | None,
    with_token: bool,
    token_name: str | None,
    expires_in: int | None,
    read_only: bool,
    insecure: bool,
) -> None:
    """Log in to a CloudTask web site: save its address and an API token in the CLI's config
    file (mode 0600), so `cloudtask tasks list` and the other API commands need no --url or
    --token.

    With your password (asked, or read from standard input), the site makes a token of your
    own, with your role. With --with-token, a token made on the user's page or by
    `cloudtask token create` is read from standard input instead.
    Either way the token is checked before it is saved."""
    site = _site(url, insecure)
    _warn_plain_http(site.url)
    if with_token:
        token = check_token(_secret("API token"), "standard input")
    else:
        if username is None:
            default = getpass.getuser() if sys.stdin.isatty() else None
            if not sys.stdin.isatty():
                raise click.UsageError(
                    "give --user NAME (the password is read from standard input)"
                )
            username = click.prompt("user name", default=default, err=True)
        password = _secret(f"password of {username}")
        with Api(site) as api:
            form = _FormSession(api)
            csrf = form.log_in(username, password)
            try:
                name = token_name or _default_token_name()
                token = _create_token(api, username, name, expires_in, read_only)
            finally:
                form.log_out(csrf)
    checked = Target(site.url, token, site.url_from, "the new login", site.verify)
    with Api(checked) as api:
        me = api.get("/me")
    path = save_login(site.url, token, me.get("username"), made=not with_token)
    click.echo(
        f"logged in to {site.url} as {me.get('username')} ({me.get('role')}); "
        f"the token is saved in {path}"
    )


@click.command("logout")
@click.option("--url", metavar="URL", help="The site to log out of (default: the saved one).")
@click.option("--keep-token", is_flag=True, help="Do not revoke the token `cloudtask login` made.")
@click.option("--insecure", is_flag=True, help="Do not check the site's TLS certificate.")
def logout(url: str | None, keep_token: bool, insecure: bool) -> None:
    """Forget the API token saved for a site. A token `cloudtask login` made is revoked on
    the site first (one saved with --with-token is left valid: it may serve elsewhere)."""
    found = saved_login(url)
    if found is None:
        where = normalize_url(url) if url else "the default site"
        raise ApiFailure(f"no login saved for {where} in {config_path()}", BAD_INPUT)
    site, entry = found
    note = "the token stays valid (revoke it on the user's page)"
    if entry.get("made_by_login") and not keep_token:
        note = _revoke(
            Target(
                site, entry["token"], str(config_path()), "the saved login", tls_verify(insecure)
            )
        )
    forget_login(site)
    click.echo(f"logged out of {site}: {note}")


def _revoke(target: Target) -> str:
    """Revoke the token of ``target`` on its site; what became of it, for the message (a
    token that cannot be revoked now is forgotten anyway, and said to be still valid)."""
    try:
        with Api(target) as api:
            me = api.get("/me")
            token_id = (me.get("token") or {}).get("id")
            if not token_id:
                return "the site did not name the token; it stays valid"
            api.call("DELETE", f"/me/tokens/{segment(token_id)}")
    except ApiFailure as e:
        if e.status == 401:
            return "the token no longer worked"
        click.echo(
            f"warning: the token could not be revoked: {e.format_message()}; it stays valid "
            "until an admin revokes it or it expires",
            err=True,
        )
        return "the token is forgotten here"
    return "the token is revoked"


@click.command("whoami")
@click.option("--url", metavar="URL", help="The web site (else the usual places).")
@click.option("--token", metavar="TOKEN", help="The API token (else the usual places).")
@click.option("--insecure", is_flag=True, help="Do not check the site's TLS certificate.")
def whoami(url: str | None, token: str | None, insecure: bool) -> None:
    """The site the API commands talk to, and who they act as."""
    target = resolve(url, token, insecure)
    with Api(target) as api:
        me = api.get("/me")
    token_info = me.get("token") or {}
    extra = ""
    if token_info:
        extra = f"; token {token_info.get('name')!r} scope {token_info.get('scope')}"
        if token_info.get("expires_at"):
            extra += f", expires {token_info['expires_at']}"
    click.echo(
        f"{me.get('username')} ({me.get('role')}) on {target.url} "
        f"(address from {target.url_from}{extra})"
    )


COMMANDS = (login, logout, whoami)

"""The CLI's side of the REST API: where the web site is, the token to send, and a client
whose every failure becomes a one-line message and an exit code scripts can trust.

Where the site and the token come from, first found wins:

* the URL: ``--url``, ``CLOUDTASK_URL``, the ``url`` of the CLI's config file (``cloudtask
  login`` writes it), then the cluster ``cloudtask up`` runs from the current folder
  (:func:`cloudtask.localstate.running_cluster`, its ``web_url``);
* the token: ``--token``, ``CLOUDTASK_TOKEN``, then the token the config file holds *for
  that URL* (a token saved for one site is never sent to another).

The config file is ``$XDG_CONFIG_HOME/cloudtask/cli.json`` (``~/.config/cloudtask/cli.json``):
``{"url": DEFAULT_URL, "servers": {URL: {"token": ..., "username": ..., "saved_at": ...}}}``.
It holds credentials, so it is written with mode 0600 (its folder 0700), by a whole new file
renamed over the old one (a process that dies while writing leaves the old file), and it is
not read when other users may read or change it (POSIX; Windows keeps ACLs, not modes).

Exit codes (:class:`ApiFailure`): 0 ok; 1 the server refused or failed (409, 413, other
4xx, 5xx, a redirect) or a run did not succeed; 2 bad input (a usage error, 400, 422, an
unusable config file); 3 not found (404); 4 not authenticated or not allowed (401, 403, no
token); 5 the server cannot be reached (connection refused, DNS, timeout, TLS).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import click

from .. import __version__

OK, FAILED, BAD_INPUT, NOT_FOUND, NOT_ALLOWED, UNREACHABLE = 0, 1, 2, 3, 4, 5
API_PREFIX = "/api/v1"
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
CONFIG_NAME = "cli.json"
ENV_URL, ENV_TOKEN, ENV_CA = "CLOUDTASK_URL", "CLOUDTASK_TOKEN", "CLOUDTASK_CA_BUNDLE"
NO_ROUTE = "The requested URL was not found"  # Werkzeug's 404 for a path no route has
LOGIN_HINT = "run `cloudtask login --url URL`, or set CLOUDTASK_TOKEN"


class ApiFailure(click.ClickException):
    """A failure printed as ``Error: MESSAGE`` (and the API's details, one per line), exiting
    with ``exit_code``."""

    def __init__(
        self,
        message: str,
        exit_code: int = FAILED,
        details: Iterable[str] = (),
        status: int | None = None,
    ) -> None:
        lines = [message, *(f"  {d}" for d in details)]
        super().__init__("\n".join(lines))
        self.exit_code = exit_code
        self.status = status  # the HTTP status of the answer, None when there was none


# --- the config file ----------------------------------------------------------------------------


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/cloudtask/cli.json``, ``~/.config/cloudtask/cli.json`` without it."""
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "cloudtask" / CONFIG_NAME


def _unsafe_mode(path: Path, info: os.stat_result) -> str | None:
    """Why the file may not be trusted with a token, or None (always None on Windows)."""
    if os.name == "nt":
        return None
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {info.st_uid})"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        return (
            f"{path} may be read or changed by other users (mode {mode:04o}); it holds API "
            f"tokens: run `chmod 600 {path}`"
        )
    return None


def read_config(path: Path | None = None) -> dict[str, Any]:
    """The config file's content (``{}`` when there is none); an unusable file is an
    :class:`ApiFailure` (exit 2) that says what is wrong with it."""
    path = path or config_path()
    try:
        info = path.stat()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ApiFailure(f"cannot read {path}: {e.strerror}", BAD_INPUT) from None
    problem = _unsafe_mode(path, info)
    if problem:
        raise ApiFailure(f"not reading {problem}", BAD_INPUT)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ApiFailure(f"cannot read {path}: {e.strerror}", BAD_INPUT) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if hasattr(e, "lineno") else ""
        raise ApiFailure(
            f"{path} is not valid JSON{where}: fix it, or delete it and run `cloudtask login`",
            BAD_INPUT,
        ) from None
    problems = _config_problems(data)
    if problems:
        raise ApiFailure(f"{path} is not a CloudTask CLI config:", BAD_INPUT, problems)
    return data


def _config_problems(data: Any) -> list[str]:
    if not isinstance(data, dict):
        return ["expected a JSON object"]
    problems = []
    if "url" in data and not isinstance(data["url"], str):
        problems.append("url: expected a string")
    servers = data.get("servers", {})
    if not isinstance(servers, dict):
        return [*problems, "servers: expected an object of URL: {token, username}"]
    for url, entry in servers.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            problems.append(f"servers.{url}: expected an object with a token string")
    return problems


def write_config(data: Mapping[str, Any], path: Path | None = None) -> Path:
    """Write the config file, mode 0600 in a folder of mode 0700: a new file renamed over
    the old one, so the old one stays whole if anything fails on the way."""
    path = path or config_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".cli-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ApiFailure(f"cannot write {path}: {e.strerror}", FAILED) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp makes it 0600
            json.dump(data, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        if os.name != "nt":
            os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ApiFailure(f"cannot write {path}: {e.strerror}", FAILED) from None
    return path


def save_login(
    url: str, token: str, username: str | None, *, made: bool = False, path: Path | None = None
) -> Path:
    """Keep ``token`` for ``url`` and make ``url`` the default site; ``made``: the token was
    made by ``cloudtask login`` (so ``logout`` revokes it)."""
    path = path or config_path()
    data = read_config(path)
    servers = dict(data.get("servers") or {})
    servers[url] = {
        "token": token,
        "username": username,
        "made_by_login": made,
        "saved_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    return write_config({**data, "url": url, "servers": servers}, path)


def saved_login(url: str | None, path: Path | None = None) -> tuple[str, dict[str, Any]] | None:
    """The URL and entry of the login kept for ``url`` (the default site when None)."""
    data = read_config(path or config_path())
    url = normalize_url(url) if url else data.get("url")
    entry = (data.get("servers") or {}).get(url) if url else None
    return (url, entry) if url and entry else None


def forget_login(url: str, path: Path | None = None) -> bool:
    """Drop the token kept for ``url``; whether there was one."""
    path = path or config_path()
    data = read_config(path)
    servers = dict(data.get("servers") or {})
    if url not in servers:
        return False
    del servers[url]
    out = {**data, "servers": servers}
    if out.get("url") == url:
        out.pop("url")
    write_config(out, path)
    return True


# --- where the site is --------------------------------------------------------------------------


def normalize_url(raw: str, source: str = "--url") -> str:
    """``https://host[:port][/prefix]`` without a trailing slash or ``/api/v1``; anything
    else is an :class:`ApiFailure` (exit 2)."""
    text = raw.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiFailure(
            f"{source}: expected the web site's address, such as https://cloudtask.example.com "
            f"or http://127.0.0.1:8080, got {raw[:200]!r}",
            BAD_INPUT,
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ApiFailure(
            f"{source}: the address may not carry a query, a fragment or credentials "
            f"(log in with `cloudtask login`), got {raw[:200]!r}",
            BAD_INPUT,
        )
    path = parts.path.rstrip("/")
    if path.endswith(API_PREFIX):
        path = path[: -len(API_PREFIX)]
    return f"{parts.scheme}://{parts.netloc}{path}"


def running_web_url() -> str | None:
    """The web address of the cluster ``cloudtask up`` runs from the current folder, if
    any (and if this CloudTask knows where ``up`` writes it)."""
    try:
        from ..localstate import running_cluster
    except ImportError:
        return None
    state = running_cluster()
    url = (state or {}).get("web_url")
    return url if isinstance(url, str) and url else None


@dataclass(frozen=True)
class Target:
    """The site a command talks to: its URL, the token (None: none known), where each came
    from (for messages), and how TLS is checked (``verify``: True, False or a CA file)."""

    url: str
    token: str | None
    url_from: str
    token_from: str | None
    verify: bool | str


def tls_verify(insecure: bool) -> bool | str:
    """False with ``--insecure``; else the CA file of ``CLOUDTASK_CA_BUNDLE`` (which must
    exist); else True (requests' CA list)."""
    if insecure:
        return False
    bundle = os.environ.get(ENV_CA)
    if bundle:
        if not Path(bundle).is_file():
            raise ApiFailure(f"{ENV_CA}: no such file {bundle!r}", BAD_INPUT)
        return bundle
    return True


def resolve(
    url: str | None, token: str | None, insecure: bool = False, *, need_token: bool = True
) -> Target:
    """The :class:`Target` of a command's ``--url``, ``--token`` and ``--insecure`` (see the
    module's docstring for the order). No URL anywhere is exit 2; no token (when
    ``need_token``) exit 4, both saying how to give one."""
    config: dict[str, Any] | None = None

    def cfg() -> dict[str, Any]:
        nonlocal config
        if config is None:
            config = read_config()
        return config

    if url:
        found, url_from = normalize_url(url, "--url"), "--url"
    elif os.environ.get(ENV_URL):
        found, url_from = normalize_url(os.environ[ENV_URL], ENV_URL), ENV_URL
    elif cfg().get("url"):
        found, url_from = normalize_url(cfg()["url"], str(config_path())), str(config_path())
    elif (local := running_web_url()) is not None:
        found, url_from = normalize_url(local, "the running cluster"), "the running cluster"
    else:
        raise ApiFailure(
            "no CloudTask web address: give --url URL, set CLOUDTASK_URL, run `cloudtask "
            "login --url URL`, or run the command in the folder where `cloudtask up` runs",
            BAD_INPUT,
        )
    token_from: str | None = None
    if token:
        token_from = "--token"
    elif os.environ.get(ENV_TOKEN):
        token, token_from = os.environ[ENV_TOKEN].strip(), ENV_TOKEN
    else:
        entry = (cfg().get("servers") or {}).get(found)
        if entry:
            token, token_from = entry["token"], str(config_path())
    if need_token and not token:
        raise ApiFailure(f"not logged in to {found}: {LOGIN_HINT}", NOT_ALLOWED)
    if token:
        token = check_token(token, token_from or "--token")
    verify = tls_verify(insecure)
    return Target(found, token or None, url_from, token_from, verify)


def check_token(token: str, source: str) -> str:
    """``token`` without surrounding blanks; one that cannot be an API token (blanks or
    control characters inside, not ASCII) is an :class:`ApiFailure` (exit 2) that does not
    repeat it."""
    text = token.strip()
    if not text or not text.isascii() or not text.isprintable() or " " in text:
        raise ApiFailure(
            f"the API token from {source} is not a token (it has blanks, control characters "
            "or non-ASCII letters): copy it again",
            BAD_INPUT,
        )
    return text


# --- the client ---------------------------------------------------------------------------------


def _api_message(answer: Any) -> tuple[str | None, list[str]]:
    """The API's ``error`` and its ``details`` as ``path: message`` lines, if the answer is
    the API's JSON error."""
    try:
        body = answer.json()
    except ValueError:
        return None, []
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return None, []
    details = []
    for d in body.get("details") or []:
        if isinstance(d, dict):
            path, message = d.get("path"), d.get("message")
            details.append(f"{path}: {message}" if path else str(message))
    return body["error"], details


def _is_json(answer: Any) -> bool:
    return (answer.headers.get("Content-Type") or "").split(";")[0].strip().endswith("json")


class Api:
    """A session on one site's API. Every method answers the parsed JSON of a success or
    raises :class:`ApiFailure` with the exit code of what went wrong."""

    def __init__(self, target: Target) -> None:
        import requests  # imported here: the other commands do not pay for it

        self.target = target
        self.requests = requests
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"cloudtask-cli/{__version__}"
        self.session.headers["Accept"] = "application/json"
        if target.token:
            self.session.headers["Authorization"] = f"Bearer {target.token}"
        self.session.verify = target.verify
        if target.verify is False:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.last: Any = None  # the last answer (its text is what --json prints)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return self.target.url + API_PREFIX + path

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float = READ_TIMEOUT,
    ) -> Any:
        """``method`` on ``/api/v1`` + ``path``: the JSON of a 2xx answer."""
        headers = {"Content-Type": content_type} if content_type else {}
        query = {k: v for k, v in (params or {}).items() if v is not None}
        answer = self.send(
            method,
            self.url(path),
            params=query,
            json=body,
            data=data,
            headers=headers,
            timeout=(CONNECT_TIMEOUT, timeout),
        )
        self.last = answer
        return self._checked(answer)

    def send(self, method: str, url: str, **kwargs: Any) -> Any:
        """The answer to one request (redirects not followed: a POST must not turn into a
        GET on the way); a site that cannot be reached is an :class:`ApiFailure` (exit 5)."""
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT, READ_TIMEOUT))
        # given with each request: requests lets REQUESTS_CA_BUNDLE override a session's
        # verify=False (--insecure) or CA file
        kwargs.setdefault("verify", self.target.verify)
        try:
            return self.session.request(method, url, allow_redirects=False, **kwargs)
        except self.requests.exceptions.SSLError as e:
            raise ApiFailure(
                f"cannot check the TLS certificate of {self.target.url}: {_reason(e)}; give "
                f"the CA's certificate with {ENV_CA}=FILE, or --insecure to skip the check",
                UNREACHABLE,
            ) from None
        except (
            self.requests.exceptions.ConnectionError,
            self.requests.exceptions.Timeout,
        ) as e:
            raise ApiFailure(
                f"cannot reach the CloudTask web site at {self.target.url} "
                f"(from {self.target.url_from}): {_reason(e)}",
                UNREACHABLE,
            ) from None
        except self.requests.exceptions.RequestException as e:
            raise ApiFailure(f"the request to {self.target.url} failed: {e}", FAILED) from None

    def _checked(self, answer: Any) -> Any:
        status = answer.status_code
        if 300 <= status < 400:
            where = answer.headers.get("Location", "elsewhere")
            raise ApiFailure(
                f"{self.target.url} redirects the API to {where}: give that site's address "
                "with --url (or CLOUDTASK_URL)",
                FAILED,
            )
        if status < 300:
            if not _is_json(answer):
                raise self._not_api(answer)
            try:
                return answer.json()
            except ValueError:
                raise self._not_api(answer) from None
        message, details = _api_message(answer)
        if message is None:
            if status in (502, 503, 504) or not _is_json(answer):
                raise self._not_api(answer)
            message = f"the server answered {status}"
        code = FAILED
        if status == 401:
            code = NOT_ALLOWED
            if self.target.token_from:
                message += f" (the token from {self.target.token_from}; {LOGIN_HINT})"
        elif status == 403:
            code = NOT_ALLOWED
        elif status == 404 and message.startswith(NO_ROUTE):
            request = answer.request
            route = urlsplit(request.url).path if request is not None else "?"
            method = request.method if request is not None else ""
            raise ApiFailure(
                f"{self.target.url} has no API route {method} {route}: is it an older "
                "CloudTask than this command?",
                FAILED,
            )
        elif status == 404:
            code = NOT_FOUND
        elif status in (400, 422):
            code = BAD_INPUT
        raise ApiFailure(message, code, details, status)

    def _not_api(self, answer: Any) -> ApiFailure:
        kind = (answer.headers.get("Content-Type") or "no content type").split(";")[0]
        return ApiFailure(
            f"{self.target.url} answered {answer.status_code} {answer.reason or ''} with "
            f"{kind}, not CloudTask's API: is it the web site's address (from "
            f"{self.target.url_from})?".replace("  ", " "),
            FAILED,
            status=answer.status_code,
        )

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params)

    def post(self, path: str, body: Any = None, **params: Any) -> Any:
        return self.call("POST", path, params=params, body=body)


def _reason(error: Exception) -> str:
    """The innermost reason of a requests error, without urllib3's object reprs."""
    text = str(error)
    for marker in ("Caused by ", "Failed to establish a new connection: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = text.strip("()'\" ")
    if "] " in text and text.startswith("<"):  # "<urllib3... object at 0x..>: [Errno 111] ..."
        text = text.split(": ", 1)[-1]
    return text[:300] or type(error).__name__


def segment(value: str) -> str:
    """``value`` as one path segment (a name with ``/`` or ``?`` stays one)."""
    return quote(value, safe="")


def echo_json(answer: Any) -> None:
    """Print an answer's JSON exactly as the API sent it."""
    text = answer.text if hasattr(answer, "text") else json.dumps(answer, indent=2)
    click.echo(text.rstrip("\n"))

"""Helpers shared by the tests: ``from helpers import wait_for``.

* ``task_spec`` is a task definition with defaults (hourly, ``true``); ``make_task`` stores
  one. Every test module builds its tasks with these two.
* ``wait_for`` polls a condition; ``start`` / ``finished`` run a task on an executor.
* ``run_document`` is a run of a stored task as an agent stores one; ``serve_http`` serves a
  ``QuietHandler`` locally (a service for http tasks).
* The web site: ``make_web_app`` (an app on a store, with users such as ``OPERATOR`` and
  ``VIEWER``), ``form_csrf`` (a form's hidden token), ``post_login`` and ``web_login`` (which
  returns the session's CSRF token).

``tests/`` has no ``__init__.py``, so pytest (default "prepend" import mode) puts this folder
on ``sys.path`` when it loads ``tests/conftest.py``; test modules import this file by name.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from aiosmtpd.controller import Controller

from cloudtask.agent.executor import Executor
from cloudtask.agent.run import RunContext
from cloudtask.runmodel import RUNNING_STATUSES, new_run_document
from cloudtask.store import Store
from cloudtask.task import parse_task
from cloudtask.users import Users

if TYPE_CHECKING:  # the web site is imported only by the tests that make an app
    from flask import Flask
    from flask.testing import FlaskClient
    from kazoo.client import KazooClient

    from cloudtask.config import Config

T = TypeVar("T")

DEFAULT_SPEC: dict[str, Any] = {"schedule": {"every": "1h"}, "command": "true"}


def task_spec(name: str = "job", **over: Any) -> dict[str, Any]:
    """A task definition: ``name``, hourly, ``true``, with ``over`` on top."""
    return {"name": name, **DEFAULT_SPEC, **over}


def make_task(store: Store, name: str = "job", **over: Any) -> dict[str, Any]:
    """Store :func:`task_spec` ``(name, **over)``; returns the task document."""
    return store.create_task(task_spec(name, **over))


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value.

    Returns that value. Raises AssertionError (with ``message``) after ``timeout`` seconds;
    the predicate is always called once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f": {message}" if message else ""
            raise AssertionError(
                f"condition not met within {timeout:g} s{detail} (last value: {value!r})"
            )
        time.sleep(interval)


def holds(
    predicate: Callable[[], Any], seconds: float, interval: float = 0.05, message: str = ""
) -> None:
    """Assert that ``predicate`` stays truthy for ``seconds`` (checked every ``interval``):
    for what must *not* happen (a removed task fires no more, a quiet leader writes nothing).
    Fails at the first look that finds it false."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if not value:
            detail = f": {message}" if message else ""
            raise AssertionError(f"condition stopped holding{detail} (value: {value!r})")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def start(store: Store, executor: Executor, task: dict, attempt: int = 0) -> RunContext:
    """Claim a run of a task (given as spec fields) and hand it to ``executor``."""
    spec = parse_task({"name": "t", "schedule": {"every": "1h"}, **task})
    task_id = f"task-{secrets.token_hex(4)}"  # runs started in the same millisecond stay apart
    now = datetime.now(timezone.utc)
    doc = new_run_document(
        task_id=task_id,
        task_name=spec.name,
        group=spec.group,
        revision=1,
        scheduled_for=now,
        slot="one",
        attempt=attempt,
        trigger="manual",
        agent="a1",
        status="queued",
        now=now,
    )
    assert store.claim_runs([doc]) == [True]
    ctx = RunContext(
        run_id=doc["_id"],
        task_id=task_id,
        revision=1,
        spec=spec,
        scheduled_for=doc["scheduled_for"],
        attempt=attempt,
        trigger="manual",
        token=secrets.token_hex(8),
        agent="a1",
    )
    executor.submit(ctx, doc)
    return ctx


def finished(store: Store, run_id: str, timeout: float = 20.0) -> dict:
    """The run's document once it is no longer queued, claimed or running."""
    return wait_for(
        lambda: (d := store.get_run(run_id)) and d["status"] not in RUNNING_STATUSES and d,
        timeout=timeout,
        message=f"run {run_id} did not finish",
    )


def run_document(
    task: dict,
    when: datetime,
    *,
    status: str = "running",
    agent: str | None = "agent-1",
    attempt: int = 0,
    trigger: str = "schedule",
    **more: Any,
) -> dict:
    """A run of ``task`` (a stored task) scheduled for and claimed at ``when``, slot ``one``,
    as an agent makes one (see :func:`cloudtask.store.new_run_document`; ``more``: its
    ``token_hash`` or ``session``). Not stored."""
    return new_run_document(
        task_id=task["_id"],
        task_name=task["name"],
        group=task["group"],
        revision=task["revision"],
        scheduled_for=when,
        slot="one",
        attempt=attempt,
        trigger=trigger,
        agent=agent,
        status=status,
        now=when,
        **more,
    )


def journal_ends(path: Path) -> dict[str, dict]:
    """Run id -> the final state the run journal file at ``path`` holds for it."""
    ends = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "end" in entry:
            ends[entry["end"]] = entry["state"]
    return ends


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing; ``reply`` answers with a status and a body."""

    def reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free port of 127.0.0.1 in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- the web site -----------------------------------------------------------------------------


class Api:
    """A test client of the REST API that sends a user's Bearer token (or none):
    ``Api(app.test_client(), token).get("/tasks")``."""

    def __init__(self, client: FlaskClient, token: str | None = None) -> None:
        self.client, self.token = client, token

    def __call__(self, method: str, path: str, headers: Any = None, **kw: Any) -> Any:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return self.client.open("/api/v1" + path, method=method, headers=headers, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self("PATCH", path, **kw)

    def put(self, path: str, **kw: Any) -> Any:
        return self("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self("DELETE", path, **kw)


def error_of(answer: Any, status: int) -> dict[str, Any]:
    """The JSON error of an API answer that must have ``status``: it says what is wrong."""
    assert answer.status_code == status, (answer.status_code, answer.get_data(as_text=True))
    body = answer.get_json()
    assert isinstance(body["error"], str) and body["error"]
    return body


def paths_of(body: dict[str, Any]) -> list[str]:
    """The paths of an API error's details, in order."""
    return [d["path"] for d in body["details"]]


class WebUser(NamedTuple):
    name: str
    password: str
    role: str


ADMIN = WebUser("root", "admin passphrase", "admin")
OPERATOR = WebUser("op1", "operator passphrase", "operator")
VIEWER = WebUser("viewer1", "viewer passphrase", "viewer")


def make_web_app(
    store: Store,
    zk: KazooClient | None = None,
    config: Config | None = None,
    users: Iterable[tuple[str, str, str]] = (OPERATOR, VIEWER),
    **test_config: Any,
) -> Flask:
    """The web app on ``store`` (and ``zk``, None: no cluster), TESTING, with ``test_config``
    added, and ``users`` (name, password, role) added to the store unless it has them already
    (an app made twice on one store)."""
    from web import create_app

    app = create_app(config, test_config={"STORE": store, "TESTING": True, "ZK": zk, **test_config})
    for name, password, role in users:
        if store.users.find_one({"_id": name}) is None:
            Users(store).add(name, password, role=role)
    return app


def form_csrf(client: FlaskClient, path: str = "/login") -> str:
    """The hidden ``csrf_token`` of the form on the page at ``path``."""
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def post_login(client: FlaskClient, username: str, password: str) -> Any:
    """Post the login form (with the login page's token); returns the answer."""
    data = {"username": username, "password": password, "csrf_token": form_csrf(client)}
    return client.post("/login", data=data)


def web_login(client: FlaskClient, username: str, password: str, page: str = "/") -> str:
    """Log in through the form (which must succeed); returns the session's CSRF token, read
    from the ``<meta name="csrf-token">`` of the page at ``page``."""
    answer = post_login(client, username, password)
    assert answer.status_code == 302, (username, answer.status_code)
    html = client.get(page).get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


# --- a real SMTP server -------------------------------------------------------------------


class Inbox:
    """An aiosmtpd handler keeping every message it is given (``envelopes`` keeps the SMTP
    envelope: ``mail_from``, ``rcpt_tos``)."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201, N802
        with self.lock:
            self.envelopes.append(envelope)
        return "250 OK"

    def messages(self) -> list[tuple[list[str], email.message.EmailMessage]]:
        with self.lock:
            envs = list(self.envelopes)
        return [
            (
                list(e.rcpt_tos),
                email.message_from_bytes(e.original_content, policy=email.policy.default),
            )
            for e in envs
        ]

    def by_recipient(self) -> dict[str, list[email.message.EmailMessage]]:
        out: dict[str, list[email.message.EmailMessage]] = {}
        for rcpts, msg in self.messages():
            for r in rcpts:
                out.setdefault(r.lower(), []).append(msg)
        return out


class SmtpServer:
    """A real SMTP server (aiosmtpd) on 127.0.0.1:``port``; ``kwargs`` go to its Controller."""

    def __init__(self, port: int, **kwargs: Any) -> None:
        self.port = port
        self.inbox = Inbox()
        self.kwargs = kwargs
        self.controller: Controller | None = None

    def start(self) -> SmtpServer:
        self.controller = Controller(
            self.inbox, hostname="127.0.0.1", port=self.port, **self.kwargs
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


class Receiver:
    """A webhook receiver: records each request; answers ``status`` after ``delay`` seconds."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append({"headers": headers, "body": body})
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

"""HTTP tasks: the agent calls a web service instead of starting a process.

The request carries the run's identity (``X-CloudTask-*`` headers, the same facts a process
gets in its environment) and a per-run token, so a long-running service can report progress
and its result later through the API. ``strategy`` picks the endpoint: ``first`` always the
first URL, ``random`` one at random, ``failover`` each in turn while connections fail.

Callback tasks (``http.callback: true``): the service answers at once and reports later
(``POST /api/v1/runs/<id>/progress`` and ``/result``, authenticated by the run's token; the
API stores the reports, see ``Store.get_report``). When the first answer is the expected one
the run stays ``running`` and the agent, the only writer of the run document, polls the report
about once a second (a find by ``_id``):

* a progress report is copied into the run document as ``progress: {percent, message, at}``
  (written with the run's other live changes, within about a second) and logged when its
  message changes;
* a result finishes the run: ``succeeded``, or ``failed`` with the service's message as its
  ``error``; the message is also added to the log and the output;
* the task's ``timeout`` (counted from the start of the run) ends the wait as ``timed_out``;
  a task without one waits at most :data:`DEFAULT_CALLBACK_WAIT` (24 h), so a lost callback
  cannot hold a ``forbid`` task forever;
* a kill (request, replacement, agent shutdown) ends the wait at once as ``killed``;
* while MongoDB cannot be read the wait goes on (logged once per outage); the timeout still
  holds.

A first answer that is not the expected status fails the run at once, as without callback.
If the agent dies while waiting, the leader marks the run ``lost``; a result posted after that
is refused by the API (the run is no longer running).
"""

from __future__ import annotations

import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from .. import netpolicy
from ..exceptions import StoreError
from .logfiles import RunLog
from .run import RunContext

log = logging.getLogger(__name__)

DEFAULT_HTTP_TIMEOUT = 60.0
# the longest a callback run of a task without a timeout waits for its service's result
DEFAULT_CALLBACK_WAIT = 24 * 3600.0
CALLBACK_POLL_INTERVAL = 1.0  # seconds between two reads of the service's report

ReadReport = Callable[[str], "dict[str, Any] | None"]
ShowProgress = Callable[["RunContext", "dict[str, Any]"], None]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: the request carries the run's token (and the task's own
    headers, perhaps credentials), which must not go to wherever a 3xx points. A 3xx is the
    answer: a failure unless ``expect_status`` names it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        return None


# its connections keep to the process's deny-list of networks (security.egress_filter)
_OPENER = urllib.request.build_opener(_NoRedirects, *netpolicy.url_handlers())


def endpoint_order(urls: tuple[str, ...], strategy: str) -> list[str]:
    if strategy == "random":
        return [random.choice(urls)]
    if strategy == "failover":
        return list(urls)
    return [urls[0]]


def request_headers(ctx: RunContext) -> dict[str, str]:
    headers = {"User-Agent": "cloudtask-agent"}
    if ctx.spec.http:
        headers.update(ctx.spec.http.headers)
        opened = ctx.secrets or {}
        headers.update(
            {h: opened[name] for h, name in ctx.spec.http.secret_headers.items() if name in opened}
        )
    for name, value in ctx.environment().items():
        # CLOUDTASK_RUN_ID -> X-CloudTask-Run-Id
        suffix = "-".join(part.capitalize() for part in name.split("_")[1:])
        headers[f"X-CloudTask-{suffix}"] = value
    headers["X-CloudTask-Token"] = ctx.token
    return headers


def _expected(status: int, expect: tuple[int, ...] | None) -> bool:
    return status in expect if expect else 200 <= status < 300


def run_http(
    ctx: RunContext,
    runlog: RunLog,
    *,
    read_report: ReadReport | None = None,
    show_progress: ShowProgress | None = None,
) -> None:
    """Call the task's endpoint(s); set status, http_status, error and output on ``ctx``.

    A callback task then waits for its service's result: ``read_report(run_id)`` returns the
    stored report (raising StoreError when MongoDB cannot be read) and ``show_progress(ctx,
    progress)`` puts a progress report into the run document.
    """
    http = ctx.spec.http
    assert http is not None
    started = time.monotonic()
    deadline = started + ctx.spec.timeout if ctx.spec.timeout else None
    body_text = (ctx.secrets or {}).get(http.body_secret) if http.body_secret else http.body
    body = body_text.encode("utf-8") if body_text is not None else None
    headers = request_headers(ctx)
    if body is not None and not any(h.lower() == "content-type" for h in headers):
        headers["Content-Type"] = "application/json"
    errors: list[str] = []
    for url in endpoint_order(http.urls, http.strategy):
        timeout = http.timeout or ctx.spec.timeout or DEFAULT_HTTP_TIMEOUT
        if deadline is not None:
            timeout = min(timeout, max(0.001, deadline - time.monotonic()))
        request = urllib.request.Request(url, data=body, method=http.method, headers=headers)
        runlog.line(f"{http.method} {url}")
        try:
            try:
                response = _OPENER.open(request, timeout=timeout)
            except urllib.error.HTTPError as e:
                response = e  # a status outside 2xx is still an answer
            with response:
                ctx.http_status = response.status
                while True:
                    chunk = response.read(65536)
                    if not chunk:
                        break
                    ctx.record_output(chunk, runlog)
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError
                ctx.end_output(runlog)
        except TimeoutError:
            ctx.kill_reason = ctx.kill_reason or "timeout"
            ctx.status = "timed_out"
            ctx.error = f"{url} did not answer within {timeout:.3g}s"
            runlog.line(ctx.error)
            return
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                ctx.status, ctx.error = "timed_out", f"{url} did not answer within {timeout:.3g}s"
                runlog.line(ctx.error)
                return
            errors.append(f"{url}: {reason}")
            runlog.line(f"cannot reach {url}: {reason}")
            continue  # failover tries the next endpoint; the others have no next
        if ctx.kill_reason is not None:
            ctx.status, ctx.error = "killed", ctx.kill_reason
        elif _expected(ctx.http_status, http.expect_status):
            if http.callback:
                runlog.line(f"HTTP {ctx.http_status}")
                _wait_for_result(ctx, runlog, started, deadline, read_report, show_progress)
                return
            ctx.status = "succeeded"
        else:
            ctx.status = "failed"
            expected = ", ".join(map(str, http.expect_status)) if http.expect_status else "2xx"
            ctx.error = f"{url} answered {ctx.http_status}, expected {expected}"
        runlog.line(f"HTTP {ctx.http_status}")
        return
    ctx.status = "failed"
    ctx.error = "no endpoint could be reached: " + "; ".join(errors)


def _wait_for_result(
    ctx: RunContext,
    runlog: RunLog,
    started: float,
    deadline: float | None,
    read_report: ReadReport | None,
    show_progress: ShowProgress | None,
) -> None:
    """Wait for the service's result (see the module docstring); set status and error."""
    if read_report is None:  # an executor without a store cannot see any report
        ctx.status, ctx.error = "failed", "this agent cannot receive callbacks (no store)"
        runlog.line(ctx.error)
        return
    if deadline is None:
        limit = started + DEFAULT_CALLBACK_WAIT
        late = (
            f"no result came within {DEFAULT_CALLBACK_WAIT:g}s, the longest wait of a callback "
            "task without a timeout"
        )
    else:
        limit = deadline
        late = f"no result came within the task's timeout of {ctx.spec.timeout:g}s"
    runlog.line("waiting for the service to report its result")
    shown: tuple[Any, ...] | None = None  # the progress last put into the run document
    logged_message: str | None = None
    unreadable = False
    while True:
        if ctx.kill_reason is not None:
            ctx.status, ctx.error = "killed", ctx.kill_reason
            runlog.line(f"stopped waiting for the result: {ctx.kill_reason}")
            return
        now = time.monotonic()
        if now >= limit:
            ctx.kill_reason = ctx.kill_reason or "timeout"
            ctx.status, ctx.error = "timed_out", late
            runlog.line(late)
            return
        next_poll = now + CALLBACK_POLL_INTERVAL
        try:
            report = read_report(ctx.run_id)
        except StoreError as e:
            if not unreadable:  # once per outage: the log must not fill up while it lasts
                unreadable = True
                runlog.line(f"cannot read the service's report yet, still waiting: {e}")
                log.warning("run %s: cannot read its callback report yet: %s", ctx.run_id, e)
            report = None
        else:
            if unreadable:
                unreadable = False
                runlog.line("the service's report can be read again")
        if report:
            progress = {
                "percent": report.get("percent"),
                "message": report.get("message") or "",
                "at": report.get("updated_at"),
            }
            key = (progress["percent"], progress["message"])
            if key != shown and not (shown is None and key == (None, "")):  # (None, ""): a
                # result without any progress before it
                shown = key
                if show_progress is not None:
                    show_progress(ctx, progress)
                if progress["message"] and progress["message"] != logged_message:
                    logged_message = progress["message"]
                    percent = progress["percent"]
                    prefix = f"{percent:g}% " if isinstance(percent, (int, float)) else ""
                    runlog.line(f"progress {prefix}{progress['message']}")
            result = report.get("result")
            if result:
                _finish(ctx, runlog, result)
                return
        runlog.flush()  # a long wait is followed live in the log file
        # sleep until the next poll, waking at once for a kill
        ctx.kill_requested.wait(max(0.0, min(next_poll, limit) - time.monotonic()))


def _finish(ctx: RunContext, runlog: RunLog, result: dict[str, Any]) -> None:
    status = result.get("status")
    message = str(result.get("message") or "")
    if status == "succeeded":
        ctx.status = "succeeded"
    else:
        ctx.status = "failed"
        if status == "failed":
            ctx.error = message or "the service reported a failure without a message"
        else:  # the API accepts only the two; a stored oddity must still end the run
            ctx.error = f"the service reported an unknown result {status!r}: {message}"
    line = f"result {status}" + (f": {message}" if message else "")
    with ctx.lock:
        newline = bool(ctx.tail) and not ctx.tail.endswith(b"\n")
    ctx.append_output(("\n" if newline else "").encode() + f"{line}\n".encode())
    runlog.line(line)

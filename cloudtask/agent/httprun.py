"""HTTP tasks: the agent calls a web service instead of starting a process.

The request carries the run's identity (``X-CloudTask-*`` headers, the same facts a process
gets in its environment) and a per-run token, so a long-running service can report progress
and its result later through the API. ``strategy`` picks the endpoint: ``first`` always the
first URL, ``random`` one at random, ``failover`` each in turn while connections fail.
"""

from __future__ import annotations

import random
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .executor import RunContext
    from .logfiles import RunLog

DEFAULT_HTTP_TIMEOUT = 60.0


def endpoint_order(urls: tuple[str, ...], strategy: str) -> list[str]:
    if strategy == "random":
        return [random.choice(urls)]
    if strategy == "failover":
        return list(urls)
    return [urls[0]]


def request_headers(ctx: RunContext) -> dict[str, str]:
    headers = {"User-Agent": "cloudtask-agent"}
    headers.update(ctx.spec.http.headers if ctx.spec.http else {})
    for name, value in ctx.environment().items():
        # CLOUDTASK_RUN_ID -> X-CloudTask-Run-Id
        suffix = "-".join(part.capitalize() for part in name.split("_")[1:])
        headers[f"X-CloudTask-{suffix}"] = value
    headers["X-CloudTask-Token"] = ctx.token
    return headers


def _expected(status: int, expect: tuple[int, ...] | None) -> bool:
    return status in expect if expect else 200 <= status < 300


def run_http(ctx: RunContext, runlog: RunLog) -> None:
    """Call the task's endpoint(s); set status, http_status, error and output on ``ctx``."""
    http = ctx.spec.http
    assert http is not None
    deadline = time.monotonic() + ctx.spec.timeout if ctx.spec.timeout else None
    body = http.body.encode("utf-8") if http.body is not None else None
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
                response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http/https only)
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
            ctx.status = "succeeded"
        else:
            ctx.status = "failed"
            expected = ", ".join(map(str, http.expect_status)) if http.expect_status else "2xx"
            ctx.error = f"{url} answered {ctx.http_status}, expected {expected}"
        runlog.line(f"HTTP {ctx.http_status}")
        return
    ctx.status = "failed"
    ctx.error = "no endpoint could be reached: " + "; ".join(errors)

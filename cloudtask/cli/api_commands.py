"""The command groups that talk to the web site's REST API: ``tasks``, ``runs``, ``agents``,
``events`` and ``plans``.

They need the site's address and an API token (``--url``/``--token``, ``CLOUDTASK_URL``/
``CLOUDTASK_TOKEN``, or what ``cloudtask login`` saved: see :mod:`~cloudtask.cli.remote`),
not the cluster's config file; the roles are the server's. People get tables (times in the
local time zone), scripts ``--json`` (the API's JSON as it came) and the exit codes of
:mod:`~cloudtask.cli.remote`: 0 ok, 1 refused or failed, 2 bad input, 3 not found, 4 not
logged in or not allowed, 5 unreachable. A task may be named by its name or its id
everywhere.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

from ..durations import parse_duration
from ..runmodel import FINISHED_STATUSES, STATUSES
from .api_output import (
    duration,
    echo_table,
    facts,
    local_time,
    schedule_text,
    table,
    trim,
)
from .remote import (
    BAD_INPUT,
    FAILED,
    NOT_FOUND,
    OK,
    UNREACHABLE,
    Api,
    ApiFailure,
    echo_json,
    resolve,
    segment,
)

MAX_LIMIT = 500  # the API's largest page
TASK_STATES = ("enabled", "paused", "done")
LAST_RESULTS = ("succeeded", "failed", "never")
SEVERITIES = ("error", "warning", "info")
PLAN_ITEM_STATES = (
    "queued",
    "claimed",
    "running",
    "retrying",
    *FINISHED_STATUSES,
)
FOLLOW_INTERVAL = 1.0
FOLLOW_PATIENCE = 120.0  # seconds --follow waits out a site that does not answer
QUEUED_NOTE = 10.0  # seconds a followed run may wait for an agent before --follow says so


# --- what every command shares ------------------------------------------------------------------


def remote(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command ``--url``, ``--token`` and ``--insecure``, and call it with an
    :class:`~cloudtask.cli.remote.Api` on the site they name as its first argument."""

    @click.option(
        "--url",
        metavar="URL",
        help="The web site (else CLOUDTASK_URL, the config file of `cloudtask login`, or the "
        "cluster `cloudtask up` runs from this folder).",
    )
    @click.option(
        "--token",
        metavar="TOKEN",
        help="The API token (else CLOUDTASK_TOKEN, or the one `cloudtask login` saved for "
        "the URL). Prefer the environment: a command line is visible to other users.",
    )
    @click.option(
        "--insecure",
        is_flag=True,
        help="Do not check the site's TLS certificate (a CA file: CLOUDTASK_CA_BUNDLE).",
    )
    @functools.wraps(command)
    def wrapper(url: str | None, token: str | None, insecure: bool, **kwargs: Any) -> Any:
        with Api(resolve(url, token, insecure)) as api:
            return command(api, **kwargs)

    return wrapper


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the API's JSON answer as it came."
)
limit_option = click.option(
    "--limit",
    type=click.IntRange(1, MAX_LIMIT),
    default=50,
    show_default=True,
    help=f"How many to show (at most {MAX_LIMIT}; --page for more).",
)
page_option = click.option(
    "--page", type=click.IntRange(1, 1_000_000), default=1, show_default=True, help="Which page."
)


def since_time(value: str | None, option: str) -> str | None:
    """``--since``/``--until``: an ISO 8601 time (UTC without an offset) or a duration ago
    (``30m``, ``2h``, ``1d``), as the API's ISO 8601."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        return (datetime.now(timezone.utc) - timedelta(seconds=ago)).isoformat()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"expected a time such as 2026-12-04T06:00:00+01:00 or a duration ago such as "
            f"30m, 2h, 1d; got {value!r}",
            param_hint=option,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat()


def parse_env(items: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--env")
        params[name] = value
    return params


# --- tasks --------------------------------------------------------------------------------------


@click.group("tasks")
def tasks_group() -> None:
    """Tasks through the web site's API: list, show, run, pause, resume, delete, clone.

    The site and the token: --url/--token, CLOUDTASK_URL/CLOUDTASK_TOKEN, or `cloudtask
    login`. (`cloudtask task ...` works on the store itself, with the config file.)"""


def _last(task: dict[str, Any]) -> str:
    last = task.get("last_run") or {}
    if not last.get("status"):
        return "never"
    return f"{last['status']} {local_time(last.get('finished'), seconds=False)}"


@tasks_group.command("list")
@remote
@click.option("--group", help="Only this group.")
@click.option("--state", type=click.Choice(TASK_STATES), help="Only tasks in this state.")
@click.option("--owner", help="Only tasks of this owner (a person or team).")
@click.option("--last", type=click.Choice(LAST_RESULTS), help="Only tasks whose last run ended so.")
@click.option("--name", "prefix", metavar="PREFIX", help="Only names starting so (any case).")
@limit_option
@page_option
@json_option
def tasks_list(
    api: Api,
    group: str | None,
    state: str | None,
    owner: str | None,
    last: str | None,
    prefix: str | None,
    limit: int,
    page: int,
    as_json: bool,
) -> None:
    """List tasks, sorted by name."""
    answer = api.get(
        "/tasks",
        q=prefix,
        group=group,
        state=state,
        owner=owner,
        last=last,
        per_page=limit,
        page=page,
    )
    if as_json:
        return echo_json(api.last)
    rows = [
        (
            t["name"],
            t["group"],
            t.get("state"),
            schedule_text((t.get("spec") or {}).get("schedule")),
            _last(t),
            t.get("owner_agent"),
        )
        for t in answer["items"]
    ]
    headers = ("NAME", "GROUP", "STATE", "SCHEDULE", "LAST RUN", "AGENT")
    echo_table(headers, rows, what="tasks", flex=3, page=answer)


@tasks_group.command("show")
@remote
@click.argument("task")
@json_option
def tasks_show(api: Api, task: str, as_json: bool) -> None:
    """One task (by name or id): its state, schedule, next fires and definition."""
    t = api.get(f"/tasks/{segment(task)}")
    if as_json:
        return echo_json(api.last)
    _print_task(t)


def _print_task(t: dict[str, Any]) -> None:
    spec = t.get("spec") or {}
    last = t.get("last_run") or {}
    click.echo(
        facts(
            [
                ("name", t["name"]),
                ("id", t["id"]),
                ("group", t["group"]),
                ("state", t.get("state")),
                ("schedule", schedule_text(spec.get("schedule"))),
                ("owner agent", t.get("owner_agent") or "-"),
                ("revision", t.get("revision")),
                ("created", local_time(t.get("created_at"))),
                ("updated", local_time(t.get("updated_at"))),
                (
                    "last run",
                    f"{last.get('status')} {local_time(last.get('finished'))} "
                    f"({duration(last.get('duration'))}) run {last.get('id')}"
                    if last.get("status")
                    else "never",
                ),
            ]
        )
    )
    fires = t.get("next_fires")
    if fires:
        click.echo("next fires:")
        for fire in fires:
            click.echo(f"  {local_time(fire)}")
    for dep in t.get("dependencies") or []:
        click.echo(f"waits for: {json.dumps(dep, sort_keys=True)}")
    click.echo("definition (keys left empty not shown; --json has them all):")
    shown = {k: v for k, v in spec.items() if v not in (None, "", {}, [])}
    for line in json.dumps(shown, indent=2, sort_keys=True).splitlines():
        click.echo(f"  {line}")


@tasks_group.command("run")
@remote
@click.argument("task")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE", help="A run parameter.")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Print the run's output until it ends (exit 1 unless it succeeds).",
)
@json_option
def tasks_run(api: Api, task: str, env: tuple[str, ...], follow: bool, as_json: bool) -> None:
    """Run a task now, with parameters (environment values on top of its own)."""
    if follow and as_json:
        raise click.UsageError("--follow prints the output: leave out --json")
    params = parse_env(env)
    run = api.post(f"/tasks/{segment(task)}/run", {"env": params} if params else None)
    if as_json:
        return echo_json(api.last)
    click.echo(f"run {run['id']} of {run.get('task_name') or task} queued", err=follow)
    if follow:
        sys.exit(follow_run(api, run["id"]))


def _set_enabled(api: Api, task: str, action: str, as_json: bool) -> None:
    t = api.post(f"/tasks/{segment(task)}/{action}")
    if as_json:
        return echo_json(api.last)
    click.echo(f"{t['name']} is {t.get('state')}")


@tasks_group.command("pause")
@remote
@click.argument("task")
@json_option
def tasks_pause(api: Api, task: str, as_json: bool) -> None:
    """Pause a task: it fires no more until resumed (its running runs go on)."""
    _set_enabled(api, task, "pause", as_json)


@tasks_group.command("resume")
@remote
@click.argument("task")
@json_option
def tasks_resume(api: Api, task: str, as_json: bool) -> None:
    """Resume a paused task."""
    _set_enabled(api, task, "resume", as_json)


@tasks_group.command("delete")
@remote
@click.argument("task")
@click.option("--kill-running", is_flag=True, help="Also kill its runs that are still going.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
def tasks_delete(api: Api, task: str, kill_running: bool, yes: bool, as_json: bool) -> None:
    """Delete a task; its running runs finish unless --kill-running. Asks first on a
    terminal; elsewhere --yes is needed."""
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("deleting a task needs --yes when not asked on a terminal")
        click.confirm(f"Delete task {task!r}?", abort=True, err=True)
    params = {"kill_running": "true"} if kill_running else {}
    answer = api.call("DELETE", f"/tasks/{segment(task)}", params=params)
    if as_json:
        return echo_json(api.last)
    killed = answer.get("killed") or []
    click.echo(
        f"deleted {answer['deleted']['name']}" + (f"; killing {len(killed)} runs" if killed else "")
    )


@tasks_group.command("clone")
@remote
@click.argument("task")
@click.argument("new_name")
@json_option
def tasks_clone(api: Api, task: str, new_name: str, as_json: bool) -> None:
    """Copy a task under a new name; the copy is created paused (resume it when ready)."""
    doc = api.post(f"/tasks/{segment(task)}/clone", {"name": new_name})
    if as_json:
        return echo_json(api.last)
    click.echo(f"cloned {task} as {doc['name']} ({doc.get('state')}; id {doc['id']})")


# --- runs ---------------------------------------------------------------------------------------


@click.group("runs")
def runs_group() -> None:
    """Runs through the web site's API: list, show, output (--follow), kill."""


def _run_rows(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            r["id"],
            r.get("task_name") or r.get("task_id"),
            r.get("status"),
            local_time(r.get("scheduled_for")),
            duration(r.get("duration")),
            r.get("exit_code"),
            r.get("agent"),
            r.get("trigger"),
        )
        for r in items
    ]


@runs_group.command("list")
@remote
@click.option("--task", metavar="TASK", help="Only runs of this task (name or id; exit 3 if none).")
@click.option("--status", type=click.Choice(STATUSES), help="Only runs in this status.")
@click.option("--agent", help="Only runs of this agent.")
@click.option("--since", metavar="TIME", help="Scheduled at or after (ISO 8601, or 2h, 1d ago).")
@click.option("--until", metavar="TIME", help="Scheduled before (ISO 8601, or a duration ago).")
@limit_option
@page_option
@json_option
def runs_list(
    api: Api,
    task: str | None,
    status: str | None,
    agent: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    page: int,
    as_json: bool,
) -> None:
    """List runs, newest scheduled first."""
    since_at, until_at = since_time(since, "--since"), since_time(until, "--until")
    answer = api.get(
        "/runs",
        task=task,
        status=status,
        agent=agent,
        since=since_at,
        until=until_at,
        per_page=limit,
        page=page,
    )
    if as_json:
        return echo_json(api.last)
    headers = ("RUN", "TASK", "STATUS", "SCHEDULED", "TOOK", "EXIT", "AGENT", "TRIGGER")
    echo_table(headers, _run_rows(answer["items"]), what="runs", flex=1, page=answer)


def run_exit(status: str | None) -> int:
    """0 for a run that succeeded or is still going, 1 for one that ended otherwise."""
    return FAILED if status in FINISHED_STATUSES and status != "succeeded" else OK


@runs_group.command("show")
@remote
@click.argument("run_id")
@json_option
def runs_show(api: Api, run_id: str, as_json: bool) -> None:
    """One run. Exit 0 when it succeeded or is still going, 1 when it ended otherwise
    (failed, timed out, killed, lost, missed, skipped)."""
    r = api.get(f"/runs/{segment(run_id)}")
    if as_json:
        echo_json(api.last)
        sys.exit(run_exit(r.get("status")))
    report = r.get("report") or {}
    click.echo(
        facts(
            [
                ("run", r["id"]),
                ("task", f"{r.get('task_name')} ({r.get('task_id')})"),
                ("status", r.get("status")),
                ("trigger", r.get("trigger")),
                ("attempt", r.get("attempt")),
                ("agent", r.get("agent") or "-"),
                ("scheduled for", local_time(r.get("scheduled_for"))),
                ("started", local_time(r.get("started_at"))),
                ("finished", local_time(r.get("finished_at"))),
                ("took", duration(r.get("duration"))),
                ("exit code", r.get("exit_code")),
                ("error", r.get("error")),
                ("requested by", r.get("requested_by")),
                ("plan", r.get("plan_id")),
                ("report", trim(json.dumps(report, sort_keys=True), 200) if report else None),
            ]
        )
    )
    sys.exit(run_exit(r.get("status")))


@runs_group.command("output")
@remote
@click.argument("run_id")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Print new output until the run ends; exit 0 if it succeeded, 1 otherwise.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 60),
    default=FOLLOW_INTERVAL,
    show_default=True,
    help="Seconds between looks with --follow.",
)
@json_option
def runs_output(api: Api, run_id: str, follow: bool, interval: float, as_json: bool) -> None:
    """A run's output: the last 64 KiB it wrote (the whole output is in its agent's log).
    With --follow, new output as it comes, until the run ends."""
    if follow and as_json:
        raise click.UsageError("--follow prints the output as it comes: leave out --json")
    if follow:
        sys.exit(follow_run(api, run_id, interval))
    answer = api.get(f"/runs/{segment(run_id)}/output")
    if as_json:
        return echo_json(api.last)
    click.echo(answer.get("output") or "", nl=False)


def new_output(seen: str, now: str) -> tuple[str, bool]:
    """What ``now`` (the run's output tail) adds to ``seen`` (the tail printed before), and
    whether some output was lost between them (the tail moved on by more than it holds).

    The tail keeps the last 64 KiB: ``now`` is the end of ``seen`` followed by what is new,
    so the new part starts after the longest end of ``seen`` that ``now`` starts with."""
    if now.startswith(seen):
        return now[len(seen) :], False
    anchor = seen[-256:]
    at = now.rfind(anchor)
    while at >= 0:
        end = at + len(anchor)
        if seen.endswith(now[:end]):
            return now[end:], False
        at = now.rfind(anchor, 0, at + len(anchor) - 1)
    return now, bool(seen)


def _patient_get(api: Api, path: str, state: dict[str, float]) -> dict[str, Any] | None:
    """``api.get(path)``; None while the site does not answer or fails (5xx) for less than
    ``FOLLOW_PATIENCE`` seconds in a row (a restart), saying so once."""
    try:
        answer = api.get(path)
    except ApiFailure as e:
        if e.exit_code != UNREACHABLE and (e.status or 0) < 500:
            raise
        first = state.setdefault("failing_since", time.monotonic())
        if time.monotonic() - first > FOLLOW_PATIENCE:
            raise
        if not state.get("warned"):
            click.echo(f"warning: {e.format_message()}; trying again", err=True)
            state["warned"] = 1
        return None
    state.pop("failing_since", None)
    state.pop("warned", None)
    return answer


def follow_run(api: Api, run_id: str, interval: float = FOLLOW_INTERVAL) -> int:
    """Print a run's output as it comes until the run ends; then a line on standard error
    saying how it ended. The exit code: 0 if it succeeded, 1 otherwise."""
    seen = ""
    state: dict[str, float] = {}
    path = f"/runs/{segment(run_id)}/output"
    started, noted = time.monotonic(), False
    while True:
        answer = _patient_get(api, path, state)
        if answer is not None:
            waited = time.monotonic() - started
            if answer.get("status") == "queued" and not noted and waited >= QUEUED_NOTE:
                click.echo(
                    f"run {run_id} is still queued: no agent has taken it yet (is an agent "
                    "of its group running? `cloudtask agents list`)",
                    err=True,
                )
                noted = True
            text = answer.get("output") or ""
            new, lost = new_output(seen, text)
            if lost:
                click.echo("\n[... output the tail no longer holds was skipped ...]", err=True)
            if new:
                click.echo(new, nl=False)
            seen = text
            if answer.get("status") in FINISHED_STATUSES:
                break
        time.sleep(interval)
    run = api.get(f"/runs/{segment(run_id)}")
    if seen and not seen.endswith("\n"):
        click.echo("")
    status = run.get("status")
    how = f"run {run_id} {status}"
    if run.get("exit_code") is not None:
        how += f" (exit code {run['exit_code']})"
    if run.get("duration") is not None:
        how += f" after {duration(run['duration'])}"
    if run.get("error"):
        how += f": {run['error']}"
    click.echo(how, err=True)
    return OK if status == "succeeded" else FAILED


@runs_group.command("kill")
@remote
@click.argument("run_id")
@json_option
def runs_kill(api: Api, run_id: str, as_json: bool) -> None:
    """Kill a running run and its whole process tree (a queued one is cancelled)."""
    r = api.post(f"/runs/{segment(run_id)}/kill")
    if as_json:
        return echo_json(api.last)
    if r.get("status") in FINISHED_STATUSES:
        click.echo(f"run {run_id} is {r['status']}")
    else:
        click.echo(f"asked agent {r.get('agent') or '-'} to kill run {run_id}")


# --- agents -------------------------------------------------------------------------------------


@click.group("agents")
def agents_group() -> None:
    """Agents through the web site's API: list, show."""


def _percent(value: Any) -> str:
    return f"{value:.0f}%" if isinstance(value, (int, float)) else "-"


@agents_group.command("list")
@remote
@click.option("--group", help="Only agents of this group.")
@json_option
def agents_list(api: Api, group: str | None, as_json: bool) -> None:
    """Every agent, live or gone, by group: status, host, load, runs and tasks."""
    answer = api.get("/agents")
    items = [a for a in answer["items"] if group is None or a.get("group") == group]
    if as_json:
        if group is None:
            return echo_json(api.last)
        return click.echo(json.dumps({"items": items}, indent=2))
    rows = [
        (
            a["agent_id"],
            a.get("group"),
            a.get("status"),
            a.get("host"),
            a.get("pid"),
            _percent((a.get("load") or {}).get("cpu_percent")),
            _percent((a.get("load") or {}).get("memory_percent")),
            a.get("running"),
            a.get("tasks"),
            local_time(a.get("last_seen")) if a.get("last_seen") else "now",
        )
        for a in items
    ]
    headers = ("AGENT", "GROUP", "STATUS", "HOST", "PID", "CPU", "MEM", "RUNS", "TASKS", "SEEN")
    echo_table(headers, rows, what="agents", flex=3)


@agents_group.command("show")
@remote
@click.argument("agent_id")
@json_option
def agents_show(api: Api, agent_id: str, as_json: bool) -> None:
    """One agent: everything the cluster knows of it."""
    answer = api.get("/agents")
    found = [a for a in answer["items"] if a.get("agent_id") == agent_id]
    if not found:
        raise ApiFailure(f"no agent {agent_id!r} (`cloudtask agents list` shows them)", NOT_FOUND)
    a = found[0]
    if as_json:
        return click.echo(json.dumps(a, indent=2))
    load = a.get("load") or {}
    click.echo(
        facts(
            [
                ("agent", a["agent_id"]),
                ("group", a.get("group")),
                ("status", a.get("status")),
                ("host", a.get("host")),
                ("pid", a.get("pid")),
                ("version", a.get("version")),
                ("platform", a.get("platform")),
                ("cores", a.get("cores")),
                ("max parallel", a.get("max_parallel")),
                ("started", local_time(a.get("started_at"))),
                ("cpu", _percent(load.get("cpu_percent"))),
                ("memory", _percent(load.get("memory_percent"))),
                ("running runs", a.get("running")),
                ("tasks", a.get("tasks")),
                ("last seen", local_time(a.get("last_seen")) if a.get("last_seen") else "now"),
            ]
        )
    )


# --- events -------------------------------------------------------------------------------------


@click.group("events")
def events_group() -> None:
    """Events through the web site's API: list."""


@events_group.command("list")
@remote
@click.option(
    "--task", metavar="TASK", help="Only events of this task (name or id; exit 3 if none)."
)
@click.option("--kind", metavar="KIND", help="One kind (run.failed) or a prefix (run.).")
@click.option("--severity", type=click.Choice(SEVERITIES), help="Only this severity.")
@click.option("--agent", help="Only events of this agent.")
@click.option("--group", help="Only events of this group.")
@click.option("--since", metavar="TIME", help="At or after (ISO 8601, or 2h, 1d ago).")
@click.option("--until", metavar="TIME", help="Before (ISO 8601, or a duration ago).")
@limit_option
@page_option
@json_option
def events_list(
    api: Api,
    task: str | None,
    kind: str | None,
    severity: str | None,
    agent: str | None,
    group: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    page: int,
    as_json: bool,
) -> None:
    """What happened, newest first: failed, timed-out, missed and lost runs, recoveries,
    agents joining and leaving, leader changes, task changes."""
    since_at, until_at = since_time(since, "--since"), since_time(until, "--until")
    answer = api.get(
        "/events",
        task=task,
        kind=kind,
        severity=severity,
        agent=agent,
        group=group,
        since=since_at,
        until=until_at,
        per_page=limit,
        page=page,
    )
    if as_json:
        return echo_json(api.last)
    rows = [
        (
            local_time(e.get("at")),
            e.get("severity"),
            e.get("kind"),
            e.get("task_name") or e.get("task_id"),
            e.get("agent"),
            e.get("message"),
        )
        for e in answer["items"]
    ]
    headers = ("AT", "SEVERITY", "KIND", "TASK", "AGENT", "MESSAGE")
    echo_table(headers, rows, what="events", page=answer)


# --- plans --------------------------------------------------------------------------------------


@click.group("plans")
def plans_group() -> None:
    """Plans through the web site's API: list, show, cancel, submit."""


def _plan_state(p: dict[str, Any]) -> str:
    return "done" if p.get("done") else "cancelled" if p.get("cancelled_at") else "open"


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "-"


@plans_group.command("list")
@remote
@json_option
def plans_list(api: Api, as_json: bool) -> None:
    """The latest plans, newest first."""
    answer = api.get("/plans")
    if as_json:
        return echo_json(api.last)
    rows = [
        (
            p["plan_id"],
            p.get("name"),
            _plan_state(p),
            p.get("total"),
            local_time(p.get("created_at")),
            p.get("submitter"),
            _counts(p.get("counts") or {}),
        )
        for p in answer["items"]
    ]
    headers = ("PLAN", "NAME", "STATE", "ITEMS", "CREATED", "BY", "COUNTS")
    echo_table(headers, rows, what="plans")


@plans_group.command("show")
@remote
@click.argument("plan_id")
@click.option("--state", type=click.Choice(PLAN_ITEM_STATES), help="Only items in this state.")
@json_option
def plans_show(api: Api, plan_id: str, state: str | None, as_json: bool) -> None:
    """A plan's counts by state and its items (--state filters them)."""
    if state:
        plan = api.get(f"/plans/{segment(plan_id)}")
        answer = api.get(f"/plans/{segment(plan_id)}/items", state=state)
        if as_json:
            return echo_json(api.last)
        items = answer["items"]
    else:
        plan = api.get(f"/plans/{segment(plan_id)}")
        if as_json:
            return echo_json(api.last)
        items = plan.get("items") or []
    click.echo(
        facts(
            [
                ("plan", plan["plan_id"]),
                ("name", plan.get("name") or "-"),
                ("state", _plan_state(plan)),
                ("submitter", plan.get("submitter")),
                ("created", local_time(plan.get("created_at"))),
                (
                    "cancelled",
                    local_time(plan["cancelled_at"]) if plan.get("cancelled_at") else None,
                ),
                ("items", plan.get("total")),
                ("counts", _counts(plan.get("counts") or {})),
            ]
        )
    )
    if items:
        rows = [
            (
                i.get("item_id"),
                i.get("type"),
                i.get("state"),
                i.get("attempt"),
                i.get("agent"),
                i.get("run_id"),
                i.get("name"),
                i.get("error"),
            )
            for i in items
        ]
        click.echo("")
        click.echo(
            table(("ITEM", "TYPE", "STATE", "ATTEMPT", "AGENT", "RUN", "NAME", "ERROR"), rows)
        )


@plans_group.command("cancel")
@remote
@click.argument("plan_id")
@click.option("--item", "item_id", metavar="ITEM_ID", help="Cancel only this item of the plan.")
@json_option
def plans_cancel(api: Api, plan_id: str, item_id: str | None, as_json: bool) -> None:
    """Cancel a plan (or one item): waiting items are dropped, running ones killed."""
    if item_id:
        answer = api.post(f"/plans/items/{segment(item_id)}/cancel")
    else:
        answer = api.post(f"/plans/{segment(plan_id)}/cancel")
    if as_json:
        return echo_json(api.last)
    if item_id:
        click.echo(f"item {item_id}: {_item_cancelled(answer)}")
    else:
        click.echo(
            f"plan {plan_id} cancelled: {answer.get('dropped', 0)} waiting items dropped, "
            f"{answer.get('killing', 0)} running items being killed"
        )


def _item_cancelled(answer: dict[str, Any]) -> str:
    parts = [f"{k} {v}" for k, v in answer.items() if not isinstance(v, (dict, list))]
    return ", ".join(parts) or "cancelled"


@plans_group.command("submit")
@remote
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True))
@json_option
def plans_submit(api: Api, path: str, as_json: bool) -> None:
    """Submit the plan in PATH (.json or .xml; - reads standard input). The whole plan is
    checked first: every problem is printed and nothing is stored."""
    if path == "-":
        raw = click.get_binary_stream("stdin").read()
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise ApiFailure(f"{path}: cannot read the file: {e.strerror}", BAD_INPUT) from None
    xml = path.lower().endswith(".xml") or raw.lstrip()[:1] == b"<"
    if xml:
        receipt = api.call("POST", "/plans", data=raw, content_type="application/xml")
    else:
        try:
            json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f"line {e.lineno}, column {e.colno}: " if hasattr(e, "lineno") else ""
            raise ApiFailure(
                f"{path}: not valid JSON: {where}{getattr(e, 'msg', e)}", BAD_INPUT
            ) from None
        receipt = api.call("POST", "/plans", data=raw, content_type="application/json")
    if as_json:
        return echo_json(api.last)
    existing = receipt.get("existing", 0)
    click.echo(
        f"plan {receipt['plan_id']}: {receipt.get('accepted', 0)} items queued"
        + (f", {existing} submitted before" if existing else "")
    )


GROUPS = (tasks_group, runs_group, agents_group, events_group, plans_group)

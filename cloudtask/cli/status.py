"""``cloudtask status``: is the cluster well? One look at everything an operator checks first.

It connects to the configured ZooKeeper and MongoDB itself (not through the web site: the
site may be what is down) and reports, one line each:

* ``zookeeper``, ``mongodb``: reachable (a request answered within ``--timeout``);
* ``leader``: a running center leads (which one, and how many centers run);
* ``agents``: per group, agents online against the ones known (live or recorded by the
  leader) and against ``--expect GROUP=N``; wrong when fewer are online than expected, when a
  group with enabled tasks has no agent online, or when an agent went offline within
  ``--window`` (an older departure is only mentioned);
* ``tasks``: enabled tasks, and the ones no agent can run (wrong when there is any);
* ``runs``: runs going now, runs whose agent stopped beating them that no leader has judged
  (stuck), and runs recorded ``lost`` within ``--window`` (wrong when there is any);
* ``deliveries``: mail and webhooks not sent; wrong when the most overdue one is more than
  ``DELIVERY_LATE`` past its time (the leading center does not send, or cannot).

A table by default, ``--json`` for scripts. Exit status: 0 when all is well, 1 when something
is wrong (each problem printed), 2 for bad input (an option, the configuration). Without
``zookeeper.hosts`` (standalone agents) the cluster's checks are skipped.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from ..clock import stored_time
from ..durations import format_duration, parse_duration
from ..exceptions import CloudTaskError, ConfigError
from .common import _load, config_option

OK, WRONG, SKIPPED, UNKNOWN = "ok", "wrong", "skipped", "unknown"
DELIVERY_LATE = 300.0  # seconds a delivery may be overdue before it counts as piling up
SHOWN = 5  # names listed in a problem at most


@dataclass
class Check:
    name: str
    state: str = OK
    summary: str = ""
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def wrong(self, problem: str) -> None:
        self.state = WRONG
        self.problems.append(problem)


@dataclass
class Facts:
    """What was read; None where it could not be."""

    now: float
    window: float
    expect: dict[str, int]
    zk_configured: bool
    zk_error: str | None = None
    mongo_error: str | None = None
    view: Any = None  # a ClusterView
    recorded: list[dict[str, Any]] | None = None  # agents recorded in MongoDB
    enabled_by_group: dict[str, int] | None = None
    task_states: dict[str, int] | None = None
    unassigned_names: dict[str, str] = field(default_factory=dict)
    going: dict[str, int] | None = None
    stuck: list[dict[str, Any]] | None = None
    lost: int | None = None
    backlog: Any = None  # a DeliveryBacklog


def _expectations(values: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        group, sep, number = value.partition("=")
        if not sep or not group.strip() or not number.strip().isdigit():
            raise click.BadParameter(
                f"{value!r}: expected GROUP=N, such as default=3", param_hint="--expect"
            )
        out[group.strip()] = int(number)
    return out


def _window(value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--window") from None
    if seconds <= 0:
        raise click.BadParameter("must be longer than 0", param_hint="--window")
    return seconds


def gather(cfg: Any, expect: dict[str, int], window: float, timeout: float) -> Facts:
    """Read everything the checks need (each part that cannot be read is left None)."""
    from kazoo.exceptions import KazooException

    from ..clusterview import read_cluster
    from ..metrics import figures as fig
    from ..store import Store
    from ..zkpaths import ZkPaths, connect_config

    now = time.time()
    facts = Facts(now, window, expect, zk_configured=bool(cfg.zookeeper.hosts))
    zk = store = None
    try:
        if facts.zk_configured:
            try:
                zk = connect_config(cfg, start_timeout=timeout)
            except (CloudTaskError, KazooException) as e:
                facts.zk_error = str(e) or type(e).__name__
            else:
                facts.zk_error = fig.ping_zookeeper(zk, timeout)
            if zk is not None and facts.zk_error is None:
                try:
                    facts.view = read_cluster(zk, ZkPaths(cfg.zookeeper.root))
                except (CloudTaskError, KazooException) as e:
                    facts.zk_error = f"ZooKeeper could not be read: {e or type(e).__name__}"
        try:
            store = Store(
                cfg.mongodb.uri,
                cfg.mongodb.database,
                server_selection_timeout_ms=int(timeout * 1000),
            )
        except CloudTaskError as e:
            facts.mongo_error = str(e)
        else:
            facts.mongo_error = fig.ping_mongodb(store, timeout)
        if store is not None and facts.mongo_error is None:
            try:
                _read_store(facts, store, fig)
            except CloudTaskError as e:
                facts.mongo_error = f"MongoDB failed a read: {e}"
    finally:
        if zk is not None:
            zk.stop()
            zk.close()
        if store is not None:
            store.close()
    return facts


def _read_store(facts: Facts, store: Any, fig: Any) -> None:
    import pymongo

    with pymongo.timeout(30):
        facts.task_states = fig.tasks_by_state(store)
        facts.enabled_by_group = store.enabled_tasks_by_group()
        facts.going = fig.unfinished_run_counts(store)
        facts.stuck = fig.stuck_runs(store, facts.now)
        facts.lost = fig.lost_run_count(store, facts.now, facts.window)
        facts.backlog = fig.delivery_backlog(store, facts.now)
        if facts.zk_configured:
            facts.recorded = store.list_agents()
        if facts.view is not None and facts.view.unassigned:
            first = sorted(facts.view.unassigned)[:SHOWN]
            facts.unassigned_names = store.task_names(first)


def _ago(seconds: float) -> str:
    return format_duration(max(1.0, round(seconds)))


def _names(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def evaluate(facts: Facts) -> list[Check]:
    """The checks, from what was read (pure)."""
    zookeeper, mongodb = Check("zookeeper"), Check("mongodb")
    if not facts.zk_configured:
        zookeeper.state, zookeeper.summary = SKIPPED, "not configured (standalone agents)"
    elif facts.zk_error:
        zookeeper.wrong(f"ZooKeeper is not reachable: {facts.zk_error}")
        zookeeper.summary = "not reachable"
    else:
        zookeeper.summary = "reachable"
    if facts.mongo_error:
        mongodb.wrong(f"MongoDB is not reachable: {facts.mongo_error}")
        mongodb.summary = "not reachable"
    else:
        mongodb.summary = "reachable"
    checks = [zookeeper, mongodb, _leader(facts), _agents(facts)]
    checks += [_tasks(facts), _runs(facts), _deliveries(facts)]
    return checks


def _cluster_unknown(check: Check, facts: Facts) -> bool:
    """Mark a check of the cluster skipped or unknown when ZooKeeper was not read."""
    if not facts.zk_configured:
        check.state, check.summary = SKIPPED, "no cluster (standalone agents)"
        return True
    if facts.view is None:
        check.state, check.summary = UNKNOWN, "ZooKeeper could not be read"
        return True
    return False


def _leader(facts: Facts) -> Check:
    check = Check("leader")
    if _cluster_unknown(check, facts):
        return check
    view = facts.view
    centers = [c["center_id"] for c in view.centers]
    check.details = {"leader": None, "centers": centers}
    if view.leader in centers:
        check.details["leader"] = view.leader
        check.summary = f"center {view.leader} leads ({len(centers)} running)"
        return check
    gone = f" (the last leader, {view.leader}, is gone)" if view.leader else ""
    check.summary = f"no leader ({len(centers)} centers running)"
    check.wrong(f"no center leads{gone}: tasks are not placed and alerts are not sent")
    return check


def _agents(facts: Facts) -> Check:
    check = Check("agents")
    if _cluster_unknown(check, facts):
        return check
    from ..clusterview import merge_agents

    rows = merge_agents(facts.view, facts.recorded or [])
    tasks = facts.enabled_by_group or {}
    groups = sorted({r["group"] for r in rows} | set(tasks) | set(facts.expect))
    parts, by_group = [], {}
    for group in groups:
        mine = [r for r in rows if r["group"] == group]
        online = [r["agent_id"] for r in mine if r["status"] == "online"]
        expected = facts.expect.get(group)
        by_group[group] = {
            "online": len(online),
            "known": len(mine),
            "expected": expected,
            "enabled_tasks": tasks.get(group, 0),
        }
        parts.append(
            f"{group} {len(online)}/{len(mine)} online"
            + (f" (expected {expected})" if expected is not None else "")
        )
        if expected is not None and len(online) < expected:
            check.wrong(f"group {group}: {len(online)} agents online, {expected} expected")
        elif not online and tasks.get(group):
            check.wrong(f"group {group} has {tasks[group]} enabled tasks and no agent online")
        for row in mine:
            if row["status"] != "offline":
                continue
            seen = stored_time(row.get("last_seen"))
            since = facts.now - seen.timestamp() if seen else None
            if since is not None and since <= facts.window:
                check.wrong(
                    f"agent {row['agent_id']} (group {group}) went offline {_ago(since)} ago"
                )
    check.details = {"groups": by_group}
    check.summary = "; ".join(parts) if parts else "no agents"
    if facts.recorded is None and facts.mongo_error:
        check.summary += " (offline agents unknown: MongoDB not read)"
    return check


def _tasks(facts: Facts) -> Check:
    check = Check("tasks")
    if facts.task_states is None:
        check.state, check.summary = UNKNOWN, "MongoDB could not be read"
        return check
    states = facts.task_states
    check.details = dict(states)
    check.summary = f"{states['enabled']} enabled, {states['paused']} paused"
    if facts.view is not None:
        unassigned = facts.view.unassigned
        check.details["unassigned"] = len(unassigned)
        check.summary += f", {len(unassigned)} without an agent"
        if unassigned:
            names = [facts.unassigned_names.get(t, t) for t in sorted(unassigned)]
            groups = sorted(set(unassigned.values()))
            check.wrong(
                f"{len(unassigned)} tasks have no live agent in their group "
                f"({', '.join(groups)}): {_names(names)}"
            )
    return check


def _runs(facts: Facts) -> Check:
    check = Check("runs")
    if facts.going is None or facts.stuck is None or facts.lost is None:
        check.state, check.summary = UNKNOWN, "MongoDB could not be read"
        return check
    stuck, window = facts.stuck, _ago(facts.window)
    check.details = {**facts.going, "stuck": len(stuck), "lost_recently": facts.lost}
    check.summary = (
        f"{facts.going.get('running', 0)} running, {facts.going.get('queued', 0)} queued, "
        f"{len(stuck)} stuck, {facts.lost} lost in the last {window}"
    )
    if stuck:
        named = [
            f"{d.get('task_name') or d.get('task_id')} on {d.get('agent')} "
            f"(silent {_ago(d['silent'])})"
            for d in sorted(stuck, key=lambda d: -d["silent"])
        ]
        check.wrong(
            f"{len(stuck)} runs are {', '.join(sorted({d['status'] for d in stuck}))} but their "
            f"agent stopped beating them and no leader judged them: {_names(named)}"
        )
    if facts.lost:
        check.wrong(
            f"{facts.lost} runs were recorded lost in the last {window} (their agent died or "
            "was cut off while they ran): see the runs page, status lost"
        )
    return check


def _deliveries(facts: Facts) -> Check:
    check = Check("deliveries")
    backlog = facts.backlog
    if backlog is None:
        check.state, check.summary = UNKNOWN, "MongoDB could not be read"
        return check
    check.details = asdict(backlog)
    check.summary = f"{backlog.pending} pending"
    if backlog.overdue:
        check.summary += f", the oldest {_ago(backlog.overdue)} overdue"
    if backlog.failed:
        check.summary += f", {backlog.failed} given up"
    if backlog.overdue > DELIVERY_LATE:
        check.wrong(
            f"{backlog.pending} mail and webhook deliveries are pending, the most overdue by "
            f"{_ago(backlog.overdue)}: is a center leading, and can it reach the SMTP server "
            "and the webhooks? (its log says)"
        )
    return check


def render_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK'.ljust(width)}  {'STATE':<7}  DETAIL"]
    for c in checks:
        lines.append(f"{c.name.ljust(width)}  {c.state:<7}  {c.summary}")
    problems = [p for c in checks for p in c.problems]
    if problems:
        lines += ["", "Something is wrong:"] + [f"  - {p}" for p in problems]
    else:
        lines += ["", "All is well."]
    return "\n".join(lines)


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {
        "ok": all(c.state != WRONG for c in checks) and _known(checks),
        "checks": {
            c.name: {"state": c.state, "summary": c.summary, "problems": c.problems, **c.details}
            for c in checks
        },
    }


def _known(checks: list[Check]) -> bool:
    return all(c.state != UNKNOWN for c in checks)


@click.command("status")
@config_option
@click.option("--json", "json_out", is_flag=True, help="Print JSON (for scripts).")
@click.option(
    "--expect",
    multiple=True,
    metavar="GROUP=N",
    help="Agents that should be online in a group (repeatable), e.g. --expect default=3.",
)
@click.option(
    "--window",
    default="1h",
    show_default=True,
    help="How far back 'recently' goes: agents gone offline, runs recorded lost.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.5, 60),
    default=5.0,
    show_default=True,
    help="Seconds to wait for ZooKeeper and MongoDB each.",
)
def status(
    config_path: str | None, json_out: bool, expect: tuple[str, ...], window: str, timeout: float
) -> None:
    """Check the cluster: ZooKeeper, MongoDB, the leader, agents, tasks, runs, deliveries.

    Exit status 0 when all is well, 1 when something is wrong (each problem is printed),
    2 for bad input."""
    expected = _expectations(expect)
    seconds = _window(window)
    # what cannot be reached is reported below, not by the client libraries' own warnings
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    try:
        cfg = _load(config_path)
    except ConfigError as e:  # the configuration is input too
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    checks = evaluate(gather(cfg, expected, seconds, timeout))
    if json_out:
        click.echo(json.dumps(as_json(checks), indent=2, default=str))
    else:
        click.echo(render_table(checks))
    wrong = any(c.state == WRONG for c in checks) or not _known(checks)
    sys.exit(1 if wrong else 0)

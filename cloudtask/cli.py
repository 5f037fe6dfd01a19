"""The ``cloudtask`` command.

Errors CloudTask raises on purpose are printed as they are (what is wrong, where, what to do),
never as a traceback. Logging is configured here, at the entry point, and nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .clock import utcnow
from .config import Config, config_to_dict, load_config
from .exceptions import CloudTaskError, StoreError, ValidationError

log = logging.getLogger("cloudtask")
T = TypeVar("T")

DEFAULT_CONFIG = Path("conf/cloudtask.json")


class _Group(click.Group):
    """Turns CloudTask's own errors into a clean message and exit code 2 (bad input) or 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValidationError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)
        except CloudTaskError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(1)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)


def _load(config_path: str | None) -> Config:
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = str(DEFAULT_CONFIG)
    return load_config(config_path)


config_option = click.option(
    "--config",
    "config_path",
    envvar="CLOUDTASK_CONFIG",
    type=click.Path(dir_okay=False),
    help="JSON config file (default: conf/cloudtask.json if present; env CLOUDTASK_CONFIG).",
)
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cloudtask")
def cli() -> None:
    """CloudTask: a distributed task scheduler that replaces per-machine crontabs."""


# --- agent ----------------------------------------------------------------------------------


@cli.command()
@config_option
@click.option(
    "--standalone",
    is_flag=True,
    help="Take the tasks of this agent's group straight from MongoDB (no ZooKeeper, no center).",
)
@click.option(
    "--id", "agent_id", help="Agent id (default: config agent.id, else kept in the data dir)."
)
@click.option("--group", help="Agent group (default: config agent.group).")
@click.option(
    "--data-dir", type=click.Path(file_okay=False), help="Where the agent keeps its id and logs."
)
@verbose_option
def agent(
    config_path: str | None,
    standalone: bool,
    agent_id: str | None,
    group: str | None,
    data_dir: str | None,
    verbose: bool,
) -> None:
    """Run an agent: register in the cluster and run the tasks the center assigns to it."""
    from .agent.agent import Agent
    from .agent.cluster import ClusterAgent
    from .clock import utcnow
    from .store import Store
    from .testing.clock import clock_from_environment
    from .zkpaths import connect

    _setup_logging(verbose)
    cfg = _load(config_path)
    changes = {k: v for k, v in {"id": agent_id, "group": group, "data_dir": data_dir}.items() if v}
    if changes:
        cfg = cfg.with_section("agent", **changes)
    store = _when_reachable("MongoDB", lambda: Store.from_config(cfg))
    zk = None
    try:
        # tests and the chaos bench may skew this agent's clock (cloudtask/testing/clock.py)
        clock = clock_from_environment() or utcnow
        if standalone:
            engine: Agent = Agent(cfg, store, clock=clock)
        else:
            zk = _when_reachable(
                "ZooKeeper", lambda: connect(cfg.zookeeper.hosts, cfg.zookeeper.session_timeout)
            )
            engine = ClusterAgent(cfg, store, zk, clock=clock)
        _stop_on_signals(engine.stop)
        engine.run()
    finally:
        if zk is not None:
            zk.stop()
            zk.close()
        store.close()


# --- web ------------------------------------------------------------------------------------


@cli.command()
@config_option
@click.option("--host", help="Address to listen on (default: config web.host).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: config web.port).")
@verbose_option
def web(config_path: str | None, host: str | None, port: int | None, verbose: bool) -> None:
    """Serve the web site and the REST API (waitress, a production WSGI server)."""
    import waitress

    from web import create_app

    from .store import Store
    from .zkpaths import ZkPaths, connect, task_signal

    _setup_logging(verbose)
    cfg = _load(config_path)
    cfg = cfg.with_section("web", secret_key=_web_secret(cfg))
    # a page waits at most 2 s for MongoDB before it says it is unreachable (503)
    store = Store(
        cfg.mongodb.uri,
        cfg.mongodb.database,
        run_retention_days=cfg.runs.retention_days,
        server_selection_timeout_ms=2000,
    )
    zk = None
    if cfg.zookeeper.hosts:  # task changes made here reach the leading center at once
        zk = connect(cfg.zookeeper.hosts, cfg.zookeeper.session_timeout)
        store.on_task_change = task_signal(zk, ZkPaths(cfg.zookeeper.root))
    app = create_app(cfg, {"STORE": store, "ZK": zk})
    host = host or cfg.web.host
    port = cfg.web.port if port is None else port
    log.info("web site on http://%s:%d/", host, port)
    try:
        waitress.serve(app, host=host, port=port, threads=8, ident="cloudtask")
    finally:
        if zk is not None:
            zk.stop()
            zk.close()
        store.close()


def _web_secret(cfg: Config) -> str:
    """The key that signs sessions: configured, or generated once and kept with mode 0600."""
    if cfg.web.secret_key:
        return cfg.web.secret_key
    import secrets

    path = Path(cfg.web.data_dir) / "secret-key"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key


# --- center ---------------------------------------------------------------------------------


@cli.command()
@config_option
@click.option("--id", "center_id", help="Center id (default: host and pid).")
@verbose_option
def center(config_path: str | None, center_id: str | None, verbose: bool) -> None:
    """Run a center: one of them leads and places tasks on the live agents."""
    from .center.center import Center
    from .store import Store
    from .zkpaths import connect

    _setup_logging(verbose)
    cfg = _load(config_path)
    store = _when_reachable("MongoDB", lambda: Store.from_config(cfg))
    zk = _when_reachable(
        "ZooKeeper", lambda: connect(cfg.zookeeper.hosts, cfg.zookeeper.session_timeout)
    )
    try:
        engine = Center(cfg, store, zk, center_id=center_id)
        _stop_on_signals(engine.stop)
        engine.run()
    finally:
        zk.stop()
        zk.close()
        store.close()


def _when_reachable(what: str, open_it: Callable[[], T]) -> T:
    """``open_it()``, tried again (1 s, doubling to 10 s) while the server does not answer: a
    daemon started while MongoDB or ZooKeeper is down (or cut off) waits for it rather than
    exit. A configuration error is raised at once. SIGTERM or Ctrl-C while waiting exits."""
    from pymongo.errors import PyMongoError

    from .zkpaths import ClusterUnavailable

    stopping = threading.Event()
    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handlers[sig] = signal.signal(sig, lambda *_: stopping.set())
    try:
        delay = 1.0
        while True:
            try:
                opened = open_it()
            except CloudTaskError as e:
                if not isinstance(e, ClusterUnavailable | StoreError) or (
                    isinstance(e, StoreError) and not isinstance(e.__cause__, PyMongoError)
                ):
                    raise
                log.warning("%s is not reachable yet; trying again in %.0f s: %s", what, delay, e)
            else:
                if stopping.is_set():  # asked to stop while it connected: not lost
                    raise SystemExit(0)
                return opened
            if stopping.wait(delay):
                raise SystemExit(0)
            delay = min(delay * 2, 10.0)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _stop_on_signals(stop: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        log.info("signal %s received, stopping", signum)
        stop()

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)


# --- tasks ----------------------------------------------------------------------------------


def _task_files(paths: tuple[str, ...]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.glob("*.json") if p.is_file())
        else:
            yield path


def read_task_files(paths: tuple[str, ...]) -> tuple[list[tuple[Path, dict]], list[str]]:
    """Read task files: each holds one task object or a list of them. Returns (tasks, errors)."""
    from .task import validate_task

    tasks: list[tuple[Path, dict]] = []
    errors: list[str] = []
    now = utcnow()  # a one-shot time in the past is refused here, up front
    for path in _task_files(paths):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            errors.append(f"{path}: cannot read: {e.strerror}")
            continue
        except UnicodeDecodeError as e:
            errors.append(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}")
            continue
        except json.JSONDecodeError as e:
            errors.append(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
            continue
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if isinstance(data, list) else str(path)
            problems = validate_task(item, now=now)
            if problems:
                errors.extend(f"{where}: {p}" for p in problems)
            else:
                tasks.append((path, item))
    names = [t[1]["name"] for t in tasks]
    for name in {n for n in names if names.count(n) > 1}:
        errors.append(f"task name {name!r} is defined more than once")
    return tasks, errors


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def validate(paths: tuple[str, ...]) -> None:
    """Check task files (or folders of *.json) without storing anything."""
    tasks, errors = read_task_files(paths)
    if errors:
        raise click.ClickException("invalid task files:\n  " + "\n  ".join(errors))
    click.echo(f"{len(tasks)} task(s) valid")


@cli.command()
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def apply(config_path: str | None, paths: tuple[str, ...]) -> None:
    """Create or update the tasks in these JSON files (all checked first; nothing stored if any is bad)."""
    from .store import Store

    cfg = _load(config_path)
    tasks, errors = read_task_files(paths)
    if errors:
        raise click.ClickException("nothing applied; invalid task files:\n  " + "\n  ".join(errors))
    store = Store.from_config(cfg)
    try:
        results = apply_tasks(store, tasks)
        for outcome, name in results:
            click.echo(f"{outcome:9} {name}")
    finally:
        store.close()
    if any(outcome != "unchanged" for outcome, _ in results):
        signal_centers(cfg)


def signal_centers(cfg: Config) -> None:
    """Tell the leading center that tasks changed (best effort: it also resyncs periodically)."""
    if not cfg.zookeeper.hosts:
        return
    from kazoo.exceptions import KazooException

    from .zkpaths import ZkPaths, connect, task_signal

    try:
        zk = connect(cfg.zookeeper.hosts, cfg.zookeeper.session_timeout, start_timeout=5)
    except CloudTaskError as e:
        click.echo(f"warning: {e}; the center picks the change up at its next resync", err=True)
        return
    try:
        task_signal(zk, ZkPaths(cfg.zookeeper.root))()
    except KazooException as e:
        click.echo(
            f"warning: cannot signal the center ({e}); it picks the change up at its next resync",
            err=True,
        )
    finally:
        zk.stop()
        zk.close()


def cli_actor() -> str:
    """Who acts, for the audit log: ``cli:<login name>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli:unknown"


def apply_tasks(store: Any, tasks: list[tuple[Path, dict]]) -> list[tuple[str, str]]:
    from .operations import Operations

    ops = Operations(store)
    for path, data in tasks:  # the files they name are stored: checked before storing any
        try:
            ops.check_apply(data)
        except ValidationError as e:
            raise ValidationError(e.problems, source=str(path)) from None
    results = []
    for path, data in tasks:
        try:
            outcome, doc = ops.apply_task(cli_actor(), data)
        except ValidationError as e:
            raise ValidationError(e.problems, source=str(path)) from None
        results.append((outcome, doc["name"]))
    return results


def _cluster(cfg: Config) -> tuple[Any, Any, Any]:
    """A store that signals task changes, a ZooKeeper client, and the paths: for commands
    that act on a running cluster."""
    from .store import Store
    from .zkpaths import ZkPaths, connect, task_signal

    zk = connect(cfg.zookeeper.hosts, cfg.zookeeper.session_timeout, start_timeout=10)
    paths = ZkPaths(cfg.zookeeper.root)
    store = Store.from_config(cfg)
    store.on_task_change = task_signal(zk, paths)
    return store, zk, paths


@cli.group("task")
def task_group() -> None:
    """Act on stored tasks."""


@task_group.command("delete")
@config_option
@click.argument("name_or_id")
@click.option("--kill-running", is_flag=True, help="Also kill its runs that are still going.")
def task_delete(config_path: str | None, name_or_id: str, kill_running: bool) -> None:
    """Delete a task; its running runs finish unless --kill-running."""
    from .operations import Operations, find_task

    store, zk, paths = _cluster(_load(config_path))
    try:
        task = find_task(store, name_or_id)
        task, killed = Operations(store, zk, paths).delete_task(
            cli_actor(), task["_id"], kill_running
        )
        click.echo(f"deleted {task['name']}" + (f"; killing {len(killed)} runs" if killed else ""))
    finally:
        zk.stop()
        zk.close()
        store.close()


@cli.group("run")
def run_group() -> None:
    """Act on runs."""


@run_group.command("kill")
@config_option
@click.argument("run_id")
def run_kill(config_path: str | None, run_id: str) -> None:
    """Kill a running run and its whole process tree."""
    from .operations import Operations

    store, zk, paths = _cluster(_load(config_path))
    try:
        run = Operations(store, zk, paths).kill_run(cli_actor(), run_id)
        if run.get("agent"):
            click.echo(f"asked agent {run['agent']} to kill run {run_id}")
        else:
            click.echo(f"cancelled run {run_id} (no agent had taken it)")
    finally:
        zk.stop()
        zk.close()
        store.close()


@cli.group("user")
def user_group() -> None:
    """Users of the web site and the API."""


@user_group.command("add")
@config_option
@click.argument("username")
@click.option(
    "--role",
    type=click.Choice(["admin", "operator", "viewer"]),
    default="viewer",
    show_default=True,
)
def user_add(config_path: str | None, username: str, role: str) -> None:
    """Add a user. The password is asked for (or read from standard input when piped)."""
    from .users import Users

    password = _read_password()
    with _store(config_path) as store:
        Users(store).add(username, password, role)
        store.add_audit(cli_actor(), "user.create", f"user:{username}", None, {"role": role})
    click.echo(f"added {username} ({role})")


@user_group.command("list")
@config_option
def user_list(config_path: str | None) -> None:
    """List users: name, role, state, created."""
    from .users import describe

    with _store(config_path) as store:
        for doc in store.list_user_docs():
            click.echo(describe(doc))


@cli.group("token")
def token_group() -> None:
    """API tokens."""


@token_group.command("create")
@config_option
@click.argument("username")
@click.option("--name", default="cli", show_default=True, help="What the token is for.")
def token_create(config_path: str | None, username: str, name: str) -> None:
    """Create an API token for a user; it is shown once (only its hash is kept)."""
    from .users import Users

    with _store(config_path) as store:
        token = Users(store).create_token(username, name)
        store.add_audit(cli_actor(), "token.create", f"user:{username}", None, {"name": name})
        click.echo(token)


@contextmanager
def _store(config_path: str | None) -> Iterator[Any]:
    """The store of the configured MongoDB, closed after the command."""
    from .store import Store

    store = Store.from_config(_load(config_path))
    try:
        yield store
    finally:
        store.close()


def _read_password() -> str:
    if sys.stdin.isatty():
        return click.prompt("password", hide_input=True, confirmation_prompt=True)
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise click.UsageError("no password on standard input")
    return password


@cli.group("file")
def file_group() -> None:
    """Task files: scripts, binaries or .zip/.tar.gz packages that tasks run with."""


@file_group.command("put")
@config_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Name to store it under (default: the file's own name).")
def file_put(config_path: str | None, path: str, name: str | None) -> None:
    """Store a new version of a task file; tasks naming it run the latest version.

    An archive (.zip, .tar.gz, .tgz, .tar) is checked first: one that does not open, or holds
    a member that would land outside the run's folder (or a link, or a device), is refused.
    The newest web.file_versions_kept versions of each name are kept, and every pinned one.
    """
    web = _load(config_path).web
    name = name or Path(path).name
    with _store(config_path) as store:
        meta = store.put_file(
            name,
            Path(path).read_bytes(),
            uploaded_by=cli_actor(),
            keep=web.file_versions_kept,
            max_bytes=web.max_upload_bytes,
        )
        if meta["created"]:
            store.add_audit(
                cli_actor(),
                "file.upload",
                f"file:{name}",
                None,
                {"sha256": meta["sha256"], "size": meta["size"]},
            )
    if meta["created"]:
        click.echo(f"stored {meta['name']}: {meta['size']} bytes, sha256 {meta['sha256']}")
    else:
        click.echo(
            f"unchanged {meta['name']}: {meta['size']} bytes, sha256 {meta['sha256']} "
            "is the latest version already"
        )


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(value, datetime) else "-"


@file_group.command("list")
@config_option
def file_list(config_path: str | None) -> None:
    """List stored task files: name, size, sha256, uploaded at and by of the latest version,
    and how many versions are stored (tab-separated)."""

    with _store(config_path) as store:
        for meta in store.list_files():
            click.echo(
                f"{meta['name']}\t{meta['size']}\t{meta['sha256']}\t{_when(meta['uploaded_at'])}"
                f"\t{meta['uploaded_by'] or '-'}\t{meta['versions']} version"
                + ("" if meta["versions"] == 1 else "s")
            )


@file_group.command("versions")
@config_option
@click.argument("name")
def file_versions(config_path: str | None, name: str) -> None:
    """List the stored versions of a task file, newest first: sha256, size, uploaded at and
    by, then ``latest``, ``pinned by TASK,...`` and ``rollback of SHA256`` where they apply."""

    with _store(config_path) as store:
        versions = store.list_file_versions(name)
    for v in versions:
        notes = []
        if v["latest"]:
            notes.append("latest")
        if v["pinned_by"]:
            notes.append("pinned by " + ",".join(v["pinned_by"]))
        if v["rolled_back_from"]:
            notes.append(f"rollback from {v['rolled_back_from'][:12]}")
        click.echo(
            f"{v['sha256']}\t{v['size']}\t{_when(v['uploaded_at'])}\t{v['uploaded_by'] or '-'}"
            f"\t{'; '.join(notes)}".rstrip("\t")
        )


@file_group.command("rollback")
@config_option
@click.argument("name")
@click.argument("sha256")
def file_rollback(config_path: str | None, name: str, sha256: str) -> None:
    """Make an older version of a task file the latest again (stored as a new upload of its
    bytes, so the history shows the rollback). SHA256 may be abbreviated to 8 or more digits,
    as `cloudtask file versions NAME` prints them."""
    import re

    from .exceptions import NotFound, Problem

    text = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", text):
        raise ValidationError(
            [
                Problem(
                    "SHA256",
                    f"expected the sha256 of a version (8 to 64 hex digits), got {sha256!r}",
                )
            ],
            source="the rollback",
        )
    web = _load(config_path).web
    with _store(config_path) as store:
        matches = sorted(
            {v["sha256"] for v in store.list_file_versions(name) if v["sha256"].startswith(text)}
        )
        if not matches:
            raise NotFound(
                f"file {name!r} has no stored version {text}; "
                "list them with `cloudtask file versions NAME`"
            )
        if len(matches) > 1:
            raise ValidationError(
                [Problem("SHA256", f"{text} names {len(matches)} versions: give more digits")],
                source="the rollback",
            )
        meta = store.rollback_file(name, matches[0], cli_actor(), keep=web.file_versions_kept)
        store.add_audit(
            cli_actor(),
            "file.rollback",
            f"file:{name}",
            {"sha256": meta["rolled_back_from"]},
            {"sha256": meta["sha256"], "size": meta["size"]},
        )
    click.echo(f"rolled back {name}: version {meta['sha256']} is the latest again")


@cli.command("next")
@click.argument("schedule")
@click.option("--timezone", "tz", default=None, help="IANA time zone for a cron expression.")
@click.option("-n", "--count", default=10, show_default=True, type=click.IntRange(1, 1000))
def next_cmd(schedule: str, tz: str | None, count: int) -> None:
    """Print the next fire times of a schedule: a cron expression or a JSON schedule object."""
    from .schedules import next_fires, parse_schedule

    text = schedule.strip()
    try:
        value: Any = json.loads(text) if text.startswith(("{", "[")) else {"cron": text}
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON at column {e.colno}: {e.msg}") from None
    if tz and isinstance(value, dict):
        value["timezone"] = tz
    parsed, problems = parse_schedule(value)
    if problems or parsed is None:
        raise ValidationError(problems, source="the schedule")
    zone = value.get("timezone", "UTC") if isinstance(value, dict) else "UTC"
    from zoneinfo import ZoneInfo

    for t in next_fires(parsed, utcnow(), count):
        click.echo(f"{t.isoformat()}  {t.astimezone(ZoneInfo(zone)).isoformat()} {zone}")


# --- up -------------------------------------------------------------------------------------


@cli.command()
@config_option
@click.option(
    "--data-dir",
    default=".cloudtask",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the embedded servers and the agent keep their data and logs.",
)
@click.option(
    "--tasks",
    "tasks_dir",
    default="conf/tasks",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder of task files applied at start.",
)
@click.option(
    "--agents", default=2, show_default=True, type=click.IntRange(1, 64), help="Agent processes."
)
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Web site port."
)
@verbose_option
def up(
    config_path: str | None, data_dir: str, tasks_dir: str, agents: int, port: int, verbose: bool
) -> None:
    """Run CloudTask on this machine: embedded servers where none are configured, a center
    and agents, each in its own process (one that dies is started again)."""
    from .localservers import MongoServer, ZooKeeperServer
    from .store import Store
    from .supervisor import Supervisor

    _setup_logging(verbose)
    cfg = _load(config_path)
    base = Path(data_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    servers: list[Any] = []
    supervisor = Supervisor()
    signals = {"count": 0}

    def request_stop(*_: Any) -> None:
        """The first signal stops everything gracefully; a second one kills it all at once."""
        signals["count"] += 1
        if signals["count"] > 1:
            supervisor.kill()
            for server in servers:
                _kill_server(server)

    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, request_stop)
    try:
        if not cfg.zookeeper.hosts:
            zk = ZooKeeperServer(base / "zookeeper")
            click.echo("starting ZooKeeper ...")
            zk.start()
            servers.append(zk)
            cfg = cfg.with_section("zookeeper", hosts=zk.hosts)
        if not cfg.mongodb.uri:
            mongo = MongoServer(base / "mongodb")
            click.echo("starting the embedded MongoDB server (nx-27017) ...")
            mongo.start()
            servers.append(mongo)
            cfg = cfg.with_section("mongodb", uri=mongo.uri)
        store = Store.from_config(cfg)
        if Path(tasks_dir).is_dir():
            tasks, errors = read_task_files((tasks_dir,))
            for err in errors:
                click.echo(f"skipped: {err}", err=True)
            for path, data in tasks:
                try:
                    outcome, doc = store.apply_task(data)
                    click.echo(f"task {doc['name']}: {outcome}")
                except (ValidationError, CloudTaskError) as e:  # report it, apply the rest
                    click.echo(f"skipped: {path}: {e}", err=True)
        from .users import Users

        admins = Users(store).count_admins()
        store.close()
        web_cfg = cfg.with_section("web", port=port, data_dir=str(base / "web"))
        if signals["count"]:
            return  # stopped while starting: the servers are stopped below
        _start_cluster(supervisor, web_cfg, base, agents)
        click.echo("")
        click.echo("CloudTask is running.")
        click.echo(f"  web site:    http://{web_cfg.web.host}:{port}/")
        click.echo(f"  ZooKeeper:   {cfg.zookeeper.hosts} (root {cfg.zookeeper.root})")
        click.echo(f"  MongoDB:     {cfg.mongodb.uri} (database {cfg.mongodb.database})")
        for child in supervisor.children.values():
            click.echo(f"  {child.name + ' log:':13}{child.log_path}")
        click.echo(f"  task logs:   {base}/agent-<n>/logs/<task>/<YYYY-MM-DD>.log")
        if not admins:
            click.echo("No admin user yet. Create the first one with:")
            click.echo(
                f"  CLOUDTASK_MONGO_URI={cfg.mongodb.uri} cloudtask user add NAME --role admin"
            )
        click.echo("Press Ctrl-C to stop.")
        while not signals["count"]:
            supervisor.poll()  # a child that died is logged and started again (backoff)
            time.sleep(0.2)
    finally:
        click.echo("stopping ...")
        # agents let their runs finish within kill_grace; a second Ctrl-C kills at once
        supervisor.stop(grace=max(30.0, cfg.agent.kill_grace + 15.0))
        for server in reversed(servers):
            server.stop(timeout=1 if signals["count"] > 1 else 10)


def _kill_server(server: Any) -> None:
    """Kill an embedded server's process group at once (a second Ctrl-C)."""
    pid = server.pid
    if pid is None or not server.is_running() or os.name != "posix":
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _start_cluster(supervisor: Any, cfg: Config, base: Path, agents: int) -> None:
    """One center, the web site and ``agents`` agents, each a supervised process of its own
    with its own config file (a restarted agent keeps its id and data dir: both are in it)."""

    def spawn(name: str, child_cfg: Config, *args: str) -> None:
        cfg_path = base / f"{name}.json"
        cfg_path.write_text(json.dumps(config_to_dict(child_cfg), indent=2), encoding="utf-8")
        supervisor.spawn(
            name,
            [sys.executable, "-m", "cloudtask", *args, "--config", str(cfg_path)],
            base / f"{name}.log",
        )

    spawn("center", cfg, "center", "--id", "center-1")
    spawn("web", cfg, "web")
    for n in range(1, agents + 1):
        agent_id = f"{cfg.agent.id}-{n}" if cfg.agent.id else ""  # "": generated, kept per agent
        agent_cfg = cfg.with_section(
            "agent", id=agent_id, data_dir=str(base / f"agent-{n}"), log_dir=""
        )
        spawn(f"agent-{n}", agent_cfg, "agent")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="cloudtask")


if __name__ == "__main__":
    main()

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .clock import utcnow
from .config import Config, load_config
from .exceptions import CloudTaskError, StoreError, ValidationError
from .taskfiles import read_task_files

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
    from .zkpaths import connect

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

    from .retry import Backoff, Stopped, retry
    from .zkpaths import ClusterUnavailable

    class NotYet(Exception):
        """The server did not answer (a configuration error is raised as it is)."""

    def attempt() -> T:
        try:
            return open_it()
        except (ClusterUnavailable, StoreError) as e:
            if isinstance(e, StoreError) and not isinstance(e.__cause__, PyMongoError):
                raise
            raise NotYet(e) from e

    backoff = Backoff(1.0, factor=2.0, most=10.0)
    stopping = threading.Event()
    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handlers[sig] = signal.signal(sig, lambda *_: stopping.set())
    try:
        try:
            opened = retry(
                attempt,
                backoff=backoff,
                retry_on=(NotYet,),
                stop=stopping,
                on_retry=lambda tries, e: log.warning(
                    "%s is not reachable yet; trying again in %.0f s: %s",
                    what,
                    backoff.wait(tries),
                    e.args[0],
                ),
            )
        except Stopped:
            raise SystemExit(0) from None
        if stopping.is_set():  # asked to stop while it connected: not lost
            raise SystemExit(0)
        return opened
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
    tasks, errors = read_task_files(paths)
    if errors:
        raise click.ClickException("nothing applied; invalid task files:\n  " + "\n  ".join(errors))
    with _operations(config_path, cluster="optional") as ops:
        results = ops.apply_tasks(cli_actor(), [(str(path), data) for path, data in tasks])
    for outcome, name in results:
        click.echo(f"{outcome:9} {name}")


def cli_actor() -> str:
    """Who acts, for the audit log: ``cli:<login name>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli:unknown"


@contextmanager
def _operations(config_path: str | None, cluster: str = "none") -> Iterator[Any]:
    """The operations on the configured store, closed after the command. ``cluster``:
    ``required`` (the command needs ZooKeeper: a kill reaches a run's agent through it),
    ``optional`` (the leading center is told of task changes at once when ZooKeeper is
    reachable, else at its next resync) or ``none``."""
    from kazoo.exceptions import KazooException

    from .operations import Operations
    from .store import Store
    from .zkpaths import ZkPaths, connect

    cfg = _load(config_path)
    store = Store.from_config(cfg)
    zk = None
    try:
        if cluster != "none" and (cfg.zookeeper.hosts or cluster == "required"):
            wait = 10 if cluster == "required" else 5
            try:
                zk = connect(cfg.zookeeper.hosts, cfg.zookeeper.session_timeout, start_timeout=wait)
            except (CloudTaskError, KazooException) as e:
                if cluster == "required":
                    raise
                warning = f"warning: {e}; the center picks the change up at its next resync"
                click.echo(warning, err=True)
        yield Operations(store, zk, ZkPaths(cfg.zookeeper.root))
    finally:
        store.close()
        if zk is not None:
            zk.stop()
            zk.close()


@cli.group("task")
def task_group() -> None:
    """Act on stored tasks."""


@task_group.command("delete")
@config_option
@click.argument("name_or_id")
@click.option("--kill-running", is_flag=True, help="Also kill its runs that are still going.")
def task_delete(config_path: str | None, name_or_id: str, kill_running: bool) -> None:
    """Delete a task; its running runs finish unless --kill-running."""
    from .operations import find_task

    with _operations(config_path, cluster="required") as ops:
        task = find_task(ops.store, name_or_id)
        task, killed = ops.delete_task(cli_actor(), task["_id"], kill_running)
    click.echo(f"deleted {task['name']}" + (f"; killing {len(killed)} runs" if killed else ""))


@cli.group("run")
def run_group() -> None:
    """Act on runs."""


@run_group.command("kill")
@config_option
@click.argument("run_id")
def run_kill(config_path: str | None, run_id: str) -> None:
    """Kill a running run and its whole process tree."""
    with _operations(config_path, cluster="required") as ops:
        run = ops.kill_run(cli_actor(), run_id)
    if run.get("agent"):
        click.echo(f"asked agent {run['agent']} to kill run {run_id}")
    else:
        click.echo(f"cancelled run {run_id} (no agent had taken it)")


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
    password = _read_password()
    with _operations(config_path) as ops:
        ops.add_user(cli_actor(), username, password, role)
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
    with _operations(config_path) as ops:
        _, token = ops.add_token(cli_actor(), username, name)
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
    with _operations(config_path) as ops:
        meta = ops.put_file(
            cli_actor(),
            name,
            Path(path).read_bytes(),
            keep=web.file_versions_kept,
            max_bytes=web.max_upload_bytes,
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
    with _operations(config_path) as ops:
        versions = ops.store.list_file_versions(name)
        matches = sorted({v["sha256"] for v in versions if v["sha256"].startswith(text)})
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
        meta = ops.rollback_file(cli_actor(), name, matches[0], keep=web.file_versions_kept)
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
    from .up import run_local

    _setup_logging(verbose)
    run_local(_load(config_path), Path(data_dir), Path(tasks_dir), agents, port, actor=cli_actor())


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli(prog_name="cloudtask")


if __name__ == "__main__":
    main()

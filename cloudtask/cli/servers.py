"""The commands that run CloudTask's programs: ``agent``, ``web`` and ``center`` (each one
process, waiting for MongoDB and ZooKeeper while they do not answer, stopped by SIGTERM or
Ctrl-C) and ``up`` (all of them on this machine)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..config import Config
from ..exceptions import StoreError
from .common import _load, _setup_logging, cli_actor, config_option, verbose_option

log = logging.getLogger("cloudtask")
T = TypeVar("T")

# what a request may carry besides an upload of web.max_upload_bytes (multipart framing, the
# form's other fields); the site's own limit (web/__init__.py, MAX_CONTENT_LENGTH) is the same
UPLOAD_OVERHEAD = 64 * 1024


def request_body_limit(cfg: Config) -> int:
    """waitress's ``max_request_body_size``: it refuses (413) a body of this size or more as
    soon as the headers announce it, or as a chunked body reaches it, before the site sees the
    request: waitress reads a whole body (to a temporary file) before it calls the site, so
    its default, 1 GiB, let anyone fill the disk and the site's limit come too late."""
    return cfg.web.max_upload_bytes + UPLOAD_OVERHEAD + 1


def _apply_network_policy(cfg: Config) -> None:
    """The process's deny-list of networks (``security.egress_filter``): the agent's HTTP
    tasks keep to it (cloudtask/netpolicy.py); mail and webhooks take it from the config."""
    from .. import netpolicy

    netpolicy.configure(netpolicy.NetworkPolicy.from_config(cfg))


# --- agent ----------------------------------------------------------------------------------


@click.command()
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
    from ..agent.agent import Agent
    from ..agent.cluster import ClusterAgent
    from ..clock import utcnow
    from ..store import Store
    from ..testing.clock import clock_from_environment
    from ..zkpaths import connect_config

    _setup_logging(verbose)
    cfg = _load(config_path)
    changes = {k: v for k, v in {"id": agent_id, "group": group, "data_dir": data_dir}.items() if v}
    if changes:
        cfg = cfg.with_section("agent", **changes)
    _apply_network_policy(cfg)
    store = _when_reachable("MongoDB", lambda: Store.from_config(cfg))
    zk = None
    try:
        # tests and the chaos bench may skew this agent's clock (cloudtask/testing/clock.py)
        clock = clock_from_environment() or utcnow
        if standalone:
            engine: Agent = Agent(cfg, store, clock=clock)
        else:
            zk = _when_reachable("ZooKeeper", lambda: connect_config(cfg))
            engine = ClusterAgent(cfg, store, zk, clock=clock)
        _stop_on_signals(engine.stop)
        engine.run()
    finally:
        if zk is not None:
            zk.stop()
            zk.close()
        store.close()


# --- web ------------------------------------------------------------------------------------


@click.command()
@config_option
@click.option("--host", help="Address to listen on (default: config web.host).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: config web.port).")
@verbose_option
def web(config_path: str | None, host: str | None, port: int | None, verbose: bool) -> None:
    """Serve the web site and the REST API (waitress, a production WSGI server)."""
    import waitress

    from web import create_app

    from ..store import Store
    from ..zkpaths import connect_config

    _setup_logging(verbose)
    cfg = _load(config_path)
    cfg = cfg.with_section("web", secret_key=_web_secret(cfg))
    _apply_network_policy(cfg)
    # a page waits at most 2 s for MongoDB before it says it is unreachable (503)
    store = Store(
        cfg.mongodb.uri,
        cfg.mongodb.database,
        run_retention_days=cfg.runs.retention_days,
        server_selection_timeout_ms=2000,
    )
    zk = None
    if cfg.zookeeper.hosts:  # task changes made here reach the leading center at once
        zk = connect_config(cfg)
    app = create_app(cfg, {"STORE": store, "ZK": zk})
    host = host or cfg.web.host
    port = cfg.web.port if port is None else port
    log.info("web site on http://%s:%d/", host, port)
    try:
        waitress.serve(
            app,
            host=host,
            port=port,
            threads=8,
            ident="cloudtask",
            max_request_body_size=request_body_limit(cfg),
            # X-Forwarded-For reaches the site, which believes it only from
            # web.trusted_proxies (web/security.py); waitress would strip it otherwise
            clear_untrusted_proxy_headers=False,
        )
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


@click.command()
@config_option
@click.option("--id", "center_id", help="Center id (default: host and pid).")
@verbose_option
def center(config_path: str | None, center_id: str | None, verbose: bool) -> None:
    """Run a center: one of them leads and places tasks on the live agents."""
    from ..center.center import Center
    from ..store import Store
    from ..zkpaths import connect_config

    _setup_logging(verbose)
    cfg = _load(config_path)
    _apply_network_policy(cfg)
    store = _when_reachable("MongoDB", lambda: Store.from_config(cfg))
    zk = _when_reachable("ZooKeeper", lambda: connect_config(cfg))
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

    from ..retry import Backoff, Stopped, retry
    from ..zkpaths import ClusterUnavailable

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


# --- up -------------------------------------------------------------------------------------


@click.command()
@config_option
@click.option(
    "--data-dir",
    default=".cloudtask",
    show_default=True,
    envvar="CLOUDTASK_DATA_DIR",
    type=click.Path(file_okay=False),
    help="Where the embedded servers and the agents keep their data and logs, and where "
    "running.json tells the commands of this folder the cluster's addresses "
    "(env CLOUDTASK_DATA_DIR).",
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
    and agents, each in its own process (one that dies is started again). While it runs,
    DATA_DIR/running.json holds their addresses for the commands run from this folder."""
    from ..up import run_local

    _setup_logging(verbose)
    cfg = _load(config_path, local=False)  # never the addresses of another running `up`
    run_local(cfg, Path(data_dir), Path(tasks_dir), agents, port, actor=cli_actor())

"""``cloudtask up``: CloudTask on one machine, as a program.

Embedded servers where none are configured (ZooKeeper, and the MongoDB wire server
nx-27017), the task files of a folder applied (through the operations, so they are checked
and audited like any change), then one center, the web site and the agents, each a supervised
process of its own (one that dies is started again, with backoff). The first SIGINT, SIGTERM
or SIGHUP stops everything gracefully; a second one kills it all at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .config import Config, config_to_dict
from .exceptions import CloudTaskError
from .localservers import MongoServer, ZooKeeperServer
from .operations import Operations
from .secretbox import make_key_file
from .store import Store
from .supervisor import Supervisor
from .taskfiles import read_task_files
from .users import Users


def run_local(
    cfg: Config,
    data_dir: Path,
    tasks_dir: Path,
    agents: int,
    port: int,
    *,
    actor: str,
    echo: Callable[..., None] = click.echo,
) -> None:
    """Run everything until a signal stops it (see the module's notes)."""
    base = data_dir.resolve()
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
            echo("starting ZooKeeper ...")
            zk.start()
            servers.append(zk)
            cfg = cfg.with_section("zookeeper", hosts=zk.hosts)
        if not cfg.mongodb.uri:
            mongo = MongoServer(base / "mongodb")
            echo("starting the embedded MongoDB server (nx-27017) ...")
            mongo.start()
            servers.append(mongo)
            cfg = cfg.with_section("mongodb", uri=mongo.uri)
        if not cfg.secrets.keys:  # a key ring of its own, made once, mode 0600
            ring = base / "secrets.keys"
            if not ring.exists():
                make_key_file(ring)
            cfg = cfg.with_section("secrets", keys=f"file:{ring}")
        store = Store.from_config(cfg)
        if tasks_dir.is_dir():
            tasks, errors = read_task_files((str(tasks_dir),))
            for err in errors:
                echo(f"skipped: {err}", err=True)
            ops = Operations(store)  # the cluster starts below: its leader reads every task
            for path, data in tasks:
                try:
                    outcome, doc = ops.apply_task(actor, data)
                    echo(f"task {doc['name']}: {outcome}")
                except CloudTaskError as e:  # report it, apply the rest
                    echo(f"skipped: {path}: {e}", err=True)
                    echo(f"  (fix it, then: cloudtask apply {path})", err=True)
        admins = Users(store).count_admins()
        store.close()
        web_cfg = cfg.with_section("web", port=port, data_dir=str(base / "web"))
        if signals["count"]:
            return  # stopped while starting: the servers are stopped below
        _start_cluster(supervisor, web_cfg, base, agents)
        echo("")
        echo("CloudTask is running.")
        echo(f"  web site:    http://{web_cfg.web.host}:{port}/")
        echo(f"  ZooKeeper:   {cfg.zookeeper.hosts} (root {cfg.zookeeper.root})")
        echo(f"  MongoDB:     {cfg.mongodb.uri} (database {cfg.mongodb.database})")
        for child in supervisor.children.values():
            echo(f"  {child.name + ' log:':13}{child.log_path}")
        echo(f"  task logs:   {base}/agent-<n>/logs/<task>/<YYYY-MM-DD>.log")
        if not admins:
            echo("No admin user yet. Create the first one with:")
            echo(f"  CLOUDTASK_MONGO_URI={cfg.mongodb.uri} cloudtask user add NAME --role admin")
        echo("Press Ctrl-C to stop.")
        while not signals["count"]:
            supervisor.poll()  # a child that died is logged and started again (backoff)
            time.sleep(0.2)
    finally:
        echo("stopping ...")
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


def _write_private(path: Path, text: str) -> None:
    """Write a child's config (it may hold credentials: zookeeper.auth, the MongoDB URI's
    password) readable by this user only (mode 0600, also when it was there before)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _start_cluster(supervisor: Any, cfg: Config, base: Path, agents: int) -> None:
    """One center, the web site and ``agents`` agents, each a supervised process of its own
    with its own config file (a restarted agent keeps its id and data dir: both are in it)."""

    def spawn(name: str, child_cfg: Config, *args: str) -> None:
        cfg_path = base / f"{name}.json"
        _write_private(cfg_path, json.dumps(config_to_dict(child_cfg), indent=2))
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

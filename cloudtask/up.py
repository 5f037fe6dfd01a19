"""``cloudtask up``: CloudTask on one machine, as a program.

Embedded servers where none are configured (ZooKeeper, and the MongoDB wire server
nx-27017), the task files of a folder applied (through the operations, so they are checked
and audited like any change), then one center, the web site and the agents, each a supervised
process of its own (one that dies is started again, with backoff). The first SIGINT, SIGTERM
or SIGHUP stops everything gracefully; a second one kills it all at once.

While it runs, ``<data dir>/running.json`` (:mod:`cloudtask.localstate`) holds the addresses
of its servers, its web site and the pids of its children: the ``cloudtask`` commands run
from the same folder read it, so they reach this cluster without a config. It is removed at
the stop. On a terminal, a first start without an admin offers to create one.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from .config import CONFIG_ORIGIN_VAR, Config, config_to_dict
from .exceptions import CloudTaskError, ConfigError
from .localservers import MongoServer, ZooKeeperServer
from .localstate import (
    DEFAULT_DATA_DIR,
    make_record,
    read_record,
    record_path,
    remove_record,
    write_record,
)
from .operations import Operations
from .secretbox import make_key_file
from .store import Store
from .supervisor import Supervisor
from .taskdiff import after_parents, parents_first
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
    other = read_record(base)
    if other is not None and other["pid"] != os.getpid():
        raise ConfigError(
            f"cloudtask up is running already with the data dir {base} (pid {other['pid']}, "
            f"{other['web_url']}): stop it first, or pass another --data-dir"
        )
    base.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    servers: list[Any] = []
    supervisor = Supervisor()
    signals = {"count": 0, "prompting": False}
    written: list[Path] = []

    def request_stop(*_: Any) -> None:
        """The first signal stops everything gracefully; a second one kills it all at once."""
        signals["count"] += 1
        if signals["prompting"]:
            raise KeyboardInterrupt  # ends the question on the terminal
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
        own_ring = ""
        if not cfg.secrets.keys:  # a key ring of its own, made once, mode 0600
            ring = base / "secrets.keys"
            if not ring.exists():
                make_key_file(ring)
            own_ring = f"file:{ring}"
            cfg = cfg.with_section("secrets", keys=own_ring)
        store = Store.from_config(cfg)
        try:
            if tasks_dir.is_dir():
                tasks, errors = read_task_files((str(tasks_dir),))
                for err in errors:
                    echo(f"skipped: {err}", err=True)
                ops = Operations(store)  # the cluster starts below: its leader reads every task
                # a task that runs after others of the folder comes after them (each file is
                # still applied, or reported, on its own)
                parents = _after_parents(tasks)
                for path, data in parents_first(tasks, parents, lambda t: t[1].get("name")):
                    try:
                        outcome, doc = ops.apply_task(actor, data)
                        echo(f"task {doc['name']}: {outcome}")
                    except CloudTaskError as e:  # report it, apply the rest
                        echo(f"skipped: {path}: {e}", err=True)
                        echo(f"  (fix it, then: cloudtask apply {path})", err=True)
            admins = Users(store).count_admins()
            if not admins and not signals["count"] and _on_a_terminal():
                admins = _offer_first_admin(store, actor, signals, echo)
        finally:
            store.close()
        web_cfg = cfg.with_section("web", port=port, data_dir=str(base / "web"))
        if signals["count"]:
            return  # stopped while starting: the servers are stopped below
        _start_cluster(supervisor, web_cfg, base, agents)
        web_url = f"http://{web_cfg.web.host}:{port}/"

        def record() -> dict[str, Any]:
            return make_record(
                pid=os.getpid(),
                web_url=web_url,
                zk_hosts=cfg.zookeeper.hosts,
                zk_root=cfg.zookeeper.root,
                mongo_uri=cfg.mongodb.uri,
                mongo_database=cfg.mongodb.database,
                started=started,
                data_dir=base,
                secrets_keys=own_ring,
                children=[
                    {"name": c.name, "pid": c.pid, "log": str(c.log_path)}
                    for c in supervisor.children.values()
                ],
            )

        written.append(write_record(base, record()))
        cli = cli_command()
        env = _data_dir_env(base)
        config = _config_option(cfg)
        echo("")
        echo("CloudTask is running.")
        echo(f"  web site:    {web_url}")
        echo(f"  ZooKeeper:   {cfg.zookeeper.hosts} (root {cfg.zookeeper.root})")
        echo(f"  MongoDB:     {cfg.mongodb.uri} (database {cfg.mongodb.database})")
        for child in supervisor.children.values():
            echo(f"  {child.name + ' log:':13}{child.log_path}")
        echo(f"  task logs:   {base}/agent-<n>/logs/<task>/<YYYY-MM-DD>.log")
        if cfg.center.metrics_port:
            echo(
                f"  metrics:     center http://{cfg.center.metrics_host}:{cfg.center.metrics_port}/metrics"
            )
        if cfg.agent.metrics_port:
            last = agent_metrics_port(cfg, agents)
            echo(
                f"  metrics:     agents http://{cfg.agent.metrics_host}:"
                f"{cfg.agent.metrics_port}..{last}/metrics (agent-1 on the first)"
            )
        pids = ", ".join(f"{c.name} {c.pid}" for c in supervisor.children.values())
        echo(f"  pids:        {pids} (also in running.json)")
        echo(f"These addresses are in {_shown(record_path(base))}: cloudtask commands run")
        echo("from this folder use it" + (f" (with {env.strip()})." if env else "."))
        echo(f"  {env}{cli} user list{config}")
        if not admins:
            echo("No admin user yet. Create the first one with:")
            if os.environ.get("MAKELEVEL"):  # started by make: its target asks for the name
                data_dir_arg = "" if not env else f" DATA_DIR={shlex.quote(str(base))}"
                echo(f"  make admin{data_dir_arg}")
            echo(f"  {env}{cli} user add admin --role admin{config}")
        echo("Press Ctrl-C to stop.")
        while not signals["count"]:
            # a child that died is logged and started again (backoff); its new pid is noted
            if supervisor.poll() and not signals["count"]:
                write_record(base, record())
            time.sleep(0.2)
    finally:
        if written:  # commands stop finding a cluster that is going away
            remove_record(base, os.getpid())
        _say(echo, "stopping ...")
        # agents let their runs finish within kill_grace; a second Ctrl-C kills at once
        supervisor.stop(grace=max(30.0, cfg.agent.kill_grace + 15.0))
        for server in reversed(servers):
            server.stop(timeout=1 if signals["count"] > 1 else 10)
        if written:
            _say(echo, f"removed {_shown(written[0])}")


def _say(echo: Callable[..., None], text: str) -> None:
    """Print while stopping: a terminal or pipe gone already (``up | tee`` ended by the same
    Ctrl-C) must not keep the children from being stopped."""
    try:
        echo(text)
    except (OSError, ValueError):
        pass


def cli_command() -> str:
    """How to call this ``cloudtask`` from the current folder, as a shell word: ``cloudtask``
    when it is the one on PATH, else its path (``.venv/bin/cloudtask``), else
    ``<python> -m cloudtask``."""
    exe = "cloudtask.exe" if os.name == "nt" else "cloudtask"
    candidates = []
    if sys.argv and Path(sys.argv[0]).name in ("cloudtask", "cloudtask.exe"):
        candidates.append(Path(sys.argv[0]))
    candidates.append(Path(sys.executable).parent / exe)  # a venv's scripts sit beside python
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            on_path = shutil.which("cloudtask")
            if on_path and Path(on_path).resolve() == path.resolve():
                return "cloudtask"
            return _shown(path)
    return f"{shlex.quote(sys.executable)} -m cloudtask"


def _shown(path: Path) -> str:
    """A path as typed in this folder: relative below it (``.venv/bin/cloudtask``), else
    absolute; quoted for a shell."""
    full = path.absolute()
    try:
        text = str(full.relative_to(Path.cwd()))
    except ValueError:
        text = str(full)
    return shlex.quote(text)


def _data_dir_env(base: Path) -> str:
    """``CLOUDTASK_DATA_DIR=... `` when the commands of this folder would not look in ``base``
    by themselves (``up`` ran with another ``--data-dir``), else ``""``."""
    if base == (Path.cwd() / DEFAULT_DATA_DIR).resolve() and not os.environ.get(
        "CLOUDTASK_DATA_DIR"
    ):
        return ""
    return f"CLOUDTASK_DATA_DIR={_shown(base)} "


def _config_option(cfg: Config) -> str:
    """`` --config FILE`` when ``up`` read a config file that the commands of this folder would
    not read by themselves (they read ``conf/cloudtask.json`` when it is there)."""
    if cfg.source == "defaults":
        return ""
    if Path(cfg.source).resolve() == (Path.cwd() / "conf" / "cloudtask.json").resolve():
        return ""
    if os.environ.get("CLOUDTASK_CONFIG") == cfg.source:
        return ""  # the same environment's commands read it too
    return f" --config {_shown(Path(cfg.source))}"


def _on_a_terminal() -> bool:
    try:
        return sys.stdin.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _offer_first_admin(store: Store, actor: str, signals: dict[str, Any], echo: Any) -> int:
    """On a terminal: ask for the first admin's name and password and add the user (through
    the operations: checked and audited like ``cloudtask user add``). Skipped on an empty
    answer or Ctrl-D; Ctrl-C (or SIGTERM) stops ``up`` as it would at any other time. Returns the number of admins after it."""
    ops = Operations(store)
    signals["prompting"] = True
    try:
        echo("No admin user yet.")
        for _ in range(3):
            name = click.prompt(
                "Name of the first admin (empty: skip, create one later)",
                default="",
                show_default=False,
            ).strip()
            if not name:
                return 0
            password = click.prompt("password", hide_input=True, confirmation_prompt=True)
            try:
                ops.add_user(actor, name, password, "admin")
            except CloudTaskError as e:
                echo(f"not added: {e}", err=True)
                continue
            echo(f"added {name} (admin)")
            return 1
        return 0
    except (click.Abort, KeyboardInterrupt, EOFError):
        echo("")
        return 0
    finally:
        signals["prompting"] = False


def _after_parents(tasks: list[tuple[Path, dict[str, Any]]]) -> dict[str, tuple[str, ...]]:
    """Each valid task's after parents (an invalid one is reported when it is applied)."""
    graph: dict[str, tuple[str, ...]] = {}
    for _, data in tasks:
        try:
            graph.update(after_parents([data]))
        except CloudTaskError:
            pass
    return graph


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
    if hasattr(os, "fchmod"):  # (not on Windows before Python 3.13: NTFS ACLs apply there)
        os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _origin_of(cfg: Config) -> str:
    """The config file ``cfg`` came from, as an absolute path (the site names it), or
    "defaults"."""
    return cfg.source if cfg.source == "defaults" else str(Path(cfg.source).resolve())


def agent_metrics_port(cfg: Config, n: int) -> int:
    """Agent ``n``'s metrics port: ``agent.metrics_port`` for the first, the next ones above
    it (the agents share one machine; 0 stays off)."""
    return cfg.agent.metrics_port + n - 1 if cfg.agent.metrics_port else 0


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
            env={**os.environ, CONFIG_ORIGIN_VAR: _origin_of(cfg)},  # the file to edit
        )

    spawn("center", cfg, "center", "--id", "center-1")
    spawn("web", cfg, "web")
    for n in range(1, agents + 1):
        agent_id = f"{cfg.agent.id}-{n}" if cfg.agent.id else ""  # "": generated, kept per agent
        agent_cfg = cfg.with_section(
            "agent",
            id=agent_id,
            data_dir=str(base / f"agent-{n}"),
            log_dir="",
            metrics_port=agent_metrics_port(cfg, n),
        )
        spawn(f"agent-{n}", agent_cfg, "agent")

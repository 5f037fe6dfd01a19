"""What the commands of :mod:`cloudtask.cli` share: the config file they load, the logging
they set up, the ``--config`` and ``--verbose`` options, who acts (for the audit log), and
the store or the operations a command works on."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..config import Config, load_config
from ..exceptions import CloudTaskError, ConfigError

DEFAULT_CONFIG = Path("conf/cloudtask.json")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)


def _load(config_path: str | None, *, local: bool = True) -> Config:
    """The config file (``--config``, ``CLOUDTASK_CONFIG``, else ``conf/cloudtask.json`` when
    present) with the environment's overrides; with ``local``, the addresses of the
    ``cloudtask up`` running for this folder (``.cloudtask/running.json``, see
    :mod:`cloudtask.localstate`) fill in the ZooKeeper hosts and MongoDB URI it names none of."""
    from ..localstate import apply_to_config, running_cluster

    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = str(DEFAULT_CONFIG)
    cfg = load_config(config_path)
    if local and not (cfg.zookeeper.hosts and cfg.mongodb.uri):
        cfg = apply_to_config(cfg, running_cluster())
    return cfg


def _need_mongodb(cfg: Config) -> None:
    """A command that needs MongoDB says where its address comes from when none is known."""
    from ..localstate import data_dir_for, record_path

    if not cfg.mongodb.uri:
        raise ConfigError(
            "no MongoDB URI configured: set mongodb.uri or CLOUDTASK_MONGO_URI, or start "
            f"`cloudtask up` (make up) in this folder (it writes {record_path(data_dir_for())}; "
            "CLOUDTASK_DATA_DIR names another data dir)"
        )


config_option = click.option(
    "--config",
    "config_path",
    envvar="CLOUDTASK_CONFIG",
    type=click.Path(dir_okay=False),
    help="JSON config file (default: conf/cloudtask.json if present; env CLOUDTASK_CONFIG).",
)
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")


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

    from ..operations import Operations
    from ..store import Store
    from ..zkpaths import ZkPaths, connect_config

    cfg = _load(config_path)
    _need_mongodb(cfg)
    store = Store.from_config(cfg)
    zk = None
    try:
        if cluster != "none" and (cfg.zookeeper.hosts or cluster == "required"):
            wait = 10 if cluster == "required" else 5
            try:
                zk = connect_config(cfg, start_timeout=wait)
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


@contextmanager
def _store(config_path: str | None) -> Iterator[Any]:
    """The store of the configured MongoDB, closed after the command."""
    from ..store import Store

    cfg = _load(config_path)
    _need_mongodb(cfg)
    store = Store.from_config(cfg)
    try:
        yield store
    finally:
        store.close()

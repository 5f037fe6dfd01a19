"""Where a running ``cloudtask up`` says how to reach it: ``<data dir>/running.json``.

``cloudtask up`` starts its own ZooKeeper and MongoDB (nx-27017) on free ports, so their
addresses change at every start. While it runs it keeps this record (mode 0600, written
whole through a temporary file, removed when it stops)::

    {
      "pid": 4242,                                  # the `cloudtask up` process
      "web_url": "http://127.0.0.1:8080/",
      "zookeeper": {"hosts": "127.0.0.1:40123", "root": "/cloudtask"},
      "mongodb": {"uri": "mongodb://127.0.0.1:40125/", "database": "cloudtask"},
      "started": "2026-12-04T23:50:00Z",            # UTC, when it started
      "data_dir": "/home/me/cloudtask/.cloudtask",
      "secrets": {"keys": "file:/home/me/cloudtask/.cloudtask/secrets.keys"},  # when up made it
      "children": [{"name": "agent-1", "pid": 4300, "log": ".../agent-1.log"}, ...]
    }

:func:`running_cluster` reads it for the commands run from the same folder
(``cloudtask user add``, ``token create``, ``file put``, ``apply`` ...; see
:func:`cloudtask.cli.common._load`), and only while the ``up`` process that wrote it is
alive: a record left by an ``up`` that was killed (kill -9, a power cut) is ignored.
``CLOUDTASK_DATA_DIR`` names another data dir than ``./.cloudtask`` (``cloudtask up
--data-dir`` takes it too).

Example::

    from cloudtask.localstate import running_cluster

    record = running_cluster()  # ./.cloudtask/running.json, or None
    if record:
        print(record["web_url"], record["mongodb"]["uri"])
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FILE_NAME = "running.json"
DEFAULT_DATA_DIR = ".cloudtask"
DATA_DIR_ENV = "CLOUDTASK_DATA_DIR"
# a process that started this much after the record says it did is another one (a pid reused
# after a reboot or a kill -9 of `up`)
START_SLACK = 5.0


def data_dir_for(folder: Path | str | None = None) -> Path:
    """The data dir of a ``cloudtask up`` run from ``folder`` (default: the current one):
    ``$CLOUDTASK_DATA_DIR`` (relative to ``folder``) when set, else ``folder/.cloudtask``."""
    base = Path.cwd() if folder is None else Path(folder)
    named = os.environ.get(DATA_DIR_ENV, "").strip()
    return base / (named or DEFAULT_DATA_DIR)


def record_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / FILE_NAME


def running_cluster(folder: Path | str | None = None) -> dict[str, Any] | None:
    """The record of the ``cloudtask up`` running for ``folder`` (default: the current
    folder; see :func:`data_dir_for`), or None: no record, one that cannot be read, or one
    whose ``up`` process is no longer alive."""
    return read_record(data_dir_for(folder))


def read_record(data_dir: Path | str) -> dict[str, Any] | None:
    """The record in ``data_dir`` while its process lives, else None. On POSIX only a record
    of this user's, which no one else may write (as ``up`` writes it: mode 0600), is believed:
    one planted in a shared folder would send this user's commands (their task specs, new
    passwords) to someone else's servers."""
    path = record_path(data_dir)
    try:
        if not _own_private_file(path):
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not _well_formed(record):
        return None
    if not process_alive(record["pid"], record.get("started")):
        return None
    return record


def _own_private_file(path: Path) -> bool:
    if not hasattr(os, "geteuid"):  # Windows: NTFS permissions apply
        return path.is_file()
    info = path.stat()
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


def _well_formed(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    pid, zk, mongo = record.get("pid"), record.get("zookeeper"), record.get("mongodb")
    return (
        isinstance(pid, int)
        and not isinstance(pid, bool)
        and pid > 0
        and isinstance(record.get("web_url"), str)
        and isinstance(zk, dict)
        and isinstance(zk.get("hosts"), str)
        and isinstance(zk.get("root"), str)
        and isinstance(mongo, dict)
        and isinstance(mongo.get("uri"), str)
        and isinstance(mongo.get("database"), str)
    )


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, given the record's ``started`` time, began no
    later than that (else the pid was reused by another process)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return False
    when = parse_started(started)
    return when is None or created <= when.timestamp() + START_SLACK


def parse_started(started: Any) -> datetime | None:
    if not isinstance(started, str):
        return None
    try:
        when = datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def make_record(
    *,
    pid: int,
    web_url: str,
    zk_hosts: str,
    zk_root: str,
    mongo_uri: str,
    mongo_database: str,
    started: datetime,
    data_dir: Path,
    secrets_keys: str = "",
    children: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "pid": pid,
        "web_url": web_url,
        "zookeeper": {"hosts": zk_hosts, "root": zk_root},
        "mongodb": {"uri": mongo_uri, "database": mongo_database},
        "started": started.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data_dir": str(data_dir),
    }
    if secrets_keys:
        record["secrets"] = {"keys": secrets_keys}
    record["children"] = list(children or [])
    return record


def write_record(data_dir: Path | str, record: dict[str, Any]) -> Path:
    """Write the record whole (a temporary file, mode 0600, renamed over the old one): a
    reader never sees half of it, and a process killed while writing leaves the old one."""
    path = record_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".running-", suffix=".json", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes it 0600; also under an odd umask
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def remove_record(data_dir: Path | str, pid: int) -> bool:
    """Remove the record if it is ``pid``'s (another ``up`` may have written its own since)."""
    path = record_path(data_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("pid") not in (pid, None):
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def apply_to_config(cfg: Any, record: dict[str, Any] | None) -> Any:
    """``cfg`` with the running cluster's addresses where it names none: the ZooKeeper hosts
    (and root) when ``zookeeper.hosts`` is empty, the MongoDB URI (and database) when
    ``mongodb.uri`` is empty, and ``up``'s own key ring when ``secrets.keys`` is empty. What the
    config (file or environment) names wins; and when it names a server of another cluster
    (hosts or a URI that are not the record's), nothing of the record is mixed in."""
    if record is None:
        return cfg
    zk, mongo = record["zookeeper"], record["mongodb"]
    zk_named, mongo_named = bool(cfg.zookeeper.hosts), bool(cfg.mongodb.uri)
    if zk_named and mongo_named:
        return cfg
    if zk_named and (cfg.zookeeper.hosts, cfg.zookeeper.root) != (zk["hosts"], zk["root"]):
        return cfg
    if mongo_named and (cfg.mongodb.uri, cfg.mongodb.database) != (
        mongo["uri"],
        mongo["database"],
    ):
        return cfg
    if not zk_named and zk["hosts"]:
        cfg = cfg.with_section("zookeeper", hosts=zk["hosts"], root=zk["root"])
    if not mongo_named and mongo["uri"].startswith(("mongodb://", "mongodb+srv://")):
        cfg = cfg.with_section("mongodb", uri=mongo["uri"], database=mongo["database"])
    keys = (record.get("secrets") or {}).get("keys")
    if not cfg.secrets.keys and isinstance(keys, str) and keys:
        cfg = cfg.with_section("secrets", keys=keys)
    return cfg

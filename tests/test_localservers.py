"""Tests of cloudtask.localservers against real servers, and of the shared test helpers."""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path

import psutil
import pymongo
import pytest
from helpers import wait_for
from kazoo.client import KazooClient
from kazoo.protocol.serialization import Connect
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from cloudtask.exceptions import ServerStartError
from cloudtask.localservers import (
    MongoServer,
    ZooKeeperServer,
    find_java,
    find_zookeeper_classpath,
    free_port,
)

# starts and stops the embedded servers themselves
pytestmark = pytest.mark.external


def process_gone(pid: int) -> bool:
    if not psutil.pid_exists(pid):
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def negotiated_session_timeout_ms(server: ZooKeeperServer, requested_ms: int) -> int:
    """Open a raw ZooKeeper session asking for ``requested_ms``; return what the server grants.

    kazoo does not expose the negotiated timeout, so this speaks the handshake itself.
    """
    request = Connect(0, 0, requested_ms, 0, b"\x00" * 16, False).serialize()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(struct.pack("!i", len(request)) + request)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack("!i", data[:4])[0]:
            chunk = sock.recv(4096)
            assert chunk, "ZooKeeper closed the connection during the handshake"
            data += chunk
    response, _ = Connect.deserialize(data[4:], 0)
    return int(response.time_out)


# -- ZooKeeper -----------------------------------------------------------------------------


def test_zookeeper_answers_kazoo(zk: KazooClient) -> None:
    zk.create("/jobs/one", b"payload", makepath=True)
    data, stat = zk.get("/jobs/one")
    assert data == b"payload"
    assert stat.version == 0
    assert zk.get_children("/jobs") == ["one"]


def test_zk_hosts_gives_each_test_its_own_chroot(zk_server: ZooKeeperServer, zk_hosts: str) -> None:
    assert zk_hosts.startswith(f"{zk_server.hosts}/t-")
    client = KazooClient(zk_hosts, timeout=2)
    client.start(timeout=15)
    try:
        assert client.get_children("/") == []
        client.create("/mine")
    finally:
        client.stop()
        client.close()
    assert zk_server.hosts.startswith("127.0.0.1:")
    assert zk_server.four_letter_word("ruok") == "imok"


def test_zookeeper_short_tick_allows_short_sessions(zk_server: ZooKeeperServer) -> None:
    assert zk_server.min_session_timeout_ms == 400  # two ticks of 200 ms
    assert negotiated_session_timeout_ms(zk_server, 400) == 400
    assert negotiated_session_timeout_ms(zk_server, 100) == 400  # raised to the minimum
    assert negotiated_session_timeout_ms(zk_server, 1500) == 1500

    client = KazooClient(zk_server.hosts, timeout=0.4)
    client.start(timeout=15)
    try:
        assert client.connected
        assert client.exists("/") is not None
    finally:
        client.stop()
        client.close()


def test_zookeeper_writes_config_and_log(zk_server: ZooKeeperServer) -> None:
    config = (zk_server.data_dir / "zoo.cfg").read_text()
    assert f"clientPort={zk_server.port}" in config
    assert "tickTime=200" in config
    assert "minSessionTimeout=400" in config
    assert "maxSessionTimeout=60000" in config
    assert "admin.enableServer=false" in config
    assert "4lw.commands.whitelist=ruok,srvr,stat" in config
    assert zk_server.log_path == zk_server.data_dir / "zookeeper.log"
    assert "ZooKeeper" in zk_server.log_tail(500) or "zookeeper" in zk_server.log_tail(500)
    assert len(zk_server.log_tail(3).splitlines()) <= 3
    assert zk_server.log_tail(0) == ""


def test_zookeeper_restart_keeps_data_and_stop_leaves_no_process(tmp_path: Path) -> None:
    with ZooKeeperServer(tmp_path / "zk", tick_time_ms=200) as server:
        assert server.is_running()
        port, first_pid = server.port, server.pid
        assert first_pid is not None
        client = KazooClient(server.hosts, timeout=2, connection_retry={"max_tries": -1})
        client.start(timeout=15)
        try:
            client.create("/kept", b"across restarts")
            server.restart()
            assert server.port == port
            assert server.pid != first_pid
            assert process_gone(first_pid)
            # the same client reconnects to the restarted server; the node is still there
            wait_for(lambda: client.connected, timeout=20, message="kazoo did not reconnect")
            data, _ = client.retry(client.get, "/kept")
            assert data == b"across restarts"
        finally:
            client.stop()
            client.close()
        last_pid = server.pid
        assert last_pid is not None
    assert not server.is_running()
    assert process_gone(last_pid)
    server.stop()  # stopping twice is fine


# -- MongoDB -------------------------------------------------------------------------------


def test_mongo_answers_pymongo(mongo_db: Database[dict]) -> None:
    things = mongo_db["things"]
    things.insert_one({"name": "a", "size": 1})
    things.insert_many([{"name": "b", "size": 2}, {"name": "c", "size": 3}])
    found = things.find_one({"name": "b"})
    assert found is not None and found["size"] == 2
    assert sorted(d["name"] for d in things.find({"size": {"$gte": 2}})) == ["b", "c"]

    things.create_index("name", unique=True)
    with pytest.raises(DuplicateKeyError):
        things.insert_one({"name": "a"})


def test_mongo_db_names_are_unique_per_test(
    mongo_server: MongoServer, mongo_db_name: str, mongo_db: Database[dict]
) -> None:
    assert mongo_db.name == mongo_db_name
    assert mongo_db_name.startswith("t_")
    assert mongo_server.uri == f"mongodb://127.0.0.1:{mongo_server.port}"


def test_mongo_restart_keeps_data_and_stop_leaves_no_process(tmp_path: Path) -> None:
    server = MongoServer(tmp_path / "mongo")
    server.start()
    try:
        client: pymongo.MongoClient[dict] = pymongo.MongoClient(
            server.uri, serverSelectionTimeoutMS=5000
        )
        client["db"]["c"].insert_one({"_id": 1, "kept": True})
        first_pid = server.pid
        assert first_pid is not None
        server.restart()
        assert process_gone(first_pid)
        assert client["db"]["c"].find_one({"_id": 1}) == {"_id": 1, "kept": True}
        client.close()
        assert (tmp_path / "mongo" / "mongo.log").is_file()
    finally:
        pid = server.pid
        server.stop()
    assert pid is not None
    assert not server.is_running()
    assert process_gone(pid)


def test_mongo_without_embedded_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nx_27017", None)  # makes it unimportable
    with pytest.raises(ServerStartError, match=r"pip install 'cloudtask\[embedded\]'"):
        MongoServer(tmp_path / "mongo").start()


# -- errors that say what to do ------------------------------------------------------------


def test_zookeeper_home_without_zookeeper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("ZOOKEEPER_HOME", str(empty))
    with pytest.raises(ServerStartError, match="apt-get install zookeeper"):
        find_zookeeper_classpath()
    server = ZooKeeperServer(tmp_path / "zk")
    with pytest.raises(ServerStartError, match="ZOOKEEPER_HOME"):
        server.start()
    assert server.pid is None  # nothing was started


def test_zookeeper_home_apache_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "apache-zookeeper-3.8.4-bin"
    (home / "lib").mkdir(parents=True)
    (home / "conf").mkdir()
    for name in ("zookeeper-3.8.4.jar", "zookeeper-jute-3.8.4.jar", "netty-handler.jar"):
        (home / "lib" / name).write_bytes(b"")
    (home / "README.txt").write_text("")
    monkeypatch.setenv("ZOOKEEPER_HOME", str(home))
    classpath = find_zookeeper_classpath()
    assert str(home / "lib" / "zookeeper-3.8.4.jar") in classpath
    assert str(home / "lib" / "netty-handler.jar") in classpath
    assert str(home / "conf") in classpath
    assert not any(entry.endswith("README.txt") for entry in classpath)


def test_default_zookeeper_classpath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZOOKEEPER_HOME", raising=False)
    classpath = find_zookeeper_classpath()
    assert any(Path(entry).name.startswith("zookeeper") for entry in classpath)


def test_java_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("JAVA_HOME", str(empty))
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ServerStartError, match="java was not found"):
        find_java()
    server = ZooKeeperServer(tmp_path / "zk")
    with pytest.raises(ServerStartError, match="JAVA_HOME"):
        server.start()
    assert server.pid is None


def test_java_home_is_used_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = tmp_path / "jdk" / "bin" / ("java.exe" if os.name == "nt" else "java")
    java.parent.mkdir(parents=True)
    java.write_text("")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    assert find_java() == str(java)


@pytest.mark.skipif(os.name != "posix", reason="uses a shell script as a fake java")
def test_server_that_exits_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text("#!/bin/sh\necho 'Error: something is badly wrong' >&2\nexit 3\n")
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    server = ZooKeeperServer(tmp_path / "zk")
    with pytest.raises(ServerStartError, match="exited with code 3") as excinfo:
        server.start(timeout=30)
    assert "something is badly wrong" in str(excinfo.value)
    assert not server.is_running()


def test_port_in_use_is_reported(tmp_path: Path, zk_server: ZooKeeperServer) -> None:
    server = ZooKeeperServer(tmp_path / "zk", port=zk_server.port)
    with pytest.raises(ServerStartError, match="in use"):
        server.start()
    assert server.pid is None
    assert zk_server.four_letter_word("ruok") == "imok"  # the session's server is untouched


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


# -- tests/helpers.py ----------------------------------------------------------------------


def test_wait_for_returns_the_truthy_value() -> None:
    calls: list[int] = []

    def third_time() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert wait_for(third_time, timeout=5, interval=0.01) == 3


def test_wait_for_raises_with_the_message() -> None:
    with pytest.raises(AssertionError, match="never true"):
        wait_for(lambda: False, timeout=0.2, interval=0.05, message="never true")

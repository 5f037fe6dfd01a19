"""Fault injection (cloudtask.testing) against the real servers.

* :class:`TcpProxy` between kazoo or pymongo and the session's ZooKeeper or MongoDB: a cut
  suspends a ZooKeeper session or times a MongoDB call out and heals, a reset fails calls
  at once, latency delays each chunk, a dropped reply leaves the server's work done.
* :class:`ZooKeeperEnsemble`: three members on loopback survive the loss of their leader,
  a client's session with them, and a :class:`ProxyGroup` in front of them.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import psutil
import pymongo
import pytest
from helpers import wait_for
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import ConnectionLoss
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import AutoReconnect, PyMongoError

from cloudtask.localservers import MongoServer, ZooKeeperEnsemble, ZooKeeperServer
from cloudtask.testing import ProxyGroup, TcpProxy

# ZooKeeper ensembles and proxies of their own
pytestmark = [pytest.mark.external, pytest.mark.slow]

# kazoo retries a connection with a growing delay (up to 60 s by default): keep it short so
# that a client reconnects soon after a fault ends.
CONNECTION_RETRY = {"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 1.0}


class StateLog:
    """The states a kazoo client went through (its listener runs in kazoo's thread)."""

    def __init__(self, client: KazooClient) -> None:
        self.states: list[str] = []
        self._lock = threading.Lock()
        client.add_listener(self._record)

    def _record(self, state: str) -> None:
        with self._lock:
            self.states.append(state)

    def saw(self, state: str) -> bool:
        with self._lock:
            return state in self.states

    def after(self, first: str, then: str) -> bool:
        """Whether ``then`` came after a ``first``."""
        with self._lock:
            return first in self.states and then in self.states[self.states.index(first) :]


def kazoo_client(hosts: str, timeout: float, **options: object) -> KazooClient:
    client = KazooClient(hosts, timeout=timeout, connection_retry=CONNECTION_RETRY, **options)
    client.start(timeout=15)
    return client


def close_kazoo(client: KazooClient) -> None:
    client.stop()
    client.close()


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("TcpProxy-")]


def sockets_on_port(port: int) -> list[object]:
    """This process's TCP sockets with ``port`` at either end."""
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if (c.laddr and c.laddr.port == port) or (c.raddr and c.raddr.port == port)
    ]


def ping_ok(client: MongoClient[dict], seconds: float = 2.0) -> bool:
    try:
        with pymongo.timeout(seconds):
            client.admin.command("ping")
    except PyMongoError:
        return False
    return True


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def zk_proxy(zk_server: ZooKeeperServer) -> Iterator[TcpProxy]:
    with TcpProxy(zk_server.hosts) as proxy:
        yield proxy


@pytest.fixture
def chroot(zk_server: ZooKeeperServer, zk_hosts: str) -> str:
    """This test's ZooKeeper chroot ("/t-<uuid>"), to append to a proxy's address."""
    return zk_hosts[len(zk_server.hosts) :]


@pytest.fixture
def mongo_proxy(mongo_server: MongoServer) -> Iterator[TcpProxy]:
    with TcpProxy(("127.0.0.1", mongo_server.port)) as proxy:
        yield proxy


@pytest.fixture
def proxied_mongo(mongo_proxy: TcpProxy) -> Iterator[MongoClient[dict]]:
    client: MongoClient[dict] = MongoClient(
        mongo_proxy.mongo_uri,
        serverSelectionTimeoutMS=5000,
        # The monitor's next check comes a minute after the first: no heartbeat of its own
        # can be "the next request" of drop_next_reply, or be what a fault hits first.
        heartbeatFrequencyMS=60_000,
        # One attempt per call, so a test sees what the fault did to that attempt.
        retryWrites=False,
        retryReads=False,
    )
    assert ping_ok(client, 10), "no ping through the proxy before any fault"
    yield client
    client.close()


# -- TcpProxy ------------------------------------------------------------------------------


def test_proxy_relays_and_stop_leaves_no_thread_or_socket(
    mongo_server: MongoServer, mongo_db_name: str, mongo_db: Database[dict]
) -> None:
    proxy = TcpProxy(("127.0.0.1", mongo_server.port))
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    assert proxy.mongo_uri == f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
    proxy.start()
    client: MongoClient[dict] = MongoClient(proxy.mongo_uri, serverSelectionTimeoutMS=5000)
    try:
        # Dozens of pooled connections at once, each relayed.
        def insert(i: int) -> None:
            client[mongo_db_name].docs.insert_one({"_id": i})

        threads = [threading.Thread(target=insert, args=(i,)) for i in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert mongo_db.docs.count_documents({}) == 40
        assert proxy.connections >= 2  # the monitor's and at least one pooled connection
        assert sockets_on_port(proxy.port)
    finally:
        client.close()
        proxy.stop()
    assert proxy_threads() == []
    assert sockets_on_port(proxy.port) == []
    assert proxy.connections == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    # It starts again on the same port.
    with proxy:
        client = MongoClient(proxy.mongo_uri, serverSelectionTimeoutMS=5000)
        assert ping_ok(client, 10)
        client.close()
    assert proxy_threads() == []


def test_kazoo_suspended_by_a_cut_reconnects_within_its_session(
    zk_proxy: TcpProxy, chroot: str, zk: KazooClient
) -> None:
    # An 8 s session: kazoo gives up a silent connection after 2/3 of it (5.3 s), which
    # leaves at least 2.6 s to reconnect before the server would expire the session.
    client = kazoo_client(zk_proxy.address + chroot, timeout=8)
    log = StateLog(client)
    try:
        client.create("/owner", b"me", ephemeral=True)
        session_id = client.client_id[0]
        zk_proxy.cut()
        wait_for(lambda: log.saw(KazooState.SUSPENDED), timeout=20, message="not suspended")
        assert zk_proxy.connections >= 1  # held open, not closed
        zk_proxy.forward()
        wait_for(lambda: client.state == KazooState.CONNECTED, timeout=15, message="no reconnect")
        assert not log.saw(KazooState.LOST)
        assert client.client_id[0] == session_id
        assert client.get("/owner")[0] == b"me"
        assert zk.exists("/owner").ephemeralOwner == session_id
    finally:
        close_kazoo(client)


def test_cut_holds_new_connections_until_forward(zk_proxy: TcpProxy) -> None:
    zk_proxy.cut()
    held = socket.create_connection(("127.0.0.1", zk_proxy.port), timeout=5)
    abandoned = socket.create_connection(("127.0.0.1", zk_proxy.port), timeout=5)
    try:
        held.sendall(b"ruok")
        abandoned.sendall(b"ruok")
        held.settimeout(1)
        with pytest.raises(TimeoutError):
            held.recv(100)  # accepted, but silent
        abandoned.close()  # its client gives up during the cut
        assert zk_proxy.connections == 2
        zk_proxy.forward()
        held.settimeout(10)
        assert held.recv(100) == b"imok"  # what it sent during the cut got through
        assert held.recv(100) == b""  # ZooKeeper closes after a four-letter word
    finally:
        held.close()
    wait_for(lambda: zk_proxy.connections == 0, timeout=10)


def test_kazoo_session_lost_when_the_cut_outlasts_it(
    zk_proxy: TcpProxy, chroot: str, zk: KazooClient
) -> None:
    client = kazoo_client(zk_proxy.address + chroot, timeout=2)
    log = StateLog(client)
    try:
        client.create("/owner", b"me", ephemeral=True)
        session_id = client.client_id[0]
        zk_proxy.cut()
        # The server expires the session: the observer (not behind the proxy) sees its
        # ephemeral node go, while the client, cut off, cannot know yet.
        wait_for(lambda: zk.exists("/owner") is None, timeout=20, message="session not expired")
        zk_proxy.forward()
        wait_for(lambda: log.saw(KazooState.LOST), timeout=20, message="session not lost")
        assert log.after(KazooState.SUSPENDED, KazooState.LOST)
        # kazoo then opens a new session.
        wait_for(lambda: client.state == KazooState.CONNECTED, timeout=15)
        assert client.client_id[0] != session_id
    finally:
        close_kazoo(client)


def test_pymongo_call_times_out_during_a_cut_and_works_after_forward(
    mongo_proxy: TcpProxy, proxied_mongo: MongoClient[dict]
) -> None:
    mongo_proxy.cut()
    started = time.monotonic()
    with pytest.raises(PyMongoError) as info, pymongo.timeout(1):
        proxied_mongo.admin.command("ping")
    elapsed = time.monotonic() - started
    assert info.value.timeout, f"not a timeout: {info.value!r}"
    assert 0.9 <= elapsed < 5, elapsed
    assert mongo_proxy.connections >= 1  # held open
    mongo_proxy.forward()
    wait_for(lambda: ping_ok(proxied_mongo), timeout=20, message="no ping after forward()")


def test_reset_fails_calls_at_once_and_refuses_new_connections(
    mongo_proxy: TcpProxy, proxied_mongo: MongoClient[dict]
) -> None:
    mongo_proxy.reset()
    assert mongo_proxy.connections == 0
    started = time.monotonic()
    with pytest.raises(AutoReconnect) as info, pymongo.timeout(10):
        proxied_mongo.admin.command("ping")
    elapsed = time.monotonic() - started
    assert not info.value.timeout, f"a timeout, not a connection error: {info.value!r}"
    assert elapsed < 2, elapsed  # at once, not after the 10 s budget
    # A new connection is accepted, then reset (on loopback, often before connect() returns).
    with (
        pytest.raises(ConnectionResetError),
        socket.create_connection(("127.0.0.1", mongo_proxy.port), timeout=5) as sock,
    ):
        sock.sendall(b"hello")
        sock.recv(100)
    mongo_proxy.forward()
    wait_for(lambda: ping_ok(proxied_mongo), timeout=20, message="no ping after forward()")


def test_latency_delays_every_chunk_both_ways_without_adding_up(
    mongo_proxy: TcpProxy, proxied_mongo: MongoClient[dict], zk_proxy: TcpProxy
) -> None:
    mongo_proxy.latency(0.3)
    started = time.monotonic()
    proxied_mongo.admin.command("ping")
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 3, elapsed  # 0.3 s each way
    mongo_proxy.forward()
    started = time.monotonic()
    proxied_mongo.admin.command("ping")
    assert time.monotonic() - started < 0.3

    # Ten connections at once: each round trip takes 0.6 s, all of them together too
    # (a proxy that slept per chunk in turn would take 6 s).
    zk_proxy.latency(0.3)
    started = time.monotonic()
    socks = [socket.create_connection(("127.0.0.1", zk_proxy.port), timeout=10) for _ in range(10)]
    try:
        for sock in socks:
            sock.sendall(b"ruok")
        answers = [sock.recv(100) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    elapsed = time.monotonic() - started
    assert answers == [b"imok"] * 10
    assert 0.6 <= elapsed < 2.5, elapsed


def test_latency_keeps_order_of_pipelined_requests(zk_proxy: TcpProxy, chroot: str) -> None:
    client = kazoo_client(zk_proxy.address + chroot, timeout=10)
    try:
        client.create("/counter", b"0")
        zk_proxy.latency(0.3)
        started = time.monotonic()
        # kazoo sends these back to back on its one connection and reads the replies in order.
        results = [client.set_async("/counter", str(i).encode()) for i in range(20)]
        versions = [result.get(timeout=10).version for result in results]
        elapsed = time.monotonic() - started
        assert versions == list(range(1, 21))
        assert 0.6 <= elapsed < 3, elapsed  # one delayed round trip, not twenty
        assert client.get("/counter")[0] == b"19"
    finally:
        close_kazoo(client)


def test_dropped_reply_mongo_call_fails_but_the_server_acted(
    mongo_proxy: TcpProxy,
    proxied_mongo: MongoClient[dict],
    mongo_db_name: str,
    mongo_db: Database[dict],
) -> None:
    docs = proxied_mongo[mongo_db_name].docs
    mongo_proxy.drop_next_reply()
    started = time.monotonic()
    with pytest.raises(PyMongoError) as info, pymongo.timeout(1):
        docs.insert_one({"_id": "acted", "n": 1})
    assert info.value.timeout, f"not a timeout: {info.value!r}"
    assert time.monotonic() - started < 5
    assert mongo_proxy.dropped_replies == 1
    # The server stored it; only the answer was lost.
    assert mongo_db.docs.find_one({"_id": "acted"}) == {"_id": "acted", "n": 1}
    # The client goes on on a new connection; nothing else is dropped.
    docs.insert_one({"_id": "next"})
    assert mongo_db.docs.count_documents({}) == 2
    assert mongo_proxy.dropped_replies == 1


def test_dropped_reply_silences_one_zookeeper_connection_only(
    zk_proxy: TcpProxy, chroot: str, zk: KazooClient
) -> None:
    victim = kazoo_client(zk_proxy.address + chroot, timeout=6)
    bystander = kazoo_client(zk_proxy.address + chroot, timeout=6)
    try:
        # kazoo's pings could be the next request: drop the reply to the create only.
        zk_proxy.drop_next_reply(match=b"/acted")
        with pytest.raises(ConnectionLoss):
            victim.create("/acted", b"x")  # no reply: kazoo drops the connection (4 s)
        assert zk_proxy.dropped_replies == 1
        assert zk.exists("/acted") is not None  # ZooKeeper created it
        # Meanwhile the other connection through the same proxy worked.
        assert bystander.create("/other") == "/other"
        wait_for(lambda: victim.state == KazooState.CONNECTED, timeout=15)
        assert victim.exists("/acted") is not None
    finally:
        close_kazoo(victim)
        close_kazoo(bystander)


def test_fault_switches_check_their_input() -> None:
    with pytest.raises(ValueError, match="host:port"):
        TcpProxy("127.0.0.1")
    with pytest.raises(ValueError, match="host:port"):
        TcpProxy("127.0.0.1:2181/chroot")
    proxy = TcpProxy(("127.0.0.1", 1))
    with pytest.raises(ValueError, match=">= 0"):
        proxy.latency(-1)
    with pytest.raises(ValueError, match="at least one"):
        ProxyGroup("")


def test_upstream_down_resets_the_client() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        with TcpProxy(("127.0.0.1", port)) as proxy:
            with (
                pytest.raises(ConnectionResetError),
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock,
            ):
                sock.recv(100)
            wait_for(lambda: proxy.connections == 0, timeout=5)


# -- ZooKeeper ensemble --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperEnsemble]:
    zk3 = ZooKeeperEnsemble(tmp_path_factory.mktemp("ensemble"), tick_time_ms=200)
    zk3.start(timeout=120)
    yield zk3
    zk3.stop()


@pytest.fixture
def ensemble_logs(
    request: pytest.FixtureRequest, ensemble: ZooKeeperEnsemble
) -> Iterator[ZooKeeperEnsemble]:
    """The ensemble; when the test fails, the end of each member's log is printed."""
    yield ensemble
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"{ensemble!r}\n{ensemble.log_tail(40)}")


@pytest.mark.timeout(180)
def test_ensemble_elects_a_new_leader_and_keeps_the_session(
    ensemble_logs: ZooKeeperEnsemble,
) -> None:
    ensemble = ensemble_logs
    assert len(ensemble.nodes) == 3
    assert ensemble.hosts == ",".join(f"127.0.0.1:{node.port}" for node in ensemble.nodes)
    assert sorted(ensemble.modes()) == ["follower", "follower", "leader"]
    old = ensemble.leader()
    assert old is not None
    ports = [(node.port, node.quorum_port, node.election_port) for node in ensemble.nodes]
    # The client connects to the leader first, so losing it means reconnecting elsewhere.
    order = [old] + [i for i in range(3) if i != old]
    hosts = ",".join(ensemble.nodes[i].hosts for i in order)
    client = kazoo_client(hosts, timeout=15, randomize_hosts=False)
    log = StateLog(client)
    path = f"/failover-{uuid.uuid4().hex[:8]}"
    try:
        client.create(path, b"before", ephemeral=True)
        session_id = client.client_id[0]

        pid = ensemble.nodes[old].pid
        assert ensemble.kill_leader() == old
        assert not ensemble.nodes[old].is_running()
        assert pid is not None and not psutil.pid_exists(pid)  # killed and reaped
        new = ensemble.wait_for_quorum(timeout=60)
        assert new != old
        assert ensemble.modes()[old] is None

        wait_for(lambda: log.after(KazooState.SUSPENDED, KazooState.CONNECTED), timeout=30)
        wait_for(lambda: client.state == KazooState.CONNECTED, timeout=30)
        assert not log.saw(KazooState.LOST)
        assert client.client_id[0] == session_id  # the same session, on another member
        client.set(path, b"after")
        assert client.get(path)[0] == b"after"

        ensemble.restart(old)
        assert ensemble.nodes[old].mode() == "follower"
        assert ensemble.leader() == new  # the old leader rejoins; it does not take over
        assert [(n.port, n.quorum_port, n.election_port) for n in ensemble.nodes] == ports
        # It caught up: a client of that member alone reads what was written without it.
        direct = kazoo_client(ensemble.nodes[old].hosts, timeout=10)
        try:
            direct.sync(path)
            assert direct.get(path)[0] == b"after"
        finally:
            close_kazoo(direct)
    finally:
        close_kazoo(client)
    assert ensemble.wait_for_quorum(timeout=60) == new


@pytest.mark.timeout(180)
def test_proxy_group_in_front_of_the_ensemble(ensemble_logs: ZooKeeperEnsemble) -> None:
    ensemble = ensemble_logs
    with ProxyGroup(ensemble.hosts) as group:
        assert len(group) == 3
        assert group.hosts == ",".join(proxy.address for proxy in group)
        client = kazoo_client(group.hosts, timeout=10)
        log = StateLog(client)
        try:
            session_id = client.client_id[0]
            assert group.connections == 1
            used = next(i for i, proxy in enumerate(group) if proxy.connections == 1)
            # Lose the link to that member only: the client moves to another one.
            group[used].reset()
            wait_for(lambda: log.saw(KazooState.SUSPENDED), timeout=15)
            wait_for(lambda: client.state == KazooState.CONNECTED, timeout=30)
            assert client.client_id[0] == session_id
            assert group[used].connections == 0
            assert group.connections == 1
            group.forward()

            group.latency(0.2)
            started = time.monotonic()
            client.exists("/")
            assert time.monotonic() - started >= 0.4
            group.forward()

            group.cut()  # partitioned from every member
            wait_for(lambda: client.state == KazooState.SUSPENDED, timeout=20)
            group.forward()
            wait_for(lambda: client.state == KazooState.CONNECTED, timeout=30)
            assert client.client_id[0] == session_id
        finally:
            close_kazoo(client)
    assert proxy_threads() == []

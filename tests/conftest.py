"""Shared fixtures: a real ZooKeeper and a MongoDB wire server for the whole session.

* ``zk_server`` / ``mongo_server`` (session): the servers (:mod:`cloudtask.localservers`).
* ``zk_hosts``: a connection string with a fresh chroot per test, so tests never see each
  other's nodes; ``zk``: a started KazooClient on it (session timeout 2 s).
* ``mongo_client`` (session, tz_aware); ``mongo_db_name`` / ``mongo_db``: a fresh database
  per test, dropped afterwards.
* The web site, for a module that defines an ``app`` fixture: ``client`` (its test client),
  ``operator`` / ``viewer`` (that client logged in as ``op1`` / ``viewer1``; the session's
  CSRF token, read from the page ``csrf_page``, "/" unless the module overrides it).
* ``from helpers import wait_for`` polls a condition; tests/helpers.py has the other helpers.

When a test fails, the end of each server's log is added to its report. Tests without a
``timeout`` marker get ``pytest.mark.timeout(120)`` unless a timeout is set on the command
line, in PYTEST_TIMEOUT or in the configuration.

Markers: a test that uses a real server (ZooKeeper or MongoDB through these fixtures, or one it
starts itself: its module says ``pytestmark = pytest.mark.external``) is marked ``external``,
so ``pytest -m "not external"`` runs the pure suites (the task model, schedules, placement,
the scheduler's ticks, the journal, mail content ...) in seconds. ``slow`` marks the tests
that run a whole cluster under faults for a minute or more (``-m "not slow"`` leaves them out).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pytest
from kazoo.client import KazooClient
from pymongo import MongoClient
from pymongo.database import Database

from cloudtask.agent.runwriter import RunWriter
from cloudtask.localservers import MongoServer, ZooKeeperServer, free_port
from cloudtask.store import Store

if TYPE_CHECKING:
    from flask import Flask
    from flask.testing import FlaskClient

# pytest's default import mode already puts tests/ on sys.path; other modes do not.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from helpers import OPERATOR, VIEWER, Receiver, SmtpServer, web_login  # noqa: E402

# A `make up` running in this checkout writes .cloudtask/running.json, and commands run from
# here fill in the addresses their config leaves empty from it: never the tests' commands.
os.environ["CLOUDTASK_DATA_DIR"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"cloudtask-tests-no-cluster-{uuid.uuid4().hex}"
)

DEFAULT_TEST_TIMEOUT = 120.0
LOG_TAIL_LINES = 40

# ZooKeeper with a 200 ms tick accepts session timeouts from 0.4 s (two ticks) to 60 s.
ZK_TICK_TIME_MS = 200


# a test using one of these fixtures talks to a real server
SERVER_FIXTURES = frozenset({"zk_server", "mongo_server"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.external)
    if (
        config.getoption("timeout", None) is not None
        or os.environ.get("PYTEST_TIMEOUT")
        or config.getini("timeout")
    ):
        return  # a timeout chosen by whoever runs the tests wins
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.failed and report.when in ("setup", "call"):
        funcargs = getattr(item, "funcargs", {})
        for fixture_name in ("zk_server", "mongo_server"):
            server = funcargs.get(fixture_name)
            if isinstance(server, (ZooKeeperServer, MongoServer)):
                report.sections.append(
                    (
                        f"{server.name} log, last {LOG_TAIL_LINES} lines ({server.log_path})",
                        server.log_tail(LOG_TAIL_LINES),
                    )
                )
    return report


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"), tick_time_ms=ZK_TICK_TIME_MS)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    server = MongoServer(tmp_path_factory.mktemp("mongo"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def zk_hosts(zk_server: ZooKeeperServer) -> str:
    """``"127.0.0.1:PORT/t-<uuid>"``: the session's ZooKeeper under a chroot of this test."""
    chroot = f"/t-{uuid.uuid4()}"
    admin = KazooClient(zk_server.hosts, timeout=5)
    admin.start(timeout=15)
    try:
        admin.ensure_path(chroot)  # kazoo does not create the chroot node
    finally:
        admin.stop()
        admin.close()
    return f"{zk_server.hosts}{chroot}"


@pytest.fixture
def zk(zk_hosts: str) -> Iterator[KazooClient]:
    client = KazooClient(zk_hosts, timeout=10)  # it only observes: a stall must not drop it
    client.start(timeout=15)
    yield client
    client.stop()
    client.close()


@pytest.fixture(scope="session")
def mongo_client(mongo_server: MongoServer) -> Iterator[MongoClient[dict]]:
    client: MongoClient[dict] = MongoClient(
        mongo_server.uri, tz_aware=True, serverSelectionTimeoutMS=5000
    )
    yield client
    client.close()


@pytest.fixture
def mongo_db_name(mongo_client: MongoClient[dict]) -> Iterator[str]:
    """A database name no other test uses; the database is dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(Exception):
        mongo_client.drop_database(name)


@pytest.fixture
def mongo_db(mongo_client: MongoClient[dict], mongo_db_name: str) -> Database[dict]:
    return mongo_client[mongo_db_name]


@pytest.fixture
def store(mongo_client: MongoClient[dict], mongo_db_name: str) -> Store:
    """A Store on this test's own database (the client is shared, so the store does not close it)."""
    return Store(mongo_client, mongo_db_name)


@pytest.fixture
def writer(store: Store) -> Iterator[RunWriter]:
    """A run writer on this test's store that flushes often."""
    w = RunWriter(store, flush_interval=0.05, tail_interval=0.2)
    w.start()
    yield w
    w.stop()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """The test client of the module's ``app``."""
    return app.test_client()


@pytest.fixture
def csrf_page() -> str:
    """The page ``operator`` and ``viewer`` read the CSRF token from after logging in."""
    return "/"


@pytest.fixture
def operator(client: FlaskClient, csrf_page: str) -> str:
    """``client`` logged in as the operator ``op1``: the session's CSRF token."""
    return web_login(client, OPERATOR.name, OPERATOR.password, csrf_page)


@pytest.fixture
def viewer(client: FlaskClient, csrf_page: str) -> str:
    """``client`` logged in as the viewer ``viewer1``: the session's CSRF token."""
    return web_login(client, VIEWER.name, VIEWER.password, csrf_page)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) on a free port, recording what it is sent."""
    server = SmtpServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on a free port, recording each request."""
    r = Receiver(free_port()).start()
    yield r
    r.stop()

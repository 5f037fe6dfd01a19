"""ZooKeeper digest ACLs (``zookeeper.auth``), against the real server.

A cluster (a center and an agent, separate processes) configured with a credential places and
runs a task, and every node it made has the digest ACL and nothing else; a client without the
credential, or with a wrong password, can neither read an assignment nor create, change or
delete anything under the root. Without ``zookeeper.auth`` nodes stay open, as before.
``cloudtask zk-acl`` protects the nodes of a cluster that ran without it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import make_task, wait_for
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl
from test_cluster import Cluster

from cloudtask.cli import cli
from cloudtask.config import Config
from cloudtask.exceptions import ConfigError
from cloudtask.zkauth import AccessDenied, Credential, credential
from cloudtask.zkpaths import ZkPaths, connect, connect_config, decode, request_kill, task_signal

USER, PASSWORD = "cloudtask", "s3cret-Zk"
DIGEST_ACL = [make_digest_acl(USER, PASSWORD, all=True)]
PATHS = ZkPaths("/cloudtask")


def acl_key(acl: list[Any]) -> list[tuple[str, str, int]]:
    return sorted((a.id.scheme, a.id.id, a.perms) for a in acl)


@contextlib.contextmanager
def client(hosts: str, auth: tuple[str, str] | None = None) -> Iterator[KazooClient]:
    """A plain KazooClient, with ``auth`` (user, password) or none."""
    data = [("digest", f"{auth[0]}:{auth[1]}")] if auth else None
    zk = KazooClient(hosts, timeout=5, auth_data=data)
    zk.start(timeout=15)
    try:
        yield zk
    finally:
        zk.stop()
        zk.close()


def tree(zk: KazooClient, root: str) -> list[str]:
    """Every node under ``root`` (itself included); nodes that vanish meanwhile are left out."""
    out, todo = [], [root]
    while todo:
        path = todo.pop()
        try:
            children = zk.get_children(path)
        except NoNodeError:
            continue
        out.append(path)
        todo.extend(f"{path}/{name}" for name in children)
    return out


def assert_locked_out(zk: KazooClient, assignment: str) -> None:
    """``zk`` can neither read nor write anything CloudTask made."""
    for read in (
        lambda: zk.get(assignment),
        lambda: zk.get_children(PATHS.root),
        lambda: zk.get_children(PATHS.assignments),
        lambda: zk.get(PATHS.status),
    ):
        with pytest.raises(NoAuthError):
            read()
    for write in (
        lambda: zk.create(f"{PATHS.root}/intruder", b"x"),
        lambda: zk.create(f"{PATHS.assignments}/evil", b"x"),
        lambda: zk.create(f"{PATHS.kills}/a1/r1", b"x", makepath=True),
        lambda: zk.create(f"{PATHS.agents}/default/fake", b"{}", ephemeral=True),
        lambda: zk.set(assignment, b"{}"),
        lambda: zk.set(PATHS.task_signal, b""),
        lambda: zk.delete(assignment),
        lambda: zk.delete(PATHS.root, recursive=True),
        lambda: zk.set_acls(assignment, OPEN_ACL_UNSAFE),
    ):
        with pytest.raises(NoAuthError):
            write()


@pytest.fixture
def secured(zk_hosts, mongo_server, mongo_db_name, tmp_path, request):
    """A center and an agent whose credential comes from an environment variable."""
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    c.env["CLOUDTASK_ZK_AUTH"] = "env:CT_TEST_ZK_CREDENTIAL"
    c.env["CT_TEST_ZK_CREDENTIAL"] = f"{USER}:{PASSWORD}"
    yield c
    c.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.timeout(180)
def test_a_cluster_with_auth_runs_tasks_and_nobody_else_can_touch_its_nodes(
    secured, zk_hosts, store
):
    task = make_task(store, "guarded", schedule={"every": "1s"}, command="echo guarded")
    secured.center("c1")
    secured.agent("a1")
    assignment = PATHS.assignment("a1", task["_id"])
    with client(zk_hosts, (USER, PASSWORD)) as zk:
        wait_for(lambda: zk.exists(assignment), timeout=30, message="the task was not placed")
        wait_for(
            lambda: store.runs.count_documents({"task_id": task["_id"], "status": "succeeded"}),
            timeout=30,
            message="the task did not run",
        )
        doc = decode(zk.get(assignment)[0])
        assert doc is not None and doc["task_id"] == task["_id"]
        # a change made through a client of the CLI's kind (connect_config) gets the ACL too
        cfg = Config().with_section("zookeeper", hosts=zk_hosts, auth=f"{USER}:{PASSWORD}")
        cli_zk = connect_config(cfg)
        try:
            request_kill(cli_zk, PATHS, "a1", "no-such-run", "test")
            task_signal(cli_zk, PATHS)()
        finally:
            cli_zk.stop()
            cli_zk.close()
        nodes = tree(zk, PATHS.root)
        kinds = {
            PATHS.root,
            PATHS.agents,
            PATHS.agent("default", "a1"),  # ephemeral
            PATHS.election,
            PATHS.centers,
            PATHS.center("c1"),  # ephemeral
            PATHS.assignments,
            PATHS.assignment_dir("a1"),
            assignment,
            PATHS.signals,
            PATHS.task_signal,
            PATHS.status,
            PATHS.kills,
        }
        assert kinds <= set(nodes), sorted(kinds - set(nodes))
        election = [n for n in nodes if n.startswith(PATHS.election + "/")]
        assert election, "no election (lock) node"  # kazoo's sequential ephemeral lock nodes
        for path in nodes:
            try:
                acl, _ = zk.get_acls(path)
            except NoNodeError:
                continue
            assert acl_key(acl) == acl_key(DIGEST_ACL), (path, acl)

    with client(zk_hosts) as anonymous:
        assert_locked_out(anonymous, assignment)
    with client(zk_hosts, (USER, "wrong-password")) as wrong:
        assert_locked_out(wrong, assignment)
    with client(zk_hosts, ("someone-else", PASSWORD)) as other:
        assert_locked_out(other, assignment)
    # the cluster still works after all that: the task keeps running
    before = store.runs.count_documents({"task_id": task["_id"], "status": "succeeded"})
    wait_for(
        lambda: (
            store.runs.count_documents({"task_id": task["_id"], "status": "succeeded"}) > before
        ),
        timeout=15,
    )


def test_a_process_without_the_credential_is_told_at_start(zk_hosts, mongo_server, mongo_db_name):
    zk = connect(zk_hosts, 5.0, credential=Credential(USER, PASSWORD))
    try:
        zk.ensure_path(PATHS.assignments)  # a cluster with auth has been here
    finally:
        zk.stop()
        zk.close()
    cfg = Config().with_section("zookeeper", hosts=zk_hosts)
    with pytest.raises(AccessDenied, match="set zookeeper.auth"):
        connect_config(cfg)
    wrong = cfg.with_section("zookeeper", auth=f"{USER}:nope")
    with pytest.raises(AccessDenied, match="the password is wrong") as e:
        connect_config(wrong)
    assert "nope" not in str(e.value)
    # the daemons say so and exit, rather than wait for ever
    env = {
        "CLOUDTASK_ZK_HOSTS": zk_hosts,
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_CONFIG": "",
    }
    result = CliRunner().invoke(cli, ["center", "--id", "c9"], env=env)
    assert result.exit_code == 1, result.output
    assert "ZooKeeper refused access to /cloudtask" in result.output


def test_without_auth_nodes_stay_open_as_before(zk_hosts):
    zk = connect(zk_hosts, 5.0, root=PATHS.root)
    try:
        zk.ensure_path(PATHS.assignment_dir("a1"))
        zk.create(PATHS.agent("default", "a1"), b"{}", ephemeral=True, makepath=True)
        for path in (PATHS.root, PATHS.assignment_dir("a1"), PATHS.agent("default", "a1")):
            assert acl_key(zk.get_acls(path)[0]) == acl_key(OPEN_ACL_UNSAFE)
    finally:
        zk.stop()
        zk.close()
    with client(zk_hosts) as anyone:
        anyone.create(PATHS.assignment("a1", "t1"), b"{}")


def test_zk_acl_protects_the_nodes_of_a_cluster_that_ran_without_auth(zk_hosts):
    with client(zk_hosts) as open_zk:  # what a cluster without zookeeper.auth left
        for path in (PATHS.assignment("a1", "t1"), PATHS.task_signal, PATHS.status):
            open_zk.create(path, b"{}", makepath=True)
        open_zk.ensure_path(PATHS.election)
        open_zk.ensure_path(PATHS.agent_group("default"))
        env = {
            "CLOUDTASK_ZK_HOSTS": zk_hosts,
            "CLOUDTASK_ZK_AUTH": f"{USER}:{PASSWORD}",
            "CLOUDTASK_CONFIG": "",
        }
        runner = CliRunner()
        dry = runner.invoke(cli, ["zk-acl", "--dry-run"], env=env)
        assert dry.exit_code == 0, dry.output
        assert (
            "/cloudtask: 10 node(s) would be given the digest ACL of user 'cloudtask'" in dry.output
        )
        open_zk.get(PATHS.assignment("a1", "t1"))  # nothing changed yet

        done = runner.invoke(cli, ["zk-acl"], env=env)
        assert done.exit_code == 0, done.output
        assert (
            "10 node(s) given the digest ACL" in done.output and "0 had it already" in done.output
        )
        assert_locked_out(open_zk, PATHS.assignment("a1", "t1"))
        again = runner.invoke(cli, ["zk-acl"], env=env)
        assert "0 node(s) given" in again.output and "10 had it already" in again.output

        undo = runner.invoke(cli, ["zk-acl", "--open"], env=env)
        assert undo.exit_code == 0 and "10 node(s) given the open ACL" in undo.output
        assert decode(open_zk.get(PATHS.assignment("a1", "t1"))[0]) == {}

    missing = CliRunner().invoke(cli, ["zk-acl"], env={**env, "CLOUDTASK_ZK_AUTH": ""})
    assert missing.exit_code == 1 and "zookeeper.auth is not set" in missing.output


# --- the setting: in clear, from the environment, from a file -----------------------------------


def test_the_credential_can_come_from_the_environment_or_a_file(tmp_path):
    assert credential("") is None
    assert credential("u:p:with:colons") == Credential("u", "p:with:colons")
    assert credential("env:ZK_CRED", {"ZK_CRED": "u:pw\n"}) == Credential("u", "pw")
    secret = tmp_path / "zk-credential"
    secret.write_text("u2:pw2\n")
    assert credential(f"file:{secret}") == Credential("u2", "pw2")
    assert "pw2" not in repr(credential(f"file:{secret}"))
    with pytest.raises(ConfigError, match="ZK_CRED, which is not set"):
        credential("env:ZK_CRED", {})
    with pytest.raises(ConfigError, match="cannot read .*nothing-here"):
        credential(f"file:{tmp_path / 'nothing-here'}")
    secret.write_text("no-colon-here\n")
    with pytest.raises(ConfigError, match="expected user:password") as e:
        credential(f"file:{secret}")
    assert "no-colon-here" not in str(e.value)


@pytest.mark.timeout(120)
def test_cloudtask_up_hands_the_credential_to_every_process(
    zk_hosts, mongo_server, mongo_db_name, tmp_path
):
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from cloudtask.localservers import free_port

    config = tmp_path / "cloudtask.json"
    config.write_text(
        json.dumps(
            {
                "zookeeper": {"hosts": zk_hosts, "auth": "env:CT_UP_ZK", "session_timeout": "3s"},
                "mongodb": {"uri": mongo_server.uri, "database": mongo_db_name},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDTASK_")}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloudtask", "up", "--agents", "1", "--port", str(port)]
        + ["--data-dir", str(tmp_path / "data"), "--tasks", str(tmp_path / "none")],
        env={**env, "CLOUDTASK_CONFIG": str(config), "CT_UP_ZK": f"{USER}:{PASSWORD}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    try:
        with client(zk_hosts, (USER, PASSWORD)) as zk:
            group = PATHS.agent_group("default")
            wait_for(lambda: zk.exists(group) and zk.get_children(group), timeout=60)
            wait_for(lambda: zk.exists(PATHS.center("center-1")), timeout=30)
            wait_for(healthy, timeout=30, message="the web site did not start")
            (agent,) = zk.get_children(group)
            for path in (PATHS.root, f"{group}/{agent}", PATHS.center("center-1")):
                assert acl_key(zk.get_acls(path)[0]) == acl_key(DIGEST_ACL), path
        with client(zk_hosts) as anonymous, pytest.raises(NoAuthError):
            anonymous.get_children(PATHS.root)
        # the credential is passed on as the reference, never written out in clear
        for name in ("center", "web", "agent-1"):
            assert PASSWORD not in (tmp_path / "data" / f"{name}.json").read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "refused" not in out, out

"""What a task process gets of its agent: a clean environment (an allow-list), and the user it
runs as (``run_as``). The rules first (no servers), then a real cluster whose agent holds
credentials in its environment, then agents that start tasks as another user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import make_task, wait_for
from test_agent import Running
from test_cluster import Cluster

from cloudtask import taskenv
from cloudtask.config import load_config
from cloudtask.exceptions import ConfigError, ValidationError
from cloudtask.operations import Operations
from cloudtask.task import parse_task
from cloudtask.taskenv import (
    DEFAULT_PATH,
    RunAsError,
    check_env_allow,
    choose_run_as,
    task_environment,
)

# --- the rules --------------------------------------------------------------------------------


def test_a_task_gets_the_allow_list_and_never_the_agents_configuration():
    agent_env = {
        "PATH": "/opt/bin:/usr/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_TIME": "de_DE.UTF-8",
        "TZ": "Europe/Berlin",
        "CLOUDTASK_MONGO_URI": "mongodb://agent:pw@db/",
        "CLOUDTASK_ZK_AUTH": "agent:zkpw",
        "AWS_SECRET_ACCESS_KEY": "aws",
        "JAVA_HOME": "/usr/lib/jvm",
        "PROXY_URL": "http://proxy",
    }
    got = task_environment(agent_env, windows=False)
    assert got == {
        "PATH": "/opt/bin:/usr/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_TIME": "de_DE.UTF-8",
        "TZ": "Europe/Berlin",
    }
    # the config adds names and patterns; CLOUDTASK_* never passes, whatever matches it
    assert task_environment(agent_env, ("JAVA_HOME", "PROXY_*", "*_HOME"), windows=False) == {
        **got,
        "JAVA_HOME": "/usr/lib/jvm",
        "PROXY_URL": "http://proxy",
    }
    assert task_environment({}, windows=False) == {"PATH": DEFAULT_PATH}


def test_the_allow_list_setting_refuses_what_would_pass_the_agents_configuration(tmp_path):
    assert check_env_allow("JAVA_HOME, PROXY_*") == ("JAVA_HOME", "PROXY_*")
    for bad in (["CLOUDTASK_MONGO_URI"], ["CLOUD*"], ["*"], ["*_URI", "C*"], ["A-B"], [1]):
        with pytest.raises(ValueError):
            check_env_allow(bad)
    cfg = load_config(None, environ={"CLOUDTASK_AGENT_ENV_ALLOW": "JAVA_HOME,PROXY_*"})
    assert cfg.agent.env_allow == ("JAVA_HOME", "PROXY_*")
    path = tmp_path / "c.json"
    path.write_text('{"agent": {"env_allow": ["CLOUDTASK_*"], "run_as": "bad user"}}')
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert "agent.env_allow" in str(e.value) and "CLOUDTASK_" in str(e.value)


def test_run_as_is_the_agents_unless_the_task_names_a_user_the_agent_allows():
    assert choose_run_as(None, "", ()) == ""
    assert choose_run_as(None, "batch", ()) == "batch"
    assert choose_run_as("batch", "batch", ()) == "batch"
    assert choose_run_as("report:staff", "", ("report:staff",)) == "report:staff"
    assert choose_run_as("anyone", "", ("*",)) == "anyone"
    for asked, allowed in (("report", ()), ("report", ("other",)), ("root", ("*",)), ("0", ("*",))):
        with pytest.raises(RunAsError, match="run_as_allowed"):
            choose_run_as(asked, "", allowed)
    spec = parse_task({"name": "t", "schedule": {"every": "1m"}, "command": "id", "run_as": "a:b"})
    assert spec.run_as == "a:b" and spec.to_dict()["run_as"] == "a:b"
    with pytest.raises(ValidationError, match="run_as"):
        parse_task({"name": "t", "schedule": {"every": "1m"}, "command": "id", "run_as": "a b"})


# --- a real cluster: the agent holds credentials, the task prints its environment -------------


def test_a_task_printing_its_whole_environment_shows_none_of_the_agents_configuration(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, store
):
    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    cluster.env.update(
        {
            "CLOUDTASK_ZK_AUTH": "agent:zk-password-probe",  # (digest auth, ACLs off here)
            "CLOUDTASK_WEB_SECRET_KEY": "web-secret-key-probe",
            "CLOUDTASK_ALERTS_SMTP_PASSWORD": "smtp-password-probe",
            "CLOUDTASK_AGENT_ENV_ALLOW": "ALLOWED_*",
            "AWS_SECRET_ACCESS_KEY": "aws-key-probe",
            "ALLOWED_PROXY": "http://proxy.example",
            "LC_MESSAGES": "C",
        }
    )
    env_dump = tmp_path / "env-dump"
    task = make_task(
        store,
        "print-env",
        schedule={"every": "1h"},
        command=["/bin/sh", "-c", f"env > {env_dump}; env"],
        env={"TASK_OWN": "mine"},
    )
    try:
        cluster.center("c1")
        cluster.agent("a1")
        wait_for(
            lambda: (
                store.runs.find_one({"task_id": task["_id"]}) is None
                and Operations(store).run_now("alice", task["_id"])
            ),
            timeout=5,
        )
        done = wait_for(
            lambda: store.runs.find_one({"task_id": task["_id"], "status": "succeeded"}),
            timeout=60,
            message="the task did not run",
        )
    finally:
        cluster.stop_all()
    got = dict(line.split("=", 1) for line in env_dump.read_text().splitlines() if "=" in line)
    agent_only = {
        k: v
        for k, v in cluster.env.items()
        if k.startswith("CLOUDTASK_") or k == "AWS_SECRET_ACCESS_KEY"
    }
    assert agent_only  # (the agent had all of these)
    for name, value in agent_only.items():
        assert name not in got, f"the task got the agent's {name}"
        if len(value) > 3 and value not in ("1s", "2.0s"):
            assert value not in done["output_tail"], f"the output shows the agent's {name}"
    assert "probe" not in done["output_tail"] and mongo_server.uri not in done["output_tail"]
    assert got["TASK_OWN"] == "mine" and got["ALLOWED_PROXY"] == "http://proxy.example"
    assert got["CLOUDTASK_TASK"] == "print-env" and got["CLOUDTASK_RUN_ID"] == done["_id"]
    assert got["PATH"] == os.environ["PATH"] and got["LC_MESSAGES"] == "C"
    run_facts = {
        "CLOUDTASK_TASK",
        "CLOUDTASK_RUN_ID",
        "CLOUDTASK_SCHEDULED_FOR",
        "CLOUDTASK_ATTEMPT",
        "CLOUDTASK_TRIGGER",
        "CLOUDTASK_AGENT",
        "CLOUDTASK_AGENT_PROCESS",  # (which agent process started it: for its leftovers)
    }
    assert {k for k in got if k.startswith("CLOUDTASK_")} == run_facts
    allowed = {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL"}
    extra = {
        k
        for k in got
        if k not in run_facts | allowed | {"TASK_OWN", "ALLOWED_PROXY", "PWD", "SHLVL", "_"}
        and not k.startswith("LC_")
    }
    assert not extra, f"the task got variables of the agent's environment: {sorted(extra)}"


# --- run_as: the agent as root starts tasks as another user ------------------------------------

root_only = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="run_as needs an agent running as root"
)


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path):
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


def finished(store, task_id: str, n: int = 1) -> list[dict]:
    def look():
        docs = list(
            store.runs.find(
                {"task_id": task_id, "status": {"$in": ["succeeded", "failed", "timed_out"]}}
            ).sort("created_at", 1)
        )
        return docs if len(docs) >= n else None

    return wait_for(look, timeout=30, message=f"fewer than {n} finished runs of {task_id}")


@pytest.fixture
def open_dir():
    """A folder other users may pass through (pytest's own are closed to them)."""
    path = Path(tempfile.mkdtemp(prefix="cloudtask-runas-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@root_only
def test_an_agent_running_as_root_starts_tasks_as_the_user_they_may_run_as(store, agents, open_dir):
    nobody, daemon = pwd.getpwnam("nobody"), pwd.getpwnam("daemon")
    private = open_dir / "agent.json"  # the agent's config: its owner's alone
    private.write_text('{"mongo": {"uri": "mongodb://agent:pw@db/"}}')
    private.chmod(0o600)
    probe = (
        'echo "uid=$(id -u) gid=$(id -g) home=$HOME user=$USER"; '
        f"test -e {private} && echo config-exists; "
        f"cat {private} && echo READ-THE-CONFIG || echo cannot-read-the-config; "
        f"ls {open_dir / 'a1'} || echo cannot-list-the-data-dir"
    )
    ops = Operations(store)
    by_default = make_task(store, "default-user", command=["/bin/sh", "-c", probe])
    own = make_task(store, "own-user", command=["/bin/sh", "-c", probe], run_as="daemon")
    refused = make_task(store, "root-asked", command=["/bin/sh", "-c", probe], run_as="root")
    missing = make_task(store, "no-such-user", command=["/bin/sh", "-c", probe], run_as="nobodyx")
    agents.start(
        "a1",
        data_dir=str(open_dir / "a1"),
        run_as="nobody",
        run_as_allowed=("daemon", "nobodyx"),
    )
    for task in (by_default, own, refused, missing):
        ops.run_now("alice", task["_id"])

    doc = finished(store, by_default["_id"])[0]
    assert doc["status"] == "succeeded", doc
    tail = doc["output_tail"]
    assert f"uid={nobody.pw_uid} gid={nobody.pw_gid} home={nobody.pw_dir} user=nobody" in tail
    assert "config-exists" in tail and "cannot-read-the-config" in tail
    assert "READ-THE-CONFIG" not in tail and "cannot-list-the-data-dir" in tail

    doc = finished(store, own["_id"])[0]
    assert doc["status"] == "succeeded", doc
    assert (
        f"uid={daemon.pw_uid} gid={daemon.pw_gid} home={daemon.pw_dir} user=daemon"
        in (doc["output_tail"])
    )

    doc = finished(store, refused["_id"])[0]
    assert doc["status"] == "failed" and "run_as_allowed" in doc["error"], doc
    assert "uid=" not in doc["output_tail"]  # never started

    doc = finished(store, missing["_id"])[0]
    assert doc["status"] == "failed" and "no user 'nobodyx'" in doc["error"], doc


@root_only
def test_a_task_file_is_laid_out_for_the_user_it_runs_as(store, agents, open_dir):
    nobody = pwd.getpwnam("nobody")
    store.put_file("whoami.sh", b'#!/bin/sh\necho "$(id -u) $(stat -c %u .)" > out; cat out\n')
    task = make_task(store, "file-task", command="./whoami.sh", file="whoami.sh", run_as="nobody")
    agents.start("a1", data_dir=str(open_dir / "a1"), run_as_allowed=("nobody",))
    Operations(store).run_now("alice", task["_id"])
    doc = finished(store, task["_id"])[0]
    assert doc["status"] == "succeeded", doc
    assert f"{nobody.pw_uid} {nobody.pw_uid}" in doc["output_tail"]  # it owns its folder


def test_an_agent_that_is_not_root_runs_tasks_as_itself_or_not_at_all():
    """As a user other than root (nobody), the rules refuse a task naming another user and
    take one naming the agent's own user as the agent's."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to start the check as another user")
    nobody = pwd.getpwnam("nobody")
    source = Path(taskenv.__file__).read_text()  # (the checkout may be closed to nobody)
    checks = (
        "\nassert run_user(None, '', ()) is None\n"
        "assert run_user('nobody', '', ('nobody',)) is None  # its own user, named\n"
        "try:\n"
        "    run_user('daemon', '', ('daemon',))\n"
        "except RunAsError as e:\n"
        "    print('refused:', e)\n"
    )
    python = shutil.which("python3", path="/usr/bin:/bin")  # (one a user other than root reaches)
    if python is None:
        pytest.skip("no system python3 for another user to run")
    out = subprocess.run(
        [python, "-I", "-c", source + checks],
        capture_output=True,
        text=True,
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        cwd="/",
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "refused: cannot run as 'daemon': the agent does not run as root" in out.stdout

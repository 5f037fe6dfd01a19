"""The `cloudtask` command: help everywhere, clean errors, apply, and real agent processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from click.testing import CliRunner
from helpers import wait_for

from cloudtask.cli import cli
from cloudtask.store import Store
from cloudtask.testing.records import duplicate_starts, read_records, recording_command

SUBCOMMANDS = [
    "agent",
    "apply",
    "validate",
    "next",
    "up",
    "center",
    "task",
    "run",
    "file",
    "user",
    "token",
    "web",
    "zk-acl",
]


def invoke(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_on_every_command(sub):
    result = invoke(*([sub] if sub else []), "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def write_tasks(tmp_path, tasks, name="tasks.json"):
    path = tmp_path / name
    path.write_text(json.dumps(tasks))
    return path


def test_validate_reports_every_problem_with_file_and_path(tmp_path):
    path = write_tasks(
        tmp_path,
        [
            {"name": "ok", "schedule": {"every": "10s"}, "command": "true"},
            {
                "name": "bad one",
                "schedule": {"cron": "0 0 31 2 *"},
                "command": "true",
                "timeout": "x",
            },
        ],
    )
    result = invoke("validate", str(path))
    assert result.exit_code != 0
    assert f"{path}[1]: name:" in result.output
    assert f"{path}[1]: schedule.cron:" in result.output
    assert f"{path}[1]: timeout:" in result.output
    assert "Traceback" not in result.output


def test_validate_bad_json_names_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"name": "x",\n "schedule": }')
    result = invoke("validate", str(path))
    assert result.exit_code != 0 and "not valid JSON at line 2" in result.output


def test_validate_warns_of_a_one_shot_time_that_has_passed(tmp_path):
    """(an exported one-shot that ran: apply leaves it unchanged, a new one is refused)"""
    path = tmp_path / "once.json"
    path.write_text(
        json.dumps({"name": "once", "schedule": {"at": "2020-01-01T00:00:00Z"}, "command": "x"})
    )
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.output
    assert "1 task(s) valid" in result.output
    assert f"warning: {path}: task 'once': schedule.at:" in result.output
    assert "refused for a new task" in result.output


def test_validate_example_tasks():
    result = invoke("validate", "conf/tasks")
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_apply_is_all_or_nothing(tmp_path, mongo_server, mongo_db_name, mongo_client):
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    good = write_tasks(
        tmp_path, {"name": "a", "schedule": {"every": "1m"}, "command": "true"}, "a.json"
    )
    bad = write_tasks(
        tmp_path, {"name": "b", "schedule": {"every": "1ms"}, "command": "true"}, "b.json"
    )
    result = invoke("apply", str(good), str(bad), env=env)
    assert result.exit_code != 0 and "nothing applied" in result.output
    assert mongo_client[mongo_db_name].tasks.count_documents({}) == 0
    result = invoke("apply", "--yes", str(good), env=env)
    assert result.exit_code == 0 and "created" in result.output
    result = invoke("apply", str(tmp_path / "a.json"), env=env)
    assert "unchanged" in result.output


def test_apply_refuses_a_task_naming_a_file_not_stored_before_storing_any(
    tmp_path, mongo_server, mongo_db_name, mongo_client
):
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    good = write_tasks(
        tmp_path, {"name": "a", "schedule": {"every": "1m"}, "command": "true"}, "a.json"
    )
    spec = {"name": "b", "schedule": {"every": "1m"}, "command": "./b.sh", "file": "b.sh"}
    needs_file = write_tasks(tmp_path, spec, "b.json")
    result = invoke("apply", str(good), str(needs_file), env=env)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{needs_file}" in result.output and "no file named 'b.sh' is stored" in result.output
    assert mongo_client[mongo_db_name].tasks.count_documents({}) == 0
    script = tmp_path / "b.sh"
    script.write_text("echo b\n")
    put = invoke("file", "put", str(script), env=env)
    assert put.exit_code == 0, put.output
    result = invoke("apply", "--yes", str(good), str(needs_file), env=env)
    assert result.exit_code == 0, result.output
    assert mongo_client[mongo_db_name].tasks.count_documents({}) == 2


def test_apply_warns_of_credentials_given_in_clear_on_stderr_and_still_applies(
    tmp_path, mongo_server, mongo_db_name, mongo_client
):
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    http = {
        "url": "https://hooks.example/deploy",
        "headers": {"Authorization": "Bearer abc", "X-Api-Token": "t0k", "Accept": "text/plain"},
    }
    clear = write_tasks(
        tmp_path, {"name": "hook", "schedule": {"every": "1h"}, "http": http}, "hook.json"
    )
    plain = write_tasks(
        tmp_path, {"name": "a", "schedule": {"every": "1m"}, "command": "true"}, "a.json"
    )
    runner = CliRunner()
    result = runner.invoke(
        cli, ["apply", "--yes", str(clear), str(plain)], env=env, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    applied = result.stdout.split("\n")
    assert applied[applied.index("created   hook") + 1] == "created   a"
    assert "warning" not in result.stdout
    lines = result.stderr.splitlines()
    assert [line.split(": ")[:3] for line in lines] == [
        ["warning", "hook", "http.headers.Authorization"],
        ["warning", "hook", "http.headers.X-Api-Token"],
    ]
    assert all("looks like a credential given in clear" in line for line in lines)
    assert mongo_client[mongo_db_name].tasks.count_documents({}) == 2
    # applied again, unchanged: still stored in clear, still warned of
    again = runner.invoke(cli, ["apply", str(clear)], env=env, catch_exceptions=False)
    assert again.exit_code == 0 and again.stdout.startswith("= unchanged hook")
    assert again.stderr.splitlines() == lines


def test_bad_config_is_a_message_not_a_traceback(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"agent": {"max_parallel": "lots"}}))
    result = invoke("apply", "--config", str(cfg), "conf/tasks")
    assert result.exit_code == 1
    assert "agent.max_parallel" in result.output and str(cfg) in result.output
    assert "Traceback" not in result.output


def test_next_prints_fire_times_in_zone():
    result = invoke("next", "30 2 * * *", "--timezone", "Europe/Berlin", "-n", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3 and all(
        "02:30:00+0" in line and "Europe/Berlin" in line for line in lines
    )
    bad = invoke("next", "61 * * * *")
    assert bad.exit_code == 2 and "schedule.cron" in bad.output


def _agent(tmp_path, agent_id, env):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudtask",
            "agent",
            "--standalone",
            "--id",
            agent_id,
            "--data-dir",
            str(tmp_path / agent_id),
        ],
        env={**os.environ, **env, "CLOUDTASK_AGENT_POLL_INTERVAL": "0.3s"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_two_agent_processes_fire_each_time_once(
    tmp_path, mongo_server, mongo_db_name, mongo_client
):
    store = Store(mongo_client, mongo_db_name)
    records = tmp_path / "records"
    task = store.create_task(
        {"name": "tick", "schedule": {"every": "1s"}, "command": recording_command(records)}
    )
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    procs = [_agent(tmp_path, "p1", env), _agent(tmp_path, "p2", env)]
    try:
        wait_for(
            lambda: store.runs.count_documents({"status": "succeeded"}) >= 6,
            timeout=30,
            message="too few runs",
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=30)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # what the task itself did: every fire started once at most, by either agent
    seen = read_records(records)
    assert len([r for r in seen if r.kind == "start"]) >= 6
    assert duplicate_starts(seen) == []
    docs = list(store.runs.find({"task_id": task["_id"]}))
    # skipped: a fire claimed while the other agent's run of the task was still going (forbid)
    assert {d["status"] for d in docs} <= {"succeeded", "missed", "skipped", "queued"}
    # a claim still waiting for its slot when both stopped is handed back, never left claimed
    assert all(d["agent"] is None and d["released_by"] for d in docs if d["status"] == "queued")
    assert all("stopped" in out for out in outputs)


def _get(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.read().decode()
    except OSError:
        return None


def _registered_pids(zk, paths) -> dict[str, int]:
    """agent id -> the pid in its ZooKeeper registration."""
    from kazoo.exceptions import NoNodeError

    from cloudtask.zkpaths import decode

    out = {}
    for group in zk.get_children(paths.agents) if zk.exists(paths.agents) else []:
        for agent_id in zk.get_children(paths.agent_group(group)):
            try:
                out[agent_id] = (decode(zk.get(paths.agent(group, agent_id))[0]) or {}).get("pid")
            except NoNodeError:
                continue
    return out


@pytest.mark.external
@pytest.mark.timeout(180)
def test_up_runs_everything_and_ctrl_c_stops_it(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hello.json").write_text(
        json.dumps(
            {"name": "hello", "schedule": {"every": "1s"}, "command": ["echo", "hello from up"]}
        )
    )
    (tasks / "broken.json").write_text(json.dumps({"name": "broken", "schedule": {"every": "0s"}}))
    # valid on its own, but its file is not stored: checked like any change, and skipped
    (tasks / "nofile.json").write_text(
        json.dumps(
            {
                "name": "nofile",
                "schedule": {"every": "1h"},
                "command": "./missing.sh",
                "file": "missing.sh",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDTASK_")}
    from cloudtask.localservers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudtask",
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--tasks",
            str(tasks),
        ],
        env={**env, "CLOUDTASK_CONFIG": "conf/cloudtask.json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        while not any("Press Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "cloudtask up exited early:\n" + "".join(lines)
            lines.append(line)
        text = "".join(lines)
        assert "task hello: created" in text
        assert "No admin user yet" in text and "user add admin --role admin" in text
        assert f"web site:    http://127.0.0.1:{port}/" in text
        health = wait_for(
            lambda: _get(f"http://127.0.0.1:{port}/healthz"), timeout=30, message="web not up"
        )
        assert json.loads(health)["status"] == "ok"
        login_page = _get(f"http://127.0.0.1:{port}/")  # redirected to the login page
        assert "Log in" in login_page
        assert "skipped:" in text and "broken" in text  # a bad file is reported, the rest runs
        for name in ("center", "web", "agent-1", "agent-2"):  # they may hold credentials
            assert (tmp_path / "data" / f"{name}.json").stat().st_mode & 0o777 == 0o600
        uri = re.search(r"MongoDB:\s+(\S+)", text).group(1)
        logs = re.search(r"task logs:\s+(\S+)/<task>", text).group(1)
        store = Store(uri, "cloudtask")
        wait_for(
            lambda: store.runs.count_documents({"status": "succeeded"}) >= 1,
            timeout=30,
            message="no run",
        )
        run = store.runs.find_one({"status": "succeeded"})
        assert run["output_tail"].strip() == "hello from up"
        # task files enter through the same door as every change: checked and audited
        assert "skipped:" in text and "nofile" in text and "missing.sh" in text
        assert [t["name"] for t in store.list_tasks()] == ["hello"]
        (entry,) = store.audit.find({"action": "task.create"})
        assert entry["target"] == "task:hello" and entry["actor"].startswith("cli:")
        assert any(
            p.name.endswith(".log") for p in (tmp_path / "data").rglob("*") if "hello" in str(p)
        )
        assert logs.startswith(str(tmp_path / "data"))
        store.close()

        # kill -9 of one agent: `up` starts it again (a new pid, registered again under the
        # same id), and nothing else stops: the web site answers throughout
        from kazoo.client import KazooClient

        from cloudtask.zkpaths import ZkPaths

        hosts, root = re.search(r"ZooKeeper:\s+(\S+) \(root (\S+)\)", text).groups()
        paths = ZkPaths(root)
        up = psutil.Process(proc.pid)

        def agent_pids() -> set[int]:
            return {c.pid for c in up.children() if "agent" in c.cmdline()}

        others = {c.pid for c in up.children() if "agent" not in c.cmdline()}
        zk = KazooClient(hosts=hosts)
        zk.start(timeout=10)
        try:
            before = agent_pids()
            registered = wait_for(
                lambda: (r := _registered_pids(zk, paths)) and set(r.values()) == before and r,
                timeout=30,
                message="agents not registered",
            )
            victim, victim_pid = min(registered.items())
            os.kill(victim_pid, signal.SIGKILL)
            assert json.loads(_get(f"http://127.0.0.1:{port}/healthz"))["status"] == "ok"

            def back() -> int | None:
                pid = _registered_pids(zk, paths).get(victim)
                return pid if pid not in (None, victim_pid) else None

            new_pid = wait_for(back, timeout=60, message="the killed agent did not come back")
            assert new_pid in agent_pids() and victim_pid not in agent_pids()
            assert agent_pids() - {new_pid} == before - {victim_pid}  # the other one kept on
            assert others <= {c.pid for c in up.children()}  # center, web, servers: the same
            assert json.loads(_get(f"http://127.0.0.1:{port}/healthz"))["status"] == "ok"
        finally:
            zk.stop()
            zk.close()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 6  # ZooKeeper, MongoDB, center, web, two agents
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    # the death was logged: name, pid, signal, log file
    assert re.search(rf"(agent-\d) \(pid {victim_pid}\) was killed by SIGKILL.*\1\.log", rest)
    wait_for(
        lambda: not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE],
        timeout=10,
        message="processes left running",
    )


def _ended(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("guard_dies_too", [False, True])
def test_a_killed_agents_runs_end_and_its_next_life_records_how(
    tmp_path, mongo_server, mongo_db_name, mongo_client, guard_dies_too
):
    """kill -9 of an agent: its run guard ends its runs and notes it in the agent's run
    journal, so the agent's next life records the run ``killed`` (its agent ended). If the
    guard is killed as well (both crash), the runs are orphans until the agent starts again,
    which ends them, and nobody knows how they ended: ``lost``. Either way the service runs
    again."""
    store = Store(mongo_client, mongo_db_name)
    task = store.create_task(
        {"name": "long", "schedule": {"every": "1h"}, "command": ["sleep", "300"]}
    )
    store.replace_task(task["_id"], {**task["spec"], "schedule": {"keepalive": True}})
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    first = _agent(tmp_path, "crashy", env)
    run = wait_for(
        lambda: store.runs.find_one({"status": "running", "pid": {"$gt": 0}}),
        timeout=20,
        message="never ran",
    )
    sleeper = psutil.Process(run["pid"])
    guard = sleeper.parent()
    assert "cloudtask.agent.guard" in " ".join(guard.cmdline())
    if guard_dies_too:
        # frozen first, so that the agent cannot see its guard die and end the run itself
        # (it would then know how the run ended) before its own kill -9 lands
        first.send_signal(signal.SIGSTOP)
        guard.kill()
        wait_for(lambda: _ended(guard), timeout=10, message="the guard did not die")
    first.kill()  # kill -9: no chance to clean up
    first.communicate(timeout=10)

    def gone() -> bool:
        return _ended(sleeper)

    if guard_dies_too:
        assert not gone()  # orphaned
    else:
        wait_for(gone, timeout=10, message="the run outlived its agent and guard")
    second = _agent(tmp_path, "crashy", env)
    try:
        verdict = "lost" if guard_dies_too else "killed"
        wait_for(
            lambda: store.get_run(run["_id"])["status"] == verdict,
            timeout=45,  # the next life first ends the orphans (a kill grace) and reads the journal
            message=f"not recorded {verdict}",
        )
        wait_for(gone, timeout=20, message="orphan survived")
        why = store.get_run(run["_id"])["error"]
        assert ("without finishing" if guard_dies_too else "its agent ended") in why
        # the keepalive task runs again under the new life of the agent
        wait_for(
            lambda: store.runs.count_documents({"status": "running"}) == 1,
            timeout=20,
            message="not restarted",
        )
    finally:
        second.send_signal(signal.SIGTERM)
        print(second.communicate(timeout=30)[0].decode(errors="replace"))  # shown on failure


def test_apply_refuses_a_past_one_shot_before_storing_anything(
    tmp_path, mongo_server, mongo_db_name, mongo_client
):
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    good = write_tasks(
        tmp_path, {"name": "a", "schedule": {"every": "1m"}, "command": "true"}, "a.json"
    )
    past = write_tasks(
        tmp_path,
        {"name": "b", "schedule": {"at": "2020-01-01T00:00:00Z"}, "command": "true"},
        "b.json",
    )
    result = invoke("apply", str(good), str(past), env=env)
    assert result.exit_code != 0 and "past" in result.output
    assert mongo_client[mongo_db_name].tasks.count_documents({}) == 0


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\xff\xfe{\x00}", "not UTF-8"),
        (
            b'{"name": "t", "schedule": {"cron": "* * * * *", "timezone": "America"}, "command": "x"}',
            "unknown timezone",
        ),
        (
            b'{"name": "t", "schedule": {"at": "9999-12-31T23:59:59-01:00"}, "command": "x"}',
            "out of range",
        ),
        (
            b'{"name": "t", "schedule": {"every": "1s"}, "command": "x", "misfire_grace": "1000000d"}',
            "at most",
        ),
    ],
)
def test_bad_files_give_messages_not_tracebacks(tmp_path, content, needle):
    path = tmp_path / "t.json"
    path.write_bytes(content)
    result = invoke("validate", str(path))
    assert result.exit_code != 0 and needle in result.output, result.output
    assert "Traceback" not in result.output


def test_next_with_bad_json_is_a_usage_error():
    result = invoke("next", "{bad")
    assert result.exit_code == 2 and "not valid JSON" in result.output


def test_web_secret_key_is_generated_once_and_private(tmp_path):
    import stat

    from cloudtask.cli.servers import _web_secret
    from cloudtask.config import Config

    cfg = Config().with_section("web", data_dir=str(tmp_path / "web"))
    first = _web_secret(cfg)
    assert len(first) == 64 and _web_secret(cfg) == first
    mode = (tmp_path / "web" / "secret-key").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert _web_secret(cfg.with_section("web", secret_key="given")) == "given"


def test_a_daemon_waits_for_its_servers_but_not_for_a_configuration_error(caplog):
    from pymongo.errors import ServerSelectionTimeoutError

    from cloudtask.cli.servers import _when_reachable
    from cloudtask.exceptions import StoreError
    from cloudtask.zkpaths import ClusterUnavailable

    tries = []

    def flaky():
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise ClusterUnavailable("ZooKeeper does not answer")
        if len(tries) == 2:
            try:
                raise ServerSelectionTimeoutError("no server")
            except ServerSelectionTimeoutError as e:
                raise StoreError("MongoDB failed to answer") from e
        return "opened"

    with caplog.at_level("WARNING"):
        assert _when_reachable("the cluster", flaky) == "opened"
    assert len(tries) == 3
    assert tries[1] - tries[0] >= 0.9 and tries[2] - tries[1] >= 1.9  # 1 s, then 2 s
    assert "not reachable yet; trying again in 1 s" in caplog.text

    def misconfigured():
        raise StoreError("no MongoDB URI configured: set mongodb.uri or CLOUDTASK_MONGO_URI")

    started = time.monotonic()
    with pytest.raises(StoreError, match="no MongoDB URI"):
        _when_reachable("MongoDB", misconfigured)
    assert time.monotonic() - started < 0.5

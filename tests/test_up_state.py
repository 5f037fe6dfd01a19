"""``cloudtask up``'s record of the running cluster (``<data dir>/running.json``,
cloudtask/localstate.py) and the commands of the same folder that find the cluster through it:
the record's life (written 0600, ignored once its process is gone, removed at the stop), how it
fills in a config that names no servers (and never overrides one that does), and, end to end,
``up`` in a folder whose printed commands work as pasted, a second ``up`` refused, and the
README's failover demo: an agent started by hand from the folder joins, is killed with
kill -9, and its tasks move to the agents of ``up``."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import psutil
import pytest
from click.testing import CliRunner

from cloudtask import localstate
from cloudtask.cli import cli
from cloudtask.cli.common import _load
from cloudtask.config import load_config
from cloudtask.localstate import (
    apply_to_config,
    make_record,
    read_record,
    record_path,
    remove_record,
    running_cluster,
    write_record,
)
from cloudtask.store import Store
from tests.helpers import wait_for

NOW = datetime.now(timezone.utc)


def _record(pid: int = 0, **over) -> dict:
    record = make_record(
        pid=pid or os.getpid(),
        web_url="http://127.0.0.1:18080/",
        zk_hosts="127.0.0.1:2181",
        zk_root="/local",
        mongo_uri="mongodb://127.0.0.1:27999",
        mongo_database="localdb",
        started=NOW,
        data_dir=Path("/x"),
        secrets_keys="file:/x/secrets.keys",
        children=[{"name": "agent-1", "pid": 12, "log": "/x/agent-1.log"}],
    )
    record.update(over)
    return record


@pytest.fixture
def clean_env(monkeypatch):
    """No CLOUDTASK_* variable of whoever runs the tests (nor a make's) leaks in."""
    for name in list(os.environ):
        if name.startswith("CLOUDTASK_") or name == "MAKELEVEL":
            monkeypatch.delenv(name)


# --- the record -----------------------------------------------------------------------------


def test_the_record_is_written_whole_private_and_read_back(tmp_path, clean_env, monkeypatch):
    data = tmp_path / ".cloudtask"
    path = write_record(data, _record())
    assert path == data / "running.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not [p for p in data.iterdir() if p.name != "running.json"]  # no temporary left
    record = read_record(data)
    assert record["pid"] == os.getpid()
    assert record["web_url"] == "http://127.0.0.1:18080/"
    assert record["zookeeper"] == {"hosts": "127.0.0.1:2181", "root": "/local"}
    assert record["mongodb"] == {"uri": "mongodb://127.0.0.1:27999", "database": "localdb"}
    assert record["started"] == NOW.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert record["children"][0]["name"] == "agent-1"
    # running_cluster(folder): <folder>/.cloudtask, or the current folder by default
    assert running_cluster(tmp_path) == record
    assert running_cluster(tmp_path / "elsewhere") is None
    monkeypatch.chdir(tmp_path)
    assert running_cluster() == record
    # CLOUDTASK_DATA_DIR names another data dir (relative to the folder)
    write_record(tmp_path / "other", _record(web_url="http://127.0.0.1:1/"))
    monkeypatch.setenv("CLOUDTASK_DATA_DIR", "other")
    assert running_cluster()["web_url"] == "http://127.0.0.1:1/"
    monkeypatch.setenv("CLOUDTASK_DATA_DIR", str(tmp_path / "other"))
    assert running_cluster(Path("/")) is not None  # an absolute one from anywhere


def test_a_record_whose_process_is_gone_is_ignored(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_record(tmp_path, _record(pid=gone.pid))
    assert read_record(tmp_path) is None
    # a live pid that started well after the record says its `up` did is another process
    write_record(tmp_path, _record(started=(NOW - timedelta(days=2)).isoformat()))
    mine = psutil.Process().create_time()
    if mine > (NOW - timedelta(days=2)).timestamp() + localstate.START_SLACK:
        assert read_record(tmp_path) is None
    write_record(tmp_path, _record())
    assert read_record(tmp_path) is not None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"pid": "12"}',
        json.dumps({**_record(), "pid": True}),
        json.dumps({**_record(), "mongodb": {"uri": 5, "database": "x"}}),
        json.dumps({k: v for k, v in _record().items() if k != "zookeeper"}),
        json.dumps({**_record(), "pid": -1}),
    ],
)
def test_a_damaged_record_is_no_cluster(tmp_path, text):
    record_path(tmp_path).write_text(text)
    assert read_record(tmp_path) is None


def test_only_its_own_record_is_removed(tmp_path):
    write_record(tmp_path, _record(pid=os.getpid()))
    assert not remove_record(tmp_path, os.getpid() + 1)  # another up wrote it since
    assert record_path(tmp_path).exists()
    assert remove_record(tmp_path, os.getpid())
    assert not record_path(tmp_path).exists()
    assert not remove_record(tmp_path, os.getpid())  # nothing to remove


# --- the config of the commands -------------------------------------------------------------


def test_it_fills_in_only_what_the_config_leaves_empty(tmp_path):
    record = _record()
    cfg = apply_to_config(load_config(None, environ={}), record)
    assert (cfg.zookeeper.hosts, cfg.zookeeper.root) == ("127.0.0.1:2181", "/local")
    assert (cfg.mongodb.uri, cfg.mongodb.database) == ("mongodb://127.0.0.1:27999", "localdb")
    assert cfg.secrets.keys == "file:/x/secrets.keys"
    # the environment wins, and names another cluster: nothing of the record is mixed in
    env = {"CLOUDTASK_MONGO_URI": "mongodb://db.example.org:27017"}
    cfg = apply_to_config(load_config(None, environ=env), record)
    assert cfg.mongodb.uri == "mongodb://db.example.org:27017"
    assert cfg.zookeeper.hosts == "" and cfg.secrets.keys == ""
    env = {"CLOUDTASK_ZK_HOSTS": "zk1:2181"}
    cfg = apply_to_config(load_config(None, environ=env), record)
    assert cfg.zookeeper.hosts == "zk1:2181" and cfg.mongodb.uri == ""
    # a config naming up's own ZooKeeper (up used it): the embedded MongoDB is filled in
    cfile = tmp_path / "c.json"
    cfile.write_text(json.dumps({"zookeeper": {"hosts": "127.0.0.1:2181", "root": "/local"}}))
    cfg = apply_to_config(load_config(cfile, environ={}), record)
    assert cfg.mongodb.uri == "mongodb://127.0.0.1:27999"
    # a key ring of its own stays
    env = {"CLOUDTASK_SECRETS_KEYS": "env:RING"}
    assert apply_to_config(load_config(None, environ=env), record).secrets.keys == "env:RING"
    # both named: the config as it is
    env = {"CLOUDTASK_ZK_HOSTS": "a:1", "CLOUDTASK_MONGO_URI": "mongodb://b"}
    cfg = apply_to_config(load_config(None, environ=env), record)
    assert (cfg.zookeeper.hosts, cfg.mongodb.uri) == ("a:1", "mongodb://b")
    assert apply_to_config(load_config(None, environ={}), None).mongodb.uri == ""


def test_the_commands_load_the_running_cluster_but_up_does_not(tmp_path, clean_env, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _load(None).mongodb.uri == ""
    write_record(tmp_path / ".cloudtask", _record())
    assert _load(None).mongodb.uri == "mongodb://127.0.0.1:27999"
    assert _load(None, local=False).mongodb.uri == ""  # `up` starts its own servers
    monkeypatch.setenv("CLOUDTASK_MONGO_URI", "mongodb://elsewhere")
    assert _load(None).mongodb.uri == "mongodb://elsewhere"
    assert _load(None).zookeeper.hosts == ""


def test_without_a_cluster_a_command_says_where_addresses_come_from(
    tmp_path, clean_env, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["user", "list"])
    assert result.exit_code == 1
    assert "no MongoDB URI configured" in result.output
    assert "cloudtask up" in result.output and "running.json" in result.output
    assert "Traceback" not in result.output


def test_user_and_token_commands_reach_the_recorded_cluster(
    tmp_path, clean_env, monkeypatch, mongo_server, mongo_db_name, mongo_client
):
    """The record names a real MongoDB (nx-27017): `user add`, `token create` and `apply`,
    run from the folder with no config at all, store into it."""
    monkeypatch.chdir(tmp_path)
    write_record(
        tmp_path / ".cloudtask",
        _record(zookeeper={"hosts": "", "root": "/cloudtask"}, secrets={"keys": ""})
        | {"mongodb": {"uri": mongo_server.uri, "database": mongo_db_name}},
    )
    runner = CliRunner()
    added = runner.invoke(cli, ["user", "add", "first", "--role", "admin"], input="Pa55-word-ok\n")
    assert added.exit_code == 0, added.output
    token = runner.invoke(cli, ["token", "create", "first"])
    assert token.exit_code == 0, token.output
    (tmp_path / "t.json").write_text(
        json.dumps({"name": "from-folder", "schedule": {"every": "1h"}, "command": "true"})
    )
    applied = runner.invoke(cli, ["apply", "--yes", str(tmp_path / "t.json")])
    assert applied.exit_code == 0, applied.output
    store = Store(mongo_client, mongo_db_name)
    assert [u["_id"] for u in store.list_user_docs()] == ["first"]
    assert [t["name"] for t in store.list_tasks()] == ["from-folder"]


def test_cli_command_is_the_real_executable(tmp_path, monkeypatch):
    from cloudtask import up

    venv_bin = Path(sys.executable).parent
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(venv_bin / "cloudtask"), "up"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # not on PATH: its path, as a shell word
    if (venv_bin / "cloudtask").is_file():
        assert shlex.split(up.cli_command()) == [str(venv_bin / "cloudtask")]
        monkeypatch.chdir(venv_bin.parent.parent)  # from the checkout: .venv/bin/cloudtask
        shown = up.cli_command()
        assert (
            not shown.startswith("/")
            and (Path.cwd() / shown).resolve() == (venv_bin / "cloudtask").resolve()
        )
        monkeypatch.setenv("PATH", str(venv_bin))  # on PATH: the plain name
        assert up.cli_command() == "cloudtask"
    monkeypatch.setattr(sys, "executable", str(tmp_path / "py"))
    monkeypatch.setattr(sys, "argv", ["x/__main__.py"])
    assert up.cli_command() == f"{tmp_path / 'py'} -m cloudtask"


# --- end to end -----------------------------------------------------------------------------


def _api(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def _failed_login(site: str, forwarded_for: str) -> int:
    """A wrong password at the login form (its CSRF token and cookie first), as a proxy
    passing ``X-Forwarded-For`` would send it; the answer's status."""
    import http.cookiejar
    import urllib.error
    import urllib.parse

    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    with opener.open(f"{site}/login", timeout=10) as page:
        html = page.read().decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    body = urllib.parse.urlencode(
        {"csrf_token": token, "username": "nobody", "password": "not-the-password"}
    ).encode()
    request = urllib.request.Request(
        f"{site}/login", data=body, headers={"X-Forwarded-For": forwarded_for}
    )
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def _pasted(line: str, cwd: Path, env: dict, stdin: str = "") -> subprocess.CompletedProcess:
    """A printed command line run as a shell would (``NAME=value`` words first)."""
    words = shlex.split(line)
    extra = {}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        extra[name] = value
    return subprocess.run(
        words,
        cwd=cwd,
        env={**env, **extra},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.external
@pytest.mark.timeout(240)
def test_up_tells_the_folder_its_cluster_and_an_agent_killed_there_hands_its_tasks_on(tmp_path):
    from cloudtask.localservers import free_port

    (tmp_path / "conf" / "tasks").mkdir(parents=True)
    # conf/cloudtask.json of the folder: read by `up` and by the commands alike
    (tmp_path / "conf" / "cloudtask.json").write_text(
        json.dumps(
            {"zookeeper": {"session_timeout": "4s"}, "web": {"trusted_proxies": ["127.0.0.1"]}}
        )
    )
    for n in range(8):
        (tmp_path / "conf" / "tasks" / f"t{n}.json").write_text(
            json.dumps({"name": f"t{n}", "schedule": {"every": "1h"}, "command": "true"})
        )
    # a task that runs after t7, in a file that sorts before t7's: applied after it all the same
    (tmp_path / "conf" / "tasks" / "a-report.json").write_text(
        json.dumps(
            {
                "name": "report",
                "group": "reports",  # no agent: the counts of placed tasks below stay 8
                "schedule": {"after": ["t7"]},
                "command": "true",
            }
        )
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CLOUDTASK_") and k != "MAKELEVEL"
    }
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    port = free_port()
    argv = [sys.executable, "-m", "cloudtask", "up", "--port", str(port)]
    proc = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,  # not a terminal: no question, no wait
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    extra = None
    lines: list[str] = []
    try:
        while not any("Press Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "cloudtask up exited early:\n" + "".join(lines)
            lines.append(line)
        text = "".join(lines)
        assert "task report: created" in text and "skipped" not in text, text
        record_file = tmp_path / ".cloudtask" / "running.json"
        assert record_file.stat().st_mode & 0o777 == 0o600
        record = json.loads(record_file.read_text())
        assert record["pid"] == proc.pid
        assert record["web_url"] == f"http://127.0.0.1:{port}/"
        assert record["mongodb"]["uri"] in text and record["zookeeper"]["hosts"] in text
        assert "These addresses are in .cloudtask/running.json" in text
        assert "from this folder use it" in text
        pids = {c["name"]: c["pid"] for c in record["children"]}
        assert set(pids) == {"center", "web", "agent-1", "agent-2"}
        assert all(psutil.pid_exists(p) for p in pids.values())
        assert f"agent-1 {pids['agent-1']}" in text  # the pids are printed too

        # the printed commands work as pasted, from the folder
        listing = re.search(r"^  (\S.* user list)$", text, re.M).group(1)
        add_admin = re.search(r"^  (\S.* user add admin --role admin)$", text, re.M).group(1)
        assert not listing.startswith("cloudtask ") or "cloudtask" in os.environ.get("PATH", "")
        added = _pasted(add_admin, tmp_path, env, stdin="Adm1n-pass-word\n")
        assert added.returncode == 0, added.stderr
        listed = _pasted(listing, tmp_path, env)
        assert listed.returncode == 0 and listed.stdout.startswith("admin\tadmin"), listed
        cli_words = shlex.split(add_admin)[:-5]  # less "user add admin --role admin"
        token = subprocess.run(
            [*cli_words, "token", "create", "admin"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert token.returncode == 0, token.stderr
        token = token.stdout.strip()

        # behind a proxy on 127.0.0.1 (web.trusted_proxies) the site sees the client that the
        # proxy names in X-Forwarded-For (waitress passes the header on): a failed login is
        # audited with it
        site = f"http://127.0.0.1:{port}"
        assert _failed_login(site, "198.51.100.7") == 401
        store = Store(record["mongodb"]["uri"], record["mongodb"]["database"])
        try:
            failed = store.audit.find_one({"action": "auth.login_failed"})
            assert failed["after"]["address"] == "198.51.100.7"
        finally:
            store.close()

        # a second `up` with the same data dir is refused, and changes nothing
        again = subprocess.run(
            [*argv[:-1], str(free_port())],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 1
        assert f"cloudtask up is running already with the data dir {tmp_path}" in again.stderr
        assert json.loads(record_file.read_text()) == record

        # the README's demo: one more agent from this folder joins the cluster ...
        agents_url = f"http://127.0.0.1:{port}/api/v1/agents"

        def tasks_by_pid() -> dict[int, int]:
            items = _api(agents_url, token)["items"]
            return {a["pid"]: a["tasks"] for a in items if a["status"] == "online"}

        wait_for(lambda: len(tasks_by_pid()) == 2, timeout=60, message="agents not online")
        extra = subprocess.Popen(
            [*cli_words, "agent", "--data-dir", ".cloudtask/agent-extra"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        held = wait_for(
            lambda: tasks_by_pid().get(extra.pid), timeout=60, message="the extra agent got none"
        )
        assert held >= 1
        # ... is killed with kill -9 (nobody starts it again) ...
        extra.send_signal(signal.SIGKILL)
        extra.wait(timeout=10)
        # ... and after its session timeout its tasks are on up's two agents
        survivors = {pids["agent-1"], pids["agent-2"]}
        moved = wait_for(
            lambda: (t := tasks_by_pid()) and set(t) == survivors and sum(t.values()) == 8 and t,
            timeout=60,
            message="the killed agent's tasks did not move",
        )
        assert sum(moved.values()) == 8
    finally:
        if extra is not None and extra.poll() is None:
            extra.kill()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=90)[0]
    assert proc.returncode == 0, rest
    assert "removed .cloudtask/running.json" in rest
    assert not (tmp_path / ".cloudtask" / "running.json").exists()
    gone = _pasted(listing, tmp_path, env)  # the cluster is gone, and the command says so
    assert gone.returncode == 1 and "no MongoDB URI configured" in gone.stderr


def test_the_first_admin_asked_for_at_a_terminal(mongo_client, mongo_db_name):
    """What `cloudtask up` asks on a terminal when there is no admin: the name and the
    password (twice); the user is added through the operations (audited like `user add`). An
    empty name skips, a refused password is asked for again, Ctrl-D gives up."""
    from cloudtask.up import _offer_first_admin
    from cloudtask.users import Users

    store = Store(mongo_client, mongo_db_name)
    signals = {"count": 0, "prompting": False}
    said = Said()
    runner = CliRunner()
    with runner.isolation(input="\n"):
        assert _offer_first_admin(store, "cli:me", signals, click.echo) == 0
    assert Users(store).count_admins() == 0
    with runner.isolation(input="ops\nshort\nshort\nops\nA-long-passw0rd\nA-long-passw0rd\n"):
        assert _offer_first_admin(store, "cli:me", signals, said.append_echo) == 1
    assert any(t.startswith("not added") and "password" in t for t in said)
    assert "added ops (admin)" in said
    assert Users(store).count_admins() == 1 and not signals["prompting"]
    (entry,) = store.audit.find({"action": "user.create"})
    assert entry["actor"] == "cli:me" and entry["target"] == "user:ops"
    with runner.isolation(input="someone\n"):  # the input ends before the password
        assert _offer_first_admin(store, "cli:me", signals, click.echo) == 0


class Said(list):
    """What was echoed, a line each (stdout and stderr alike)."""

    def append_echo(self, text="", err=False, **_):
        self.append(str(text))


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="file owners and modes: POSIX")
def test_a_record_others_may_write_is_not_believed(tmp_path):
    path = write_record(tmp_path, _record())
    assert read_record(tmp_path) is not None
    path.chmod(0o620)  # group-writable: anyone of the group could point it elsewhere
    assert read_record(tmp_path) is None
    path.chmod(0o644)  # readable is no harm (up writes 0600; an older copy may be 0644)
    assert read_record(tmp_path) is not None
    if os.geteuid() == 0:  # a file of another user's
        os.chown(path, 65534, -1)
        assert read_record(tmp_path) is None


def test_up_gives_each_agent_its_own_metrics_port():
    from cloudtask.config import Config
    from cloudtask.up import agent_metrics_port

    cfg = Config().with_section("agent", metrics_port=9101)
    assert [agent_metrics_port(cfg, n) for n in (1, 2, 3)] == [9101, 9102, 9103]
    assert agent_metrics_port(Config(), 2) == 0  # off stays off

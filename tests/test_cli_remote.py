"""The API commands of the CLI (``tasks``, ``runs``, ``agents``, ``events``, ``plans``,
``login``) against the real web site: the app on the test's MongoDB database, served by
Werkzeug's threaded server on a loopback port, driven through click's CliRunner and through the installed
``cloudtask`` program. Runs are run by a real standalone agent on the same database.

What is checked: tables and ``--json`` (the API's answer as it came), the exit codes (0 ok,
1 refused, 2 bad input, 3 not found, 4 not logged in or not allowed, 5 unreachable), names
and ids, ``runs output --follow`` following a run to its end, where the address and the
token come from (flags, environment, the config file, and never a token for another site),
and the config file's permissions.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import requests
from click.testing import CliRunner
from helpers import ADMIN, OPERATOR, VIEWER, make_task, make_web_app
from test_agent import Running

from cloudtask.cli import cli
from cloudtask.cli.api_commands import new_output
from cloudtask.cli.api_output import table
from cloudtask.cli.remote import config_path, normalize_url, read_config
from cloudtask.localservers import free_port
from cloudtask.users import Users

pytestmark = pytest.mark.timeout(180)
PROGRAM = Path(sys.executable).parent / "cloudtask"


class Site(NamedTuple):
    url: str
    operator: str  # op1's API token
    viewer: str  # viewer1's API token


@pytest.fixture
def site(store) -> Iterator[Site]:
    """The web site on a free loopback port (waitress in a thread), with an operator and a
    viewer, each with an API token."""
    from werkzeug.serving import make_server

    app = make_web_app(store)
    users = Users(store)
    op_token = users.create_token(OPERATOR.name, "cli test")
    viewer_token = users.create_token(VIEWER.name, "cli test")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Site(f"http://127.0.0.1:{server.server_port}", op_token, viewer_token)
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path) -> Path:
    """No address or token from the machine: a config folder of the test's own, no
    CLOUDTASK_* variables, and a working folder where no cluster runs."""
    names = ("URL", "TOKEN", "CA_BUNDLE", "CONFIG", "DATA_DIR")
    for name in (f"CLOUDTASK_{n}" for n in names):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "config-home"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path) -> Iterator[Running]:
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


def ct(*args: str, url: str | None = None, token: str | None = None, input: str | None = None):
    """Run ``cloudtask ARGS`` in this process; ``url`` and ``token`` go in the environment."""
    env = {}
    if url:
        env["CLOUDTASK_URL"] = url
    if token:
        env["CLOUDTASK_TOKEN"] = token
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def api(site: Site, path: str, token: str | None = None) -> Any:
    answer = requests.get(
        f"{site.url}/api/v1{path}",
        headers={"Authorization": f"Bearer {token or site.operator}"},
        timeout=10,
    )
    return answer


# --- tasks --------------------------------------------------------------------------------------


def test_tasks_list_table_json_and_show(site, store):
    make_task(store, "backup-db", schedule={"cron": "0 3 * * *", "timezone": "Europe/Berlin"})
    make_task(store, "report", group="reports", schedule={"every": "5m"})
    result = ct("tasks", "list", url=site.url, token=site.viewer)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "GROUP", "STATE", "SCHEDULE", "LAST", "RUN", "AGENT"]
    assert lines[1].startswith("backup-db ")
    assert "cron 0 3 * * * Europe/Berlin" in lines[1]
    assert "every 5m" in lines[2] and "reports" in lines[2]
    # the columns are aligned: every row has its group where the header has GROUP
    column = lines[0].index("GROUP")
    assert lines[1][column:].startswith("default") and lines[2][column:].startswith("reports")

    result = ct("tasks", "list", "--json", "--group", "reports", url=site.url, token=site.viewer)
    assert result.exit_code == 0
    assert result.stdout == api(site, "/tasks?group=reports&per_page=50&page=1").text
    assert [t["name"] for t in json.loads(result.stdout)["items"]] == ["report"]

    task = store.get_task_by_name("backup-db")
    for ref in ("backup-db", task["_id"]):
        result = ct("tasks", "show", ref, url=site.url, token=site.viewer)
        assert result.exit_code == 0, result.output
        assert f"id:          {task['_id']}" in result.stdout
        assert "next fires:" in result.stdout
        assert '"cron": "0 3 * * *"' in result.stdout
    shown = ct("tasks", "show", "backup-db", "--json", url=site.url, token=site.viewer)
    assert json.loads(shown.stdout)["id"] == task["_id"]


def test_limit_and_pages(site, store):
    for i in range(5):
        make_task(store, f"t{i}")
    result = ct("tasks", "list", "--limit", "2", "--page", "2", url=site.url, token=site.viewer)
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["t2", "t3"]
    assert "tasks 3-4 of 5; see more with --page 3" in result.stderr


def test_pause_resume_run_delete(site, store):
    make_task(store, "nightly")
    result = ct("tasks", "pause", "nightly", url=site.url, token=site.operator)
    assert (result.exit_code, result.stdout) == (0, "nightly is paused\n")
    assert not store.get_task_by_name("nightly")["enabled"]
    result = ct("tasks", "resume", "nightly", "--json", url=site.url, token=site.operator)
    assert json.loads(result.stdout)["state"] == "enabled"

    result = ct(
        "tasks", "run", "nightly", "--env", "DAY=2026-12-04", url=site.url, token=site.operator
    )
    assert result.exit_code == 0, result.output
    run_id = result.stdout.split()[1]
    run = store.get_run(run_id)
    assert run["status"] == "queued" and run["trigger"] == "manual"

    # deleting asks first; not on a terminal it needs --yes, and nothing is deleted
    result = ct("tasks", "delete", "nightly", url=site.url, token=site.operator)
    assert result.exit_code == 2 and "needs --yes" in result.stderr
    assert store.get_task_by_name("nightly")
    result = ct("tasks", "delete", "nightly", "--yes", url=site.url, token=site.operator)
    assert (result.exit_code, result.stdout) == (0, "deleted nightly\n")
    result = ct("tasks", "show", "nightly", url=site.url, token=site.operator)
    assert result.exit_code == 3


def test_clone(site, store):
    make_task(store, "source", schedule={"every": "1h"})
    result = ct("tasks", "clone", "source", "copy", url=site.url, token=site.operator)
    assert result.exit_code == 0, result.output
    copy = store.get_task_by_name("copy")
    assert copy["spec"]["schedule"]["every"] == "1h" and not copy["enabled"]
    assert "cloned source as copy (paused" in result.stdout
    again = ct("tasks", "clone", "source", "copy", url=site.url, token=site.operator)
    assert again.exit_code == 1 and "copy" in again.stderr  # the name is taken: 409


# --- exit codes ---------------------------------------------------------------------------------


def test_exit_codes_scripts_can_trust(site, store):
    make_task(store, "known")
    # 404: not found, with the API's message
    result = ct("tasks", "show", "nope", url=site.url, token=site.viewer)
    assert result.exit_code == 3
    assert result.stderr == "Error: no task named 'nope' (nor with that id)\n"
    assert ct("runs", "show", "0" * 24, url=site.url, token=site.viewer).exit_code == 3
    # 401: a wrong token; no token at all
    result = ct("tasks", "list", url=site.url, token="not-a-token")
    assert result.exit_code == 4 and "cloudtask login" in result.stderr
    result = ct("tasks", "list", url=site.url)
    assert result.exit_code == 4
    assert f"not logged in to {site.url}" in result.stderr
    # a token mangled by a paste: bad input, and the token is not printed back
    result = ct("tasks", "list", "--token", "ct_abc\x1bdef", url=site.url)
    assert result.exit_code == 2 and "from --token is not a token" in result.stderr
    assert "abc" not in result.output
    # 403: a viewer may not pause
    result = ct("tasks", "pause", "known", url=site.url, token=site.viewer)
    assert result.exit_code == 4 and "operator role" in result.stderr
    assert store.get_task_by_name("known")["enabled"]
    # 2: a usage error; a bad time; the server's 422 with its details
    assert ct("tasks", "list", "--limit", "0", url=site.url, token=site.viewer).exit_code == 2
    result = ct("runs", "list", "--since", "yesterday-ish", url=site.url, token=site.viewer)
    assert result.exit_code == 2 and "--since" in result.stderr
    result = ct("tasks", "run", "known", "--env", "1BAD=x", url=site.url, token=site.operator)
    assert result.exit_code == 2
    assert "Error: the run's parameters are invalid" in result.stderr
    assert "  env.1BAD: " in result.stderr
    result = ct("events", "list", "--kind", "no.such", url=site.url, token=site.viewer)
    assert result.exit_code == 2 and "kind: expected one of" in result.stderr
    # 1: the server refused (409: killing a run that is not running)
    run = store.request_manual_run(store.get_task_by_name("known"), requested_by="t")
    store.runs.update_one({"_id": run["_id"]}, {"$set": {"status": "succeeded"}})
    result = ct("runs", "kill", run["_id"], url=site.url, token=site.operator)
    assert result.exit_code == 1 and "Error:" in result.stderr
    # 5: nothing listens there
    dead = f"http://127.0.0.1:{free_port()}"
    result = ct("tasks", "list", url=dead, token=site.viewer)
    assert result.exit_code == 5
    assert f"cannot reach the CloudTask web site at {dead} (from CLOUDTASK_URL)" in result.stderr
    # no address anywhere: 2, saying where one comes from
    result = ct("tasks", "list", token=site.viewer)
    assert result.exit_code == 2 and "--url" in result.stderr and "CLOUDTASK_URL" in result.stderr
    # nothing printed a traceback
    assert "Traceback" not in result.output


def test_not_the_api(site):
    """An address that is not CloudTask's API says so (here: the site's own login page
    under a wrong prefix is HTML, and a missing route is named)."""
    result = ct("tasks", "list", url=site.url + "/login", token=site.viewer)
    assert result.exit_code == 1
    assert "not CloudTask's API" in result.stderr or "no API route" in result.stderr


# --- runs, the agent, --follow -----------------------------------------------------------------


SLOW_SCRIPT = "for i in 1 2 3 4 5; do echo line-$i; sleep 0.4; done"


def test_follow_a_run_to_its_end(site, store, agents):
    make_task(store, "slow", schedule={"cron": "0 0 1 1 *"}, command=SLOW_SCRIPT, shell=True)
    make_task(
        store, "broken", schedule={"cron": "0 0 1 1 *"}, command="echo oops; exit 3", shell=True
    )
    agents.start("cli-agent")

    started = time.monotonic()
    result = ct("tasks", "run", "slow", "--follow", url=site.url, token=site.operator)
    assert result.exit_code == 0, result.output
    assert result.stdout == "".join(f"line-{i}\n" for i in range(1, 6))
    assert "succeeded (exit code 0)" in result.stderr
    assert time.monotonic() - started < 60

    queued = ct("tasks", "run", "broken", url=site.url, token=site.operator)
    run_id = queued.stdout.split()[1]
    result = ct("runs", "output", run_id, "--follow", url=site.url, token=site.operator)
    assert result.exit_code == 1
    assert result.stdout == "oops\n"
    assert f"run {run_id} failed (exit code 3)" in result.stderr
    # the finished run: its output, show's exit code, the list by task name and by id
    assert ct("runs", "output", run_id, url=site.url, token=site.viewer).stdout == "oops\n"
    shown = ct("runs", "show", run_id, url=site.url, token=site.viewer)
    assert shown.exit_code == 1 and "exit code:" in shown.stdout and "failed" in shown.stdout
    task_id = store.get_task_by_name("broken")["_id"]
    for ref in ("broken", task_id):
        listed = ct("runs", "list", "--task", ref, "--json", url=site.url, token=site.viewer)
        assert listed.exit_code == 0
        assert [r["id"] for r in json.loads(listed.stdout)["items"]] == [run_id]
    table_out = ct("runs", "list", "--status", "succeeded", url=site.url, token=site.viewer)
    rows = table_out.stdout.splitlines()
    assert rows[0].split()[:3] == ["RUN", "TASK", "STATUS"] and len(rows) == 2
    assert "slow" in rows[1] and "cli-agent" in rows[1]
    # a run that does not exist; a task that does not exist
    result = ct("runs", "output", "f" * 24, "--follow", url=site.url, token=site.viewer)
    assert result.exit_code == 3
    result = ct("runs", "list", "--task", "no-such-task", url=site.url, token=site.viewer)
    assert result.exit_code == 3 and "no-such-task" in result.stderr


def test_follow_says_when_no_agent_takes_the_run(site, store, monkeypatch):
    """Following a run no agent takes says so (once), and ends when the run is cancelled."""
    from cloudtask.cli import api_commands

    monkeypatch.setattr(api_commands, "QUEUED_NOTE", 0.3)
    make_task(store, "orphan", group="nobody-runs-this")
    run_id = ct("tasks", "run", "orphan", url=site.url, token=site.operator).stdout.split()[1]
    outcome: list[Any] = []
    follower = threading.Thread(
        target=lambda: outcome.append(
            ct("runs", "output", run_id, "-f", "--interval", "0.2", url=site.url, token=site.viewer)
        )
    )
    follower.start()
    time.sleep(1.0)
    cancel = requests.post(
        f"{site.url}/api/v1/runs/{run_id}/kill",
        headers={"Authorization": f"Bearer {site.operator}"},
        timeout=10,
    )
    assert cancel.status_code == 202, cancel.text
    follower.join(timeout=30)
    assert outcome, "the follow did not end when the run was cancelled"
    result = outcome[0]
    assert result.exit_code == 1
    assert result.stderr.count(f"run {run_id} is still queued: no agent has taken it") == 1
    assert f"run {run_id} killed" in result.stderr


def test_new_output_of_a_moving_tail():
    assert new_output("", "a\nb\n") == ("a\nb\n", False)
    assert new_output("a\nb\n", "a\nb\nc\n") == ("c\n", False)
    # the tail dropped its start: the new part is what follows the old end
    seen = "".join(f"line {i}\n" for i in range(100))
    now = seen[300:] + "line 100\n"
    assert new_output(seen, now) == ("line 100\n", False)
    # the tail moved on by more than it holds: everything is new, and something was lost
    assert new_output("x" * 10 + "END\n", "fresh\n") == ("fresh\n", True)


# --- agents, events, plans ----------------------------------------------------------------------


def test_agents_and_events(site, store):
    info = {"group": "default", "host": "box-1", "pid": 42, "version": "0.1.0"}
    store.record_agents({"a-one": info})
    store.record_agents({})  # it went away: offline, and an agent.left event
    result = ct("agents", "list", url=site.url, token=site.viewer)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split()[:4] == ["a-one", "default", "offline", "box-1"]
    shown = ct("agents", "show", "a-one", "--json", url=site.url, token=site.viewer)
    assert json.loads(shown.stdout)["host"] == "box-1"
    assert ct("agents", "show", "nobody", url=site.url, token=site.viewer).exit_code == 3

    events = ct("events", "list", "--kind", "agent.", "--json", url=site.url, token=site.viewer)
    kinds = [e["kind"] for e in json.loads(events.stdout)["items"]]
    assert "agent.joined" in kinds and "agent.left" in kinds
    events = ct("events", "list", "--since", "1h", url=site.url, token=site.viewer)
    assert events.exit_code == 0 and "agent.joined" in events.stdout
    assert events.stdout.splitlines()[0].split() == [
        "AT", "SEVERITY", "KIND", "TASK", "AGENT", "MESSAGE",
    ]  # fmt: skip
    events = ct("events", "list", "--until", "1h", url=site.url, token=site.viewer)
    assert events.exit_code == 0 and events.stdout == "" and "no events" in events.stderr


def test_events_by_task_name(site, store):
    make_task(store, "watched")
    ct("tasks", "pause", "watched", url=site.url, token=site.operator)
    task_id = store.get_task_by_name("watched")["_id"]
    stored = list(store.events.find({"task_id": task_id}))
    for ref in ("watched", task_id):
        result = ct("events", "list", "--task", ref, "--json", url=site.url, token=site.viewer)
        assert result.exit_code == 0
        assert len(json.loads(result.stdout)["items"]) == len(stored)


def test_plans(site, store, tmp_path):
    plan = {
        "name": "nightly batch",
        "items": [{"name": "one", "type": "default", "command": "echo 1"}],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    result = ct("plans", "submit", str(path), "--json", url=site.url, token=site.operator)
    assert result.exit_code == 0, result.output
    plan_id = json.loads(result.stdout)["plan_id"]
    listed = ct("plans", "list", url=site.url, token=site.viewer)
    assert plan_id in listed.stdout and "nightly batch" in listed.stdout
    shown = ct("plans", "show", plan_id, url=site.url, token=site.viewer)
    assert shown.exit_code == 0 and "1 queued" in shown.stdout and "one" in shown.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"items": [{"name": "x"}]}')
    result = ct("plans", "submit", str(bad), url=site.url, token=site.operator)
    assert result.exit_code == 2 and "items[0]" in result.stderr
    bad.write_text("{not json")
    result = ct("plans", "submit", str(bad), url=site.url, token=site.operator)
    assert result.exit_code == 2 and "not valid JSON: line 1" in result.stderr
    assert ct("plans", "show", "nope", url=site.url, token=site.viewer).exit_code == 3


# --- where the address and the token come from --------------------------------------------------


def test_login_with_token_saves_a_private_config(site, clean_env):
    result = ct("login", "--url", site.url, "--with-token", input=site.operator + "\n")
    assert result.exit_code == 0, result.output
    assert f"logged in to {site.url} as op1 (operator)" in result.stdout
    path = clean_env / "cloudtask" / "cli.json"
    assert config_path() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    saved = json.loads(path.read_text())
    assert saved["url"] == site.url and saved["servers"][site.url]["token"] == site.operator
    # no flag and no variable: the saved address and token
    assert ct("tasks", "list").exit_code == 0
    assert ct("whoami").stdout.startswith(f"op1 (operator) on {site.url}")
    # a token saved for one site is never sent to another
    other = f"http://127.0.0.1:{free_port()}"
    result = ct("tasks", "list", "--url", other)
    assert result.exit_code == 4 and f"not logged in to {other}" in result.stderr
    # the environment wins over the file
    assert ct("whoami", token=site.viewer).stdout.startswith("viewer1 (viewer)")
    # a file others may read is not read
    path.chmod(0o644)
    result = ct("tasks", "list")
    assert result.exit_code == 2 and "chmod 600" in result.stderr
    path.chmod(0o600)
    # logout forgets it, and leaves a token it did not make valid (it may serve elsewhere)
    result = ct("logout")
    assert result.exit_code == 0 and "the token stays valid" in result.stdout
    assert read_config() == {"servers": {}}
    assert ct("tasks", "list", url=site.url).exit_code == 4
    assert ct("whoami", url=site.url, token=site.operator).exit_code == 0
    assert ct("logout").exit_code == 2


def test_login_with_a_wrong_token_saves_nothing(site, clean_env):
    result = ct("login", "--url", site.url, "--with-token", input="wrong\n")
    assert result.exit_code == 4
    assert not (clean_env / "cloudtask" / "cli.json").exists()


def test_login_with_password(site, store, mongo_db, clean_env):
    """A password logs in through the site's form; the site makes a token of the user's own
    (whatever the role), which is saved; the login session is ended; logout revokes it."""
    import requests

    Users(store).add(ADMIN.name, ADMIN.password, role="admin")
    result = ct(
        "login", "--url", site.url, "--user", ADMIN.name, "--name", "laptop",
        input=ADMIN.password + "\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert ct("whoami").stdout.startswith(f"{ADMIN.name} (admin) on {site.url}")
    tokens = Users(store).list_tokens(ADMIN.name)
    assert [t["name"] for t in tokens] == ["laptop"]
    assert mongo_db["sessions"].count_documents({}) == 0  # the login's session ended
    wrong = ct("login", "--url", site.url, "--user", ADMIN.name, input="wrong\n")
    assert wrong.exit_code == 4 and "refused the login" in wrong.stderr
    # the saved login is still the admin's
    assert ct("whoami").stdout.startswith(f"{ADMIN.name} (admin)")
    token = json.loads(config_path().read_text())["servers"][site.url]["token"]
    # a token makes no tokens (only a password login does)
    answer = requests.post(
        site.url + "/api/v1/me/tokens",
        json={"name": "longer-lived"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert answer.status_code == 403 and "cannot make API tokens" in answer.json()["error"]
    # logout revokes the token login made, then forgets it
    result = ct("logout")
    assert result.exit_code == 0 and "the token is revoked" in result.stdout, result.output
    assert Users(store).list_tokens(ADMIN.name) == []
    assert ct("whoami", url=site.url, token=token).exit_code == 4
    assert site.url not in json.loads(config_path().read_text())["servers"]
    # an operator (not an admin) makes a token of their own too, with their role
    before = {t["id"] for t in Users(store).list_tokens(OPERATOR.name)}
    result = ct("login", "--url", site.url, "--user", OPERATOR.name, input=OPERATOR.password + "\n")
    assert result.exit_code == 0, result.output
    assert ct("whoami").stdout.startswith(f"{OPERATOR.name} (operator)")
    made = [t for t in Users(store).list_tokens(OPERATOR.name) if t["id"] not in before]
    assert len(made) == 1 and made[0]["name"].startswith("cli")
    assert ct("logout").exit_code == 0
    assert {t["id"] for t in Users(store).list_tokens(OPERATOR.name)} == before


def test_a_broken_config_file_says_what_is_wrong(site, clean_env):
    path = clean_env / "cloudtask" / "cli.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"url": ')
    path.chmod(0o600)
    result = ct("tasks", "list")
    assert result.exit_code == 2
    assert f"{path} is not valid JSON at line 1" in result.stderr


def test_the_running_cluster_gives_the_address(site, clean_env, tmp_path):
    """In the folder where `cloudtask up` runs, the web address it recorded is used (while
    the process that recorded it lives); a saved default address wins over it."""
    from datetime import datetime, timezone

    from cloudtask.localstate import make_record, write_record

    data_dir = Path.cwd() / ".cloudtask"
    record = make_record(
        pid=os.getpid(),
        web_url=site.url + "/",
        zk_hosts="127.0.0.1:1",
        zk_root="/cloudtask",
        mongo_uri="mongodb://127.0.0.1:1/",
        mongo_database="cloudtask",
        started=datetime.now(timezone.utc),
        data_dir=data_dir,
    )
    write_record(data_dir, record)
    result = ct("whoami", token=site.viewer)
    assert result.exit_code == 0, result.output
    assert f"on {site.url} (address from the running cluster" in result.stdout
    # a record of a process that is gone is not used
    write_record(data_dir, {**record, "pid": 2**22 + 12345})
    result = ct("whoami", token=site.viewer)
    assert result.exit_code == 2 and "no CloudTask web address" in result.stderr


def test_urls_and_tables():
    assert normalize_url("https://ct.example.com/") == "https://ct.example.com"
    assert normalize_url("http://h:8080/api/v1/") == "http://h:8080"
    assert normalize_url("https://h/prefix/") == "https://h/prefix"
    for bad in ("ct.example.com", "ftp://h", "https://user:pw@h", "http://h/?x=1"):
        with pytest.raises(Exception) as e:
            normalize_url(bad)
        assert getattr(e.value, "exit_code", None) == 2
    text = table(("A", "LONG"), [("x", "y" * 100)], width=30)
    lines = text.splitlines()
    assert all(len(line) <= 30 for line in lines) and lines[1].endswith("…")


# --- the installed program ----------------------------------------------------------------------


def test_the_installed_program(site, store, tmp_path):
    make_task(store, "from-a-script")
    env = {
        **os.environ,
        "CLOUDTASK_URL": site.url,
        "CLOUDTASK_TOKEN": site.viewer,
        "XDG_CONFIG_HOME": str(tmp_path / "none"),
    }
    done = subprocess.run(
        [str(PROGRAM), "tasks", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert [t["name"] for t in json.loads(done.stdout)["items"]] == ["from-a-script"]
    done = subprocess.run(
        [str(PROGRAM), "tasks", "show", "missing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 3
    assert done.stderr == "Error: no task named 'missing' (nor with that id)\n"


# --- on a cluster: live agents, kill, --follow of a killed run ---------------------------------


@pytest.fixture
def cluster_site(store, zk, zk_hosts, mongo_server, mongo_db_name, tmp_path) -> Iterator[Site]:
    """A center and an agent (real processes on ZooKeeper and the test's database), and the
    web site on the same cluster."""
    from test_cluster import Cluster
    from werkzeug.serving import make_server

    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    app = make_web_app(store, zk)
    users = Users(store)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cluster.center("c1")
    cluster.agent("a1")
    try:
        yield Site(
            f"http://127.0.0.1:{server.server_port}",
            users.create_token(OPERATOR.name, "cli test"),
            users.create_token(VIEWER.name, "cli test"),
        )
    finally:
        cluster.stop_all()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


TICKING = "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done"


def test_follow_and_kill_on_a_cluster(cluster_site, store, tmp_path):
    site = cluster_site
    make_task(store, "ticking", schedule={"cron": "0 0 1 1 *"}, command=TICKING, shell=True)

    def agent_online() -> bool:
        listed = ct("agents", "list", "--json", url=site.url, token=site.viewer)
        items = json.loads(listed.stdout)["items"] if listed.exit_code == 0 else []
        return any(a["agent_id"] == "a1" and a["status"] != "offline" for a in items)

    deadline = time.monotonic() + 60
    while not agent_online():
        assert time.monotonic() < deadline, "agent a1 did not show up in `agents list`"
        time.sleep(0.5)
    queued = ct("tasks", "run", "ticking", url=site.url, token=site.operator)
    assert queued.exit_code == 0, queued.output
    run_id = queued.stdout.split()[1]

    # the installed program follows the run while this process kills it
    env = {
        **os.environ,
        "CLOUDTASK_URL": site.url,
        "CLOUDTASK_TOKEN": site.viewer,
        "XDG_CONFIG_HOME": str(tmp_path / "none"),
    }
    follower = subprocess.Popen(
        [str(PROGRAM), "runs", "output", run_id, "--follow", "--interval", "0.3"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while "tick-2\n" not in lines:  # the follower prints the run's output as it comes
            assert time.monotonic() < deadline and follower.poll() is None, lines
            time.sleep(0.1)
        killed = ct("runs", "kill", run_id, url=site.url, token=site.operator)
        assert killed.exit_code == 0, killed.output
        assert "asked agent a1 to kill run" in killed.stdout
        follower.wait(timeout=60)
        reader.join(timeout=10)
        err = follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 1, err
    # what it printed is the run's whole output: nothing twice, nothing left out
    run = store.get_run(run_id)
    assert run["status"] == "killed"
    assert "".join(lines) == run["output_tail"]
    ticks = [line for line in lines if line.startswith("tick-")]
    assert ticks == [f"tick-{i}\n" for i in range(1, len(ticks) + 1)]
    assert f"run {run_id} killed" in err
    shown = ct("runs", "show", run_id, url=site.url, token=site.viewer)
    assert shown.exit_code == 1 and "killed" in shown.stdout
    again = ct("runs", "kill", run_id, url=site.url, token=site.operator)
    assert again.exit_code == 1 and "not running" in again.stderr


# --- TLS ----------------------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (certificate, key) PEM files."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "site.pem", folder / "site.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_is_checked(store, tmp_path, monkeypatch):
    from werkzeug.serving import make_server

    cert, key = self_signed(tmp_path)
    app = make_web_app(store)
    token = Users(store).create_token(VIEWER.name, "cli test")
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=(str(cert), str(key)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_port}"
    try:
        result = ct("tasks", "list", url=url, token=token)
        assert result.exit_code == 5
        assert f"cannot check the TLS certificate of {url}" in result.stderr
        assert "CLOUDTASK_CA_BUNDLE" in result.stderr and "--insecure" in result.stderr
        assert ct("tasks", "list", "--insecure", url=url, token=token).exit_code == 0
        monkeypatch.setenv("CLOUDTASK_CA_BUNDLE", str(cert))
        result = ct("tasks", "list", url=url, token=token)
        assert result.exit_code == 0, result.output
        monkeypatch.setenv("CLOUDTASK_CA_BUNDLE", str(tmp_path / "missing.pem"))
        result = ct("tasks", "list", url=url, token=token)
        assert result.exit_code == 2 and "missing.pem" in result.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

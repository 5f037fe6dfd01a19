"""Tasks as code: ``cloudtask apply`` prints a plan (create, change with a field diff,
unchanged, and with --prune delete), applies it with --yes or when confirmed at a terminal,
refuses without either; ``cloudtask export`` writes files that apply reads back as a no-op.
Against a real nx-27017 store, through the real command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudtask.cli import cli
from cloudtask.exceptions import StoreError
from cloudtask.operations import Operations
from cloudtask.secretbox import load_box, make_key_file
from cloudtask.taskexport import file_names, file_stem


@pytest.fixture
def env(mongo_server, mongo_db_name, tmp_path, monkeypatch):
    # a folder of its own: no conf/cloudtask.json, no running cluster's addresses
    monkeypatch.chdir(tmp_path)
    return {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}


def run(env, *args, input=None):
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def task(name, **fields):
    return {"name": name, "schedule": {"every": "1h"}, "command": "true", **fields}


def write(folder: Path, *tasks) -> Path:
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.json"):
        old.unlink()
    for t in tasks:
        (folder / f"{t['name']}.json").write_text(json.dumps(t))
    return folder


def snapshot(store):
    """Everything a write would change: every task document whole, the audit log, events."""
    docs = sorted(store.tasks.find(), key=lambda d: d["_id"])
    return docs, store.audit.count_documents({}), store.events.count_documents({})


def names(store):
    return sorted(d["name"] for d in store.tasks.find({}, {"name": 1}))


def test_the_plan_shows_create_change_unchanged_and_delete_and_a_dry_run_writes_nothing(
    env, store, tmp_path
):
    files = write(tmp_path / "tasks", task("a"), task("b"), task("c"))
    first = run(env, "apply", "--yes", str(files))
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines()[-1] == "Applied: 3 created, 0 changed, 0 deleted."
    long_command = "echo " + "x" * 300
    write(
        files,
        task(
            "a",
            schedule={"cron": "*/20 * * * * *", "timezone": "Europe/Berlin"},
            command=long_command,
            env={"DB": "reports"},
            notify={"emails": ["ops@example.com"]},
        ),
        task("b", retries=0, enabled=True),  # defaults written out: still unchanged
        task("e", group="batch"),
    )
    before = snapshot(store)
    plan = run(env, "apply", "--prune", "--dry-run", "--detailed-exitcode", str(files))
    assert plan.exit_code == 3, plan.output
    lines = plan.stdout.splitlines()
    assert lines[0] == "~ change    a"
    changes = lines[1:6]
    assert changes[0] == '      schedule.every: "1h" → (absent)'
    assert changes[1] == '      schedule.timezone: "UTC" → "Europe/Berlin"'
    assert changes[2] == '      schedule.cron: (absent) → "*/20 * * * * *"'
    assert changes[3].startswith('      command: "true" → "echo xxxx') and changes[3].endswith("…")
    assert len(changes[3]) < 120  # a long value is trimmed
    assert lines[5:7] == [
        '      env.DB: (absent) → "reports"',
        '      notify.emails: [] → ["ops@example.com"]',
    ]
    assert lines[7] == "= unchanged b"
    assert lines[8] == f"+ create    e  ({files / 'e.json'})"
    assert lines[9] == "- delete    c"
    assert lines[10] == "Plan: 1 to create, 1 to change, 1 unchanged, 1 to delete"
    assert snapshot(store) == before  # a dry run writes nothing
    assert run(env, "apply", "--prune", "--dry-run", str(files)).exit_code == 0

    applied = run(env, "apply", "--prune", "--yes", str(files))
    assert applied.exit_code == 0, applied.output
    assert applied.stdout.splitlines()[-4:] == [
        "updated   a",
        "created   e",
        "deleted   c",
        "Applied: 1 created, 1 changed, 1 deleted.",
    ]
    assert names(store) == ["a", "b", "e"]
    a = store.get_task_by_name("a")
    assert a["spec"]["command"] == long_command and a["revision"] == 2
    assert store.get_task_by_name("b")["revision"] == 1  # unchanged: not written
    again = run(env, "apply", "--prune", "--dry-run", "--detailed-exitcode", str(files))
    assert again.exit_code == 0 and again.stdout.splitlines()[-1] == "No changes."


def test_without_a_terminal_or_yes_nothing_is_applied(env, store, tmp_path):
    files = write(tmp_path / "tasks", task("a"), task("b"))
    result = run(env, "apply", str(files))
    assert result.exit_code == 2
    assert "nothing applied: 2 change(s) need a confirmation; give --yes" in result.stderr
    assert "+ create    a" in result.stdout  # the plan is shown all the same
    assert store.tasks.count_documents({}) == 0
    dry = run(env, "apply", "--detailed-exitcode", str(files))
    assert dry.exit_code == 2 and "--detailed-exitcode goes with --dry-run" in dry.output


def _apply_at_a_terminal(env, folder: Path, answer: bytes, cwd: Path):
    """``cloudtask apply`` in a process whose standard input is a real terminal (a pty)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloudtask", "apply", str(folder)],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            cwd=cwd,
        )
        os.close(slave)
        os.write(master, answer)
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
    return proc.returncode, out.decode(), err.decode()


def test_at_a_terminal_apply_asks_first(env, store, tmp_path):
    files = write(tmp_path / "tasks", task("a"))
    code, out, err = _apply_at_a_terminal(env, files, b"n\n", tmp_path)
    # the question on standard error: seen even when the plan is piped (apply ... | less)
    assert code == 1 and "Apply these 1 change(s)? [y/N]" in err and "Nothing applied." in out
    assert store.tasks.count_documents({}) == 0
    code, out, err = _apply_at_a_terminal(env, files, b"y\n", tmp_path)
    assert code == 0, out + err
    assert "created   a" in out
    assert names(store) == ["a"]


def test_prune_deletes_only_what_apply_made_in_the_groups_in_scope(env, store, tmp_path):
    ops = Operations(store)
    files = write(
        tmp_path / "tasks",
        task("a", group="etl"),
        task("b", group="etl"),
        task("x", group="web"),
    )
    assert run(env, "apply", "--yes", str(files)).exit_code == 0
    assert {d["name"]: d.get("source") for d in store.tasks.find()} == {
        "a": "apply",
        "b": "apply",
        "x": "apply",
    }
    ops.create_task("alice", task("site-made", group="etl"))  # made on the site: never pruned
    b = store.get_task_by_name("b")  # edited on the site after apply made it: still apply's
    ops.replace_task("alice", b["_id"], task("b", group="etl", retries=2))
    assert store.get_task_by_name("b")["source"] == "apply"
    assert "source" not in store.get_task_by_name("site-made")

    write(files, task("a", group="etl"))  # b and x left the files
    result = run(env, "apply", "--prune", "--yes", str(files))
    assert result.exit_code == 0, result.output
    assert "- delete    b" in result.stdout
    assert (
        "not deleted, though no file names them (not created or changed by apply; group etl):"
        " site-made" in result.stdout
    )
    assert names(store) == ["a", "site-made", "x"]  # x: another group

    result = run(env, "apply", "--prune-group", "web", "--yes", str(files))
    assert result.exit_code == 0, result.output
    assert "- delete    x" in result.stdout
    assert names(store) == ["a", "site-made"]
    # a site-made task that a file changed is the files' from then on
    write(files, task("a", group="etl"), task("site-made", group="etl", retries=1))
    assert run(env, "apply", "--yes", str(files)).exit_code == 0
    assert store.get_task_by_name("site-made")["source"] == "apply"
    write(files, task("a", group="etl"))
    assert run(env, "apply", "--prune", "--yes", str(files)).exit_code == 0
    assert names(store) == ["a"]
    # audit entries name who deleted
    deleted = [e["target"] for e in store.audit.find({"action": "task.delete"})]
    assert len(deleted) == 3


def test_a_progress_bar_past_50_changes(env, store, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    batch = folder / "batch.json"
    batch.write_text(json.dumps([task(f"t{i:02}") for i in range(50)]))
    fifty = run(env, "apply", "--yes", str(folder))
    assert fifty.exit_code == 0, fifty.output
    assert "Applying" not in fifty.output and "created   t49" in fifty.stdout
    batch.write_text(json.dumps([task(f"t{i:02}", retries=1) for i in range(51)]))
    more = run(env, "apply", "--yes", str(folder))
    assert more.exit_code == 0, more.output
    assert "Applying 51 changes" in more.stderr
    assert not re.search(r"^(created|updated) ", more.stdout, re.M)  # no line per task
    assert more.stdout.splitlines()[-1] == "Applied: 1 created, 50 changed, 0 deleted."
    assert store.tasks.count_documents({"spec.retries": 1}) == 51


def test_a_failure_midway_says_what_was_applied_and_what_was_not(env, store, tmp_path, monkeypatch):
    real = Operations.apply_task

    def failing(self, actor, data):
        if data["name"] == "b":
            raise StoreError("cannot reach MongoDB (test)")
        return real(self, actor, data)

    monkeypatch.setattr(Operations, "apply_task", failing)
    files = write(tmp_path / "tasks", task("a"), task("b"), task("c"))
    result = run(env, "apply", "--yes", str(files))
    assert result.exit_code == 1
    assert f"Error: stopped at b ({files / 'b.json'}): cannot reach MongoDB (test)" in result.stderr
    assert "applied before it (1): a" in result.stderr
    assert "not applied (2): b, c" in result.stderr
    assert names(store) == ["a"]


def test_export_warns_of_credentials_stored_in_clear(env, store, tmp_path):
    http = {"url": "https://hooks.example/x", "headers": {"X-Api-Token": "clear-t0k"}}
    Operations(store).create_task("alice", {"name": "h", "schedule": {"every": "1h"}, "http": http})
    result = run(env, "export", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0
    assert "warning: h: http.headers.X-Api-Token: looks like a credential given in clear" in (
        result.stderr
    )


def test_credentials_are_masked_in_the_diff(env, store, tmp_path):
    files = write(tmp_path / "tasks", task("a", env={"DB_PASSWORD": "old-pw-1", "HOST": "h1"}))
    assert run(env, "apply", "--yes", str(files)).exit_code == 0
    write(files, task("a", env={"DB_PASSWORD": "new-pw-2", "HOST": "h1"}))
    result = run(env, "apply", "--dry-run", str(files))
    assert '      env.DB_PASSWORD: "***" → "*** (changed)"' in result.stdout
    assert "old-pw-1" not in result.output and "new-pw-2" not in result.output


def test_a_spec_stored_before_a_field_existed_is_unchanged(env, store, tmp_path):
    files = write(tmp_path / "tasks", task("a"))
    assert run(env, "apply", "--yes", str(files)).exit_code == 0
    store.tasks.update_one({"name": "a"}, {"$unset": {"spec.on_lost": "", "spec.requires": ""}})
    before = snapshot(store)
    result = run(env, "apply", "--yes", str(files))
    assert result.exit_code == 0 and result.stdout.splitlines()[-2:] == [
        "Plan: 0 to create, 0 to change, 1 unchanged",
        "No changes.",
    ]
    assert snapshot(store) == before


def _varied_tasks(store, tmp_path) -> None:
    """A task of every kind, made as the site makes them (Operations), with what they
    refer to stored first: a secret, a task file, a pool."""
    ops = Operations(store)
    keys = tmp_path / "keys"
    make_key_file(keys)
    box = load_box(f"file:{keys}")
    ops.set_secret("alice", box, "db.pw", "s3cret-value")
    ops.set_secret("alice", box, "hook.token", "Bearer t0ken-value")
    sha = ops.put_file("alice", "job.sh", b"echo job\n", keep=5)["sha256"]
    ops.set_pool("alice", "pg", 2)
    ops.set_calendar("alice", "holidays", {"dates": ["2026-12-25"], "weekdays": ["sat"]})
    soon = (datetime.now(timezone.utc) + timedelta(days=30)).replace(microsecond=0)
    specs = [
        task(
            "cron-seconds",
            schedule={"cron": "*/15 * * * * *", "timezone": "Europe/Berlin"},
            command=["echo", "tick"],
            env={"A": "1", "EMPTY": ""},
            retries=3,
            retry_delay="30s",
            timeout="5m",
            warn_after="1m",
            deadline="06:00 mon,tue",
        ),
        task(
            "interval",
            schedule={
                "every": "90s",
                "between": ["08:00", "18:00"],
                "calendar": {"skip": "holidays"},
                "start": "2026-01-01T00:00:00Z",
            },
            expect_every="2h",
            command="echo $HOME | wc -c",
            shell=True,
            concurrency="allow",
            description="counts",
            owner="team-a",
        ),
        task("one-shot", schedule={"at": soon.isoformat()}),
        task("service", schedule={"keepalive": True}, command="sleep 1000", on_lost="rerun"),
        {
            "name": "hook",
            "schedule": [{"every": "10m"}, {"cron": "0 6 * * 1-5", "timezone": "Asia/Tokyo"}],
            "http": {
                "urls": ["https://a.example/deploy", "https://b.example/deploy"],
                "strategy": "failover",
                "method": "POST",
                "headers": {
                    "Accept": "application/json",
                    "Authorization": {"secret": "hook.token"},
                },
                "body": {"ref": "main"},
                "expect_status": [200, 202],
                "timeout": "10s",
            },
        },
        task(
            "pinned",
            command="sh job.sh",
            file="job.sh",
            file_version=sha,
            env={"PGPASSWORD": {"secret": "db.pw"}},
            cwd="/tmp",
        ),
        task(
            "fan-in",
            schedule={"after": ["cron-seconds", "interval"], "within": "6h"},
            deadline={"at": "07:30", "timezone": "America/New_York"},
        ),
        task(
            "pooled",
            pool="pg",
            pool_wait="5m",
            mode="all",
            enabled=False,
            misfire="skip",
            misfire_grace="10m",
            notify={"emails": ["ops@example.com"], "on": ["failure", "success"]},
        ),
        {
            "name": "boxed",
            "schedule": {"every": "1h"},
            "container": {"image": "alpine:3.19", "args": ["echo", "hi"], "memory": "256m"},
            "requires": {"os": "linux"},
        },
        task("Backup"),  # names that differ in case only, and one Windows reserves
        task("backup"),
        task("CON"),
    ]
    for spec in specs:
        ops.create_task("alice", spec)
    # a one-shot that ran (its instant now past) still exports and applies back unchanged
    ran = ops.create_task("alice", task("ran-once", schedule={"at": soon.isoformat()}))
    past = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    store.tasks.update_one({"_id": ran["_id"]}, {"$set": {"spec.schedule.at": past}})


def test_export_then_apply_is_a_no_op(env, store, tmp_path):
    _varied_tasks(store, tmp_path)
    out = tmp_path / "exported"
    result = run(env, "export", "--out", str(out))
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "Backup.json",
            "backup-2.json",
            "_CON.json",
            "boxed.json",
            "cron-seconds.json",
            "fan-in.json",
            "hook.json",
            "interval.json",
            "one-shot.json",
            "pinned.json",
            "pooled.json",
            "ran-once.json",
            "service.json",
        ]
    )
    # short files: defaults left out, name first, secrets as references
    assert json.loads((out / "Backup.json").read_text()) == task("Backup")
    assert list(json.loads((out / "pooled.json").read_text()))[0] == "name"
    pinned = (out / "pinned.json").read_text()
    assert '"PGPASSWORD": {\n      "secret": "db.pw"\n    }' in pinned
    hook = (out / "hook.json").read_text()
    assert '"Authorization": {\n        "secret": "hook.token"' in hook
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out / "hook.json").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert not list(out.glob(".export-*"))  # no temporary file left
    assert "s3cret-value" not in pinned + hook and "t0ken" not in hook

    before = snapshot(store)
    plan = run(env, "apply", "--prune", str(out))  # no --yes needed: nothing to do
    assert plan.exit_code == 0, plan.output
    assert plan.stdout.splitlines()[-2:] == [
        "Plan: 0 to create, 0 to change, 13 unchanged, 0 to delete",
        "No changes.",
    ]
    assert run(env, "apply", "--yes", str(out)).exit_code == 0
    assert snapshot(store) == before  # revisions, updated_at, audit log, events: untouched

    # standard output: one list, that apply reads the same way
    listing = run(env, "export", "--group", "default", "--task", "hook", "--task", "interval")
    assert [t["name"] for t in json.loads(listing.stdout)] == ["hook", "interval"]
    one = tmp_path / "one.json"
    one.write_text(listing.stdout)
    assert run(env, "apply", str(one)).stdout.splitlines()[-1] == "No changes."
    missing = run(env, "export", "--task", "nope")
    assert missing.exit_code == 2 and "no task named 'nope'" in missing.output


def test_export_file_names_are_safe(env, store, tmp_path):
    hostile = [
        "../../etc/passwd",
        "..",
        ".",
        "",
        "a/b\\c",
        "C:\\Windows\\x",
        "nul",
        "COM1.txt",
        ".hidden",
        "-rf",
        "x\0y\n",
        "ünïcödé name",
        "trailing.",
        "z" * 500,
    ]
    for name in hostile:
        stem = file_stem(name)
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", stem), (name, stem)
        assert not stem.endswith(".") and stem.split(".")[0].lower() not in ("nul", "com1")
    chosen = file_names(hostile)
    assert len({f.lower() for f in chosen.values()}) == len(hostile)  # no two share a file

    # a stored task whose name is not valid (written around the checks): not exported, said so
    ops = Operations(store)
    doc = ops.create_task("alice", task("fine"))
    evil = dict(doc, _id="evil", name="../../evil", name_lc="../../evil")
    evil["spec"] = dict(doc["spec"], name="../../evil")
    store.tasks.insert_one(evil)
    out = tmp_path / "out" / "inner"
    result = run(env, "export", "--out", str(out))
    assert result.exit_code == 1
    assert "warning: '../../evil' not exported: its stored spec is invalid" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fine.json"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["inner"]
    assert not list(tmp_path.rglob("*evil*"))
    # a file of another export left there is named, not removed
    (out / "old.json").write_text(json.dumps(task("old")))
    again = run(env, "export", "--out", str(out))
    assert "1 other file(s)" in again.stderr and "old.json" in again.stderr
    assert (out / "old.json").exists()


def test_a_task_and_the_parents_it_runs_after_apply_together(env, store, tmp_path):
    files = write(
        tmp_path / "tasks",
        task("a-report", schedule={"after": ["z-extract", "m-load"]}),
        task("m-load", schedule={"after": ["z-extract"]}),
        task("z-extract"),
    )
    result = run(env, "apply", "--yes", str(files))
    assert result.exit_code == 0, result.output
    applied = [line for line in result.stdout.splitlines() if line.startswith("created")]
    assert applied == ["created   z-extract", "created   m-load", "created   a-report"]
    # a cycle among new tasks is refused before anything is stored
    cycle = write(
        tmp_path / "cycle",
        task("p", schedule={"after": ["q"]}),
        task("q", schedule={"after": ["p"]}),
    )
    refused = run(env, "apply", "--yes", str(cycle))
    assert refused.exit_code == 2 and "schedule.after[0]: a cycle: p -> q -> p" in refused.output
    assert names(store) == ["a-report", "m-load", "z-extract"]
    # pruning a parent that a task still runs after says so
    write(files, task("a-report", schedule={"after": ["m-load"]}), task("m-load"))
    plan = run(env, "apply", "--prune", "--dry-run", str(files))
    lines = plan.stdout.splitlines()
    at = lines.index("- delete    z-extract")
    assert lines[at + 1] == "Plan: 0 to create, 2 to change, 0 unchanged, 1 to delete"
    write(files, task("m-load", schedule={"after": ["z-extract"]}))
    plan = run(env, "apply", "--prune", "--dry-run", str(files))
    lines = plan.stdout.splitlines()
    assert lines[lines.index("- delete    z-extract") + 1] == (
        "      ! m-load run(s) after it: it would wait for a task that is gone"
    )
    assert lines[lines.index("- delete    a-report") + 1].startswith("- delete    z-extract")


def test_the_api_answers_the_plan_and_applies_it(store):
    from helpers import OPERATOR, VIEWER, make_web_app

    from cloudtask.users import Users

    app = make_web_app(store)
    users = Users(store)
    tokens = {u.role: users.create_token(u.name, "tests") for u in (OPERATOR, VIEWER)}
    client = app.test_client()

    def post(body, role="operator", query=""):
        headers = {"Authorization": f"Bearer {tokens[role]}"}
        return client.post(f"/api/v1/tasks:apply{query}", json=body, headers=headers)

    Operations(store).create_task("alice", task("site-made"))
    body = {"tasks": [task("a"), task("b", schedule={"after": ["a"]})], "prune": True}
    dry = post(body, query="?dry_run=true")
    assert dry.status_code == 200, dry.get_json()
    assert dry.get_json() == {
        "dry_run": True,
        "plan": [
            {"action": "create", "name": "a", "group": "default", "changes": [], "notes": []},
            {"action": "create", "name": "b", "group": "default", "changes": [], "notes": []},
        ],
        "kept": ["site-made"],
        "applied": [],
    }
    assert names(store) == ["site-made"]
    assert post(body, role="viewer").status_code == 403
    done = post(body)
    assert done.status_code == 200, done.get_json()
    assert done.get_json()["applied"] == [
        {"outcome": "created", "name": "a"},
        {"outcome": "created", "name": "b"},
    ]
    assert names(store) == ["a", "b", "site-made"]
    changed = post({"tasks": [task("a", env={"API_TOKEN": "x1"})], "prune": True})
    plan = {i["name"]: i for i in changed.get_json()["plan"]}
    assert plan["a"]["changes"] == [{"path": "env.API_TOKEN", "new": "***"}]
    assert plan["b"]["action"] == "delete" and changed.get_json()["applied"][-1] == {
        "outcome": "deleted",
        "name": "b",
    }
    bad = post({"tasks": [task("a"), {"name": "c", "schedule": {"every": "1ms"}}], "x": 1})
    assert bad.status_code == 422
    paths = {d["path"] for d in bad.get_json()["details"]}
    assert {"x", "tasks[1].schedule.every", "tasks[1].command"} <= paths
    assert names(store) == ["a", "site-made"]

"""Stored secrets: sealed with AES-GCM under a key ring, write-only for people, referred to by
tasks as {"secret": NAME}; against the real nx-27017 server."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from cloudtask.cli import cli
from cloudtask.exceptions import ConfigError, Conflict, NotFound, ValidationError
from cloudtask.operations import Operations
from cloudtask.secretbox import (
    SecretBox,
    SecretError,
    check_setting,
    load_box,
    make_key_file,
    new_key,
    parse_ring,
)
from cloudtask.task import clear_credentials, parse_task

VALUE = "s3cr3t-VALUE-that-must-never-show"


def ring(*lines: str) -> SecretBox:
    return SecretBox(tuple(parse_ring("\n".join(lines), "test")))


def test_a_value_opens_only_under_its_own_name_and_a_key_of_the_ring():
    k1 = new_key("k1")
    box = ring(k1)
    sealed = box.seal("db.password", VALUE)
    assert sealed["key_id"] == "k1" and VALUE.encode() not in sealed["ciphertext"]
    assert box.open("db.password", sealed) == VALUE
    assert box.seal("db.password", VALUE)["nonce"] != sealed["nonce"]  # a fresh nonce each time
    with pytest.raises(SecretError, match="not its own"):
        box.open("other", sealed)  # moved to another name
    with pytest.raises(SecretError, match="not in this process's key ring"):
        ring(new_key("k2")).open("db.password", sealed)
    damaged = {
        **sealed,
        "ciphertext": bytes([sealed["ciphertext"][0] ^ 1]) + sealed["ciphertext"][1:],
    }
    with pytest.raises(SecretError, match="damaged"):
        box.open("db.password", damaged)
    assert "k1" in repr(box) and k1.split(":")[1] not in repr(box)


def test_key_rings_are_read_from_a_file_or_the_environment_never_from_the_config(tmp_path):
    path = tmp_path / "keys"
    make_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    box = load_box(f"file:{path}")
    assert box is not None and box.primary == "k1"
    line = new_key("env1")
    assert load_box("env:RING", {"RING": f"{line}, {new_key('old')}"}).primary == "env1"
    assert load_box("") is None
    with pytest.raises(ConfigError, match="RING, which is not set"):
        load_box("env:RING", {})
    with pytest.raises(ConfigError, match="key 1: the key is not the base64 of 32 bytes"):
        load_box("env:RING", {"RING": "k1:abcd"})
    with pytest.raises(ConfigError, match="used twice"):
        parse_ring(f"{line}\n{line}", "x")
    with pytest.raises(ValueError, match="never stand in the config"):
        check_setting(line)


def test_tasks_refer_to_secrets_and_credentials_in_clear_get_a_warning():
    spec = parse_task(
        {
            "name": "t",
            "schedule": {"every": "1m"},
            "http": {
                "url": "https://example.com/hook",
                "method": "POST",
                "headers": {"Authorization": "Bearer in-clear", "X-Api-Key": {"secret": "api"}},
                "body": {"secret": "payload"},
            },
        }
    )
    assert spec.http.secret_headers == {"X-Api-Key": "api"} and spec.http.body_secret == "payload"
    assert "X-Api-Key" not in spec.http.headers and spec.http.body is None
    assert spec.secrets_used() == {"api", "payload"}
    assert parse_task(spec.to_dict()) == spec
    assert [p.path for p in clear_credentials(spec)] == ["http.headers.Authorization"]
    with pytest.raises(ValidationError) as caught:
        parse_task(
            {
                "name": "t",
                "schedule": {"every": "1m"},
                "command": "true",
                "env": {"A": {"secret": "9lives"}, "B": {"secret": "ok", "x": 1}},
            }
        )
    assert sorted(p.path for p in caught.value.problems) == ["env.A", "env.B"]


def test_the_store_never_gives_a_value_back_except_to_the_processes_that_use_it(store):
    box = ring(new_key("k1"))
    ops = Operations(store)
    info = ops.set_secret("alice", box, "db.password", VALUE, "the reports database")
    assert info["name"] == "db.password" and info["updated_by"] == "alice"
    task = store.create_task(
        {
            "name": "report",
            "schedule": {"every": "1m"},
            "command": "env",
            "env": {"PGPASSWORD": {"secret": "db.password"}, "PLAIN": "x"},
        }
    )
    listing = store.list_secrets()
    assert [r["name"] for r in listing] == ["db.password"]
    assert listing[0]["used_by"] == [{"id": task["_id"], "name": "report"}]
    assert not {"ciphertext", "nonce"} & set(listing[0])
    ops.set_secret("bob", box, "db.password", VALUE + "2")  # replaced
    assert store.get_secret_info("db.password")["updated_by"] == "bob"
    assert store.secret_values(box, ["db.password"]) == {"db.password": VALUE + "2"}
    with pytest.raises(SecretError, match="no secret named 'nope'"):
        store.secret_values(box, ["db.password", "nope"])
    with pytest.raises(SecretError, match="no key ring"):
        store.secret_values(None, ["db.password"])
    with pytest.raises(Conflict, match="used by 1 task"):
        ops.delete_secret("alice", "db.password")
    with pytest.raises(ValidationError):
        ops.set_secret("alice", box, "bad name", VALUE)
    # nothing stored anywhere but the secrets collection holds the value, even sealed
    everything = json.dumps(
        {
            name: list(store.db[name].find({}))
            for name in store.db.list_collection_names()
            if name != "secrets"
        },
        default=str,
    )
    assert VALUE not in everything
    actions = [e["action"] for e in store.audit.find({"target": "secret:db.password"})]
    assert actions == ["secret.set", "secret.set"]
    store.delete_task(task["_id"])
    ops.delete_secret("alice", "db.password")
    with pytest.raises(NotFound):
        store.get_secret_info("db.password")


def test_rotation_seals_every_value_again_under_the_new_primary(store):
    old = new_key("old")
    box = ring(old)
    ops = Operations(store)
    for i in range(3):
        ops.set_secret("alice", box, f"s{i}", f"{VALUE}{i}")
    rotated = ring(new_key("new"), old)
    assert ops.rotate_secrets("alice", rotated) == 3
    assert {d["key_id"] for d in store.secrets.find({})} == {"new"}
    only_new = SecretBox(rotated.keys[:1])  # the old key dropped from the ring
    assert store.secret_values(only_new, ["s0", "s1", "s2"]) == {
        f"s{i}": f"{VALUE}{i}" for i in range(3)
    }
    assert ops.rotate_secrets("alice", rotated) == 0


def test_the_cli_reads_values_from_stdin_and_never_prints_them(
    tmp_path, mongo_server, mongo_db_name, store
):
    keys = tmp_path / "keys"
    make_key_file(keys)
    env = {
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_SECRETS_KEYS": f"file:{keys}",
    }
    runner = CliRunner()
    result = runner.invoke(cli, ["secrets", "set", "token"], input=VALUE + "\n", env=env)
    assert result.exit_code == 0, result.output
    assert "stored secret token" in result.output and VALUE not in result.output
    listed = runner.invoke(cli, ["secrets", "list"], env=env)
    assert "token" in listed.output and VALUE not in listed.output
    assert store.secret_values(load_box(f"file:{keys}"), ["token"]) == {"token": VALUE}
    no_ring = runner.invoke(
        cli, ["secrets", "set", "other"], input="x", env={**env, "CLOUDTASK_SECRETS_KEYS": ""}
    )
    assert no_ring.exit_code == 1 and "no key ring" in no_ring.output
    assert runner.invoke(cli, ["secrets", "delete", "token"], env=env).exit_code == 0
    new = runner.invoke(cli, ["secrets", "new-key", "--id", "k2"])
    assert new.output.startswith("k2:") and len(parse_ring(new.output, "cli")) == 1

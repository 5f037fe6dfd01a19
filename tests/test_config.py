"""Config file and environment: every bad value fails with the file, the key and what is expected."""

from __future__ import annotations

import json

import pytest

from cloudtask.config import config_keys, config_to_dict, load_config
from cloudtask.exceptions import ConfigError


def write(tmp_path, data) -> str:
    path = tmp_path / "cloudtask.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults_without_file():
    cfg = load_config(None, environ={})
    assert cfg.zookeeper.root == "/cloudtask"
    assert cfg.agent.max_parallel == 16
    assert cfg.runs.retention_days == 90


def test_example_config_is_valid():
    cfg = load_config("conf/cloudtask.json", environ={})
    assert cfg.agent.log_retention_days >= 1
    assert cfg.source == "conf/cloudtask.json"


def test_the_example_config_names_every_key():
    """conf/cloudtask.json is where operators look for what can be set: every key is in it."""
    import json
    from dataclasses import fields
    from pathlib import Path

    from cloudtask.config import Config

    example = json.loads(Path("conf/cloudtask.json").read_text(encoding="utf-8"))
    missing = []
    for section in fields(Config):
        if section.name == "source":
            continue
        given = example.get(section.name)
        if given is None:
            missing.append(section.name)
            continue
        for key in fields(section.default_factory()):
            if key.name not in given:
                missing.append(f"{section.name}.{key.name}")
    assert missing == []


def test_file_values_and_durations(tmp_path):
    path = write(
        tmp_path,
        {
            "zookeeper": {"hosts": "zk1:2181,zk2:2181", "root": "/ct", "session_timeout": "15s"},
            "mongodb": {"uri": "mongodb://db1,db2/?replicaSet=rs0", "database": "ct"},
            "agent": {"group": "batch", "labels": {"zone": "a"}, "max_parallel": 4},
        },
    )
    cfg = load_config(path, environ={})
    assert cfg.zookeeper.session_timeout == 15.0
    assert cfg.mongodb.database == "ct"
    assert cfg.agent.labels == {"zone": "a"}
    assert cfg.agent.max_parallel == 4


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, {"mongodb": {"uri": "mongodb://file:1"}, "agent": {"max_parallel": 4}})
    env = {
        "CLOUDTASK_MONGO_URI": "mongodb://env:2",
        "CLOUDTASK_ZK_HOSTS": "127.0.0.1:2181",
        "CLOUDTASK_AGENT_MAX_PARALLEL": "8",
        "CLOUDTASK_AGENT_LABELS": "zone=b,rack=3",
        "CLOUDTASK_ZOOKEEPER_SESSION_TIMEOUT": "20s",
    }
    cfg = load_config(path, environ=env)
    assert cfg.mongodb.uri == "mongodb://env:2"
    assert cfg.zookeeper.hosts == "127.0.0.1:2181"
    assert cfg.agent.max_parallel == 8
    assert cfg.agent.labels == {"zone": "b", "rack": "3"}
    assert cfg.zookeeper.session_timeout == 20.0


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"agent": {"max_paralel": 3}}, "agent.max_paralel: unknown key"),
        ({"agnet": {}}, "unknown section 'agnet'"),
        ({"agent": {"max_parallel": "many"}}, "agent.max_parallel: expected a whole number"),
        ({"agent": {"max_parallel": 0}}, "agent.max_parallel: expected a whole number from 1"),
        ({"agent": {"weight": True}}, "agent.weight"),
        ({"zookeeper": {"session_timeout": "soon"}}, "zookeeper.session_timeout"),
        ({"zookeeper": {"root": "cloudtask"}}, "zookeeper.root: expected an absolute"),
        ({"mongodb": {"uri": "http://x"}}, "mongodb.uri: expected a URI"),
        ({"mongodb": {"database": "a/b"}}, "mongodb.database"),
        ({"agent": {"labels": ["a"]}}, "agent.labels"),
        ({"agent": {"id": "bad id"}}, "agent.id"),
        ({"agent": 3}, "agent: expected an object"),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, data, needle):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert path in str(err.value)
    assert needle in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, {"agent": {"max_parallel": -1, "group": ""}, "runs": {"x": 1}})
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    text = str(err.value)
    assert "agent.max_parallel" in text and "agent.group" in text and "runs.x" in text


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="CLOUDTASK_AGENT_MAX_PARALLEL"):
        load_config(None, environ={"CLOUDTASK_AGENT_MAX_PARALLEL": "lots"})


def test_invalid_json_names_line(tmp_path):
    path = write(tmp_path, '{"agent": {"max_parallel": 3,}}')
    with pytest.raises(ConfigError, match=r"not valid JSON at line 1"):
        load_config(path, environ={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.json"), environ={})


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(
        None, environ={"CLOUDTASK_AGENT_GROUP": "g1", "CLOUDTASK_AGENT_KILL_GRACE": "2s"}
    )
    again = load_config(write(tmp_path, config_to_dict(cfg)), environ={})
    for section in config_keys():
        assert getattr(again, section) == getattr(cfg, section)
    assert again.agent.group == "g1" and again.agent.kill_grace == 2.0


def test_zookeeper_auth_in_clear_from_the_environment_or_a_file(tmp_path):
    for value in ("ct:pa55", "env:CT_ZK_CREDENTIAL", f"file:{tmp_path / 'zk-cred'}"):
        cfg = load_config(write(tmp_path, {"zookeeper": {"auth": value}}), environ={})
        assert cfg.zookeeper.auth == value
        assert value not in repr(cfg)  # never in a log line that shows the config
    cfg = load_config(None, environ={"CLOUDTASK_ZK_AUTH": "env:ZK_SECRET"})
    assert cfg.zookeeper.auth == "env:ZK_SECRET"
    assert config_to_dict(cfg)["zookeeper"]["auth"] == "env:ZK_SECRET"  # `up` hands it on
    assert load_config(None, environ={}).zookeeper.auth == ""


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("justapassword", "expected user:password"),
        (":pw", "expected user:password"),
        ("user:", "expected user:password"),
        ("us er:pw", "must not contain spaces"),
        ("env:NOT A NAME", "env: must be followed by the name of an environment variable"),
        ("file:", "file: must be followed by a path"),
        (42, "expected a string"),
    ],
)
def test_bad_zookeeper_auth_says_what_is_expected_and_never_shows_it(tmp_path, value, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"zookeeper": {"auth": value}}), environ={})
    assert "zookeeper.auth" in str(e.value) and needle in str(e.value)
    assert "'user:password', 'env:VARIABLE' or 'file:/path/to/file'" in str(e.value)
    if isinstance(value, str) and len(value) > 5:
        assert value not in str(e.value)

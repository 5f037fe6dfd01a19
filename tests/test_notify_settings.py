"""The alert settings (file, environment and the settings page's stored keys) and the
subjects of alert mail.
"""

from __future__ import annotations

import json

import pytest
from notifying import (
    BASE,
    T0,
    config,
    make_task,
    run_event,
    ts,
)

from cloudtask.config import load_config
from cloudtask.exceptions import CloudTaskError, ConfigError, ValidationError
from cloudtask.localservers import free_port
from cloudtask.notify import (
    Notifier,
    load_settings,
    save_settings,
    send_test_mail,
)
from cloudtask.notify.content import event_subject
from cloudtask.notify.settings import validate_settings

# --- settings ----------------------------------------------------------------------------------


def test_stored_settings_override_the_file_key_by_key(store, smtp):
    cfg = config(None, operators=("file@example.com",), alert_interval=600.0)
    assert load_settings(store, cfg).mail_enabled is False
    stored = save_settings(
        store,
        {
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp.port,
            "smtp_security": "none",
            "operators": ["db@example.com"],
            "alert_interval": "1h",
        },
        by="admin1",
    )
    assert stored["alert_interval"] == 3600.0
    s = load_settings(store, cfg)
    assert s.smtp_host == "127.0.0.1" and s.operators == ("db@example.com",)
    assert s.alert_interval == 3600.0 and s.mail_from == "CloudTask <alerts@example.com>"
    assert s.from_database == (
        "alert_interval",
        "operators",
        "smtp_host",
        "smtp_port",
        "smtp_security",
    )
    assert s.base_url == BASE
    run_event(store, make_task(store), T0)
    Notifier(store, cfg).run_once(ts(T0, 1))
    assert list(smtp.inbox.by_recipient()) == ["db@example.com"]


def test_settings_validation_names_each_bad_key(store):
    with pytest.raises(ValidationError) as err:
        save_settings(
            store,
            {
                "smtp_port": "many",
                "smtp_security": "tls",
                "operators": ["ops@example.com", "not-an-address"],
                "operators_by_kind": {"run.fail": ["a@example.com"]},
                "webhooks": [{"url": "ftp://x", "secret": "s"}],
                "alert_interval": "soon",
                "bogus": 1,
            },
        )
    problems = {p.path: p.message for p in err.value.problems}
    assert set(problems) == {
        "smtp_port",
        "smtp_security",
        "operators[1]",
        "operators_by_kind.run.fail",
        "webhooks[0].url",
        "alert_interval",
        "bogus",
    }
    assert "expected one of starttls, ssl, none" in problems["smtp_security"]
    assert "not an email address" in problems["operators[1]"]
    assert "unknown key" in problems["bogus"]
    with pytest.raises(ValidationError) as err:
        save_settings(store, {"webhooks": [{"url": "https://x.example.com/h"}]})
    assert [p.path for p in err.value.problems] == ["webhooks[0].secret"]
    with pytest.raises(ValidationError):
        save_settings(store, ["not", "an", "object"])
    assert store.db["settings"].find_one({"_id": "alerts"}) is None  # nothing stored


def test_a_bad_stored_setting_is_ignored_and_the_file_value_kept(store, caplog):
    store.db["settings"].insert_one({"_id": "alerts", "smtp_port": "x", "smtp_host": "m.example"})
    s = load_settings(store, config(None))
    assert s.smtp_port == 587 and s.smtp_host == "m.example"
    assert "smtp_port" in caplog.text


def test_send_test_mail(smtp):
    cfg = config(smtp.port)
    send_test_mail(load_settings(None, cfg), "admin@example.com")
    ((rcpts, msg),) = smtp.inbox.messages()
    assert rcpts == ["admin@example.com"] and msg["Subject"].startswith("[CloudTask] TEST")
    with pytest.raises(CloudTaskError, match="connection refused"):
        send_test_mail(load_settings(None, config(free_port())), "admin@example.com")
    with pytest.raises(CloudTaskError, match="mail is off"):
        send_test_mail(load_settings(None, config(None)), "admin@example.com")
    with pytest.raises(CloudTaskError, match="not an email address"):
        send_test_mail(load_settings(None, cfg), "admin")
    with pytest.raises(CloudTaskError, match="does not offer STARTTLS"):
        send_test_mail(load_settings(None, config(smtp.port, smtp_security="starttls")), "a@b.c")


# --- the config file ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alerts, needle",
    [
        ({"smtp_port": "many"}, "alerts.smtp_port: expected a whole number"),
        ({"smtp_port": 70000}, "alerts.smtp_port"),
        ({"smtp_security": "tls"}, "alerts.smtp_security: expected one of starttls"),
        ({"smtp_host": 3}, "alerts.smtp_host: expected a string"),
        ({"smtp_password_env": "MY PASS"}, "alerts.smtp_password_env"),
        ({"mail_from": "nobody"}, "alerts.mail_from"),
        ({"operators": 3}, "alerts.operators: expected a list"),
        ({"operators": ["x"]}, "alerts.operators[0]: 'x' is not an email address"),
        ({"operators_by_kind": []}, "alerts.operators_by_kind: expected an object"),
        ({"operators_by_kind": {"run.oops": []}}, "alerts.operators_by_kind.run.oops"),
        ({"operators_by_group": {"batch": ["nobody"]}}, "alerts.operators_by_group.batch[0]"),
        ({"operators_by_group": {"batch": 5}}, "alerts.operators_by_group.batch: expected a list"),
        ({"alert_interval": "soon"}, "alerts.alert_interval"),
        ({"webhooks": {"url": "x"}}, "alerts.webhooks: expected a list"),
        (
            {"webhooks": [{"url": "http://h/x", "secret": "s", "kinds": ["x"]}]},
            "alerts.webhooks[0].kinds[0]",
        ),
        (
            {"webhooks": [{"url": "http://h/x", "secret": "s", "when": 1}]},
            "alerts.webhooks[0].when: unknown key",
        ),
        ({"webhook_timeout": "0s"}, "alerts.webhook_timeout"),
        ({"smpt_host": "x"}, "alerts.smpt_host: unknown key"),
    ],
)
def test_config_file_alerts_are_checked(tmp_path, alerts, needle):
    path = tmp_path / "cloudtask.json"
    path.write_text(json.dumps({"alerts": alerts}))
    with pytest.raises(ConfigError) as err:
        load_config(str(path), environ={})
    assert needle in str(err.value)


def test_config_file_and_environment_alerts(tmp_path):
    path = tmp_path / "cloudtask.json"
    path.write_text(
        json.dumps(
            {
                "alerts": {
                    "smtp_host": "mail.example.com",
                    "smtp_security": "ssl",
                    "smtp_port": 465,
                    "alert_interval": "5m",
                    "operators_by_kind": {"agent.left": ["infra@example.com"]},
                    "webhooks": [{"url": "https://h.example.com/x", "secret": "s"}],
                }
            }
        )
    )
    env = {
        "CLOUDTASK_ALERTS_OPERATORS": "a@example.com, b@example.com",
        "CLOUDTASK_ALERTS_OPERATORS_BY_GROUP": '{"batch": ["c@example.com"]}',
        "CLOUDTASK_ALERTS_SMTP_PASSWORD_ENV": "CLOUDTASK_SMTP_PASS",
    }
    cfg = load_config(str(path), environ=env)
    a = cfg.alerts
    assert (a.smtp_host, a.smtp_port, a.smtp_security) == ("mail.example.com", 465, "ssl")
    assert a.alert_interval == 300.0
    assert a.operators == ("a@example.com", "b@example.com")
    assert a.operators_by_group == {"batch": ("c@example.com",)}
    assert a.operators_by_kind == {"agent.left": ("infra@example.com",)}
    assert a.webhooks == ({"url": "https://h.example.com/x", "secret": "s", "kinds": None},)
    s = load_settings(None, cfg, environ={"CLOUDTASK_SMTP_PASS": "from-env"})
    assert s.smtp_password == "from-env"
    with pytest.raises(ConfigError, match="CLOUDTASK_ALERTS_WEBHOOKS at \\[0\\].url"):
        load_config(None, environ={"CLOUDTASK_ALERTS_WEBHOOKS": '[{"url": "x", "secret": "s"}]'})


def test_example_config_documents_every_alerts_key():
    with open("conf/cloudtask.json", encoding="utf-8") as f:
        raw = json.load(f)
    from cloudtask.config import config_keys

    assert set(raw["alerts"]) - {"$comment"} == set(config_keys()["alerts"])
    assert "$comment" in raw["alerts"]


# --- subjects ----------------------------------------------------------------------------------


def test_subjects_sort_by_kind_then_name_then_time():
    base = {"task_name": "sync", "task_id": "t1", "run_id": "r1", "agent": "a2"}
    d = {"scheduled_for": "2026-12-01T05:30:00+00:00"}
    assert (
        event_subject({**base, "kind": "run.failed", "details": {**d, "http_status": 500}})
        == "[CloudTask] FAILED sync (HTTP 500) 2026-12-01 05:30 UTC"
    )
    assert (
        event_subject({**base, "kind": "run.lost", "details": d})
        == "[CloudTask] LOST sync 2026-12-01 05:30 UTC"
    )
    assert (
        event_subject({**base, "kind": "run.missed", "details": d})
        == "[CloudTask] MISSED sync 2026-12-01 05:30 UTC"
    )
    leader = {"kind": "center.leader", "at": T0, "details": {"center_id": "c2"}}
    assert event_subject(leader) == "[CloudTask] LEADER c2 2026-12-01 03:00 UTC"
    newline = {"kind": "task.changed", "task_name": "x", "at": T0, "details": {"actor": "a\nb"}}
    assert "\n" not in event_subject(newline)


# --- what the settings page cannot change -------------------------------------------------------


def test_smtp_password_env_may_only_name_a_variable_with_the_configured_prefix(store, smtp):
    environ = {"CLOUDTASK_MONGO_URI": "mongodb://admin:db-secret@db/", "CLOUDTASK_SMTP_PW": "pw"}
    cfg = config(smtp.port, smtp_user="alerts")
    save_settings(store, {"smtp_password_env": "CLOUDTASK_MONGO_URI"})  # saved as before ...
    s = load_settings(store, cfg, environ=environ)
    assert s.smtp_password == "" and "db-secret" not in repr(s)  # ... but never read
    assert s.password_problem.startswith(
        "alerts.smtp_password_env may only name an environment variable starting with "
        "CLOUDTASK_SMTP_ (security.smtp_password_env_prefix), got 'CLOUDTASK_MONGO_URI'"
    )
    with pytest.raises(CloudTaskError, match="may only name an environment variable"):
        send_test_mail(s, "admin@example.com")  # the page's "test mail"
    assert smtp.inbox.messages() == []
    save_settings(store, {"smtp_password_env": "CLOUDTASK_SMTP_PW"})
    assert load_settings(store, cfg, environ=environ).smtp_password == "pw"
    # the same refused at once where the prefix is known (the page, given the config)
    prefix = cfg.security.smtp_password_env_prefix
    _, problems = validate_settings({"smtp_password_env": "HOME"}, env_prefix=prefix)
    assert [(p.path, p.message.split(",")[0]) for p in problems] == [
        (
            "smtp_password_env",
            "may only name an environment variable starting with CLOUDTASK_SMTP_ "
            "(security.smtp_password_env_prefix)",
        )
    ]
    with pytest.raises(ValidationError, match="smtp_password_env: may only name"):
        save_settings(store, {"smtp_password_env": "HOME"}, env_prefix=prefix)
    assert validate_settings({"smtp_password_env": "CLOUDTASK_SMTP_X"}, env_prefix=prefix)[1] == []


def test_the_prefix_comes_from_the_file_or_the_environment(tmp_path):
    path = tmp_path / "cloudtask.json"
    path.write_text(json.dumps({"security": {"smtp_password_env_prefix": "ALERT_MAIL_"}}))
    cfg = load_config(str(path), environ={})
    assert cfg.security.smtp_password_env_prefix == "ALERT_MAIL_"
    cfg = cfg.with_section("alerts", smtp_password_env="ALERT_MAIL_PW")
    assert load_settings(None, cfg, environ={"ALERT_MAIL_PW": "x"}).smtp_password == "x"
    env = {"CLOUDTASK_SECURITY_SMTP_PASSWORD_ENV_PREFIX": "OPS_"}
    assert load_config(None, environ=env).security.smtp_password_env_prefix == "OPS_"
    assert load_config(None, environ={}).security.smtp_password_env_prefix == "CLOUDTASK_SMTP_"
    path.write_text(json.dumps({"security": {"smtp_password_env_prefix": "A B"}}))
    with pytest.raises(ConfigError, match="security.smtp_password_env_prefix"):
        load_config(str(path), environ={})

"""The SMTP password and webhook secrets kept in the secret store, against real servers: an
aiosmtpd SMTP server that requires a login, the webhook receiver, the real MongoDB wire
server. The alert settings only name the secrets (smtp_password_secret, a webhook's
url_secret and secret_secret); the notifier of the leading center opens them with the key
ring of its own config when it sends, and no delivery, error or log names a URL that is
itself a secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

import pytest
from aiosmtpd.smtp import AuthResult
from helpers import SmtpServer
from notifying import T0, config, make_task, run_event, ts

from cloudtask.config import ALERTS_CHECKS
from cloudtask.exceptions import ValidationError
from cloudtask.localservers import free_port
from cloudtask.notify import Notifier, load_settings
from cloudtask.notify.deliveries import Deliveries
from cloudtask.operations import Operations
from cloudtask.secretbox import SecretBox, make_key_file, new_key, parse_ring

PASSWORD = "smtp-Pw-7730-never-shown"
HOOK_SECRET = "hook-Sig-5512-never-shown"
URL_TOKEN = "T0KEN-in-the-url-4471"


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys"
    make_key_file(path)
    return path


@pytest.fixture
def box(keys) -> SecretBox:
    return SecretBox(tuple(parse_ring(keys.read_text(), "test")))


@pytest.fixture
def login_smtp():
    """An SMTP server that takes the login alerts / PASSWORD only."""
    tried: list[bytes] = []

    def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
        tried.append(auth_data.password)
        ok = auth_data.login == b"alerts" and auth_data.password == PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    server = SmtpServer(
        free_port(), authenticator=authenticator, auth_required=True, auth_require_tls=False
    ).start()
    server.tried = tried  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_the_smtp_password_is_a_stored_secret_opened_by_the_notifier(store, box, keys, login_smtp):
    ops = Operations(store)
    ops.set_secret("alice", box, "mail.password", PASSWORD, "the alert mailbox")
    cfg = config(
        login_smtp.port,
        smtp_user="alerts",
        smtp_password="the-file-password-loses",
        smtp_password_env="CLOUDTASK_SMTP_PASSWORD",
        smtp_password_secret="mail.password",
    ).with_section("secrets", keys=f"file:{keys}")
    settings = load_settings(store, cfg, environ={"CLOUDTASK_SMTP_PASSWORD": "env-loses-too"})
    assert settings.smtp_password == "" and "only the leading center opens" in (
        settings.password_problem
    )  # loaded, not opened: the web process never has the value
    event = run_event(store, make_task(store), T0)

    counts = Notifier(store, cfg, environ={"CLOUDTASK_SMTP_PASSWORD": "env-loses-too"}).run_once(
        ts(T0, 5)
    )
    assert counts["sent"] == 1, Deliveries(store).for_event(event["_id"])
    assert login_smtp.tried == [PASSWORD.encode()]  # the stored secret won
    ((rcpts, msg),) = login_smtp.inbox.messages()
    assert rcpts == ["ops@example.com"] and PASSWORD not in msg.as_string()

    # replaced: the next read of the settings (every few seconds) opens the new value
    ops.set_secret("alice", box, "mail.password", "wrong-now")
    event2 = run_event(store, make_task(store, "other"), T0)
    assert Notifier(store, cfg).run_once(ts(T0, 10))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event2["_id"])
    assert "refused the login of 'alerts'" in doc["last_error"]
    assert "wrong-now" not in json.dumps(doc, default=str)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_a_password_secret_that_cannot_be_opened_says_why_and_sends_nothing(
    store, box, keys, login_smtp, tmp_path
):
    cfg = config(login_smtp.port, smtp_user="alerts", smtp_password_secret="mail.password")
    event = run_event(store, make_task(store), T0)
    # no key ring in the center's config
    assert Notifier(store, cfg).run_once(ts(T0, 1))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert doc["last_error"] == (
        "alerts.smtp_password_secret: this process has no key ring (secrets.keys), so it "
        "cannot open the secrets mail.password"
    )
    # a key ring, but the secret is not stored
    with_ring = cfg.with_section("secrets", keys=f"file:{keys}")
    assert Notifier(store, with_ring).run_once(ts(T0, 10))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert doc["last_error"] == "alerts.smtp_password_secret: no secret named 'mail.password'"
    # a key ring that cannot be read
    broken = cfg.with_section("secrets", keys=f"file:{tmp_path}/missing")
    assert Notifier(store, broken).run_once(ts(T0, 30))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert "secrets.keys: cannot read" in doc["last_error"]
    # sealed under a key the center's ring does not have
    other = tmp_path / "other"
    other.write_text(new_key("k2") + "\n")
    Operations(store).set_secret("alice", box, "mail.password", PASSWORD)
    elsewhere = cfg.with_section("secrets", keys=f"file:{other}")
    assert Notifier(store, elsewhere).run_once(ts(T0, 60))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert "not in this process's key ring" in doc["last_error"]
    assert login_smtp.tried == [] and login_smtp.inbox.messages() == []
    # the right ring: sent
    assert Notifier(store, with_ring).run_once(ts(T0, 200))["sent"] == 1
    assert login_smtp.tried == [PASSWORD.encode()]


def test_webhook_urls_and_secrets_from_the_store_and_no_url_anywhere(
    store, box, keys, receiver, caplog
):
    ops = Operations(store)
    secret_url = f"{receiver.url}?token={URL_TOKEN}"  # a Slack-style URL: itself the secret
    ops.set_secret("alice", box, "slack.url", secret_url)
    ops.set_secret("alice", box, "hook.key", HOOK_SECRET)
    hooks = (
        {"url_secret": "slack.url", "secret_secret": "hook.key", "kinds": None},
        {"url": receiver.url, "secret_secret": "hook.key", "kinds": None},
    )
    cfg = config(None, webhooks=hooks).with_section("secrets", keys=f"file:{keys}")
    event = run_event(store, make_task(store), T0)
    caplog.set_level(logging.INFO, logger="cloudtask")

    counts = Notifier(store, cfg).run_once(ts(T0, 5))
    assert counts["sent"] == 2, Deliveries(store).for_event(event["_id"])
    for request in receiver.requests:  # signed with the stored secret
        expected = (
            "sha256=" + hmac.new(HOOK_SECRET.encode(), request["body"], hashlib.sha256).hexdigest()
        )
        assert request["headers"]["x-cloudtask-signature"] == expected
    targets = sorted(d["target"] for d in Deliveries(store).for_event(event["_id"]))
    assert targets == sorted(["secret:slack.url", receiver.url])
    stored = json.dumps(
        [list(store.db[n].find({})) for n in store.db.list_collection_names() if n != "secrets"],
        default=str,
    )
    for value in (URL_TOKEN, HOOK_SECRET):
        assert value not in stored and value not in caplog.text

    # the receiver behind the secret URL fails: the error names secret:slack.url, not the URL
    receiver.status = 500
    event2 = run_event(store, make_task(store, "second"), T0)
    Notifier(store, cfg).run_once(ts(T0, 10))
    docs = {d["target"]: d for d in Deliveries(store).for_event(event2["_id"])}
    assert docs["secret:slack.url"]["last_error"] == (
        "secret:slack.url answered HTTP 500 Internal Server Error"
    )
    assert URL_TOKEN not in json.dumps(docs, default=str) and URL_TOKEN not in caplog.text


def test_a_webhook_whose_secret_is_missing_is_not_posted(store, keys, receiver):
    hooks = ({"url_secret": "slack.url", "secret": "plain", "kinds": None},)
    cfg = config(None, webhooks=hooks).with_section("secrets", keys=f"file:{keys}")
    event = run_event(store, make_task(store), T0)
    assert Notifier(store, cfg).run_once(ts(T0, 5))["retried"] == 1
    (doc,) = Deliveries(store).for_event(event["_id"])
    assert doc["target"] == "secret:slack.url"
    assert doc["last_error"] == (
        "the webhook secret:slack.url cannot be used: no secret named 'slack.url'"
    )
    assert receiver.requests == []


def test_settings_name_secrets_and_are_checked_like_the_file():
    check = ALERTS_CHECKS["webhooks"]
    assert check([{"url_secret": "slack", "secret_secret": "key"}]) == (
        {"kinds": None, "url_secret": "slack", "secret_secret": "key"},
    )
    for hooks, path, needle in (
        (
            [{"url": "https://x.example", "url_secret": "a", "secret": "s"}],
            "[0].url_secret",
            "either",
        ),
        ([{"url_secret": "9lives", "secret": "s"}], "[0].url_secret", "name of a stored secret"),
        ([{"url_secret": "a"}], "[0].secret", "secret_secret"),
        ([{"url_secret": "a", "secret": "s", "key": 1}], "[0].key", "unknown key"),
    ):
        with pytest.raises(ValueError, match=needle) as caught:
            check(hooks)
        assert caught.value.subpath == path
    with pytest.raises(ValueError, match="name of a stored secret"):
        ALERTS_CHECKS["smtp_password_secret"]("bad name")


def test_saving_settings_that_name_a_missing_secret_is_refused_at_its_path(store, box):
    ops = Operations(store)
    data = {
        "smtp_password_secret": "mail.password",
        "webhooks": [{"url_secret": "slack.url", "secret_secret": "hook.key"}],
    }
    with pytest.raises(ValidationError) as caught:
        ops.save_alert_settings("root", data)
    assert [(p.path, p.message) for p in caught.value.problems] == [
        ("smtp_password_secret", "no secret named 'mail.password'"),
        ("webhooks[0].url_secret", "no secret named 'slack.url'"),
        ("webhooks[0].secret_secret", "no secret named 'hook.key'"),
    ]
    for name, value in (
        ("mail.password", PASSWORD),
        ("slack.url", "https://x.example/T"),
        ("hook.key", HOOK_SECRET),
    ):
        ops.set_secret("root", box, name, value)
    before, after = ops.save_alert_settings("root", data)
    assert after["smtp_password_secret"] == "mail.password"
    (entry,) = store.audit.find({"action": "settings.alerts"})
    assert entry["after"]["secret_names"] == ["hook.key", "mail.password", "slack.url"]
    assert PASSWORD not in json.dumps(entry, default=str)

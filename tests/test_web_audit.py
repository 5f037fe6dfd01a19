"""The audit log (issue 12, item 5), on a real store through the Flask test client and the
command line: every upload (page, API, CLI; stored, unchanged or refused), login, failed
login, lockout, logout, test mail, user deletion and token change is recorded, and no entry
holds a credential or a webhook URL (task env values and http headers named like
credentials, passwords in URLs, webhook URLs, tokens), neither stored nor on the audit page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ADMIN, OPERATOR, VIEWER, SmtpServer, make_web_app

from cloudtask.cli import cli
from cloudtask.config import load_config
from cloudtask.localservers import free_port
from cloudtask.operations import Operations
from cloudtask.users import Users

ROOT = Path(__file__).resolve().parent.parent
MASK, CHANGED = "***", "*** (changed)"  # as cloudtask.operations.audit writes them
SECRETS = {
    "env": "env-pass-Zz91",
    "header": "hdr-token-Yy22",
    "url_password": "urlpass-Xx33",
    "query": "qtok-Ww44",
    "slack": "slackpath-Vv55",
    "webhook_secret": "hook-secret-Uu66",
    "api_key": "apikey-Tt77",
}


@pytest.fixture
def app(store):
    return make_web_app(store, users=[ADMIN, OPERATOR, VIEWER])


def login_form_token(client) -> str:
    page = client.get("/login").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def log_in(client, username, password):
    data = {"username": username, "password": password, "csrf_token": login_form_token(client)}
    return client.post("/login", data=data)


def page_token(client, path="/tasks") -> str:
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


def entries(store, action_prefix: str = "") -> list[dict]:
    docs = list(store.db["audit"].find({}).sort("at", 1))
    return [d for d in docs if d["action"].startswith(action_prefix)]


# --- the door: logins, failures, lockouts, logouts ------------------------------------------


def test_logins_failed_logins_lockouts_and_logouts_are_audited(app, store):
    browser = app.test_client()
    assert log_in(browser, OPERATOR.name, OPERATOR.password).status_code == 302
    (login,) = entries(store, "auth.login")
    assert (login["actor"], login["target"]) == ("op1", "user:op1")
    assert login["after"]["address"] == "127.0.0.1"
    assert browser.post("/logout", data={"csrf_token": page_token(browser)}).status_code == 302
    (logout,) = entries(store, "auth.logout")
    assert (logout["actor"], logout["target"]) == ("op1", "user:op1")

    stranger = app.test_client()
    for i in range(5):
        assert log_in(stranger, VIEWER.name, f"guess number {i}").status_code == 401
    failed = entries(store, "auth.login_failed")
    assert len(failed) == 5 and all(e["target"] == "user:viewer1" for e in failed)
    assert all(e["actor"] == "anonymous" and e["after"]["during"] == "login" for e in failed)
    (lockout,) = entries(store, "auth.lockout")
    assert lockout["target"] == "user:viewer1" and lockout["after"]["reason"] == "pair"
    assert lockout["after"]["seconds"] > 0
    assert log_in(stranger, VIEWER.name, VIEWER.password).status_code == 429
    assert len(entries(store, "auth.lockout")) == 1  # the lockout once, not every refusal

    # a name that is nobody's may be a password typed in the wrong field: never stored
    log_in(app.test_client(), "my-Secret-Passw0rd", "whatever")
    last = entries(store, "auth.login_failed")[-1]
    assert last["target"] == "user:(unknown)" and "my-Secret-Passw0rd" not in str(last)
    for entry in entries(store, "auth."):
        assert "guess number" not in str(entry) and VIEWER.password not in str(entry)


def test_wrong_current_passwords_on_the_password_page_are_audited(app, store):
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    token = page_token(browser)
    for i in range(5):
        browser.post(
            "/account/password",
            data={"current": f"wrong {i} guess", "new": "whatever passphrase", "csrf_token": token},
        )
    failed = entries(store, "auth.login_failed")
    assert len(failed) == 5 and all(e["actor"] == "op1" for e in failed)
    assert {e["after"]["during"] for e in failed} == {"password change"}
    (lockout,) = entries(store, "auth.lockout")
    assert lockout["actor"] == "op1"


# --- uploads --------------------------------------------------------------------------------


def test_every_upload_is_audited_from_the_page_the_api_and_the_cli(
    app, store, mongo_server, mongo_db_name, tmp_path
):
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    token = page_token(browser, "/files")

    def page_upload(name, data):
        from io import BytesIO

        form = {"csrf_token": token, "file": (BytesIO(data), name)}
        return browser.post("/files", data=form, content_type="multipart/form-data")

    assert page_upload("page.sh", b"echo page").status_code == 302
    assert page_upload("page.sh", b"echo page").status_code == 302  # the same bytes again
    api_token = Users(store).create_token(OPERATOR.name, "ci")
    api = app.test_client()
    headers = {"Authorization": f"Bearer {api_token}", "Content-Type": "text/plain"}
    assert (
        api.post("/api/v1/files?name=api.sh", data=b"echo api", headers=headers).status_code == 201
    )
    assert (
        api.post("/api/v1/files?name=api.sh", data=b"echo api", headers=headers).status_code == 200
    )
    bad = api.post("/api/v1/files?name=bad.zip", data=b"not a zip at all", headers=headers)
    assert bad.status_code == 422
    script = tmp_path / "cli.sh"
    script.write_text("echo cli\n")
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    for _ in range(2):
        result = CliRunner().invoke(cli, ["file", "put", str(script)], env=env)
        assert result.exit_code == 0, result.output

    uploads = [(e["actor"], e["action"], e["target"]) for e in entries(store, "file.upload")]
    cli_actor = uploads[-1][0]
    assert cli_actor.startswith("cli:")
    assert uploads == [
        ("op1", "file.upload", "file:page.sh"),
        ("op1", "file.upload.unchanged", "file:page.sh"),
        ("op1", "file.upload", "file:api.sh"),
        ("op1", "file.upload.unchanged", "file:api.sh"),
        ("op1", "file.upload.refused", "file:bad.zip"),
        (cli_actor, "file.upload", "file:cli.sh"),
        (cli_actor, "file.upload.unchanged", "file:cli.sh"),
    ]
    refused = entries(store, "file.upload.refused")[0]["after"]
    assert refused["size"] == len(b"not a zip at all") and refused["problems"]


# --- the test mail --------------------------------------------------------------------------


def test_a_test_mail_is_audited_whether_or_not_it_was_sent(store):
    server = SmtpServer(free_port()).start()
    try:
        cfg = load_config(None, environ={}).with_section(
            "alerts",
            smtp_host="127.0.0.1",
            smtp_port=server.port,
            smtp_security="none",
            smtp_timeout=5.0,
            mail_from="CloudTask <alerts@example.com>",
        )
        app = make_web_app(store, config=cfg, users=[ADMIN])
        admin = app.test_client()
        log_in(admin, ADMIN.name, ADMIN.password)
        token = page_token(admin, "/settings")
        answer = admin.post(
            "/settings/test-mail", data={"csrf_token": token, "to": "me@example.com"}
        )
        assert answer.status_code == 302 and len(server.inbox.messages()) == 1
    finally:
        server.stop()
    # the server is gone: the next one fails, and is recorded too
    admin.post("/settings/test-mail", data={"csrf_token": token, "to": "you@example.com"})
    sent, failed = entries(store, "settings.test_mail")
    assert sent["actor"] == "root" and sent["target"] == "settings:alerts"
    assert sent["after"] == {
        "to": "me@example.com",
        "server": f"127.0.0.1:{server.port}",
        "sent": True,
    }
    assert failed["after"]["sent"] is False and failed["after"]["to"] == "you@example.com"
    assert "connect" in failed["after"]["error"]


# --- users and tokens -----------------------------------------------------------------------


def test_token_changes_and_user_deletion_are_audited(app, store, mongo_server, mongo_db_name):
    env = {"CLOUDTASK_MONGO_URI": mongo_server.uri, "CLOUDTASK_MONGO_DATABASE": mongo_db_name}
    result = CliRunner().invoke(
        cli,
        ["token", "create", "viewer1", "--name", "grafana", "--expires-in", "30", "--read-only"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert token.startswith("ct_")
    me = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.get_json()["token"]["scope"] == "read" and me.get_json()["token"]["expires_at"]
    bad = CliRunner().invoke(cli, ["token", "create", "viewer1", "--expires-in", "0"], env=env)
    assert bad.exit_code != 0 and "expires_in" in bad.output and "Traceback" not in bad.output
    (created,) = entries(store, "token.create")
    assert created["after"]["scope"] == "read" and created["after"]["name"] == "grafana"
    assert token not in str(created)

    admin = app.test_client()
    log_in(admin, ADMIN.name, ADMIN.password)
    csrf = page_token(admin)
    token_id = Users(store).list_tokens("viewer1")[0]["id"]
    admin.post(f"/users/viewer1/tokens/{token_id}/revoke", data={"csrf_token": csrf})
    admin.post("/users/viewer1/delete", data={"csrf_token": csrf, "confirm": "viewer1"})
    (revoked,) = entries(store, "token.revoke")
    assert revoked["before"] == {"token_id": token_id, "name": "grafana"}
    (deleted,) = entries(store, "user.delete")
    assert deleted["actor"] == "root" and deleted["target"] == "user:viewer1"
    assert deleted["before"]["role"] == "viewer" and deleted["after"] is None
    assert "password_hash" not in str(deleted) and "scrypt" not in str(deleted)


# --- masking --------------------------------------------------------------------------------


def _secret_task_specs() -> tuple[dict, dict]:
    command = {
        "name": "with-secrets",
        "schedule": {"every": "1h"},
        "command": "true",
        "env": {"DB_PASSWORD": SECRETS["env"], "API_KEY": SECRETS["api_key"], "MODE": "visible"},
    }
    http = {
        "name": "calls-a-service",
        "schedule": {"every": "1h"},
        "http": {
            "url": (
                f"https://bot:{SECRETS['url_password']}@api.example.com/run"
                f"?token={SECRETS['query']}&page=2"
            ),
            "headers": {"Authorization": f"Bearer {SECRETS['header']}", "Accept": "text/plain"},
        },
    }
    return command, http


def test_credentials_and_webhook_urls_are_masked_in_every_entry(app, store):
    command, http = _secret_task_specs()
    ops = Operations(store)
    made = ops.create_task("op1", command)
    ops.create_task("op1", http)
    changed = dict(command, env=dict(command["env"], DB_PASSWORD="rotated-Ss88"))
    ops.replace_task("op1", made["_id"], changed)
    slack = f"https://hooks.slack.com/services/T000/B000/{SECRETS['slack']}"
    ops.save_alert_settings(
        "root", {"webhooks": [{"url": slack, "secret": SECRETS["webhook_secret"]}]}
    )

    text = repr(entries(store))
    for name, secret in [*SECRETS.items(), ("rotated", "rotated-Ss88")]:
        assert secret not in text, name
    create = entries(store, "task.create")[0]
    assert create["after"]["env"] == {"DB_PASSWORD": MASK, "API_KEY": MASK, "MODE": "visible"}
    update = entries(store, "task.update")[0]
    assert update["before"]["env"]["DB_PASSWORD"] == MASK
    assert update["after"]["env"]["DB_PASSWORD"] == CHANGED  # it changed; to what is not said
    assert update["after"]["env"]["API_KEY"] == MASK
    http_entry = entries(store, "task.create")[1]["after"]["http"]
    assert http_entry["headers"] == {"Authorization": MASK, "Accept": "text/plain"}
    (url,) = http_entry["urls"]
    assert url == f"https://bot:{MASK}@api.example.com/run?token={MASK}&page=2"
    (settings,) = entries(store, "settings.alerts")
    assert settings["after"]["webhooks"][0]["url"] == f"https://hooks.slack.com/{MASK}"

    # the task itself keeps its values: only the audit log is masked
    assert store.get_task(made["_id"])["spec"]["env"]["DB_PASSWORD"] == "rotated-Ss88"
    # and the audit page shows none of them to a viewer
    viewer = app.test_client()
    log_in(viewer, VIEWER.name, VIEWER.password)
    page = viewer.get("/audit?per_page=200").get_data(as_text=True)
    assert "with-secrets" in page and "env.DB_PASSWORD" in page
    for name, secret in [*SECRETS.items(), ("rotated", "rotated-Ss88")]:
        assert secret not in page, name


def test_entries_written_before_masking_are_masked_on_the_page(app, store):
    store.add_audit(
        "bob",
        "task.update",
        "task:old",
        {"env": {"TOKEN": "old-tok-Rr11"}},
        {"env": {"TOKEN": "new-tok-Qq22"}, "webhook_url": "https://hooks.example.com/abc-Pp33"},
    )
    viewer = app.test_client()
    log_in(viewer, VIEWER.name, VIEWER.password)
    page = viewer.get("/audit").get_data(as_text=True)
    for secret in ("old-tok-Rr11", "new-tok-Qq22", "abc-Pp33"):
        assert secret not in page
    assert "env.TOKEN" in page and "*** (changed)" in page


def test_what_counts_as_a_credential():
    from cloudtask.operations.audit import is_secret_key, mask_pair, scrub_text

    secret = [
        "password",
        "DB_PASSWORD",
        "smtp_password",
        "secret",
        "GITHUB_TOKEN",
        "X-Auth-Token",
        "Authorization",
        "Proxy-Authorization",
        "X-Api-Key",
        "apiKey",
        "AWS_SECRET_ACCESS_KEY",
        "SSH_PRIVATE_KEY",
        "Cookie",
        "password_hash",
        "hash",
        "DB_PASS",
        "key",
    ]
    plain = [
        "name",
        "token_id",
        "token_name",
        "password_changed",
        "secrets_changed",
        "smtp_password_env",
        "AWS_ACCESS_KEY_ID",
        "TOKEN_FILE",
        "session_epoch",
        "keepalive",
        "MODE",
        "sha256",
        "expires_at",
        "scope",
    ]
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in plain if is_secret_key(k)] == []
    assert scrub_text("curl -H 'Authorization: Bearer abcdef123456' x") == (
        f"curl -H 'Authorization: Bearer {MASK}' x"
    )
    assert scrub_text("postgres://app:pw-secret@db:5432/x") == f"postgres://app:{MASK}@db:5432/x"
    assert scrub_text("use ct_" + "a" * 40) == f"use {MASK}"
    # a reference to a stored secret names no value: kept
    before, after = mask_pair(None, {"env": {"DB_PASSWORD": {"secret": "db"}}})
    assert after == {"env": {"DB_PASSWORD": {"secret": "db"}}}


def test_only_the_operations_write_audit_entries():
    """Every entry goes through OperationsBase.audit, which masks it: nothing else in the
    site, the CLI or the servers calls the store's add_audit."""
    callers = []
    for path in [*(ROOT / "cloudtask").rglob("*.py"), *(ROOT / "web").rglob("*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("cloudtask/store/") or rel == "cloudtask/operations/base.py":
            continue
        if re.search(r"\badd_audit\(", path.read_text()):
            callers.append(rel)
    assert callers == [], "write audit entries with OperationsBase.audit: it masks credentials"

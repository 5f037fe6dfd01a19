"""The settings page (admin only) on a real store, with a real aiosmtpd SMTP server on a free
port for the test mail: the form shows the config file's values and the database's overrides,
saving stores what differs from the file (and load_settings sees it), every problem is shown at
its field (with its line in the lists) with 422 and the input kept, the SMTP password and the
webhook secrets never reach the page and are kept when left alone, the audit entry hides them,
the test mail arrives (or its failure is said), and only admins get in."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult
from helpers import ADMIN, OPERATOR, VIEWER, Inbox, SmtpServer, make_web_app, web_login

from cloudtask.config import Config, load_config
from cloudtask.localservers import free_port
from cloudtask.notify import load_settings, save_settings, stored_settings

FILE_PASSWORD = "file-pass-Zq81"
FILE_SECRET = "file-secret-Kx42"
FILE_HOOK = "https://hooks.example.com/file"
DB_PASSWORD = "db-pass-Wm27"
DB_SECRET = "db-secret-Pv93"
MASK = "********"


# --- a real SMTP server ------------------------------------------------------------------------


@pytest.fixture
def smtp() -> Iterator[tuple[int, Inbox]]:
    server = SmtpServer(free_port()).start()
    yield server.port, server.inbox
    server.stop()


# --- the app -----------------------------------------------------------------------------------


def config(**alerts: Any) -> Config:
    """A config whose file sets a password and a webhook; the SMTP port is a closed one."""
    values: dict[str, Any] = dict(
        smtp_host="127.0.0.1",
        smtp_port=free_port(),
        smtp_security="none",
        smtp_timeout=5.0,
        smtp_password=FILE_PASSWORD,
        mail_from="CloudTask <alerts@example.com>",
        operators=("ops@example.com",),
        webhooks=({"url": FILE_HOOK, "secret": FILE_SECRET, "kinds": None},),
    )
    values.update(alerts)
    return load_config(None, environ={}).with_section("alerts", **values)


@pytest.fixture
def cfg() -> Config:
    return config()


@pytest.fixture
def app(store, cfg):
    return make_web_app(store, config=cfg, users=[ADMIN, OPERATOR, VIEWER])


@pytest.fixture
def admin(app):
    client = app.test_client()
    client.csrf = web_login(client, ADMIN.name, ADMIN.password, "/settings")
    return client


class FormReader(HTMLParser):
    """The fields of one form as a browser would post them (checked boxes, selected options)."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id = form_id
        self.inside = False
        self.values: dict[str, list[str]] = {}
        self.textarea: str | None = None
        self.select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        if not self.inside:
            return
        if tag == "input" and a.get("name"):
            if a.get("type") == "checkbox" and "checked" not in a:
                return
            self.values.setdefault(a["name"], []).append(a.get("value", ""))
        elif tag == "textarea":
            self.textarea = a["name"]
            self.values[self.textarea] = [""]
        elif tag == "select":
            self.select = a["name"]
        elif tag == "option" and self.select and "selected" in a:
            self.values[self.select] = [a["value"]]

    def handle_data(self, data: str) -> None:
        if self.textarea:
            self.values[self.textarea][0] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea":
            self.textarea = None
        elif tag == "select":
            self.select = None
        elif tag == "form":
            self.inside = False


def form_of(page: str) -> dict[str, list[str]]:
    reader = FormReader("settings-form")
    reader.feed(page)
    # a textarea's first new line is dropped by browsers
    return {k: [v.removeprefix("\n") for v in vs] for k, vs in reader.values.items()}


def page_of(client, path: str = "/settings") -> str:
    answer = client.get(path)
    assert answer.status_code == 200, answer.status_code
    return answer.get_data(as_text=True)


def post_settings(client, change: dict[str, Any] | None = None, page: str | None = None):
    """Post the settings form as the page holds it, with some fields changed."""
    data: dict[str, Any] = form_of(page or page_of(client))
    data.update(change or {})
    data["csrf_token"] = client.csrf
    return client.post("/settings", data=data)


def errors_of(page: str, field: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(rf'data-error="{field}">([^<]*)<', page)]


def source_of(page: str, field: str) -> str:
    found = re.search(rf'data-source="{field}">(.*?)</small>', page, re.S)
    assert found, field
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", found.group(1))).split())


def flashes(page: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'<p class="flash [a-z]+">([^<]*)</p>', page)]


# --- the form ---------------------------------------------------------------------------------


def test_the_form_shows_the_file_values_then_the_database_overrides(admin, store, cfg):
    page = page_of(admin)
    form = form_of(page)
    assert form["smtp_host"] == ["127.0.0.1"]
    assert form["smtp_port"] == [str(cfg.alerts.smtp_port)]
    assert form["smtp_security"] == ["none"]
    assert form["smtp_timeout"] == ["5s"] and form["alert_interval"] == ["15m"]
    assert form["operators"] == ["ops@example.com"]
    assert source_of(page, "smtp_host") == "config file"
    assert "reset" not in form  # nothing to reset: nothing is stored

    save_settings(
        store,
        {"smtp_host": "mail.example.org", "alert_interval": "5m", "operators": ["a@example.org"]},
    )
    page = page_of(admin)
    form = form_of(page)
    assert form["smtp_host"] == ["mail.example.org"] and form["alert_interval"] == ["5m"]
    assert form["operators"] == ["a@example.org"]
    assert source_of(page, "smtp_host").startswith("database overrides the config file: 127.0.0.1")
    assert "file: 15m" in source_of(page, "alert_interval")
    assert "file: ops@example.com" in source_of(page, "operators")
    assert source_of(page, "smtp_port") == "config file"  # not overridden


def test_the_settings_link_is_for_admins_only(app, admin):
    assert 'href="/settings" class="here">Settings</a>' in page_of(admin)
    operator = app.test_client()
    web_login(operator, OPERATOR.name, OPERATOR.password)
    assert 'href="/settings"' not in operator.get("/").get_data(as_text=True)


# --- saving -----------------------------------------------------------------------------------


def test_saving_valid_settings_stores_them_and_the_notifier_sees_them(admin, store, cfg):
    answer = post_settings(
        admin,
        {
            "smtp_host": " mail.example.org ",
            "smtp_port": "2525",
            "smtp_security": "starttls",
            "smtp_user": "alerts",
            "smtp_password_env": "CLOUDTASK_SMTP_PASSWORD",
            "mail_from": "Alerts <alerts@example.org>",
            "smtp_timeout": "30s",
            "operators": "ops@example.com, oncall@example.com\nlead@example.com",
            "operators_by_kind": (
                "run.failed: dba@example.com, b@example.com\n\nagent.left: x@example.com"
            ),
            "operators_by_group": "batch: batch@example.com",
            "alert_interval": "5m",
            "webhooks": (
                f"{FILE_HOOK} {MASK}\nhttps://new.example.com/h new-secret run.failed, run.lost"
            ),
            "webhook_timeout": "3s",
        },
    )
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/settings")
    page = admin.get("/settings").get_data(as_text=True)
    assert any(m.startswith("Alert settings saved") for m in flashes(page))

    s = load_settings(store, cfg, environ={})
    assert (s.smtp_host, s.smtp_port, s.smtp_security) == ("mail.example.org", 2525, "starttls")
    assert (s.smtp_user, s.smtp_password_env, s.smtp_timeout) == (
        "alerts",
        "CLOUDTASK_SMTP_PASSWORD",
        30,
    )
    assert s.sender == "Alerts <alerts@example.org>"
    assert s.operators == ("ops@example.com", "oncall@example.com", "lead@example.com")
    assert s.by_kind("run.failed") == ("dba@example.com", "b@example.com")
    assert s.by_kind("agent.left") == ("x@example.com",)
    assert s.by_group("batch") == ("batch@example.com",)
    assert (s.alert_interval, s.webhook_timeout) == (300, 3)
    assert [(h.url, h.secret, h.kinds) for h in s.webhooks] == [
        (FILE_HOOK, FILE_SECRET, None),  # the masked secret is the file's, kept
        ("https://new.example.com/h", "new-secret", ("run.failed", "run.lost")),
    ]
    assert s.smtp_password == FILE_PASSWORD  # blank, nothing stored: the file's
    assert "smtp_password" not in s.from_database
    assert "webhooks" in s.from_database and "smtp_host" in s.from_database


def test_the_form_saved_unchanged_stores_nothing_and_the_file_applies(admin, store, cfg):
    answer = post_settings(admin)
    assert answer.status_code == 302
    assert stored_settings(store) == {}
    assert "Nothing changed" in " ".join(flashes(page_of(admin)))
    assert store.audit.find_one({"action": "settings.alerts"}) is None
    s = load_settings(store, cfg, environ={})
    assert s.smtp_password == FILE_PASSWORD and s.webhooks[0].secret == FILE_SECRET


def test_a_value_typed_back_to_the_files_or_reset_follows_the_file_again(admin, store):
    save_settings(store, {"smtp_host": "mail.example.org", "alert_interval": 60})
    assert post_settings(admin, {"smtp_host": "127.0.0.1"}).status_code == 302
    assert stored_settings(store) == {"alert_interval": 60}
    page = page_of(admin)
    assert 'name="reset" value="alert_interval"' in page
    assert post_settings(admin, {"reset": "alert_interval"}, page).status_code == 302
    assert stored_settings(store) == {}
    assert source_of(page_of(admin), "alert_interval") == "config file"


@pytest.mark.parametrize(
    "field, typed, needle",
    [
        ("smtp_port", "70000", "expected a whole number from 1 to 65535, got 70000"),
        ("smtp_port", "many", "expected a whole number from 1 to 65535"),
        ("smtp_timeout", "soon", "is not a duration"),
        ("mail_from", "nobody", "expected an address such as"),
        ("smtp_password_env", "MY PASS", "expected the name of an environment variable"),
        (
            "operators",
            "ops@example.com\nnot-an-address",
            "line 2: 'not-an-address' is not an email",
        ),
        ("operators_by_kind", "run.oops: a@example.com", 'line 1: "run.oops" is not an event kind'),
        ("operators_by_kind", "\nrun.failed a@example.com", "line 2: expected 'event kind: a@"),
        ("operators_by_group", "batch: a@example.com, wrong", "line 1: 'wrong' is not an email"),
        (
            "webhooks",
            f"{FILE_HOOK} {MASK}\nftp://h/x s3",
            "line 2: expected an http:// or https://",
        ),
        ("webhooks", "https://h.example.com/x", "line 1: expected 'URL SECRET'"),
        ("webhooks", "https://h.example.com/x s kinds run.oops", 'line 1: "kinds run.oops" is not'),
        (
            "webhooks",
            f"https://other.example.com/x {MASK}\n{FILE_HOOK} {MASK}",
            "line 1: no stored",
        ),
    ],
)
def test_a_bad_value_is_shown_at_its_field_with_422_and_the_input_kept(
    admin, store, field, typed, needle
):
    answer = post_settings(admin, {field: typed, "smtp_host": "kept.example.org"})
    assert answer.status_code == 422
    page = answer.get_data(as_text=True)
    assert any(needle in e for e in errors_of(page, field)), errors_of(page, field)
    form = form_of(page)
    assert form[field] == [typed] and form["smtp_host"] == ["kept.example.org"]
    assert "The settings were not saved" in page
    assert stored_settings(store) == {}  # nothing saved


def test_every_problem_is_shown_at_once(admin, store):
    answer = post_settings(
        admin,
        {"smtp_port": "0", "webhooks": "https://h.example.com/x", "operators": "a@x.org, b"},
    )
    assert answer.status_code == 422
    page = answer.get_data(as_text=True)
    assert errors_of(page, "smtp_port") and errors_of(page, "webhooks")
    assert errors_of(page, "operators") == [
        "line 1: 'b' is not an email address such as ops@example.com"
    ]
    assert stored_settings(store) == {}


# --- secrets ----------------------------------------------------------------------------------


def test_the_password_never_reaches_the_page_blank_keeps_it_the_box_removes_it(admin, store, cfg):
    page = page_of(admin)
    assert FILE_PASSWORD not in page
    assert "The config file sets a password" in page and "remove_password" not in page

    assert post_settings(admin, {"smtp_password": DB_PASSWORD}).status_code == 302
    assert stored_settings(store)["smtp_password"] == DB_PASSWORD
    page = page_of(admin)
    assert DB_PASSWORD not in page and FILE_PASSWORD not in page
    assert "A password is stored" in page
    assert form_of(page)["smtp_password"] == [""]
    assert "file: a password" in source_of(page, "smtp_password")

    assert post_settings(admin, {"smtp_host": "other.example.org"}, page).status_code == 302
    assert stored_settings(store)["smtp_password"] == DB_PASSWORD  # blank: kept

    answer = post_settings(admin, {"smtp_port": "x", "smtp_password": "typed-Ab93"})
    assert answer.status_code == 422
    failed = answer.get_data(as_text=True)
    assert "typed-Ab93" not in failed and DB_PASSWORD not in failed
    assert "The password you typed was not kept" in failed

    answer = post_settings(admin, {"smtp_password": "typed-Ab93", "remove_password": "on"})
    assert answer.status_code == 422
    assert errors_of(answer.get_data(as_text=True), "smtp_password")

    assert post_settings(admin, {"remove_password": "on"}).status_code == 302
    assert "smtp_password" not in stored_settings(store)
    assert load_settings(store, cfg, environ={}).smtp_password == FILE_PASSWORD


def test_webhook_secrets_are_masked_and_kept(admin, store, cfg):
    page = page_of(admin)
    assert FILE_SECRET not in page
    assert form_of(page)["webhooks"] == [f"{FILE_HOOK} {MASK}"]

    save_settings(
        store,
        {
            "webhooks": [
                {"url": "https://a.example.com/1", "secret": DB_SECRET, "kinds": ["run.failed"]},
                {"url": FILE_HOOK, "secret": FILE_SECRET},
            ]
        },
    )
    page = page_of(admin)
    assert DB_SECRET not in page and FILE_SECRET not in page
    assert form_of(page)["webhooks"] == [
        f"https://a.example.com/1 {MASK} run.failed\n{FILE_HOOK} {MASK}"
    ]
    assert "file: https://hooks.example.com/file ********" in source_of(page, "webhooks")

    # reordered, one URL edited, one kind added: the masks keep each webhook's own secret
    edited = f"{FILE_HOOK} {MASK}\nhttps://b.example.com/2 {MASK} run.failed,run.lost"
    assert post_settings(admin, {"webhooks": edited}, page).status_code == 302
    hooks = load_settings(store, cfg).webhooks
    assert [(h.url, h.secret, h.kinds) for h in hooks] == [
        (FILE_HOOK, FILE_SECRET, None),
        ("https://b.example.com/2", DB_SECRET, ("run.failed", "run.lost")),
    ]
    assert DB_SECRET not in page_of(admin)


def test_the_audit_entry_hides_the_secrets(admin, store):
    save_settings(store, {"smtp_password": DB_PASSWORD, "smtp_host": "old.example.org"})
    answer = post_settings(
        admin,
        {
            "smtp_host": "new.example.org",
            "smtp_password": "new-pass-Tt55",
            "webhooks": f"{FILE_HOOK} rotated-Qq11\nhttps://n.example.com/x {DB_SECRET}",
        },
    )
    assert answer.status_code == 302
    (entry,) = store.audit.find({"action": "settings.alerts"})
    assert entry["actor"] == ADMIN.name and entry["target"] == "settings:alerts"
    assert entry["before"] == {"smtp_host": "old.example.org", "smtp_password": "(hidden)"}
    after = entry["after"]
    assert after["smtp_host"] == "new.example.org" and after["smtp_password"] == "(hidden)"
    assert [h["secret"] for h in after["webhooks"]] == ["(hidden)", "(hidden)"]
    assert after["secrets_changed"] == ["smtp_password"]  # the file's webhook is new here
    text = repr(entry)
    for secret in (DB_PASSWORD, "new-pass-Tt55", "rotated-Qq11", DB_SECRET, FILE_SECRET):
        assert secret not in text
    audit_page = admin.get("/audit").get_data(as_text=True)
    assert "settings.alerts" in audit_page and "new-pass-Tt55" not in audit_page


# --- the test mail ----------------------------------------------------------------------------


def test_the_test_mail_arrives_with_the_saved_settings(admin, store, smtp):
    port, inbox = smtp
    # the file names a closed port: the page's saved port is the one used
    assert post_settings(admin, {"smtp_port": str(port)}).status_code == 302
    answer = admin.post(
        "/settings/test-mail", data={"csrf_token": admin.csrf, "to": "me@example.com"}
    )
    assert answer.status_code == 302
    assert re.search(r"/settings\?to=me(@|%40)example.com#test-mail$", answer.headers["Location"])
    page = admin.get(answer.headers["Location"]).get_data(as_text=True)
    assert any(m.startswith("Test mail sent to me@example.com") for m in flashes(page))
    assert form_of(page) and 'name="to" value="me@example.com"' in page
    ((rcpts, msg),) = inbox.messages()
    (envelope,) = inbox.envelopes
    assert envelope.mail_from == "alerts@example.com" and rcpts == ["me@example.com"]
    assert msg["From"] == "CloudTask <alerts@example.com>" and msg["To"] == "me@example.com"
    assert msg["Subject"].startswith("[CloudTask] TEST")


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_the_test_mail_logs_in_with_the_stored_password(admin, store):
    def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
        ok = auth_data.login == b"alerts" and auth_data.password == DB_PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    server = SmtpServer(
        free_port(), authenticator=authenticator, auth_required=True, auth_require_tls=False
    ).start()
    inbox, port = server.inbox, server.port
    try:
        change = {"smtp_port": str(port), "smtp_user": "alerts", "smtp_password": DB_PASSWORD}
        assert post_settings(admin, change).status_code == 302
        # saved again with the password left blank: the stored one is kept and used
        assert post_settings(admin, {"smtp_timeout": "6s"}).status_code == 302
        data = {"csrf_token": admin.csrf, "to": "me@example.com"}
        answer = admin.post("/settings/test-mail", data=data, follow_redirects=True)
        assert any(m.startswith("Test mail sent") for m in flashes(answer.get_data(as_text=True)))
        assert len(inbox.messages()) == 1
    finally:
        server.stop()


def test_a_test_mail_to_a_closed_port_says_so(admin, cfg):
    data = {"csrf_token": admin.csrf, "to": "me@example.com"}
    answer = admin.post("/settings/test-mail", data=data)
    assert answer.status_code == 302
    page = admin.get(answer.headers["Location"]).get_data(as_text=True)
    (message,) = [m for m in flashes(page) if "test mail" in m]
    assert message == (
        "the test mail was not sent: cannot connect to the SMTP server "
        f"127.0.0.1:{cfg.alerts.smtp_port}: connection refused"
    )


def test_a_test_mail_with_mail_off_says_so(store):
    app = make_web_app(store, config=config(smtp_host=""), users=[ADMIN])
    client = app.test_client()
    csrf = web_login(client, ADMIN.name, ADMIN.password, "/settings")
    data = {"csrf_token": csrf, "to": "me@example.com"}
    page = client.post("/settings/test-mail", data=data, follow_redirects=True)
    assert "mail is off (alerts.smtp_host is empty)" in " ".join(
        flashes(page.get_data(as_text=True))
    )


@pytest.mark.parametrize(
    "to, needle",
    [("", "type the address"), ("me", "'me' is not an email address"), ("a b@x.org", "not an")],
)
def test_the_test_mail_needs_an_address(admin, smtp, to, needle):
    answer = admin.post("/settings/test-mail", data={"csrf_token": admin.csrf, "to": to})
    assert answer.status_code == 422
    (error,) = errors_of(answer.get_data(as_text=True), "to")
    assert needle in error
    assert smtp[1].messages() == []


# --- who may ----------------------------------------------------------------------------------


@pytest.mark.parametrize("user", [VIEWER, OPERATOR], ids=["viewer", "operator"])
def test_viewers_and_operators_get_403(app, store, smtp, user):
    client = app.test_client()
    csrf = web_login(client, user.name, user.password)
    assert client.get("/settings").status_code == 403
    data = {"csrf_token": csrf, "smtp_host": "evil.example.org", "to": "me@example.com"}
    assert client.post("/settings", data=data).status_code == 403
    assert client.post("/settings/test-mail", data=data).status_code == 403
    assert stored_settings(store) == {} and smtp[1].messages() == []


def test_anonymous_users_are_sent_to_the_login_page(app):
    answer = app.test_client().get("/settings")
    assert answer.status_code == 302 and "/login" in answer.headers["Location"]


def test_a_post_without_the_csrf_token_is_refused(admin, store):
    for path in ("/settings", "/settings/test-mail"):
        answer = admin.post(path, data={"smtp_host": "x.example.org", "to": "me@example.com"})
        assert answer.status_code == 400
        assert "security token" in answer.get_data(as_text=True)
    assert stored_settings(store) == {}

"""Sessions that really end, and what protects every request (issue 12, item 4), on a real
store through Flask's test client: sessions kept in MongoDB (logout, a password change or
reset, a role change, disabling or deleting a user end them at once; idle and absolute
timeouts), a new session id and CSRF token at login, the Secure flag, the CSRF exemption only
for a valid API token, security headers and ``Cache-Control: no-store``, the client address
behind trusted proxies, a login throttle strangers cannot use to lock an account, the same
time for every wrong login, and API tokens that expire or may only read."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import pytest
from helpers import ADMIN, OPERATOR, VIEWER, make_web_app

from cloudtask.config import Config
from cloudtask.users import Users

SPEC = {"name": "backup", "schedule": {"every": "1h"}, "command": ["sh", "-c", "echo hi"]}
TEMPLATES = Path(__file__).resolve().parent.parent / "web" / "templates"


@pytest.fixture
def app(store):
    return make_web_app(store, users=[ADMIN, OPERATOR, VIEWER])


def cookie_name(app) -> str:
    return app.config["SESSION_COOKIE_NAME"]


def login_form_token(client, address: str | None = None) -> str:
    environ = {"REMOTE_ADDR": address} if address else {}
    page = client.get("/login", environ_base=environ).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def log_in(client, username, password, address: str | None = None, headers=None):
    environ = {"REMOTE_ADDR": address} if address else {}
    data = {"username": username, "password": password, "csrf_token": login_form_token(client)}
    return client.post("/login", data=data, environ_base=environ, headers=headers or {})


def page_token(client, path="/tasks") -> str:
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)


def session_cookie(client, app) -> str:
    cookie = client.get_cookie(cookie_name(app))
    return cookie.value if cookie else ""


def with_cookie(app, value: str):
    """A new browser holding a copy of ``value`` as its session cookie."""
    other = app.test_client()
    other.set_cookie(cookie_name(app), value)
    return other


def logged_in(client) -> bool:
    return client.get("/tasks").status_code == 200


def stored_sessions(store, username: str) -> list[dict]:
    return list(store.db["sessions"].find({"user": username}))


# --- sessions end when they must -------------------------------------------------------------


def test_a_copied_cookie_stops_working_after_logout(app, store):
    browser = app.test_client()
    assert log_in(browser, OPERATOR.name, OPERATOR.password).status_code == 302
    copied = session_cookie(browser, app)
    thief = with_cookie(app, copied)
    assert logged_in(thief)  # the copy works while the session lives ...
    answer = browser.post("/logout", data={"csrf_token": page_token(browser)})
    assert answer.status_code == 302
    assert not logged_in(browser)
    assert not logged_in(thief)  # ... and not after the logout
    assert stored_sessions(store, OPERATOR.name) == []


def test_the_cookie_holds_only_a_random_id_and_the_store_only_its_hash(app, store):
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    value = session_cookie(browser, app)
    assert re.fullmatch(r"s\.[A-Za-z0-9_-]{43}", value), value
    (doc,) = stored_sessions(store, OPERATOR.name)
    assert value not in str(doc) and len(doc["_id"]) == 64


@pytest.mark.parametrize(
    "end",
    [
        lambda store: Users(store).set_password(OPERATOR.name, "a brand new passphrase"),
        lambda store: Users(store).set_enabled(OPERATOR.name, False, by=ADMIN.name),
        lambda store: Users(store).set_role(OPERATOR.name, "viewer", by=ADMIN.name),
        lambda store: Users(store).delete(OPERATOR.name, by=ADMIN.name),
    ],
    ids=["password reset", "disabled", "role change", "deleted"],
)
def test_a_reset_disable_role_change_or_delete_ends_every_session_at_once(app, store, end):
    browsers = [app.test_client() for _ in range(3)]
    for browser in browsers:
        assert log_in(browser, OPERATOR.name, OPERATOR.password).status_code == 302
    assert len(stored_sessions(store, OPERATOR.name)) == 3
    end(store)
    assert stored_sessions(store, OPERATOR.name) == []
    assert not any(logged_in(b) for b in browsers)


def test_the_admin_pages_end_the_users_sessions(app, store):
    admin = app.test_client()
    log_in(admin, ADMIN.name, ADMIN.password)
    token = page_token(admin)
    for action, data in (
        ("role", {"role": "viewer"}),
        ("password", {"password": "a new passphrase", "password2": "a new passphrase"}),
        ("disable", {}),
    ):
        victim = app.test_client()
        password = "a new passphrase" if action == "disable" else OPERATOR.password
        if action != "disable":
            Users(store).set_password(OPERATOR.name, OPERATOR.password)
        assert log_in(victim, OPERATOR.name, password).status_code == 302
        answer = admin.post(f"/users/op1/{action}", data={"csrf_token": token, **data})
        assert answer.status_code == 302, action
        assert not logged_in(victim), action
    assert stored_sessions(store, OPERATOR.name) == []
    Users(store).set_enabled(OPERATOR.name, True, by=ADMIN.name)
    victim = app.test_client()
    log_in(victim, OPERATOR.name, "a new passphrase")
    refused = admin.post("/users/op1/delete", data={"csrf_token": token, "confirm": "op"})
    assert refused.status_code == 422 and logged_in(victim)
    answer = admin.post("/users/op1/delete", data={"csrf_token": token, "confirm": "op1"})
    assert answer.status_code == 302 and not logged_in(victim)
    assert store.find_user(OPERATOR.name) is None
    own = admin.post("/users/root/delete", data={"csrf_token": token, "confirm": "root"})
    assert own.status_code == 409 and "your own account" in own.get_data(as_text=True)


def test_a_password_change_keeps_this_session_under_a_new_id_and_ends_the_others(app, store):
    here, elsewhere = app.test_client(), app.test_client()
    for browser in (here, elsewhere):
        log_in(browser, OPERATOR.name, OPERATOR.password)
    before = session_cookie(here, app)
    answer = here.post(
        "/account/password",
        data={
            "current": OPERATOR.password,
            "new": "another passphrase",
            "csrf_token": page_token(here),
        },
    )
    assert answer.status_code == 302
    after = session_cookie(here, app)
    assert after and after != before
    assert logged_in(here) and not logged_in(elsewhere)
    assert not logged_in(with_cookie(app, before))  # the id it had is void
    assert len(stored_sessions(store, OPERATOR.name)) == 1


def test_sessions_end_when_idle_and_at_their_absolute_age(app, store):
    interface = app.session_interface
    now = [time.time()]
    interface.clock = lambda: now[0]
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    now[0] += 11 * 3600  # used within the idle timeout (12 h) ...
    assert logged_in(browser)
    now[0] += 11 * 3600  # ... and again: still alive
    assert logged_in(browser)
    now[0] += 12 * 3600 + 60  # left idle for over 12 h: over
    assert not logged_in(browser)

    browser = app.test_client()
    start = now[0]
    log_in(browser, OPERATOR.name, OPERATOR.password)
    while now[0] - start < 8 * 86400:  # used every 11 h, it still ends 7 days after the login
        now[0] += 11 * 3600
        if not logged_in(browser):
            break
    assert 7 * 86400 <= now[0] - start < 7 * 86400 + 11 * 3600


def test_timeouts_come_from_the_config(store):
    cfg = Config().with_section("web", session_idle_timeout=120.0, session_max_age=600.0)
    app = make_web_app(store, config=cfg, users=[OPERATOR])
    now = [time.time()]
    app.session_interface.clock = lambda: now[0]
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    now[0] += 100
    assert logged_in(browser)
    now[0] += 130
    assert not logged_in(browser)


def test_a_request_that_saves_an_ended_session_does_not_bring_it_back(app, store):
    from web.sessions import WebSession, session_key

    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    value = session_cookie(browser, app)
    (doc,) = stored_sessions(store, OPERATOR.name)
    cookie = {"Cookie": f"{cookie_name(app)}={value}"}
    with app.test_request_context("/", headers=cookie) as ctx:
        loaded = app.session_interface.open_session(app, ctx.request)
        assert isinstance(loaded, WebSession)
        assert loaded.key == session_key(value) == doc["_id"]
        Users(store).set_password(OPERATOR.name, "a brand new passphrase")  # ends it meanwhile
        loaded["note"] = "changed by a request that began before"
        answer = app.response_class()
        app.session_interface.save_session(app, loaded, answer)
    assert stored_sessions(store, OPERATOR.name) == []
    assert "Max-Age=0" in answer.headers.get("Set-Cookie", "")


# --- login: a new session, a new token ------------------------------------------------------


def test_login_starts_a_new_session_with_a_new_csrf_token(app, store):
    browser = app.test_client()
    form_token = login_form_token(browser)
    planted = session_cookie(browser, app)  # what an attacker could have planted
    answer = browser.post(
        "/login",
        data={
            "username": OPERATOR.name,
            "password": OPERATOR.password,
            "csrf_token": form_token,
        },
    )
    assert answer.status_code == 302
    assert session_cookie(browser, app) != planted
    assert not logged_in(with_cookie(app, planted))  # the planted cookie gained nothing
    new_token = page_token(browser)
    assert new_token != form_token
    refused = browser.post("/api/v1/tasks", json=SPEC, headers={"X-CSRF-Token": form_token})
    assert refused.status_code == 400  # the token from before the login is void
    created = browser.post("/api/v1/tasks", json=SPEC, headers={"X-CSRF-Token": new_token})
    assert created.status_code == 201
    # logging in again (another user) in the same browser ends the first session
    first = session_cookie(browser, app)
    log_in(browser, VIEWER.name, VIEWER.password)
    assert session_cookie(browser, app) != first
    assert stored_sessions(store, OPERATOR.name) == []
    assert not logged_in(with_cookie(app, first))


def test_before_login_nothing_is_stored_and_no_user_rides_in_a_cookie(app, store):
    browser = app.test_client()
    login_form_token(browser)
    assert store.db["sessions"].count_documents({}) == 0
    # a signed pre-login cookie naming a user (made with the app's own key) is not a login
    from flask.sessions import SecureCookieSessionInterface

    forged = SecureCookieSessionInterface()
    forged.salt = "cloudtask-anonymous-session"
    value = forged.get_signing_serializer(app).dumps({"_user_id": "op1|0", "_fresh": True})
    assert not logged_in(with_cookie(app, value))
    assert not logged_in(with_cookie(app, "s." + "A" * 43))  # an id of no session


# --- the Secure flag ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "web, secure",
    [
        ({}, False),
        ({"base_url": "https://cloudtask.example.com"}, True),
        ({"base_url": "https://cloudtask.example.com", "secure_cookies": False}, False),
        ({"base_url": "http://10.0.0.5:8080", "secure_cookies": True}, True),
    ],
)
def test_the_session_cookie_is_secure_when_the_site_is_https_or_configured(store, web, secure):
    app = make_web_app(store, config=Config().with_section("web", **web), users=[OPERATOR])
    browser = app.test_client()
    answer = log_in(browser, OPERATOR.name, OPERATOR.password)
    (cookie,) = [c for c in answer.headers.getlist("Set-Cookie") if c.startswith("cloudtask")]
    assert ("Secure" in cookie) is secure, cookie
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


# --- CSRF: only a valid API token skips it --------------------------------------------------


def test_a_junk_token_header_with_a_session_still_needs_the_csrf_token(app, store):
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    for headers in (
        {"Authorization": "Bearer junk"},
        {"X-CloudTask-Token": "x"},
        {"Authorization": "Bearer junk", "X-CloudTask-Token": "x"},
    ):
        answer = browser.post("/api/v1/tasks", json=SPEC, headers=headers)
        assert answer.status_code == 400, (headers, answer.status_code)
        form = browser.post("/tasks/new", data={"name": "x"}, headers=headers)
        assert form.status_code == 400, headers
    assert store.db["tasks"].count_documents({}) == 0
    token = page_token(browser)
    ok = browser.post(
        "/api/v1/tasks",
        json=SPEC,
        headers={"Authorization": "Bearer junk", "X-CSRF-Token": token},
    )
    assert ok.status_code == 201  # the cookie's session, with its CSRF token


def test_a_valid_token_skips_csrf_and_the_request_is_the_tokens_users(app, store):
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    admin_token = Users(store).create_token(ADMIN.name, "ci")
    answer = browser.post(
        "/api/v1/tasks", json=SPEC, headers={"Authorization": f"Bearer {admin_token}"}
    )
    assert answer.status_code == 201
    (entry,) = store.db["audit"].find({"action": "task.create"})
    assert entry["actor"] == ADMIN.name  # the token's user, not the cookie's
    assert browser.get("/api/v1/me").get_json()["username"] == OPERATOR.name


def test_a_run_tokens_header_exempts_only_the_callbacks(app, store):
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    answer = browser.post(
        "/api/v1/runs/nope/result", json={"status": "succeeded"}, headers={"X-CloudTask-Token": "x"}
    )
    assert answer.status_code == 401  # the callback checks the run's token itself


# --- headers --------------------------------------------------------------------------------


def _assert_security_headers(answer, what):
    csp = answer.headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in csp, what
    assert "script-src 'self'" in csp and "style-src 'self'" in csp, what
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, what
    assert answer.headers.get("X-Content-Type-Options") == "nosniff", what
    assert answer.headers.get("Referrer-Policy") in ("same-origin", "no-referrer"), what
    assert answer.headers.get("X-Frame-Options") == "DENY", what


def test_every_answer_carries_the_security_headers(app, store):
    anonymous = app.test_client()
    for path in ("/login", "/healthz", "/static/site.css", "/nowhere", "/tasks", "/api/v1/me"):
        _assert_security_headers(anonymous.get(path), path)
    browser = app.test_client()
    log_in(browser, ADMIN.name, ADMIN.password)
    for path in ("/", "/tasks", "/runs", "/users", "/settings", "/audit", "/api/v1/tasks"):
        answer = browser.get(path)
        assert answer.status_code == 200, path
        _assert_security_headers(answer, path)


def test_logged_in_pages_and_api_answers_are_never_stored(app, store):
    browser = app.test_client()
    log_in(browser, OPERATOR.name, OPERATOR.password)
    for path in ("/", "/tasks", "/runs", "/files", "/audit", "/account/password", "/api/v1/me"):
        assert browser.get(path).headers.get("Cache-Control") == "no-store", path
    token = Users(store).create_token(OPERATOR.name, "ci")
    api = app.test_client().get("/api/v1/tasks", headers={"Authorization": f"Bearer {token}"})
    assert api.headers.get("Cache-Control") == "no-store"
    assert app.test_client().get("/login").headers.get("Cache-Control") == "no-store"
    assert "no-store" not in (browser.get("/static/site.css").headers.get("Cache-Control") or "")


def test_no_template_has_inline_scripts_styles_or_handlers():
    """The policy allows scripts and styles from the site's files only: the pages must not
    need anything inline (a <script> without src, <style>, style="", onclick=...)."""
    found = []
    for path in sorted(TEMPLATES.rglob("*.html")):
        text = path.read_text()
        for pattern in (
            r"<script(?![^>]*\bsrc=)",
            r"<style",
            r"\sstyle=",
            r"\son[a-z]+=",
            "javascript:",
        ):
            if re.search(pattern, text, re.I):
                found.append(f"{path.relative_to(TEMPLATES)}: {pattern}")
    assert found == []


# --- the client's address -------------------------------------------------------------------


def test_forwarded_for_is_read_only_from_trusted_proxies():
    from web.security import client_address_of, parse_networks

    trusted = parse_networks(["10.0.0.0/8", "::1"])
    # not behind a trusted proxy: the peer, whatever the header says
    assert client_address_of("203.0.113.9", ["1.2.3.4"], trusted) == "203.0.113.9"
    assert client_address_of("203.0.113.9", ["1.2.3.4"], ()) == "203.0.113.9"
    # behind one: the right-most address that is not a trusted proxy
    assert client_address_of("10.0.0.1", ["198.51.100.7"], trusted) == "198.51.100.7"
    forged = ["6.6.6.6, 198.51.100.7, 10.0.0.2"]  # the client wrote 6.6.6.6 itself
    assert client_address_of("10.0.0.1", forged, trusted) == "198.51.100.7"
    assert client_address_of("::1", ["2001:db8::5"], trusted) == "2001:db8::5"
    assert client_address_of("10.0.0.1", ["not-an-address"], trusted) == "10.0.0.1"
    assert client_address_of("10.0.0.1", [], trusted) == "10.0.0.1"
    assert client_address_of("10.0.0.1", ["10.0.0.3"], trusted) == "10.0.0.3"  # all trusted


def test_bad_trusted_proxies_are_a_clear_config_error(tmp_path):
    from cloudtask.config import load_config
    from cloudtask.exceptions import ConfigError

    path = tmp_path / "c.json"
    path.write_text('{"web": {"trusted_proxies": ["10.0.0.0/8", "proxy.local"]}}')
    with pytest.raises(ConfigError, match=r"web.trusted_proxies\[1\].*10.0.0.0/8"):
        load_config(path, environ={})
    cfg = load_config(None, environ={"CLOUDTASK_WEB_TRUSTED_PROXIES": "10.0.0.1, ::1"})
    assert cfg.web.trusted_proxies == ("10.0.0.1/32", "::1/128")


# --- the login throttle ---------------------------------------------------------------------

PROXY = "10.0.0.1"


@pytest.fixture
def proxied(store):
    """The site behind a reverse proxy at 10.0.0.1 (web.trusted_proxies)."""
    cfg = Config().with_section("web", trusted_proxies=("10.0.0.0/8",))
    return make_web_app(store, config=cfg, users=[ADMIN, OPERATOR, VIEWER])


def via_proxy(app, client_address):
    """A browser at ``client_address`` whose requests come through the proxy."""
    browser = app.test_client()
    browser.environ_base["REMOTE_ADDR"] = PROXY
    browser.environ_base["HTTP_X_FORWARDED_FOR"] = client_address
    return browser


def test_strangers_behind_the_same_proxy_cannot_lock_a_user_out(proxied, store):
    stranger = via_proxy(proxied, "203.0.113.66")
    codes = [log_in(stranger, ADMIN.name, f"guess {i}!!").status_code for i in range(8)]
    assert codes == [401] * 5 + [429] * 3  # the stranger is throttled ...
    owner = via_proxy(proxied, "198.51.100.7")
    assert log_in(owner, ADMIN.name, ADMIN.password).status_code == 302  # ... not the owner
    refused = log_in(stranger, ADMIN.name, ADMIN.password)
    assert refused.status_code == 429 and refused.headers["Retry-After"]


def test_many_strangers_put_the_user_in_backoff_for_failing_addresses_only(proxied, store):
    for n in range(10):  # ten addresses, one wrong guess each
        assert (
            log_in(via_proxy(proxied, f"203.0.113.{n}"), OPERATOR.name, "wrong!!").status_code
            == 401
        )
    # an address that has been failing is refused now, even with the right password
    assert (
        log_in(via_proxy(proxied, "203.0.113.3"), OPERATOR.name, OPERATOR.password).status_code
        == 429
    )
    # a new stranger gets one try, then is refused too
    newcomer = via_proxy(proxied, "192.0.2.44")
    assert log_in(newcomer, OPERATOR.name, "wrong!!").status_code == 401
    assert log_in(newcomer, OPERATOR.name, OPERATOR.password).status_code == 429
    # the user, from an address that has not been failing, logs in
    assert (
        log_in(via_proxy(proxied, "198.51.100.8"), OPERATOR.name, OPERATOR.password).status_code
        == 302
    )
    # other users are not in backoff
    assert (
        log_in(via_proxy(proxied, "203.0.113.3"), VIEWER.name, VIEWER.password).status_code == 302
    )
    lockouts = list(store.db["audit"].find({"action": "auth.lockout"}))
    assert lockouts and {e["after"]["reason"] for e in lockouts} >= {"account"}


def test_one_address_guessing_many_names_is_throttled_for_all(proxied, store):
    sprayer = via_proxy(proxied, "203.0.113.200")
    codes = [log_in(sprayer, f"user{i}", "password1234").status_code for i in range(21)]
    assert codes == [401] * 20 + [429]
    assert log_in(sprayer, VIEWER.name, VIEWER.password).status_code == 429
    assert (
        log_in(via_proxy(proxied, "198.51.100.9"), VIEWER.name, VIEWER.password).status_code == 302
    )


def test_without_trusted_proxies_the_forwarded_header_is_ignored(app, store):
    liar = app.test_client()
    liar.environ_base["REMOTE_ADDR"] = "203.0.113.5"
    codes = []
    for i in range(7):  # a new X-Forwarded-For each time: it changes nothing
        liar.environ_base["HTTP_X_FORWARDED_FOR"] = f"192.0.2.{i}"
        codes.append(log_in(liar, OPERATOR.name, f"guess {i}!!").status_code)
    assert codes == [401] * 5 + [429] * 2


# --- the same time for every wrong login ----------------------------------------------------


def test_unknown_disabled_and_wrong_password_logins_take_the_same_time(app, store, monkeypatch):
    import cloudtask.users as users_module

    Users(store).add("gone", "a long passphrase", role="viewer")
    Users(store).set_enabled("gone", False, by=ADMIN.name)
    checks: list[str] = []
    real = users_module.check_password_hash

    def counting(stored, password):
        checks.append(stored[:6])
        return real(stored, password)

    monkeypatch.setattr(users_module, "check_password_hash", counting)
    cases = {
        "unknown": ("nobody-here", "whatever passphrase"),
        "disabled, right password": ("gone", "a long passphrase"),
        "disabled, wrong password": ("gone", "not the passphrase"),
        "wrong password": (OPERATOR.name, "not the passphrase"),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(5):
        for what, (name, password) in cases.items():
            browser = app.test_client()
            browser.environ_base["REMOTE_ADDR"] = f"198.51.100.{len(checks) % 250}"
            token = login_form_token(browser)
            started = time.perf_counter()
            answer = browser.post(
                "/login", data={"username": name, "password": password, "csrf_token": token}
            )
            times[what].append(time.perf_counter() - started)
            assert answer.status_code == 401, what
            assert "Wrong user name or password." in answer.get_data(as_text=True)
    assert len(checks) == 5 * len(cases)  # one password hash check for every try
    medians = {what: statistics.median(t) for what, t in times.items()}
    fastest, slowest = min(medians.values()), max(medians.values())
    assert slowest < fastest * 2.5, medians  # before: 0.6 ms for a disabled user, 98 ms else


# --- API tokens: expiry and a read-only scope -----------------------------------------------


def test_an_expired_token_is_refused_with_a_clear_401(app, store):
    users = Users(store)
    token_id, token = users.add_token(OPERATOR.name, "ci", expires_in_days=1)
    headers = {"Authorization": f"Bearer {token}"}
    client = app.test_client()
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    doc = users.get(OPERATOR.name)
    doc["tokens"][0]["expires_at"] = time.time() - 5  # a day later
    store.users.replace_one({"_id": OPERATOR.name}, doc)
    answer = client.get("/api/v1/me", headers=headers)
    assert answer.status_code == 401
    error = answer.get_json()["error"]
    assert "expired at" in error and token_id in error and "'ci'" in error
    page = client.get("/tasks", headers=headers)
    assert page.status_code == 401 and "expired" in page.get_json()["error"]
    junk = client.get("/api/v1/me", headers={"Authorization": "Bearer ct_nope"}).get_json()
    assert "not valid" in junk["error"]


def test_token_expiry_is_checked_when_it_is_made(app, store):
    from cloudtask.exceptions import ValidationError

    users = Users(store)
    for bad in ({"expires_in_days": 0}, {"expires_in_days": "x"}, {"expires_in_days": 5000}):
        with pytest.raises(ValidationError) as err:
            users.add_token(OPERATOR.name, "ci", **bad)
        assert err.value.problems[0].path == "expires_in"
    with pytest.raises(ValidationError) as err:
        users.add_token(OPERATOR.name, "ci", expires_at=time.time() - 10)
    assert err.value.problems[0].path == "expires_at"
    with pytest.raises(ValidationError) as err:
        users.add_token(OPERATOR.name, "ci", scope="write")
    assert err.value.problems[0].path == "scope"
    at = time.time() + 3600
    token_id, _ = users.add_token(OPERATOR.name, "ci", expires_at=at)
    (listed,) = users.list_tokens(OPERATOR.name)
    assert listed["expires_at"] == round(at, 3) and not listed["expired"]


def test_a_read_only_token_may_only_read_whatever_the_role(app, store):
    token = Users(store).create_token(ADMIN.name, "dashboards", scope="read")
    headers = {"Authorization": f"Bearer {token}"}
    client = app.test_client()
    assert client.get("/api/v1/tasks", headers=headers).status_code == 200
    assert client.head("/api/v1/tasks", headers=headers).status_code == 200
    assert client.get("/api/v1/me", headers=headers).get_json()["token"]["scope"] == "read"
    refused = client.post("/api/v1/tasks", json=SPEC, headers=headers)
    assert refused.status_code == 403 and "read-only" in refused.get_json()["error"]
    assert client.post("/users", data={"username": "x"}, headers=headers).status_code == 403
    assert store.db["tasks"].count_documents({}) == 0
    full = Users(store).create_token(ADMIN.name, "ci")
    made = client.post("/api/v1/tasks", json=SPEC, headers={"Authorization": f"Bearer {full}"})
    assert made.status_code == 201


def test_the_admin_page_makes_tokens_that_expire_or_only_read(app, store):
    admin = app.test_client()
    log_in(admin, ADMIN.name, ADMIN.password)
    token = page_token(admin, "/users/op1")
    page = admin.post(
        "/users/op1/tokens",
        data={"csrf_token": token, "name": "reports", "expires_in": "30", "scope": "read"},
    ).get_data(as_text=True)
    assert "read-only" in page
    (listed,) = Users(store).list_tokens(OPERATOR.name)
    assert listed["scope"] == "read"
    assert 29.9 * 86400 < listed["expires_at"] - time.time() <= 30 * 86400
    bad = admin.post(
        "/users/op1/tokens", data={"csrf_token": token, "name": "x", "expires_in": "-3"}
    )
    assert bad.status_code == 422 and 'data-error="token_expires"' in bad.get_data(as_text=True)
    (entry,) = store.db["audit"].find({"action": "token.create"})
    assert entry["after"]["scope"] == "read" and entry["after"]["expires_at"]

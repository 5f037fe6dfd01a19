"""Login through an OpenID Connect provider (``auth.oidc``): the real ``oidc-provider``
package from the npm registry run by Node.js (tests/oidc/provider.mjs, installed into
tests/oidc/node_modules by ``make test`` or, failing that, by these tests with ``npm ci``),
the site served by waitress on a real MongoDB wire server, and Debian's Chromium driven by
Playwright clicking "Log in with ..." and signing in at the provider.

A user of a mapped group comes back logged in with the mapped role; a user whose claim maps
to no role is refused with a message saying so; a user dropped from the group at the provider
is refused at the next login and their sessions end; a forged or replayed state, and a code
moved into another browser's login, are refused with a clear 400; a provider that is down is
a clear error; local accounts keep working and are never taken over. The ID token checks
(signature, issuer, audience, expiry, nonce, algorithms) are also tested on tokens made here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from test_browser import CHROMIUM, CHROMIUM_FLAGS, Steps

from cloudtask.authconfig import check_oidc, oidc_settings
from cloudtask.config import Config
from cloudtask.exceptions import ConfigError
from cloudtask.localservers import free_port
from cloudtask.users import Users
from web import create_app

pytestmark = [pytest.mark.external, pytest.mark.timeout(180)]

PROVIDER_DIR = Path(__file__).parent / "oidc"
NODE = shutil.which("node")
NPM = shutil.which("npm")
CLIENT_ID = "cloudtask-site"
CLIENT_SECRET = "a client secret of the test provider"
SECRET_ENV = "CLOUDTASK_TEST_OIDC_SECRET"
SSO_NAME = "Test SSO"
ROLE_MAP = {"ops-team": "operator", "platform-admins": "admin", "readers": "viewer"}
ACCOUNTS = {
    "erin": {"password": "erin at the provider", "claims": {"groups": ["readers", "ops-team"]}},
    "frank": {"password": "frank at the provider", "claims": {"groups": ["marketing"]}},
    "grace": {"password": "grace at the provider", "claims": {"groups": ["platform-admins"]}},
    # a provider account whose name is a local account's
    "ops-at-sso": {
        "password": "ops at the provider",
        "claims": {"groups": ["platform-admins"], "preferred_username": "ops"},
    },
}
for _login, _account in ACCOUNTS.items():
    _account["claims"].setdefault("preferred_username", _login)
    _account["claims"].setdefault("email", f"{_login}@example.org")

_install_lock = threading.Lock()


def provider_modules() -> str | None:
    """None when tests/oidc/node_modules has oidc-provider (installed with ``npm ci`` here
    if need be), else why these tests cannot run."""
    if NODE is None or NPM is None:
        return "Node.js and npm are not installed (make test installs them)"
    with _install_lock:
        if (PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
            return None
        answer = subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund", "--prefix", str(PROVIDER_DIR)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if answer.returncode != 0:
            return f"npm ci in tests/oidc failed: {answer.stderr.strip()[-500:]}"
    return None


class OidcTestProvider:
    """tests/oidc/provider.mjs on a free loopback port, for a site at ``site_url``."""

    def __init__(self, folder: Path, site_url: str, accounts=None) -> None:
        self.port = free_port()
        self.issuer = f"http://localhost:{self.port}"
        self.site_url = site_url
        self.accounts = json.loads(json.dumps(accounts or ACCOUNTS))
        self.log_path = folder / "provider.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OidcTestProvider:
        config = {
            "port": self.port,
            "issuer": self.issuer,
            "client": {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [self.site_url + "/login/oidc/callback"],
            },
            "accounts": self.accounts,
        }
        env = {**os.environ, "OIDC_TEST_CONFIG": json.dumps(config)}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [NODE, str(PROVIDER_DIR / "provider.mjs")],
                cwd=PROVIDER_DIR,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while "listening" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test provider did not start: {self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def change_accounts(self, accounts: dict) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/test/accounts",
            data=json.dumps(accounts).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 204

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def oidc_config(issuer: str, site_url: str) -> Config:
    setting = check_oidc(
        {
            "name": SSO_NAME,
            "issuer": issuer,
            "client_id": CLIENT_ID,
            "client_secret": f"env:{SECRET_ENV}",
            "scopes": ["openid", "profile", "email", "groups"],
            "groups_claim": "groups",
            "role_map": ROLE_MAP,
            "timeout": "5s",
        }
    )
    return Config().with_section("web", base_url=site_url).with_section("auth", oidc=setting)


class Site:
    def __init__(self, url: str, provider: OidcTestProvider, app) -> None:
        self.url, self.provider, self.app = url, provider, app


@pytest.fixture
def sso(store, tmp_path, monkeypatch):
    """The site (waitress, a free port) with the test provider beside it; users: the local
    operator ``ops`` and the local admin ``root``."""
    from waitress.server import create_server

    why = provider_modules()
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv(SECRET_ENV, CLIENT_SECRET)
    port = free_port()
    site_url = f"http://127.0.0.1:{port}"
    provider = OidcTestProvider(tmp_path, site_url).start()
    app = create_app(
        oidc_config(provider.issuer, site_url), test_config={"STORE": store, "TESTING": True}
    )
    Users(store).add("ops", "operator passphrase", role="operator")
    Users(store).add("root", "admin passphrase", role="admin")
    server = create_server(app, host="127.0.0.1", port=port, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield Site(site_url, provider, app)
    server.close()
    thread.join(timeout=10)
    provider.stop()


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def new_page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(20_000)
    return page


def sign_in_at_provider(page, login: str, password: str) -> None:
    page.wait_for_selector("form#provider-login")
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", password)
    page.click("form#provider-login button[type=submit]")


def audit(store, action: str) -> list[dict]:
    return list(store.audit.find({"action": action}).sort("at", 1))


def test_log_in_with_the_provider_in_the_browser(sso, store, browser, tmp_path):
    from playwright.sync_api import expect

    page = new_page(browser)
    step = Steps(page, tmp_path)

    def click_log_in_with():
        page.goto(sso.url + "/tasks")  # not logged in: the login page, with the button
        expect(page.locator("#oidc-login")).to_have_text(f"Log in with {SSO_NAME}")
        page.click("#oidc-login")
        page.wait_for_url(sso.provider.issuer + "/**")

    def sign_in():
        sign_in_at_provider(page, "erin", ACCOUNTS["erin"]["password"])
        page.wait_for_url(sso.url + "/tasks")  # back where she was going
        expect(page.locator("header .who")).to_have_text("erin (operator)")
        page.screenshot(path=str(tmp_path / "logged-in.png"))

    def log_out_and_in_again():
        page.click("header form button:has-text('Log out')")
        page.wait_for_url("**/login")
        page.click("#oidc-login")  # the provider remembers her: straight back
        page.wait_for_url(sso.url + "/")
        expect(page.locator("header .who")).to_have_text("erin (operator)")

    step("click log in with", click_log_in_with)
    step("sign in at the provider", sign_in)
    step("log out and in again", log_out_and_in_again)
    doc = store.users.find_one({"_id": "erin"})
    assert doc["source"] == "oidc" and doc["role"] == "operator"
    assert doc["subject"] == f"{sso.provider.issuer}#erin"
    assert "password_hash" not in doc
    assert sorted(doc["groups"]) == ["ops-team", "readers"]
    logins = audit(store, "auth.login")
    assert [e["after"]["via"] for e in logins] == ["oidc", "oidc"]
    assert audit(store, "user.create")[0]["actor"] == "(oidc)"
    assert ACCOUNTS["erin"]["password"] not in repr(list(store.audit.find()))
    assert page.context.cookies(sso.url)[0]["name"] == "cloudtask_session"


def test_a_user_whose_claim_maps_to_no_role_is_refused(sso, store, browser):
    from playwright.sync_api import expect

    page = new_page(browser)
    page.goto(sso.url + "/login")
    page.click("#oidc-login")
    sign_in_at_provider(page, "frank", ACCOUNTS["frank"]["password"])
    page.wait_for_url(sso.url + "/login/oidc/callback**")
    expect(page.locator(".flash.error")).to_contain_text(
        f"Your {SSO_NAME} account is in no group that gives access to CloudTask"
    )
    expect(page.locator("form#login")).to_be_visible()
    assert page.goto(sso.url + "/tasks").url.startswith(sso.url + "/login")
    assert store.users.find_one({"_id": "frank"}) is None
    refused = audit(store, "auth.login_refused")
    assert refused[0]["after"] == {
        "address": "127.0.0.1",
        "via": "oidc",
        "reason": "no mapped group",
    }


def test_a_user_dropped_from_the_group_is_refused_and_their_sessions_end(sso, store, browser):
    from playwright.sync_api import expect

    first = new_page(browser)
    first.goto(sso.url + "/login")
    first.click("#oidc-login")
    sign_in_at_provider(first, "grace", ACCOUNTS["grace"]["password"])
    first.wait_for_url(sso.url + "/")
    expect(first.locator("header .who")).to_have_text("grace (admin)")

    grace = dict(ACCOUNTS["grace"], claims={**ACCOUNTS["grace"]["claims"], "groups": []})
    sso.provider.change_accounts({"grace": grace})
    second = new_page(browser)  # another browser: she signs in at the provider again
    second.goto(sso.url + "/login")
    second.click("#oidc-login")
    sign_in_at_provider(second, "grace", ACCOUNTS["grace"]["password"])
    expect(second.locator(".flash.error")).to_contain_text("in no group that gives access")
    first.goto(sso.url + "/users")
    expect(first.locator("form#login")).to_be_visible()  # her first session ended
    assert store.db["sessions"].count_documents({"user": "grace"}) == 0
    revoked = audit(store, "auth.access_revoked")
    assert revoked[0]["target"] == "user:grace" and revoked[0]["actor"] == "(oidc)"


def sign_in_over_http(sso, login: str) -> tuple[object, str]:
    """A login made with plain HTTP (requests) up to the provider's answer, which is not
    followed: (that "browser", the callback URL with its code and state)."""
    import requests

    browser = requests.Session()
    answer = browser.get(sso.url + "/login/oidc", allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    page = browser.get(answer.headers["Location"], timeout=10)  # to the provider's login page
    assert 'id="provider-login"' in page.text, page.text
    action = page.text.split('action="', 1)[1].split('"', 1)[0]
    form = {"login": login, "password": ACCOUNTS[login]["password"]}
    answer = browser.post(
        sso.provider.issuer + action, data=form, allow_redirects=False, timeout=10
    )
    while answer.status_code in (302, 303) and not answer.headers["Location"].startswith(sso.url):
        location = answer.headers["Location"]
        if location.startswith("/"):
            location = sso.provider.issuer + location
        answer = browser.get(location, allow_redirects=False, timeout=10)
    assert answer.headers.get("Location", "").startswith(sso.url + "/login/oidc/callback"), (
        answer.status_code,
        answer.text,
    )
    return browser, answer.headers["Location"]


def test_state_tampering_is_refused(sso, store, browser):
    from playwright.sync_api import expect

    # a direct request with a made-up state: a clear 400, nothing else happens
    client = sso.app.test_client()
    answer = client.get("/login/oidc/callback?state=forged&code=forged")
    page_text = answer.get_data(as_text=True)
    assert answer.status_code == 400
    assert "its state does not match" in page_text and "Traceback" not in page_text
    assert client.get("/login/oidc/callback?code=x").status_code == 400

    # A signs in; the provider's answer (code and state) is taken before A's browser uses it
    _, callback = sign_in_over_http(sso, "erin")
    query = parse_qs(urlsplit(callback).query)
    code, state = query["code"][0], query["state"][0]

    # replayed in browser B (Chromium), which started no such login: 400
    b = new_page(browser)
    answer = b.goto(callback)
    assert answer is not None and answer.status == 400
    expect(b.locator(".flash.error")).to_contain_text("its state does not match")

    # A's code moved into a login B started itself (B's state): PKCE binds the code to A's
    # login, so the provider refuses it
    started: list[str] = []
    b.on("request", lambda r: started.append(r.url) if "state=" in r.url else None)
    b.goto(sso.url + "/login")
    b.click("#oidc-login")
    sign_in_page = b.wait_for_selector("form#provider-login")  # B stops at the provider
    assert sign_in_page is not None and started, "the site did not send B to the provider"
    b_state = parse_qs(urlsplit(started[0]).query)["state"][0]
    assert b_state != state
    answer = b.goto(f"{sso.url}/login/oidc/callback?code={code}&state={b_state}")
    assert answer is not None and answer.status == 400
    expect(b.locator(".flash.error")).to_contain_text("refused to complete the login")
    assert b.goto(sso.url + "/tasks").url.startswith(sso.url + "/login")
    assert store.users.find_one({"_id": "erin"}) is None  # nobody logged in
    reasons = [e["after"]["reason"] for e in audit(store, "auth.login_failed")]
    assert reasons[:3] == ["state mismatch", "state mismatch", "state mismatch"]
    assert reasons[-1].startswith("token refused")
    # the wrong issuer in the answer (a mix-up) is refused too
    answer = client.get("/login/oidc/callback?state=x&code=y&iss=https://evil.example.org")
    assert answer.status_code == 400


def test_a_nonce_other_than_the_logins_is_refused(sso, store):
    """The provider's own ID token, for a login whose kept nonce is not the one it was made
    for: refused (a token injected into another login)."""
    browser, callback = sign_in_over_http(sso, "erin")
    from web.sso import PENDING_KEY

    # the site's pre-login session (a signed cookie), as this "browser" holds it
    signer = sso.app.session_interface._cookies.get_signing_serializer(sso.app)
    data = signer.loads(browser.cookies.get("cloudtask_session"))
    state = parse_qs(urlsplit(callback).query)["state"][0]
    pending = data[PENDING_KEY][state]
    pending["nonce"] = "not the nonce of this login"
    client = sso.app.test_client()
    with client.session_transaction() as session:
        session[PENDING_KEY] = {state: pending}
    answer = client.get(callback[len(sso.url) :])
    assert answer.status_code == 400
    assert "did not check out (nonce)" in answer.get_data(as_text=True)
    assert store.users.find_one({"_id": "erin"}) is None
    assert audit(store, "auth.login_failed")[-1]["after"]["reason"] == "id token: nonce"


def test_local_accounts_keep_working_and_are_never_taken_over(sso, store, browser):
    from playwright.sync_api import expect

    page = new_page(browser)
    page.goto(sso.url + "/login")
    page.click("#oidc-login")
    sign_in_at_provider(page, "ops-at-sso", ACCOUNTS["ops-at-sso"]["password"])
    expect(page.locator(".flash.error")).to_contain_text("'ops' is a local CloudTask account")
    assert store.users.find_one({"_id": "ops"})["role"] == "operator"
    assert "source" not in store.users.find_one({"_id": "ops"})
    page.fill("input[name=username]", "root")
    page.fill("input[name=password]", "admin passphrase")
    page.click("form#login button[type=submit]")
    page.wait_for_url(sso.url + "/")
    expect(page.locator("header .who")).to_have_text("root (admin)")
    assert audit(store, "auth.login_refused")[0]["after"]["reason"] == "local_account"


def test_a_provider_that_is_down_is_a_clear_error(sso, store):
    sso.provider.stop()
    client = sso.app.test_client()
    answer = client.get("/login/oidc")
    text = answer.get_data(as_text=True)
    assert answer.status_code == 503
    assert f"{SSO_NAME} cannot be reached right now" in text
    assert "Traceback" not in text and "Connection refused" not in text
    from helpers import post_login

    assert post_login(client, "ops", "operator passphrase").status_code == 302


def test_bad_settings_name_their_key(store, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    config = oidc_config("http://localhost:9", "http://127.0.0.1:8080")
    with pytest.raises(ConfigError, match=f"auth.oidc.client_secret names .*{SECRET_ENV}"):
        create_app(config, test_config={"STORE": store})
    with pytest.raises(ValueError, match="https://"):
        check_oidc(
            {"issuer": "http://sso.example.org", "client_id": "x", "role_map": {"a": "admin"}}
        )
    with pytest.raises(ValueError, match="in clear"):
        check_oidc(
            {
                "issuer": "https://sso.example.org",
                "client_id": "x",
                "client_secret": "hunter2",
                "role_map": {"a": "admin"},
            }
        )
    # without auth.oidc, the routes only send people back to the login page
    app = create_app(test_config={"STORE": store})
    answer = app.test_client().get("/login/oidc")
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/login")
    assert "Log in with" not in app.test_client().get("/login").get_data(as_text=True)


# --- the ID token's checks, on tokens made here ------------------------------------------------


def _provider_with_keys():
    from joserfc.jwk import RSAKey

    from cloudtask.oidc import Provider

    key = RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"})
    settings = oidc_settings(
        check_oidc(
            {"issuer": "https://sso.example.org", "client_id": "ct", "role_map": {"a": "admin"}}
        )
    )
    provider = Provider(settings)
    provider._metadata = {
        "issuer": "https://sso.example.org",
        "jwks_uri": "https://sso.example.org/jwks",
        "id_token_signing_alg_values_supported": ["RS256", "none", "HS256"],
    }
    provider._metadata_at = time.monotonic()
    provider._jwks = {"keys": [key.as_dict(private=False)]}
    return provider, key


def _token(key, alg: str = "RS256", **claims) -> str:
    from joserfc import jwt

    now = int(time.time())
    body = {
        "iss": "https://sso.example.org",
        "aud": "ct",
        "sub": "u1",
        "iat": now,
        "exp": now + 300,
        "nonce": "n1",
        **claims,
    }
    return jwt.encode({"alg": alg, "kid": "k1"}, body, key)


def test_id_token_checks():
    from joserfc.jwk import OctKey, RSAKey

    from cloudtask.oidc import OidcError

    provider, key = _provider_with_keys()
    assert provider.validate_id_token(_token(key), "n1")["sub"] == "u1"
    cases = {
        "nonce": _token(key, nonce="another"),
        "issuer": _token(key, iss="https://evil.example.org"),
        "audience": _token(key, aud="another-client"),
        "authorized party": _token(key, aud=["ct", "other"], azp="other"),
        "expired": _token(key, exp=int(time.time()) - 600),
        "bad signature": _token(RSAKey.generate_key(2048, parameters={"kid": "k1"}), nonce="n1"),
    }
    for what, token in cases.items():
        with pytest.raises(OidcError, match=what) as refused:
            provider.validate_id_token(token, "n1")
        assert refused.value.status == 400
    with pytest.raises(OidcError, match="nonce"):
        provider.validate_id_token(_token(key, nonce=None), "n1")  # a token without one
    # a token signed with a shared secret (or none) is never accepted, whatever is offered
    shared = OctKey.generate_key(256, parameters={"kid": "k1"})
    with pytest.raises(OidcError, match="unreadable"):
        provider.validate_id_token(_token(shared, alg="HS256"), "n1")
    header = "eyJhbGciOiJub25lIn0"  # {"alg":"none"}
    unsigned = _token(key).split(".")
    with pytest.raises(OidcError, match="unreadable"):
        provider.validate_id_token(f"{header}.{unsigned[1]}.", "n1")

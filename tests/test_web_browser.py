"""The site's security in a real headless Chromium (Debian's ``chromium``, driven by
Playwright; the set-up of tests/test_browser.py): every page works under the site's
Content-Security-Policy (no violation reported, the stylesheets applied), a copy of the
session cookie in another browser stops working when the first one logs out, and the Secrets
page stores, replaces and deletes secrets under the CSP without ever showing a value."""

from __future__ import annotations

import threading

import pytest
import test_browser
from test_browser import CHROMIUM, Steps

from cloudtask.config import load_config
from cloudtask.localservers import free_port
from cloudtask.secretbox import make_key_file
from cloudtask.users import Users
from web import create_app

# the fixtures of tests/test_browser.py: the site served by waitress, a Chromium page
site = test_browser.site
page = test_browser.page

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make browser)"),
    pytest.mark.timeout(240),
]


def test_every_page_works_under_the_content_security_policy_and_logout_ends_copies(
    site, store, page, tmp_path
):
    """The site's pages in Chromium under its Content-Security-Policy: no violation reported
    (no inline script or style left), the stylesheets applied; and a copy of the session
    cookie in another browser stops working when the first one logs out."""
    from playwright.sync_api import expect

    Users(store).add("root", "admin passphrase", role="admin")
    task = store.create_task({"name": "csp-task", "schedule": {"every": "1h"}, "command": "true"})
    violations = test_browser.csp_violations(page)
    step = Steps(page, tmp_path)

    def log_in():
        test_browser.log_in(page, site, "root", "admin passphrase")

    def visit_every_page():
        for path in (
            "/",
            "/tasks",
            "/tasks/new",
            f"/tasks/{task['_id']}",
            "/runs",
            "/events",
            "/cluster",
            "/files",
            "/secrets",
            "/audit",
            "/users",
            "/users/ops",
            "/settings",
            "/account/password",
        ):
            answer = page.goto(site + path)
            assert answer is not None and answer.status == 200, path
            assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        page.goto(site + "/users/ops")
        grid = page.locator(".admin-forms").evaluate("e => getComputedStyle(e).display")
        assert grid == "grid"  # admin.css (once an inline <style>) is applied

    def copies_end_at_logout():
        cookies = page.context.cookies()
        assert any(c["name"] == "cloudtask_session" and c["httpOnly"] for c in cookies)
        other = page.context.browser.new_context()
        try:
            other.add_cookies(cookies)
            thief = other.new_page()
            thief.goto(site + "/tasks")
            assert thief.url == site + "/tasks"  # the copy works while the session lives
            page.click("header form button:has-text('Log out')")
            page.wait_for_url("**/login")
            thief.goto(site + "/tasks")
            expect(thief.locator("form#login")).to_be_visible()  # and not after the logout
        finally:
            other.close()

    step("log in", log_in)
    step("visit every page", visit_every_page)
    step("a copied cookie ends at logout", copies_end_at_logout)
    assert violations == [], violations
    assert page.js_errors == [], page.js_errors  # type: ignore[attr-defined]


@pytest.fixture
def keyed_site(store, tmp_path):
    """The site with a key ring (secrets.keys), served by waitress like ``site``."""
    from waitress.server import create_server

    make_key_file(tmp_path / "keys")
    cfg = load_config(None, environ={}).with_section("secrets", keys=f"file:{tmp_path / 'keys'}")
    app = create_app(cfg, test_config={"STORE": store})
    Users(store).add("ops", "operator passphrase", role="operator")
    server = create_server(app, host="127.0.0.1", port=free_port(), threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()
    thread.join(timeout=10)


def test_the_secrets_page_works_under_the_content_security_policy(
    keyed_site, store, page, tmp_path
):
    """An operator stores a secret with the page's form (a password field), replaces it from
    its row, uses it in a task through the form (secret:NAME), cannot delete it while the task
    uses it, and deletes it afterwards: no CSP violation, no value on any page."""
    from playwright.sync_api import expect

    site = keyed_site
    value, replaced = "browser-Secret-4a1f", "browser-Secret-9c2e"
    violations = test_browser.csp_violations(page)
    step = Steps(page, tmp_path)
    seen: list[str] = []

    def look() -> None:
        seen.append(page.content())

    def log_in():
        page.goto(site + "/login")
        page.fill("input[name=username]", "ops")
        page.fill("input[name=password]", "operator passphrase")
        page.click("form#login button[type=submit]")
        page.wait_for_url(site + "/")

    def store_a_secret():
        page.click("nav.main a:has-text('Secrets')")
        page.wait_for_url(site + "/secrets")
        assert page.get_attribute("#f-value", "type") == "password"
        page.fill("#f-name", "db.password")
        page.fill("#f-value", value)
        page.fill("#f-description", "the reports database")
        page.click("form#set-secret button[type=submit]")
        expect(page.locator("p.flash.ok")).to_contain_text("Secret db.password stored")
        row = page.locator('tr[data-secret="db.password"]')
        expect(row).to_contain_text("the reports database")
        expect(row).to_contain_text("by ops")
        assert page.input_value("#f-value") == ""
        look()

    def replace_it():
        page.click('tr[data-secret="db.password"] a:has-text("Replace")')
        assert page.input_value("#f-name") == "db.password"
        page.fill("#f-value", replaced)
        page.click("form#set-secret button:has-text('Replace value')")
        expect(page.locator("p.flash.ok")).to_contain_text("Secret db.password replaced")
        look()

    def use_it_in_a_task():
        page.goto(site + "/tasks/new")
        page.fill("#f-name", "uses-secret")
        page.check("input[name=schedule_kind][value=every]")
        page.fill("#f-every", "1h")
        page.fill("#f-command", "env")
        page.fill("#f-env", "PGPASSWORD=secret:db.password")
        page.click("form#task-form button[type=submit]")
        expect(page.locator("#task-secrets")).to_contain_text("db.password")
        look()
        page.goto(site + "/secrets")
        expect(page.locator('tr[data-secret="db.password"]')).to_contain_text("uses-secret")

    def deleting_is_refused_while_used():
        page.click('tr[data-secret="db.password"] a:has-text("Delete")')
        expect(page.locator("#delete-secret")).to_contain_text("Used by 1 task")
        page.click("#delete-secret button[type=submit]")
        expect(page.locator("#secret-error")).to_contain_text("is used by 1 task(s): uses-secret")
        look()

    def delete_when_unused():
        store.delete_task(store.get_task_by_name("uses-secret")["_id"])
        page.goto(site + "/secrets/db.password/delete")
        page.click("#delete-secret button[type=submit]")
        expect(page.locator("p.flash.ok")).to_contain_text("Secret db.password deleted")
        look()

    step("log in", log_in)
    step("store a secret", store_a_secret)
    step("replace it", replace_it)
    step("use it in a task", use_it_in_a_task)
    step("deleting is refused while used", deleting_is_refused_while_used)
    step("delete when unused", delete_when_unused)
    assert violations == [], violations
    assert page.js_errors == [], page.js_errors  # type: ignore[attr-defined]
    assert not [text for text in seen if value in text or replaced in text]

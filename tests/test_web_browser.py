"""The site's security in a real headless Chromium (Debian's ``chromium``, driven by
Playwright; the set-up of tests/test_browser.py): every page works under the site's
Content-Security-Policy (no violation reported, the stylesheets applied), and a copy of the
session cookie in another browser stops working when the first one logs out."""

from __future__ import annotations

import pytest
import test_browser
from test_browser import CHROMIUM, Steps

from cloudtask.users import Users

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
    violations: list[str] = []
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    step = Steps(page, tmp_path)

    def log_in():
        page.goto(site + "/login")
        page.fill("input[name=username]", "root")
        page.fill("input[name=password]", "admin passphrase")
        page.click("form#login button[type=submit]")
        page.wait_for_url(site + "/")

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

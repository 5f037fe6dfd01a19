"""The task page's run forms in a real headless Chromium (the set-up of tests/test_browser.py):
an operator opens "Run with parameters…", types two NAME=value lines and lands on the run
page; opens "Backfill…", picks a past range in the datetime-local inputs and sees the count;
all under the site's Content-Security-Policy (disclosures without script, tasks.css applied)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import test_browser
from test_browser import CHROMIUM, Steps

site = test_browser.site
page = test_browser.page

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make browser)"),
    pytest.mark.timeout(240),
]


def test_run_with_parameters_and_backfill_in_the_browser(site, store, page, tmp_path):
    from playwright.sync_api import expect

    task = store.create_task({"name": "params", "schedule": {"every": "1h"}, "command": "true"})
    violations = test_browser.csp_violations(page)
    step = Steps(page, tmp_path)

    def log_in():
        test_browser.log_in(page, site, "ops", "operator passphrase")

    def run_with_parameters():
        page.goto(f"{site}/tasks/{task['_id']}")
        box = page.locator("#run-params-text")
        expect(box).to_be_hidden()  # closed until its summary is clicked
        page.click("#run-params summary")
        expect(box).to_be_visible()
        panel = page.locator("#run-params-form")
        assert panel.evaluate("e => getComputedStyle(e).position") == "absolute"  # tasks.css
        box.fill("A=1\nB=two words")
        page.click("#run-params-form button[type=submit]")
        page.wait_for_url(f"{site}/runs/**")
        expect(page.locator(".flash.ok")).to_contain_text("with 2 parameters queued")
        [run] = store.runs.find({"task_id": task["_id"]})
        assert run["env"] == {"A": "1", "B": "two words"} and page.url.endswith(run["_id"])

    def backfill():
        page.goto(f"{site}/tasks/{task['_id']}")
        expect(page.locator("#backfill-start")).to_be_hidden()
        page.click("#backfill summary")
        hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        first, last = hour - timedelta(hours=5), hour - timedelta(hours=2)
        page.fill("#backfill-start", first.strftime("%Y-%m-%dT%H:%M"))  # the task's zone: UTC
        page.fill("#backfill-end", last.strftime("%Y-%m-%dT%H:%M"))
        page.click("#backfill-form button[type=submit]")
        expect(page.locator(".flash.ok")).to_contain_text(
            "Backfill of params: 4 runs queued (0 had run already)"
        )
        assert page.url == f"{site}/tasks/{task['_id']}"
        assert store.runs.count_documents({"task_id": task["_id"], "trigger": "backfill"}) == 4

    step("log in", log_in)
    step("run with parameters", run_with_parameters)
    step("backfill", backfill)
    assert violations == [], violations
    assert page.js_errors == [], page.js_errors  # type: ignore[attr-defined]

"""The Plans pages in a real headless Chromium (Debian's ``chromium``, driven by Playwright;
the set-up of tests/test_browser.py: the site served by waitress): an operator opens the plans
list from the navigation, opens a plan, cancels it through the in-page confirmation, and sees
the flash and the items' new states, with no Content-Security-Policy violation (the progress
bar is an SVG sized by attributes, never an inline style) and no script error."""

from __future__ import annotations

import pytest
import test_browser
from test_browser import CHROMIUM, Steps

from cloudtask.clock import to_bson_time, utcnow
from cloudtask.operations import Operations

# the fixtures of tests/test_browser.py: the site (with the operator "ops"), a Chromium page
site = test_browser.site
page = test_browser.page

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make browser)"),
    pytest.mark.timeout(240),
]


def test_an_operator_cancels_a_plan_in_the_browser(site, store, page, tmp_path):
    from playwright.sync_api import expect

    items = [{"type": "etl", "name": f"load-{i}", "command": "true"} for i in range(3)]
    receipt = Operations(store).submit_plan("upstream", {"name": "nightly-eu", "items": items})
    plan_id = receipt["plan_id"]
    done = receipt["items"][0]["item_id"]
    store.runs.update_one(
        {"task_id": done},
        {"$set": {"status": "succeeded", "exit_code": 0, "finished_at": to_bson_time(utcnow())}},
    )
    violations = test_browser.csp_violations(page)
    step = Steps(page, tmp_path)

    def log_in():
        test_browser.log_in(page, site, "ops", "operator passphrase")

    def open_the_list():
        page.click("nav.main a:has-text('Plans')")
        page.wait_for_url(site + "/plans")
        row = page.locator(f"tr[data-plan='{plan_id}']")
        expect(row).to_contain_text("nightly-eu")
        expect(row.locator("[data-count=queued]")).to_have_text("queued 2")
        expect(row.locator("[data-segment=ok]")).to_have_count(1)
        box = row.locator("svg.plan-bar").bounding_box()
        assert box and box["width"] > 50  # plans.css applied

    def open_the_plan():
        page.click(f"tr[data-plan='{plan_id}'] a:has-text('nightly-eu')")
        page.wait_for_url(f"{site}/plans/{plan_id}")
        expect(page.locator("#item-table tbody tr")).to_have_count(3)
        expect(page.locator("#item-table tr[data-state=queued]")).to_have_count(2)

    def cancel_it():
        confirm = page.locator("#cancel-plan-form button")
        expect(confirm).to_be_hidden()  # nothing is posted before the confirmation
        page.click("#cancel-plan summary")
        expect(page.locator("#cancel-plan")).to_contain_text("2 waiting item(s) are dropped")
        confirm.click()
        page.wait_for_url(f"{site}/plans/{plan_id}")
        expect(page.locator("p.flash.ok")).to_contain_text(
            "Plan nightly-eu cancelled: dropped 2 waiting items"
        )
        expect(page.locator("#item-table tr[data-state=killed]")).to_have_count(2)
        expect(page.locator("#item-table tr[data-state=succeeded]")).to_have_count(1)
        expect(page.locator("[data-plan-state=cancelled]").first).to_be_visible()
        expect(page.locator("#cancel-plan")).to_have_count(0)  # nothing left to cancel
        page.screenshot(path=str(tmp_path / "plan-page.png"), full_page=True)

    step("log in", log_in)
    step("open the plans list", open_the_list)
    step("open the plan", open_the_plan)
    step("cancel it", cancel_it)
    assert [i["state"] for i in store.plan_items(plan_id)] == ["succeeded", "killed", "killed"]
    assert violations == [], violations
    assert page.js_errors == [], page.js_errors  # type: ignore[attr-defined]

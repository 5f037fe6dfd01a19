"""The site in a real headless Chromium (Debian's ``chromium``, driven by Playwright; never a
downloaded browser): log in, create a task with the form, run it now, see its output on the run
page, and see the duration chart on the task page. The site is served by waitress (as
``cloudtask web`` serves it) and the run is taken by a real standalone agent on the same
database. A failing step saves a screenshot and names it in the failure."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator

import pytest
from test_agent import Running

from cloudtask.localservers import free_port
from cloudtask.users import Users
from web import create_app

CHROMIUM = os.environ.get("CLOUDTASK_CHROMIUM") or shutil.which("chromium")
# the flags this machine needs: no sandbox as root, and no background connections (the network
# is closed; Chromium would otherwise retry them all the time)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make browser)"),
    pytest.mark.timeout(240),
]


@pytest.fixture
def site(store, tmp_path) -> Iterator[str]:
    """The web site on a free loopback port, served by waitress in a thread."""
    from waitress.server import create_server

    app = create_app(test_config={"STORE": store})
    Users(store).add("ops", "operator passphrase", role="operator")
    server = create_server(app, host="127.0.0.1", port=free_port(), threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()
    thread.join(timeout=10)


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path) -> Iterator[Running]:
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(20_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.js_errors = errors  # type: ignore[attr-defined]
        yield page
        context.close()
        browser.close()


def csp_violations(page) -> list[str]:
    """A list that fills with every Content-Security-Policy violation the page reports."""
    found: list[str] = []
    page.on(
        "console",
        lambda m: found.append(m.text) if "Content Security Policy" in m.text else None,
    )
    return found


def log_in(page, site: str, username: str, password: str) -> None:
    """Log in through the login form; lands on the dashboard."""
    page.goto(site + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("form#login button[type=submit]")
    page.wait_for_url(site + "/")


class Steps:
    """Runs named steps; the first that fails leaves a screenshot and says where it is."""

    def __init__(self, page, folder) -> None:
        self.page, self.folder = page, folder

    def __call__(self, name: str, action) -> None:
        try:
            action()
        except Exception as e:
            shot = self.folder / f"failed-{name.replace(' ', '-')}.png"
            try:
                self.page.screenshot(path=str(shot), full_page=True)
            except Exception:
                shot = "(no screenshot could be taken)"
            raise AssertionError(
                f"browser step {name!r} failed at {self.page.url}: {e}\nscreenshot: {shot}"
            ) from e


def test_log_in_create_run_now_see_output_and_chart(site, agents, store, page, tmp_path):
    from playwright.sync_api import expect

    step = Steps(page, tmp_path)
    agents.start("browser-agent")

    def log_in():
        page.goto(site + "/tasks")  # not logged in: sent to the login page
        expect(page.locator("form#login")).to_be_visible()
        page.fill("input[name=username]", "ops")
        page.fill("input[name=password]", "operator passphrase")
        page.click("form#login button[type=submit]")
        page.wait_for_url(site + "/tasks")
        expect(page.locator("header .who")).to_contain_text("ops")

    def create_task():
        page.goto(site + "/tasks/new")
        page.fill("#f-name", "browser-hello")
        page.check("input[name=schedule_kind][value=cron]")
        page.fill("#f-cron", "0 4 * * *")
        page.fill("#f-timezone", "Europe/Berlin")
        page.check("input[name=run_kind][value=command]")
        page.fill("#f-command", "echo hello-from-the-browser-test")
        page.click(".form-buttons button[type=submit]")
        expect(page.locator("h1")).to_contain_text("browser-hello")
        expect(page.locator("#next-fires .zone")).to_have_text("Europe/Berlin")
        assert page.locator("#next-fires .fire-list li").count() == 10

    def run_now():
        page.click("#task-actions button:has-text('Run now')")
        page.wait_for_url("**/runs/**")
        # the page refreshes itself while the run is queued or running
        expect(page.locator("#run-output")).to_contain_text(
            "hello-from-the-browser-test", timeout=60_000
        )
        expect(page.locator("body")).to_contain_text("succeeded", timeout=30_000)

    def see_chart():
        task = store.get_task_by_name("browser-hello")
        page.goto(f"{site}/tasks/{task['_id']}")
        chart = page.locator("#trend")
        expect(chart).to_have_attribute("data-points", "1", timeout=20_000)
        box = page.locator("#trend canvas").bounding_box()
        assert box and box["width"] > 200 and box["height"] > 100
        page.screenshot(path=str(tmp_path / "task-page.png"), full_page=True)

    step("log in", log_in)
    step("create the task", create_task)
    step("run it now", run_now)
    step("see the chart", see_chart)
    assert page.js_errors == [], page.js_errors  # type: ignore[attr-defined]

"""Page fixes, each checked in a real headless Chromium (the set-up of tests/test_browser.py):
the test mail's result shows where the page lands; a kill asks first; a fire time in UTC is
printed once; dates and agent ids in the lists do not break across lines; the cluster page
shows the machine's load and the agent process's own, from a real agent's registration;
an audit entry of a create folds its fields away; a 403 says which role is needed; the
settings page names the config file to edit; and the Calendars page, used as an operator
would."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
import test_browser
from helpers import SmtpServer, wait_for
from test_browser import CHROMIUM, Steps

from cloudtask.config import CONFIG_ORIGIN_VAR, Config, load_config
from cloudtask.localservers import free_port
from cloudtask.operations import Operations
from cloudtask.users import Users
from web import create_app

page = test_browser.page

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make browser)"),
    pytest.mark.timeout(300),
]

LONG_AGENT = "agent-eu-west-1-build-host-17"


@pytest.fixture
def mail() -> Iterator[SmtpServer]:
    server = SmtpServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def site_config(tmp_path, mail) -> Config:
    """A config read from a file (the one to edit) with the SMTP server above."""
    path = tmp_path / "cloudtask.json"
    alerts = {
        "smtp_host": "127.0.0.1",
        "smtp_port": mail.port,
        "smtp_security": "none",
        "mail_from": "CloudTask <alerts@example.com>",
    }
    path.write_text(json.dumps({"alerts": alerts}))
    return load_config(str(path), environ={})


@pytest.fixture
def site(store, zk, site_config, monkeypatch) -> Iterator[str]:
    """The site on a free port (waitress in a thread) with ZooKeeper, an admin, an operator and
    a viewer; run as ``cloudtask up`` runs it: on a copy of the config, naming the original."""
    from waitress.server import create_server

    monkeypatch.setenv(CONFIG_ORIGIN_VAR, "/srv/cloudtask/conf/cloudtask.json")
    app = create_app(site_config, test_config={"STORE": store, "ZK": zk})
    users = Users(store)
    users.add("root", "admin passphrase", role="admin")
    users.add("ops", "operator passphrase", role="operator")
    users.add("eve", "viewer passphrase", role="viewer")
    server = create_server(app, host="127.0.0.1", port=free_port(), threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()
    thread.join(timeout=10)


@pytest.fixture
def cluster_agent(zk, zk_hosts, mongo_client, mongo_db_name, tmp_path) -> Iterator[str]:
    """A real center and a real agent of the cluster, in this process: the agent registers and
    publishes its load, the center places the tasks of its group on it."""
    from kazoo.client import KazooClient

    from cloudtask.agent.cluster import ClusterAgent
    from cloudtask.center.center import Center
    from cloudtask.store import Store

    cfg = (
        Config()
        .with_section("zookeeper", hosts=zk_hosts)
        .with_section("agent", data_dir=str(tmp_path / "agent"), group="pagefix")
    )
    center = Center(cfg, Store(mongo_client, mongo_db_name), zk, center_id="c1", notify=False)
    client = KazooClient(hosts=zk_hosts)
    client.start()
    agent = ClusterAgent(cfg, Store(mongo_client, mongo_db_name), client, agent_id=LONG_AGENT)
    threads = [threading.Thread(target=x.run, daemon=True) for x in (center, agent)]
    for thread in threads:
        thread.start()
    yield LONG_AGENT
    agent.stop()
    center.stop()
    for thread in threads:
        thread.join(timeout=30)
    client.stop()
    client.close()


def one_line(locator) -> bool:
    """The element's text is laid out on a single line (it did not wrap)."""
    return locator.evaluate(
        "e => { const r = document.createRange(); r.selectNodeContents(e);"
        " const tops = new Set([...r.getClientRects()].map(b => Math.round(b.top)));"
        " return tops.size === 1; }"
    )


def test_page_fixes_in_the_browser(site, store, zk, page, tmp_path, mail, cluster_agent):
    from playwright.sync_api import expect

    ops = Operations(store)
    step = Steps(page, tmp_path)
    violations = test_browser.csp_violations(page)
    utc_task = ops.create_task(
        "web:root",
        {
            "name": "utc-job",
            "schedule": {"cron": "0 4 * * *", "timezone": "UTC"},
            "command": "true",
            "group": "pagefix",  # placed on the agent with the long id
        },
    )
    berlin_task = ops.create_task(
        "web:root",
        {
            "name": "berlin-job",
            "schedule": {"cron": "0 4 * * *", "timezone": "Europe/Berlin"},
            "command": "true",
            "group": "nobody-here",  # no agent: its manual run stays queued
            "description": "d",
            "env": {"A": "1", "B": "2", "C": "3"},
            "retries": 2,
            "timeout": "5m",
        },
    )
    finished = datetime(2026, 12, 1, 3, 4, 5, tzinfo=timezone.utc)
    store.tasks.update_one(
        {"_id": utc_task["_id"]},
        {
            "$set": {
                "last_run": {
                    "id": "r1",
                    "status": "succeeded",
                    "finished": finished,
                    "duration": 1.5,
                },
            }
        },
    )

    def as_viewer_a_403_names_the_role():
        test_browser.log_in(page, site, "eve", "viewer passphrase")
        answer = page.goto(site + "/settings")
        assert answer.status == 403
        expect(page.locator("h1")).to_contain_text("403 · Not allowed")
        expect(page.locator("#error-message")).to_contain_text(
            "this needs the admin role; eve has the viewer role"
        )
        page.context.clear_cookies()  # logged out

    def fire_times_once_in_utc():
        test_browser.log_in(page, site, "root", "admin passphrase")
        page.goto(f"{site}/tasks/{utc_task['_id']}")
        first = page.locator("#next-fires .fire-list li").first
        text = first.inner_text()
        assert text.count("04:00:00") == 1 and text.count("UTC") == 1, text
        page.goto(f"{site}/tasks/{berlin_task['_id']}")
        text = page.locator("#next-fires .fire-list li").first.inner_text()
        # 04:00 in Berlin, 03:00 UTC in winter (the date is in December)
        assert "04:00:00" in text and "UTC" in text and text.count(":00:00") == 2, text

    def task_list_keeps_values_on_one_line():
        page.set_viewport_size({"width": 760, "height": 900})

        def placed() -> bool:
            page.goto(f"{site}/tasks")
            row = page.locator("#task-table tr", has_text="utc-job")
            return row.locator("td").nth(5).inner_text().strip() == cluster_agent

        wait_for(placed, timeout=30, message="utc-job was not placed on the agent")
        row = page.locator("#task-table tr", has_text="utc-job")
        agent_cell = row.locator("td").nth(5)
        assert one_line(agent_cell), "the agent id wrapped"
        when = row.locator("td").nth(4).locator(".nowrap")
        expect(when).to_have_text("2026-12-01 03:04:05")
        assert one_line(when), "the date wrapped"
        page.set_viewport_size({"width": 1280, "height": 900})

    def kill_asks_first():
        run = ops.run_now("web:root", berlin_task["_id"])
        page.goto(f"{site}/runs/{run['_id']}")
        expect(page.locator("#kill-form")).to_be_hidden()  # behind "Kill…"
        page.click("#kill-confirm summary")
        expect(page.locator("#kill-confirm .confirm-box")).to_contain_text("berlin-job")
        assert store.runs.find_one({"_id": run["_id"]})["status"] == "queued"  # not yet
        page.click("#kill-form button[type=submit]")
        expect(page.locator(".flash.ok")).to_contain_text("asked to stop")
        assert store.runs.find_one({"_id": run["_id"]})["status"] == "killed"

    def audit_entries_fold_a_create():
        page.goto(f"{site}/audit?action=task.create")
        row = page.locator("#audit-table tbody tr", has_text="berlin-job")
        expect(row).to_contain_text("created with")
        visible = row.locator("td > ul.changes > li")
        assert 1 <= visible.count() <= 4
        more = row.locator("details.more-changes")
        expect(more.locator("summary")).to_contain_text("more field")
        expect(more.locator("ul.changes")).to_be_hidden()  # folded until asked
        assert row.evaluate("e => e.getBoundingClientRect().height") < 250
        more.locator("summary").click()
        expect(more.locator("ul.changes")).to_be_visible()
        expect(row).not_to_contain_text("→")  # a create has no old values

    def cluster_page_shows_real_load():
        def shown() -> bool:
            page.goto(f"{site}/cluster")
            cell = page.locator(f'tr[data-agent="{cluster_agent}"] td[data-col="agent-load"]')
            return cell.count() == 1 and "MB" in cell.inner_text()

        wait_for(shown, timeout=30, message="the agent's load never showed")
        row = page.locator(f'tr[data-agent="{cluster_agent}"]')
        host = row.locator('td[data-col="host-load"]').inner_text()
        own = row.locator('td[data-col="agent-load"]').inner_text()
        assert "cores" in host and "mem 0 %" not in host, host
        megabytes = int(own.split("·")[1].split()[0])
        assert megabytes >= 10, own  # this test process holds far more than 10 MB

    def test_mail_result_in_sight():
        page.goto(f"{site}/settings")
        expect(page.locator("#config-file")).to_have_text("/srv/cloudtask/conf/cloudtask.json")
        expect(page.locator("#config-source")).to_contain_text("a copy it writes again")
        page.fill("#f-to", "me@example.com")
        page.click(".test-mail-form button[type=submit]")
        page.wait_for_url("**/settings?to=me*#test-mail")
        result = page.locator("#test-mail-result")
        expect(result).to_contain_text("Test mail sent to me@example.com")
        in_view = result.evaluate(
            "e => { const r = e.getBoundingClientRect();"
            " return r.top >= 0 && r.bottom <= window.innerHeight; }"
        )
        assert in_view, "the test mail's result is out of sight"
        assert page.locator("main > p.flash").count() == 0  # not repeated at the top
        wait_for(lambda: mail.inbox.messages(), timeout=10, message="no test mail arrived")

    step("a viewer's 403", as_viewer_a_403_names_the_role)
    step("fire times", fire_times_once_in_utc)
    step("task list", task_list_keeps_values_on_one_line)
    step("kill asks first", kill_asks_first)
    step("audit folds a create", audit_entries_fold_a_create)
    step("cluster load", cluster_page_shows_real_load)
    step("test mail", test_mail_result_in_sight)
    assert violations == [], violations
    assert page.js_errors == [], page.js_errors  # type: ignore[attr-defined]


def test_the_calendars_page_in_the_browser(site, store, page, tmp_path):
    """An operator makes a calendar by hand (a wrong date is marked where it was typed),
    imports one from an .ics file, plans a one-off blackout, sees when it opens, and deletes
    it after being asked."""
    from playwright.sync_api import expect

    step = Steps(page, tmp_path)
    violations = test_browser.csp_violations(page)
    ics = tmp_path / "xmas.ics"
    ics.write_bytes(
        b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n"
        b"BEGIN:VEVENT\r\nUID:xmas\r\nSUMMARY:Christmas\r\nDTSTART;VALUE=DATE:20251225\r\n"
        b"DTEND;VALUE=DATE:20251227\r\nRRULE:FREQ=YEARLY\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )

    def a_calendar_by_hand():
        test_browser.log_in(page, site, "ops", "operator passphrase")
        page.click("nav.main a:text-is('Calendars')")
        page.wait_for_url(site + "/calendars")
        form = page.locator("#calendar-form")
        form.locator("#c-name").fill("year-end")
        form.locator("input[name=weekdays][value=sat]").check()
        form.locator("input[name=weekdays][value=sun]").check()
        form.locator("#c-dates").fill("2099-12-24\n2099-02-30")
        form.locator("button[type=submit]").click()
        error = page.locator("#calendar-form [data-error='calendar.dates']")
        expect(error).to_be_visible()
        expect(error).to_contain_text("2099-02-30")
        expect(page.locator("#c-dates")).to_have_value("2099-12-24\n2099-02-30")
        assert store.calendar_names(["year-end"]) == set()
        page.locator("#c-dates").fill("2099-12-24\n2099-12-27..2099-12-28")
        page.locator("#calendar-form button[type=submit]").click()
        row = page.locator("tr[data-calendar='year-end']")
        expect(row).to_contain_text("2099-12-24, 2099-12-27, 2099-12-28")
        expect(row).to_contain_text("sat, sun")
        expect(page.locator(".flash.ok")).to_contain_text("Calendar year-end created")

    def a_task_on_the_calendar_with_a_label():
        page.goto(site + "/tasks/new")
        page.fill("#f-name", "weekend-report")
        page.fill("#f-cron", "0 6 * * *")
        page.fill("#f-timezone", "UTC")
        page.fill("#f-calendar_only", "year-end")
        page.fill("#f-command", "true")
        page.fill("#f-requires", "os=linux")

        def weekend_fires() -> list[str]:  # the calendar holds weekends only, until 2099
            texts = page.locator("#schedule-preview li").all_inner_texts()
            days = {datetime.strptime(t[:10], "%Y-%m-%d").strftime("%a") for t in texts}
            shown = len(texts) == 5 and days <= {"Sat", "Sun"}
            return shown and all("06:00:00" in t for t in texts) and texts

        wait_for(weekend_fires, timeout=15, message="the preview did not judge the calendar")
        page.click(".form-buttons button[type=submit]")
        expect(page.locator("h1")).to_contain_text("weekend-report")
        spec = store.get_task_by_name("weekend-report")["spec"]
        assert spec["schedule"]["calendar"] == {"only": "year-end"}
        assert spec["requires"] == {"os": "linux"}
        page.goto(site + "/calendars")
        expect(page.locator("tr[data-calendar='year-end']")).to_contain_text("weekend-report")

    def a_calendar_from_a_file():
        page.locator("#i-name").fill("xmas")
        page.locator("#i-file").set_input_files(str(ics))
        page.locator("#import-form button[type=submit]").click()
        expect(page.locator(".flash.ok")).to_contain_text("Calendar xmas created from xmas.ics")
        row = page.locator("tr[data-calendar='xmas']")
        expect(row).to_contain_text("ics:xmas.ics")
        today = datetime.now(timezone.utc).date()
        year = today.year if today <= today.replace(month=12, day=25) else today.year + 1
        expect(row.locator("[data-next]")).to_contain_text(f"{year}-12-25")

    def a_one_off_blackout():
        form = page.locator("#blackout-form")
        form.locator("#b-name").fill("freeze")
        form.locator("input[name=kind][value=once]").check()
        form.locator("#b-start").fill("2099-12-24T18:00")
        form.locator("#b-end").fill("2099-12-27T06:00")
        form.locator("#b-description").fill("year-end freeze")
        form.locator("button[type=submit]").click()
        row = page.locator("tr[data-blackout='freeze']")
        expect(row).to_contain_text("every group")
        expect(row.locator("[data-now]")).to_have_text("opens 2099-12-24 18:00:00 UTC")
        assert store.get_blackout("freeze")["start"] == "2099-12-24T18:00:00"

    def deleting_asks_first():
        page.locator("tr[data-blackout='freeze'] a:text-is('Delete')").click()
        expect(page.locator("h1")).to_contain_text("Delete blackout freeze?")
        page.locator("#delete-blackout button[type=submit]").click()
        expect(page.locator(".flash.ok")).to_contain_text("Blackout freeze deleted")
        expect(page.locator("tr[data-blackout='freeze']")).to_have_count(0)

    step("a calendar by hand", a_calendar_by_hand)
    step("a task on the calendar with a label", a_task_on_the_calendar_with_a_label)
    step("a calendar from a file", a_calendar_from_a_file)
    step("a one-off blackout", a_one_off_blackout)
    step("deleting asks first", deleting_asks_first)
    assert violations == []

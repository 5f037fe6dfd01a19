"""Calendars and blackout windows through the store, the operations, the REST API (roles),
the CLI and the previews (the API's next fires, the task page, ``cloudtask next``), on the
MongoDB wire server."""

from __future__ import annotations

from datetime import timedelta

import pytest
from click.testing import CliRunner
from helpers import OPERATOR, VIEWER, make_web_app, web_login

from cloudtask.agent.calendarfeed import CalendarFeed
from cloudtask.cli import cli
from cloudtask.clock import utcnow
from cloudtask.config import load_config
from cloudtask.exceptions import Conflict, ValidationError
from cloudtask.operations import Operations
from cloudtask.users import Users

ICS = (
    b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n"
    b"BEGIN:VEVENT\r\nUID:xmas\r\nSUMMARY:Christmas\r\nDTSTART;VALUE=DATE:20251225\r\n"
    b"DTEND;VALUE=DATE:20251227\r\nRRULE:FREQ=YEARLY\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)
BROKEN = b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nDTSTART:20261225\r\nRRULE:FREQ=NEVER\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"


def task(name: str, calendar: dict | None = None, cron: str = "0 3 * * *") -> dict:
    schedule: dict = {"cron": cron}
    if calendar is not None:
        schedule["calendar"] = calendar
    return {"name": name, "schedule": schedule, "command": "true"}


def test_tasks_name_stored_calendars_and_a_calendar_in_use_is_not_deleted(store):
    ops = Operations(store)
    with pytest.raises(ValidationError) as e:
        ops.create_task("alice", task("t", {"only": "workdays", "skip": ["holidays"]}))
    assert [p.path for p in e.value.problems] == ["schedule.calendar", "schedule.calendar"]
    assert "no calendar named 'holidays'" in str(e.value)
    ops.set_calendar("alice", "workdays", {"weekdays": ["mon", "tue", "wed", "thu", "fri"]})
    ops.set_calendar("alice", "holidays", {"dates": ["2026-12-24..2026-12-26"]})
    ops.create_task("alice", task("t", {"only": "workdays", "skip": ["holidays"]}))
    # a list of schedules names a calendar too
    ops.create_task(
        "alice",
        {
            "name": "u",
            "command": "true",
            "schedule": [{"every": "1h"}, {"cron": "0 9 * * *", "calendar": {"skip": "holidays"}}],
        },
    )
    with pytest.raises(Conflict, match=r"named by 2 task\(s\): t, u"):
        ops.delete_calendar("alice", "holidays")
    with pytest.raises(Conflict, match="named by 1 task"):
        ops.delete_calendar("alice", "workdays")
    assert store.get_calendar("holidays")["dates"] == ["2026-12-24", "2026-12-25", "2026-12-26"]
    ops.delete_task("alice", store.get_task_by_name("u")["_id"])
    ops.replace_task("alice", store.get_task_by_name("t")["_id"], task("t"))
    ops.delete_calendar("alice", "holidays")
    assert store.calendar_names(["holidays", "workdays"]) == {"workdays"}
    actions = [a["action"] for a in store.audit.find({"target": "calendar:holidays"})]
    assert sorted(actions) == ["calendar.delete", "calendar.set"]
    entry = store.audit.find_one({"action": "calendar.set", "target": "calendar:holidays"})
    assert entry["after"] == {
        "weekdays": [],
        "dates": 3,
        "first": "2026-12-24",
        "last": "2026-12-26",
    }


def test_a_bad_import_keeps_the_stored_calendar(store):
    ops = Operations(store)
    calendar, created = ops.import_calendar("alice", "xmas", ICS, filename="xmas.ics")
    assert created and calendar["source"] == "ics:xmas.ics"
    year = utcnow().year
    assert f"{year}-12-25" in calendar["dates"] and f"{year}-12-26" in calendar["dates"]
    before = store.get_calendar("xmas")
    with pytest.raises(ValidationError) as e:
        ops.import_calendar("alice", "xmas", BROKEN, filename="broken.ics")
    assert e.value.source == "the iCalendar file broken.ics"
    assert e.value.problems[0].path == "line 4" and "RRULE" in e.value.problems[0].message
    assert store.get_calendar("xmas") == before


def test_the_agents_feed_reads_changes_and_keeps_them_on_disk(store, tmp_path):
    ops = Operations(store)
    cache = tmp_path / "agent" / "calendars.json"
    feed = CalendarFeed(store, "default", cache, poll_interval=0)
    assert feed.look() is False and feed.book.blackouts == ()  # nothing yet
    ops.set_blackout(
        "alice", "maint", {"group": "default", "days": ["sun"], "from": "02:00", "to": "04:00"}
    )
    ops.set_blackout("alice", "theirs", {"group": "batch", "days": ["sun"]})
    ops.set_calendar("alice", "holidays", {"dates": ["2026-12-24"]})
    assert feed.look() is True
    assert [b.name for b in feed.book.blackouts] == ["maint"]  # its group's only
    assert set(feed.book.calendars) == {"holidays"}
    assert feed.look() is False  # the change counter did not move
    # a new agent process that cannot read MongoDB starts with what the last one knew
    again = CalendarFeed(None, "default", cache)
    assert [b.name for b in again.book.blackouts] == ["maint"]
    assert set(again.book.calendars) == {"holidays"}
    ops.delete_blackout("alice", "maint")
    assert feed.look() is True and feed.book.blackouts == ()


def api_client(store):
    app = make_web_app(store, config=load_config(None, environ={}), users=[OPERATOR, VIEWER])
    operator = Users(store).create_token(OPERATOR.name, "tests")
    viewer = Users(store).create_token(VIEWER.name, "tests")
    client = app.test_client()

    def call(method, path, who=operator, **kw):
        return client.open(
            f"/api/v1{path}", method=method, headers={"Authorization": f"Bearer {who}"}, **kw
        )

    return client, call, viewer


def test_the_api_manages_calendars_and_blackouts_by_role(store):
    client, call, viewer = api_client(store)
    body = {"dates": ["2026-12-24", "2026-12-31"], "weekdays": ["sun"], "description": "office"}
    assert call("PUT", "/calendars/office", viewer, json=body).status_code == 403
    reply = call("PUT", "/calendars/office", json=body)
    assert reply.status_code == 201, reply.get_json()
    assert reply.get_json()["dates"] == ["2026-12-24", "2026-12-31"]
    assert call("PUT", "/calendars/office", json=body).status_code == 200
    bad = call("PUT", "/calendars/office", json={"dates": ["2026-13-01"], "colour": 1})
    assert bad.status_code == 422
    assert sorted(p["path"] for p in bad.get_json()["details"]) == ["colour", "dates[0]"]
    assert call("PUT", "/calendars/bad%20name", json=body).status_code == 422
    listed = call("GET", "/calendars", viewer).get_json()["items"]
    assert [(c["name"], c["date_count"], c["weekdays"]) for c in listed] == [("office", 2, ["sun"])]
    assert call("GET", "/calendars/none", viewer).status_code == 404
    # import: the raw body, and a multipart file; a broken file is a 422 with the line
    reply = call(
        "POST", "/calendars/xmas/import?weekdays=sat", data=ICS, content_type="text/calendar"
    )
    assert reply.status_code == 201, reply.get_json()
    assert reply.get_json()["weekdays"] == ["sat"] and reply.get_json()["source"] == "ics"
    assert call("POST", "/calendars/xmas/import", viewer, data=ICS).status_code == 403
    import io

    reply = call(
        "POST",
        "/calendars/xmas/import",
        data={"file": (io.BytesIO(BROKEN), "broken.ics")},
        content_type="multipart/form-data",
    )
    assert reply.status_code == 422
    assert reply.get_json()["details"][0]["path"] == "line 4"
    assert call("GET", "/calendars/xmas", viewer).get_json()["weekdays"] == ["sat"]
    # blackouts
    window = {
        "group": "default",
        "days": ["sun"],
        "from": "02:00",
        "to": "04:00",
        "timezone": "Europe/Berlin",
    }
    assert call("PUT", "/blackouts/maint", viewer, json=window).status_code == 403
    reply = call("PUT", "/blackouts/maint", json=window)
    assert reply.status_code == 201
    assert reply.get_json()["summary"] == "sun 02:00-04:00 Europe/Berlin"
    bad = call("PUT", "/blackouts/maint", json={"group": "default", "days": ["sun"], "to": "99:00"})
    assert bad.status_code == 422 and bad.get_json()["details"][0]["path"] == "to"
    assert call("GET", "/blackouts/maint", viewer).get_json()["from"] == "02:00"
    assert [
        b["name"] for b in call("GET", "/blackouts?group=default", viewer).get_json()["items"]
    ] == ["maint"]
    assert call("GET", "/blackouts?group=other", viewer).get_json()["items"] == []
    # in use: refused; the OpenAPI document has them
    ops = Operations(store)
    ops.create_task("alice", task("t", {"skip": "office"}))
    reply = call("DELETE", "/calendars/office")
    assert reply.status_code == 409 and "named by 1 task" in reply.get_json()["error"]
    assert call("DELETE", "/calendars/xmas", viewer).status_code == 403
    assert call("DELETE", "/calendars/xmas").get_json() == {"deleted": "xmas"}
    assert call("DELETE", "/calendars/xmas").status_code == 404
    assert call("DELETE", "/blackouts/maint").get_json() == {"deleted": "maint"}
    paths = call("GET", "/openapi.json", viewer).get_json()["paths"]
    assert {"/api/v1/calendars/{name}/import", "/api/v1/blackouts/{name}"} <= set(paths)
    assert client.get("/api/v1/calendars").status_code == 401


def test_the_previews_honour_calendars_and_blackouts(store, mongo_server, mongo_db_name):
    client, call, viewer = api_client(store)
    ops = Operations(store)
    tomorrow = (utcnow() + timedelta(days=1)).date()
    ops.set_calendar("alice", "tomorrow", {"dates": [tomorrow.isoformat()]})
    ops.set_blackout(
        "alice",
        "maint",
        {"group": "default", "dates": [(tomorrow + timedelta(days=1)).isoformat()]},
    )
    doc = ops.create_task("alice", task("daily", {"skip": "tomorrow"}))
    out = call("GET", f"/tasks/{doc['_id']}", viewer).get_json()
    fires = out["next_fires"]
    assert not [f for f in fires if f.startswith(tomorrow.isoformat())]  # no fire tomorrow
    after = (tomorrow + timedelta(days=1)).isoformat()
    assert [s["at"][:10] for s in out["next_fires_skipped"]] == [after]
    assert out["next_fires_skipped"][0]["reason"] == "blackout maint"
    assert fires[0][:10] == utcnow().date().isoformat() or fires[0][:10] == after
    # the task page marks the fire the blackout skips
    web_login(client, VIEWER.name, VIEWER.password, "/")
    page = client.get(f"/tasks/{doc['_id']}").get_data(as_text=True)
    assert page.count("skipped: blackout maint") == 1
    assert f"{tomorrow.isoformat()} 03:00" not in page and f"{after} 03:00" in page
    # cloudtask next reads them from the configured MongoDB
    env = {
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_CONFIG": "",
    }
    runner = CliRunner()
    out = runner.invoke(
        cli,
        [
            "next",
            '{"cron": "0 3 * * *", "calendar": {"skip": "tomorrow"}}',
            "-n",
            "3",
            "--group",
            "default",
        ],
        env=env,
    )
    assert out.exit_code == 0, out.output
    assert tomorrow.isoformat() + "T03" not in out.output
    assert out.output.count("skipped: blackout maint") == 1


def test_the_cli_manages_calendars_and_blackouts(store, mongo_server, mongo_db_name, tmp_path):
    env = {
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_CONFIG": "",
    }
    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli, list(args), env=env)

    out = run("calendar", "set", "workdays", "--weekdays", "mon,tue,wed", "--weekdays", "thu,fri")
    assert (
        out.exit_code == 0
        and "calendar workdays created: mon,tue,wed,thu,fri, 0 dates" in out.output
    ), out.output
    out = run("calendar", "set", "bad", "--dates", "2026-02-30")
    assert out.exit_code == 2 and "dates[0]" in out.output, out.output
    ics = tmp_path / "de.ics"
    ics.write_bytes(ICS)
    out = run("calendar", "import", "de", str(ics), "--description", "holidays")
    assert out.exit_code == 0 and "calendar de imported:" in out.output, out.output
    broken = tmp_path / "broken.ics"
    broken.write_bytes(BROKEN)
    out = run("calendar", "import", "de", str(broken))
    assert out.exit_code == 2 and "line 4: RRULE" in out.output, out.output
    out = run("calendar", "list")
    lines = out.output.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["de", "workdays"]
    out = run("calendar", "show", "de", "--json")
    assert out.exit_code == 0 and '"description": "holidays"' in out.output
    Operations(store).create_task("alice", task("t", {"only": "workdays"}))
    out = run("calendar", "delete", "workdays")
    assert out.exit_code == 1 and "named by 1 task(s): t" in out.output, out.output
    out = run("calendar", "show", "workdays")
    assert "tasks: t" in out.output
    out = run("calendar", "delete", "nope")
    assert out.exit_code == 1 and "no calendar named 'nope'" in out.output
    out = run(
        "blackout",
        "set",
        "maint",
        "--group",
        "default",
        "--days",
        "sun",
        "--from",
        "02:00",
        "--to",
        "04:00",
        "--timezone",
        "Europe/Berlin",
    )
    assert out.exit_code == 0 and "sun 02:00-04:00 Europe/Berlin" in out.output, out.output
    out = run(
        "blackout",
        "set",
        "x",
        "--group",
        "default",
        "--start",
        "2026-12-24T18:00",
        "--end",
        "yesterday",
    )
    assert out.exit_code == 2 and "end: expected a local time" in out.output, out.output
    out = run("blackout", "list", "--group", "default")
    assert out.output.startswith("maint\tdefault\tsun 02:00-04:00 Europe/Berlin")
    out = run("blackout", "delete", "maint")
    assert out.exit_code == 0 and store.list_blackouts() == []


def test_backfill_leaves_out_the_dates_a_calendar_rule_excludes(store):
    ops = Operations(store)
    ops.set_calendar("alice", "weekend", {"weekdays": ["sat", "sun"]})
    doc = ops.create_task("alice", task("daily", {"skip": "weekend"}))
    # Monday 2026-11-02 to Sunday 2026-11-08: five workdays
    result = ops.backfill("alice", doc["_id"], "2026-11-02T00:00:00Z", "2026-11-08T23:59:00Z")
    assert result["queued"] == 5
    days = sorted(d["scheduled_for"].day for d in store.runs.find({"task_name": "daily"}))
    assert days == [2, 3, 4, 5, 6]


def test_the_task_form_shows_a_calendar_rule_in_its_fields(store):
    import re

    client, _, _ = api_client(store)
    Operations(store).set_calendar("alice", "weekend", {"weekdays": ["sat", "sun"]})
    doc = Operations(store).create_task("alice", task("daily", {"skip": "weekend"}))
    web_login(client, OPERATOR.name, OPERATOR.password, "/")
    page = client.get(f"/tasks/{doc['_id']}/edit").get_data(as_text=True)
    assert re.search(r'name="editor" value="fields"\s+checked', page)
    assert re.search(r'name="calendar_skip" value="weekend"', page)
    assert re.search(r'name="calendar_only" value=""', page)


def test_the_cluster_page_lists_blackouts_and_calendars(store):
    client, _, _ = api_client(store)
    web_login(client, VIEWER.name, VIEWER.password, "/")
    assert 'id="calendars"' not in client.get("/cluster").get_data(as_text=True)
    ops = Operations(store)
    ops.set_calendar("alice", "weekend", {"weekdays": ["sat", "sun"], "description": "<b>off</b>"})
    ops.set_blackout(
        "alice",
        "maint",
        {
            "group": "*",
            "days": ["sun"],
            "from": "02:00",
            "to": "04:00",
            "timezone": "Europe/Berlin",
        },
    )
    page = client.get("/cluster").get_data(as_text=True)
    assert 'id="calendars"' in page
    assert "<td>maint</td><td>*</td><td>sun 02:00-04:00 Europe/Berlin</td>" in page
    assert "<td>weekend</td><td>sat, sun</td><td>0</td><td>&lt;b&gt;off&lt;/b&gt;</td>" in page

"""The Calendars page (Flask test client on the real nx-27017 store): everyone sees the
calendars and blackout windows (next dates, the tasks naming a calendar, a window open now or
when it opens next); operators create, change, import and delete them through the forms
(the same validation as the API: a refused form keeps what was typed, marks the field, and
the stored one is unchanged), deleting asks first and is refused while a task names the
calendar; every change is audited."""

from __future__ import annotations

import html
import io
import re
from datetime import datetime, timedelta, timezone

import pytest
from helpers import OPERATOR, VIEWER, make_web_app, web_login

from cloudtask.calendars import Blackout
from cloudtask.operations import Operations

ICS = (
    b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n"
    b"BEGIN:VEVENT\r\nUID:xmas\r\nSUMMARY:Christmas\r\nDTSTART;VALUE=DATE:20251225\r\n"
    b"DTEND;VALUE=DATE:20251227\r\nRRULE:FREQ=YEARLY\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
)
BROKEN = b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nDTSTART:20261225\r\nRRULE:FREQ=NEVER\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"


@pytest.fixture
def app(store):
    return make_web_app(store, users=[OPERATOR, VIEWER])


def logged_in(app, user):
    client = app.test_client()
    client.csrf = web_login(client, user.name, user.password, "/calendars")
    return client


def text(answer) -> str:
    """The page's words, without tags."""
    words = re.sub(r"<[^>]+>", " ", answer.get_data(as_text=True))
    return re.sub(r"\s+", " ", html.unescape(words))


def row(page: str, kind: str, name: str) -> str:
    found = re.search(rf'<tr data-{kind}="{re.escape(name)}">(.*?)</tr>', page, re.S)
    assert found, f"no {kind} row {name}"
    words = html.unescape(re.sub(r"<[^>]+>", " ", found.group(1)))
    return re.sub(r"\s+,", ",", re.sub(r"\s+", " ", words))


def post(client, path, data, **kw):
    return client.post(path, data={"csrf_token": client.csrf, **data}, **kw)


def test_everyone_sees_calendars_and_blackouts_and_only_operators_get_the_forms(app, store):
    ops = Operations(store)
    today = datetime.now(timezone.utc).date()
    soon = [(today + timedelta(days=d)).isoformat() for d in (3, 10, 40)]
    past = (today - timedelta(days=30)).isoformat()
    ops.set_calendar("op1", "holidays", {"dates": [past, *soon], "description": "days off"})
    ops.set_calendar("op1", "workdays", {"weekdays": ["mon", "tue", "wed", "thu", "fri"]})
    ops.create_task(
        "op1",
        {
            "name": "report",
            "schedule": {"cron": "0 3 * * *", "calendar": {"only": "workdays", "skip": "holidays"}},
            "command": "true",
        },
    )
    now = datetime.now(timezone.utc)
    ops.set_blackout(
        "op1",
        "now-window",
        {
            "group": "*",
            "start": (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"),
            "end": (now + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"),
        },
    )
    ops.set_blackout(
        "op1", "sunday", {"group": "default", "days": ["sun"], "from": "02:00", "to": "04:00"}
    )
    # every day all day: one window after the other, open until the last one ends
    days = f"{today}..{today + timedelta(days=2)}"
    ops.set_blackout("op1", "all-week", {"group": "x", "dates": [days]})

    viewer = logged_in(app, VIEWER)
    answer = viewer.get("/calendars")
    assert answer.status_code == 200
    page = answer.get_data(as_text=True)
    holidays = row(page, "calendar", "holidays")
    assert ", ".join(soon) in holidays  # the next dates, not the past one
    assert past not in holidays and "report" in holidays and "days off" in holidays
    assert "mon, tue, wed, thu, fri" in row(page, "calendar", "workdays")
    assert "open until" in row(page, "blackout", "now-window")
    assert f"open until {today + timedelta(days=3)} 00:00:00" in row(page, "blackout", "all-week")
    opens = Blackout.from_doc(store.get_blackout("sunday")).next_opening(now)
    assert f"opens {opens:%Y-%m-%d %H:%M}" in row(page, "blackout", "sunday")
    assert 'id="calendar-form"' not in page and 'id="blackout-form"' not in page
    assert "Read only" in page
    assert viewer.get("/calendars/calendar/holidays/delete").status_code == 403

    operator = logged_in(app, OPERATOR)
    page = operator.get("/calendars").get_data(as_text=True)
    for form in ("calendar-form", "import-form", "blackout-form"):
        assert f'id="{form}"' in page
    # ?calendar= fills the form with the stored calendar to change it
    page = text(operator.get("/calendars?calendar=holidays"))
    assert "Change calendar holidays" in page and soon[0] in page


def test_an_operator_creates_and_replaces_a_calendar_and_bad_input_keeps_the_stored_one(app, store):
    operator = logged_in(app, OPERATOR)
    answer = post(
        operator,
        "/calendars/calendar",
        {
            "name": "year-end",
            "description": "closed",
            "weekdays": ["sat", "sun"],
            "dates": "2026-12-24\n2026-12-27..2026-12-29, 2026-12-31",
        },
    )
    assert answer.status_code == 302
    stored = store.get_calendar("year-end")
    assert stored["dates"] == [
        "2026-12-24",
        "2026-12-27",
        "2026-12-28",
        "2026-12-29",
        "2026-12-31",
    ]
    assert stored["weekdays"] == ["sat", "sun"] and stored["description"] == "closed"
    assert "Calendar year-end created" in text(operator.get(answer.headers["Location"]))

    # a bad date: refused at its field, what was typed is kept, the stored calendar unchanged
    typed = "2026-12-24\n2026-13-40"
    answer = post(operator, "/calendars/calendar", {"name": "year-end", "dates": typed})
    assert answer.status_code == 422
    page = answer.get_data(as_text=True)
    assert re.search(r'data-field="dates">.*?data-error="calendar.dates"', page, re.S)
    assert "2026-13-40" in page and "The calendar was not stored" in page
    assert store.get_calendar("year-end") == stored
    # nothing at all: the whole is refused, with why
    answer = post(operator, "/calendars/calendar", {"name": "empty"})
    assert answer.status_code == 422
    assert "at least one date or weekday" in text(answer)
    # a bad name
    answer = post(operator, "/calendars/calendar", {"name": "no spaces", "weekdays": ["mon"]})
    assert answer.status_code == 422 and 'data-error="calendar.name"' in answer.get_data(
        as_text=True
    )

    answer = post(operator, "/calendars/calendar", {"name": "year-end", "dates": "2027-01-01"})
    assert answer.status_code == 302
    assert store.get_calendar("year-end")["dates"] == ["2027-01-01"]
    assert "Calendar year-end replaced" in text(operator.get("/calendars"))
    actions = [e["action"] for e in store.audit.find({"target": "calendar:year-end"})]
    assert actions == ["calendar.set", "calendar.set"]


def test_an_operator_imports_an_ics_file_and_a_broken_file_is_refused_with_its_line(app, store):
    operator = logged_in(app, OPERATOR)
    answer = post(
        operator,
        "/calendars/import",
        {"name": "xmas", "timezone": "Europe/Berlin", "file": (io.BytesIO(ICS), "xmas.ics")},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 302, text(answer)
    stored = store.get_calendar("xmas")
    this_year = datetime.now(timezone.utc).year
    assert f"{this_year}-12-25" in stored["dates"] and f"{this_year}-12-26" in stored["dates"]
    assert stored["source"] == "ics:xmas.ics"
    assert re.search(r"from xmas.ics: \d+ dates", text(operator.get("/calendars")))

    answer = post(
        operator,
        "/calendars/import",
        {"name": "xmas", "file": (io.BytesIO(BROKEN), "bad.ics")},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 422
    page = text(answer)
    assert "bad.ics" in page and "line 4: RRULE" in page
    assert store.get_calendar("xmas") == stored
    # no file chosen, and a bad time zone: said at their fields
    answer = post(
        operator, "/calendars/import", {"name": "xmas"}, content_type="multipart/form-data"
    )
    assert answer.status_code == 422 and 'data-error="import.file"' in answer.get_data(as_text=True)
    answer = post(
        operator,
        "/calendars/import",
        {"name": "xmas", "timezone": "Mars/Base", "file": (io.BytesIO(ICS), "x.ics")},
        content_type="multipart/form-data",
    )
    assert answer.status_code == 422
    assert 'data-error="import.timezone"' in answer.get_data(as_text=True)
    assert store.get_calendar("xmas") == stored


def test_an_operator_stores_weekly_and_one_off_blackouts_and_a_bad_window_is_marked(app, store):
    operator = logged_in(app, OPERATOR)
    answer = post(
        operator,
        "/calendars/blackout",
        {
            "name": "db-maint",
            "group": "default",
            "kind": "weekly",
            "days": ["sun"],
            "from": "02:00",
            "to": "04:00",
            "timezone": "Europe/Berlin",
            "start": "2026-01-01T00:00",  # (the other kind's fields are ignored)
        },
    )
    assert answer.status_code == 302, text(answer)
    stored = store.get_blackout("db-maint")
    assert (stored["group"], stored["days"], stored["from"], stored["to"]) == (
        "default",
        ["sun"],
        "02:00",
        "04:00",
    )
    assert stored["timezone"] == "Europe/Berlin" and not stored.get("start")

    answer = post(
        operator,
        "/calendars/blackout",
        {"name": "freeze", "group": "", "kind": "once", "start": "2026-12-24T18:00"},
    )
    assert answer.status_code == 422  # an empty group is not every group: that is "*"
    assert 'data-error="blackout.group"' in answer.get_data(as_text=True)
    answer = post(
        operator,
        "/calendars/blackout",
        {
            "name": "freeze",
            "group": "*",
            "kind": "once",
            "start": "2026-12-24T18:00",
            "end": "2026-12-27T06:00",
        },
    )
    assert answer.status_code == 302
    freeze = store.get_blackout("freeze")
    assert (freeze["group"], freeze["start"], freeze["end"]) == (
        "*",
        "2026-12-24T18:00:00",
        "2026-12-27T06:00:00",
    )
    answer = operator.get("/calendars?blackout=freeze")
    assert "Change blackout freeze" in text(answer)
    assert 'value="2026-12-24T18:00"' in answer.get_data(as_text=True)

    # opens and closes at once: refused at "to", the stored window unchanged
    answer = post(
        operator,
        "/calendars/blackout",
        {"name": "db-maint", "group": "default", "days": ["sun"], "from": "02:00", "to": "02:00"},
    )
    assert answer.status_code == 422
    assert 'data-error="blackout.to"' in answer.get_data(as_text=True)
    assert store.get_blackout("db-maint") == stored
    answer = post(
        operator,
        "/calendars/blackout",
        {"name": "long", "kind": "once", "start": "2026-01-01T00:00", "end": "2026-03-01T00:00"},
    )
    assert answer.status_code == 422 and "at most 31 days" in text(answer)


def test_deleting_asks_first_and_a_calendar_named_by_a_task_is_kept(app, store):
    ops = Operations(store)
    ops.set_calendar("op1", "used", {"weekdays": ["mon"]})
    ops.set_calendar("op1", "unused", {"dates": ["2026-12-24"]})
    ops.set_blackout("op1", "gone", {"group": "*", "days": ["sat"]})
    ops.create_task(
        "op1",
        {
            "name": "monday-job",
            "schedule": {"cron": "0 3 * * *", "calendar": {"only": "used"}},
            "command": "true",
        },
    )
    operator = logged_in(app, OPERATOR)
    page = text(operator.get("/calendars/calendar/used/delete"))
    assert "Named by 1 task" in page and "monday-job" in page
    answer = post(operator, "/calendars/calendar/used/delete", {})
    assert answer.status_code == 409 and "monday-job" in text(answer)
    assert store.get_calendar("used")["weekdays"] == ["mon"]

    assert "No task names it" in text(operator.get("/calendars/calendar/unused/delete"))
    assert post(operator, "/calendars/calendar/unused/delete", {}).status_code == 302
    assert "unused" not in store.calendar_names(["unused"])

    assert "Every group" in text(operator.get("/calendars/blackout/gone/delete"))
    assert post(operator, "/calendars/blackout/gone/delete", {}).status_code == 302
    assert store.list_blackouts() == []
    assert post(operator, "/calendars/blackout/gone/delete", {}).status_code == 404
    assert operator.get("/calendars/calendar/nothing/delete").status_code == 404
    actions = sorted(e["action"] for e in store.audit.find({"action": {"$regex": "delete$"}}))
    assert actions == ["blackout.delete", "calendar.delete"]


def test_the_task_forms_preview_judges_the_calendars_and_marks_the_groups_blackouts(app, store):
    ops = Operations(store)
    ops.set_calendar("op1", "weekend", {"weekdays": ["sat", "sun"]})
    ops.set_blackout("op1", "saturday", {"group": "batch", "days": ["sat"]})
    viewer = logged_in(app, VIEWER)
    query = "/tasks/preview?cron=0+6+*+*+*&timezone=UTC&calendar_only=weekend&n=6"
    answer = viewer.get(query + "&group=batch")
    assert answer.status_code == 200, answer.get_json()
    fires = answer.get_json()["fires"]
    assert len(fires) == 6
    for fire in fires:
        day = datetime.fromisoformat(fire["utc"]).strftime("%a")
        assert day in ("Sat", "Sun"), fire
        assert fire["blackout"] == ("saturday" if day == "Sat" else None), fire
    # another group has no blackout; a skip side leaves the Saturdays out
    others = viewer.get(query + "&group=web").get_json()["fires"]
    assert [f["utc"] for f in others] == [f["utc"] for f in fires]
    assert all(f["blackout"] is None for f in others)
    sundays = viewer.get(query + "&calendar_skip=only-saturdays").get_json()
    assert sundays["details"][0] == {
        "path": "schedule.calendar",
        "message": "no calendar named 'only-saturdays'",
    }
    ops.set_calendar("op1", "only-saturdays", {"weekdays": ["sat"]})
    sundays = viewer.get(query + "&calendar_skip=only-saturdays").get_json()["fires"]
    assert {datetime.fromisoformat(f["utc"]).strftime("%a") for f in sundays} == {"Sun"}


def test_the_tasks_naming_a_calendar_are_found_in_single_and_listed_schedules(store):
    ops = Operations(store)
    ops.set_calendar("op1", "workdays", {"weekdays": ["mon", "tue", "wed", "thu", "fri"]})
    ops.set_calendar("op1", "holidays", {"dates": ["2026-12-24"]})
    single = {"cron": "0 3 * * *", "calendar": {"only": "workdays"}}
    listed = [{"every": "1h"}, {"cron": "0 4 * * *", "calendar": {"skip": "holidays"}}]
    for name, schedule in (("single", single), ("listed", listed), ("plain", {"every": "1h"})):
        ops.create_task("op1", {"name": name, "schedule": schedule, "command": "true"})
    ops.create_task("op1", {"name": "plain-list", "schedule": [{"every": "2h"}], "command": "x"})
    users = store.calendar_users()
    assert {k: [t["name"] for t in v] for k, v in users.items()} == {
        "workdays": ["single"],
        "holidays": ["listed"],
    }


def test_the_dashboard_names_the_blackouts_open_now_and_those_opening_within_a_day(app, store):
    ops = Operations(store)
    now = datetime.now(timezone.utc)

    def once(name: str, start: datetime, hours: float) -> None:
        window = {
            "group": "batch",
            "start": start.strftime("%Y-%m-%dT%H:%M"),
            "end": (start + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M"),
            "description": f"{name} work",
        }
        ops.set_blackout("op1", name, window)

    viewer = logged_in(app, VIEWER)
    assert 'id="blackouts-now"' not in viewer.get("/").get_data(as_text=True)
    once("upgrade", now - timedelta(hours=1), 3)
    once("tonight", now + timedelta(hours=5), 2)
    once("next-week", now + timedelta(days=7), 2)
    page = viewer.get("/").get_data(as_text=True)
    upgrade = row_li(page, "upgrade")
    assert upgrade.startswith("open upgrade (group batch) until") and "upgrade work" in upgrade
    assert row_li(page, "tonight").startswith("tonight (group batch) opens")
    assert 'data-blackout="next-week"' not in page
    assert page.index('data-blackout="upgrade"') < page.index('data-blackout="tonight"')


def row_li(page: str, name: str) -> str:
    found = re.search(rf'<li data-blackout="{name}">(.*?)</li>', page, re.S)
    assert found, f"no blackout {name} on the dashboard"
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", found.group(1)))).strip()

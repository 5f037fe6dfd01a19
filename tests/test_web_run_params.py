"""The task page's run forms (Flask test client on a real store): "Run with parameters…" (a
manual run whose NAME=value lines become its env) and "Backfill…" (a run for each fire time
of a past range, times read in the task's time zone); which tasks offer which form; the
refusals flashed with their paths and the input kept; viewers and the CSRF token."""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import helpers
import pytest
from helpers import make_web_app

BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture
def app(store):
    return make_web_app(store)


@pytest.fixture
def csrf_page():
    return "/tasks"


def make_task(store, name, **spec):
    return helpers.make_task(store, name, **spec)


def page_of(client, task) -> str:
    answer = client.get(f"/tasks/{task['_id']}")
    assert answer.status_code == 200
    return html.unescape(answer.get_data(as_text=True))


def flashes(text: str) -> list[tuple[str, str]]:
    """The page's flash messages: (category, text)."""
    found = re.findall(r'<p class="flash ([^"]+)">(.*?)</p>', text, re.DOTALL)
    return [(category, html.unescape(message)) for category, message in found]


def offers(text: str) -> dict[str, bool]:
    return {
        "run": '/run"' in text and ">Run now</button>" in text,
        "params": 'id="run-params"' in text and 'name="params"' in text,
        "backfill": 'id="backfill"' in text and 'name="start"' in text,
    }


# --- run with parameters ----------------------------------------------------------------------


def test_run_with_two_parameters(client, store, operator):
    task = make_task(store, "params", env={"A": "from the task", "KEEP": "x"})
    text = page_of(client, task)
    assert offers(text) == {"run": True, "params": True, "backfill": True}
    assert "Run with parameters…" in text and "<details" in text
    form = text.split('id="run-params-form"', 1)[1].split("</form>", 1)[0]
    assert 'name="csrf_token"' in form and f'action="/tasks/{task["_id"]}/run"' in text

    lines = "A=1\n\n   \n  B=two words  \r\n"
    answer = client.post(
        f"/tasks/{task['_id']}/run", data={"csrf_token": operator, "params": lines}
    )
    assert answer.status_code == 302
    runs = list(store.runs.find({"task_id": task["_id"]}))
    assert len(runs) == 1
    run = runs[0]
    assert run["env"] == {"A": "1", "B": "two words"}
    assert (run["status"], run["trigger"], run["requested_by"]) == ("queued", "manual", "op1")
    assert answer.headers["Location"].endswith(f"/runs/{run['_id']}")
    shown = flashes(html.unescape(client.get("/tasks").get_data(as_text=True)))
    assert (
        "ok",
        f"Run {run['_id']} of params with 2 parameters queued: an agent of "
        f"{task['group']} takes it.",
    ) in shown

    # the value is everything after the first "=", as typed; a box of blank lines: a plain run
    client.post(f"/tasks/{task['_id']}/run", data={"csrf_token": operator, "params": "Q=a=b c"})
    client.post(f"/tasks/{task['_id']}/run", data={"csrf_token": operator, "params": "\n \n"})
    plain = client.post(f"/tasks/{task['_id']}/run", data={"csrf_token": operator})
    assert plain.status_code == 302 and "/runs/" in plain.headers["Location"]
    envs = [r.get("env") for r in store.runs.find({"task_id": task["_id"]}).sort("_id", 1)]
    assert sorted(envs, key=str) == sorted(
        [{"A": "1", "B": "two words"}, {"Q": "a=b c"}, None, None], key=str
    )


def test_bad_lines_and_bad_names_are_flashed_and_run_nothing(client, store, operator):
    task = make_task(store, "careful")
    url = f"/tasks/{task['_id']}/run"

    lines = "A=1\nno equals sign\n=3\nA=2"
    answer = client.post(url, data={"csrf_token": operator, "params": lines})
    assert answer.status_code == 422
    text = html.unescape(answer.get_data(as_text=True))
    [(category, message)] = flashes(text)
    assert category == "error" and message.startswith("Cannot run careful: ")
    assert "line 2: expected NAME=value, got 'no equals sign'" in message
    assert "line 3: expected NAME=value, got '=3'" in message
    assert "line 4: A is given twice" in message and "line 1" not in message
    assert re.search(r'<details class="run-box" id="run-params" open>', text)
    assert "no equals sign\n=3" in text  # the input is kept in the box

    answer = client.post(url, data={"csrf_token": operator, "params": "OK=1\n1X=3\nNUL=a\x00b"})
    assert answer.status_code == 422
    text = html.unescape(answer.get_data(as_text=True))
    [(category, message)] = flashes(text)
    assert category == "error"
    assert message.startswith("Cannot run careful with these parameters: ")
    assert "env.1X: '1X' is not allowed" in message and "env.NUL: " in message
    assert "env.OK" not in message
    assert "1X=3" in text
    assert store.runs.count_documents({}) == 0


def test_http_and_keepalive_tasks(client, store, operator):
    hook = make_task(store, "hook", command=None, http={"url": "https://example.com/hook"})
    text = page_of(client, hook)
    assert offers(text) == {"run": True, "params": False, "backfill": True}
    # posted anyway: refused at env, the http task's run not stored
    answer = client.post(
        f"/tasks/{hook['_id']}/run", data={"csrf_token": operator, "params": "A=1"}
    )
    assert answer.status_code == 422
    [(category, message)] = flashes(html.unescape(answer.get_data(as_text=True)))
    assert category == "error" and "env: an http task has no environment" in message
    assert store.runs.count_documents({}) == 0

    service = make_task(store, "service", schedule={"keepalive": True})
    assert offers(page_of(client, service)) == {"run": False, "params": False, "backfill": False}
    refused = client.post(
        f"/tasks/{service['_id']}/run", data={"csrf_token": operator, "params": "A=1"}
    )
    assert refused.status_code == 302 and refused.headers["Location"].endswith(service["_id"])
    [(_, message)] = flashes(page_of(client, service))
    assert "keepalive service" in message
    backfill = client.post(
        f"/tasks/{service['_id']}/backfill",
        data={"csrf_token": operator, "start": "2026-01-01T00:00Z", "end": "2026-01-01T03:00Z"},
    )
    assert backfill.status_code == 422
    [(_, message)] = flashes(html.unescape(backfill.get_data(as_text=True)))
    assert "schedule: backfill takes a task with fire times" in message
    assert store.runs.count_documents({}) == 0


# --- backfill ---------------------------------------------------------------------------------


def local_text(moment: datetime) -> str:
    """What a datetime-local input sends: the wall time in Berlin, no offset."""
    return moment.astimezone(BERLIN).strftime("%Y-%m-%dT%H:%M")


def test_backfill_an_hourly_task_in_its_time_zone(client, store, operator):
    task = make_task(store, "hourly", schedule={"every": "1h", "timezone": "Europe/Berlin"})
    text = page_of(client, task)
    assert offers(text)["backfill"]
    form = text.split('id="backfill-form"', 1)[1].split("</form>", 1)[0]
    assert 'name="csrf_token"' in form and 'type="datetime-local"' in form
    assert f'action="/tasks/{task["_id"]}/backfill"' in text
    assert '<strong class="zone">Europe/Berlin</strong>' in form

    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    first, last = hour - timedelta(hours=5), hour - timedelta(hours=2)
    data = {"csrf_token": operator, "start": local_text(first), "end": local_text(last)}
    answer = client.post(f"/tasks/{task['_id']}/backfill", data=data)
    assert answer.status_code == 302 and answer.headers["Location"].endswith(
        f"/tasks/{task['_id']}"
    )
    runs = list(store.runs.find({"task_id": task["_id"]}).sort("scheduled_for", 1))
    assert [r["scheduled_for"] for r in runs] == [first + timedelta(hours=i) for i in range(4)]
    assert {(r["trigger"], r["status"], r["agent"]) for r in runs} == {("backfill", "queued", None)}
    shown = flashes(html.unescape(client.get(answer.headers["Location"]).get_data(as_text=True)))
    fmt = "%Y-%m-%d %H:%M:%S %Z"
    assert (
        "ok",
        f"Backfill of hourly: 4 runs queued (0 had run already), "
        f"first {first.astimezone(BERLIN).strftime(fmt)}, "
        f"last {last.astimezone(BERLIN).strftime(fmt)}.",
    ) in shown

    again = client.post(f"/tasks/{task['_id']}/backfill", data=data)
    assert again.status_code == 302
    shown = flashes(html.unescape(client.get(again.headers["Location"]).get_data(as_text=True)))
    assert any(
        m.startswith("Backfill of hourly: 0 runs queued (4 had run already)") for _, m in shown
    )
    assert store.runs.count_documents({"task_id": task["_id"]}) == 4

    # an explicit offset wins over the task's zone
    utc = client.post(
        f"/tasks/{task['_id']}/backfill",
        data={
            "csrf_token": operator,
            "start": (first - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end": (first - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )
    assert utc.status_code == 302
    assert store.runs.count_documents({"task_id": task["_id"]}) == 5


def test_backfill_refusals_are_flashed_with_their_paths(client, store, operator):
    task = make_task(store, "hourly")
    url = f"/tasks/{task['_id']}/backfill"
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    future = {
        "csrf_token": operator,
        "start": (now - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M"),
        "end": (now + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M"),
    }
    answer = client.post(url, data=future)
    assert answer.status_code == 422
    text = html.unescape(answer.get_data(as_text=True))
    [(category, message)] = flashes(text)
    assert category == "error" and message.startswith("Cannot backfill hourly: ")
    assert "end (To): is in the future" in message
    assert re.search(r'<details class="run-box" id="backfill" open>', text)
    assert f'value="{future["end"]}"' in text  # the input is kept

    for data, expected in [
        ({"start": "", "end": future["start"]}, "start (From): is required"),
        ({"start": "yesterday", "end": future["start"]}, "start (From): 'yesterday' is not"),
        ({"start": future["start"], "end": "2020-01-01T00:00"}, "end (To): must not be before"),
    ]:
        answer = client.post(url, data={"csrf_token": operator, **data})
        assert answer.status_code == 422, data
        [(_, message)] = flashes(html.unescape(answer.get_data(as_text=True)))
        assert expected in message, (data, message)

    everyone = make_task(store, "everyone", mode="all")
    assert offers(page_of(client, everyone)) == {"run": True, "params": True, "backfill": False}
    answer = client.post(
        f"/tasks/{everyone['_id']}/backfill", data={**future, "end": future["start"]}
    )
    assert answer.status_code == 422
    [(_, message)] = flashes(html.unescape(answer.get_data(as_text=True)))
    assert "mode: backfill runs tasks of mode one" in message

    parent = make_task(store, "parent")
    child = make_task(store, "child", schedule={"after": ["parent"]})
    assert offers(page_of(client, parent))["backfill"]
    assert offers(page_of(client, child)) == {"run": True, "params": True, "backfill": False}
    assert store.runs.count_documents({}) == 0


# --- roles and CSRF ---------------------------------------------------------------------------


def test_viewers_see_no_forms_and_cannot_post(client, store, viewer):
    task = make_task(store, "guarded")
    text = page_of(client, task)
    assert offers(text) == {"run": False, "params": False, "backfill": False}
    assert "Run with parameters" not in text and "Backfill…" not in text
    base = f"/tasks/{task['_id']}"
    for path, data in [
        (f"{base}/run", {"params": "A=1"}),
        (f"{base}/backfill", {"start": "2026-01-01T00:00Z", "end": "2026-01-01T03:00Z"}),
    ]:
        answer = client.post(path, data={**data, "csrf_token": viewer})
        assert answer.status_code == 403, path
    assert store.runs.count_documents({}) == 0


def test_posts_without_the_csrf_token_are_refused(client, store, operator):
    task = make_task(store, "csrf")
    base = f"/tasks/{task['_id']}"
    data = {"params": "A=1", "start": "2026-01-01T00:00Z", "end": "2026-01-01T03:00Z"}
    for path in (f"{base}/run", f"{base}/backfill"):
        for token in ({"csrf_token": "wrong-token"}, {}):
            answer = client.post(path, data={**data, **token})
            assert answer.status_code == 400, path
            assert "security token" in answer.get_data(as_text=True)
    assert store.runs.count_documents({}) == 0
    assert (
        client.post("/tasks/nope/backfill", data={**data, "csrf_token": operator}).status_code
        == 404
    )

"""The Plans pages (Flask test client on the real nx-27017 store): the list shows each plan
with its progress and counts by state (and how plans are submitted while there are none), a
plan's page shows every item (200 a page), filters by state and links each item to its
latest attempt's run page; operators cancel a plan or one item (the flash says what was
dropped, what is being killed, and a Conflict is a flash error, not a 500), viewers see no
cancel button and get 403; a POST without the CSRF token is refused, an unknown plan is a 404
page, and a plan's name is escaped."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pytest
from helpers import OPERATOR, VIEWER, make_web_app, web_login

from cloudtask.clock import to_bson_time, utcnow
from cloudtask.config import load_config
from cloudtask.operations import Operations
from web import plan_pages
from web.plan_pages import ITEMS_PER_PAGE


@pytest.fixture
def app(store):
    return make_web_app(store, config=load_config(None, environ={}))


def logged_in(app, user):
    client = app.test_client()
    client.csrf = web_login(client, user.name, user.password, "/plans")
    return client


def submit(store, n=3, name="nightly"):
    items = [{"type": "etl", "name": f"load-{i}", "command": "true"} for i in range(n)]
    return Operations(store).submit_plan("upstream", {"name": name, "items": items})


def item_ids(receipt):
    return [i["item_id"] for i in receipt["items"]]


def first_attempt(store, item_id):
    return store.runs.find_one({"task_id": item_id, "attempt": 0})


def end(store, item_id, status, **fields):
    """The item's latest attempt ends ``status`` (as its agent records it)."""
    doc = store.runs.find_one({"task_id": item_id}, sort=[("attempt", -1)])
    now = utcnow()
    store.runs.update_one(
        {"_id": doc["_id"]},
        {
            "$set": {
                "status": status,
                "agent": "agent-7",
                "started_at": to_bson_time(now - timedelta(seconds=3)),
                "finished_at": to_bson_time(now),
                "followed": False,
                **fields,
            }
        },
    )
    return store.get_run(doc["_id"])


def running(store, item_id, agent="agent-7"):
    doc = store.runs.find_one({"task_id": item_id}, sort=[("attempt", -1)])
    store.runs.update_one(
        {"_id": doc["_id"]},
        {"$set": {"status": "running", "agent": agent, "started_at": to_bson_time(utcnow())}},
    )


def rows(page):
    """The item rows of a plan page: {item id: its row's HTML}."""
    return dict(re.findall(r'<tr data-item="([^"]+)"[^>]*>(.*?)</tr>', page, re.S))


def flashes(page):
    return [html.unescape(m) for m in re.findall(r'<p class="flash (?:ok|error)">(.*?)</p>', page)]


def test_the_list_shows_each_plan_with_its_progress_and_counts(app, store):
    client = logged_in(app, VIEWER)
    empty = client.get("/plans").get_data(as_text=True)
    assert 'id="no-plans"' in empty
    assert "/api/v1/plans" in empty and "cloudtask plan submit" in empty

    old = submit(store, 2, name="older")
    receipt = submit(store, 4, name="nightly")
    ids = item_ids(receipt)
    end(store, ids[0], "succeeded", exit_code=0)
    end(store, ids[1], "failed", exit_code=3)
    answer = client.get("/plans")
    assert answer.status_code == 200
    page = answer.get_data(as_text=True)
    assert '<a href="/plans">Plans</a>' in page.replace(' class="here"', "")  # the nav link
    listed = re.findall(r'<tr data-plan="([^"]+)"', page)
    assert listed == [receipt["plan_id"], old["plan_id"]]  # newest first
    row = page.split(f'data-plan="{receipt["plan_id"]}"')[1].split("</tr>")[0]
    assert "nightly" in row and "upstream" in row
    assert 'data-count="succeeded"' in row and ">succeeded 1<" in row
    assert ">failed 1<" in row and ">queued 2<" in row
    assert f'href="/plans/{receipt["plan_id"]}?state=failed"' in row
    assert 'data-final="2" data-total="4"' in row
    assert 'data-segment="ok" data-n="1"' in row and 'data-segment="bad" data-n="1"' in row
    assert 'data-plan-state="open"' in row
    assert "style=" not in page  # the Content-Security-Policy allows no inline style


def test_the_list_is_paged(app, store, monkeypatch):
    monkeypatch.setattr(plan_pages, "PLANS_PER_PAGE", 2)
    monkeypatch.setattr(plan_pages, "MAX_LIST_PAGE", 2)
    plans = [submit(store, 1, name=f"plan-{i}")["plan_id"] for i in range(5)][::-1]
    client = logged_in(app, VIEWER)
    first = client.get("/plans").get_data(as_text=True)
    assert re.findall(r'<tr data-plan="([^"]+)"', first) == plans[:2]
    assert "page 1 of 2+" in first and 'href="/plans?page=2"' in first
    second = client.get("/plans?page=2").get_data(as_text=True)
    assert re.findall(r'<tr data-plan="([^"]+)"', second) == plans[2:4]
    assert "page=3" not in second  # the list reaches back MAX_LIST_PAGE pages
    assert client.get("/plans?page=3").status_code == 422


def test_the_plan_page_shows_every_item_filters_and_links_to_the_runs(app, store):
    receipt = submit(store, 5, name="nightly")
    # (a callback_url needs a stored secret to sign with: written here as submit stores it)
    store.db["plans"].update_one(
        {"_id": receipt["plan_id"]}, {"$set": {"callback_url": "https://up.example/cb"}}
    )
    ids = item_ids(receipt)
    end(store, ids[0], "succeeded", exit_code=0)
    end(store, ids[1], "failed", exit_code=2, error="exit code 2")
    running(store, ids[2])
    # the fourth fails with an attempt left: it is followed by a second attempt (a new run)
    store.runs.update_one({"task_id": ids[3]}, {"$set": {"max_attempts": 2}})
    failed = end(store, ids[3], "failed", exit_code=1)
    assert store.follow_item(failed)
    second = store.runs.find_one({"task_id": ids[3], "attempt": 1})

    client = logged_in(app, VIEWER)
    page = client.get(f"/plans/{receipt['plan_id']}").get_data(as_text=True)
    shown = rows(page)
    assert list(shown) == ids  # every item, in plan order
    for i, item_id in enumerate(ids):
        run_id = second["_id"] if i == 3 else first_attempt(store, item_id)["_id"]
        assert f'href="/runs/{run_id}"' in shown[item_id]
        assert client.get(f"/runs/{run_id}").status_code == 200
    assert 'data-state="succeeded"' in page and 'data-state="running"' in page
    assert "exit code 2" in shown[ids[1]] and "agent-7" in shown[ids[2]]
    assert "https://up.example/cb" in page and "upstream" in page
    assert re.search(r'data-count="queued"[^>]*>queued 2<', page)  # the follow-up waits too

    failed_only = client.get(f"/plans/{receipt['plan_id']}?state=failed").get_data(as_text=True)
    assert list(rows(failed_only)) == [ids[1]]
    queued = client.get(f"/plans/{receipt['plan_id']}?state=queued").get_data(as_text=True)
    assert list(rows(queued)) == [ids[3], ids[4]]
    none = client.get(f"/plans/{receipt['plan_id']}?state=lost").get_data(as_text=True)
    assert rows(none) == {} and "No item is lost" in none
    bad = client.get(f"/plans/{receipt['plan_id']}?state=nope")
    assert bad.status_code == 422
    assert len(rows(bad.get_data(as_text=True))) == 5  # the bad filter is left out


def test_a_big_plan_is_shown_a_page_at_a_time(app, store):
    n = ITEMS_PER_PAGE + 50
    receipt = submit(store, n, name="big")
    ids = item_ids(receipt)
    client = logged_in(app, VIEWER)
    first = client.get(f"/plans/{receipt['plan_id']}").get_data(as_text=True)
    assert list(rows(first)) == ids[:ITEMS_PER_PAGE]
    assert "page 1 of 2" in first
    assert f'href="/plans/{receipt["plan_id"]}?page=2"' in first
    second = client.get(f"/plans/{receipt['plan_id']}?page=2").get_data(as_text=True)
    assert list(rows(second)) == ids[ITEMS_PER_PAGE:]
    assert f"{ITEMS_PER_PAGE + 1}–{n} shown" in second
    beyond = client.get(f"/plans/{receipt['plan_id']}?page=99").get_data(as_text=True)
    assert list(rows(beyond)) == ids[ITEMS_PER_PAGE:]  # the last page


def test_a_viewer_sees_no_cancel_button_and_may_not_cancel(app, store):
    receipt = submit(store, 2)
    ids = item_ids(receipt)
    client = logged_in(app, VIEWER)
    page = client.get(f"/plans/{receipt['plan_id']}").get_data(as_text=True)
    assert "Cancel plan" not in page and "/cancel" not in page
    data = {"csrf_token": client.csrf}
    assert client.post(f"/plans/{receipt['plan_id']}/cancel", data=data).status_code == 403
    assert client.post(f"/plans/items/{ids[0]}/cancel", data=data).status_code == 403
    assert store.get_plan(receipt["plan_id"])["counts"] == {"queued": 2}
    assert store.get_plan(receipt["plan_id"]).get("cancelled_at") is None


def test_an_operator_cancels_one_item_then_the_plan(app, store):
    receipt = submit(store, 4)
    plan_id, ids = receipt["plan_id"], item_ids(receipt)
    end(store, ids[0], "succeeded", exit_code=0)
    client = logged_in(app, OPERATOR)
    page = client.get(f"/plans/{plan_id}").get_data(as_text=True)
    assert 'id="cancel-plan-form"' in page and "Yes, cancel the plan" in page
    assert f'name="csrf_token" value="{client.csrf}"' in page
    shown = rows(page)
    assert "item-cancel" not in shown[ids[0]]  # over: nothing to cancel
    assert all(f"/plans/items/{i}/cancel" in shown[i] for i in ids[1:])

    # one item, from the page filtered on queued: back to that filter
    answer = client.post(
        f"/plans/items/{ids[1]}/cancel", data={"csrf_token": client.csrf, "state": "queued"}
    )
    assert answer.status_code == 302
    assert answer.headers["Location"] == f"/plans/{plan_id}?state=queued"
    page = client.get(answer.headers["Location"]).get_data(as_text=True)
    assert any("load-1 (#1) cancelled: dropped 1 waiting attempt" in f for f in flashes(page))
    assert store.plan_items(plan_id)[1]["state"] == "killed"
    assert list(rows(page)) == ids[2:]

    # an item that is over: a flash error
    answer = client.post(
        f"/plans/items/{ids[0]}/cancel", data={"csrf_token": client.csrf}, follow_redirects=True
    )
    assert answer.status_code == 200
    assert any("not cancelled" in f and "is over" in f for f in flashes(answer.get_data(True)))

    # the plan: its two waiting items are dropped
    answer = client.post(f"/plans/{plan_id}/cancel", data={"csrf_token": client.csrf})
    assert answer.status_code == 302 and answer.headers["Location"] == f"/plans/{plan_id}"
    page = client.get(f"/plans/{plan_id}").get_data(as_text=True)
    assert (
        "Plan nightly cancelled: dropped 2 waiting items, killing 0 running items. "
        "No further attempt is queued." in flashes(page)
    )
    states = [i["state"] for i in store.plan_items(plan_id)]
    assert states == ["succeeded", "killed", "killed", "killed"]
    assert 'id="plan-cancelled"' in page and OPERATOR.name in page
    assert 'data-plan-state="cancelled"' in page
    assert "Yes, cancel the plan" not in page and "item-cancel" not in page  # all over
    audit = [e["action"] for e in store.db["audit"].find({"actor": OPERATOR.name})]
    assert "plan.cancel" in audit and "plan.item.cancel" in audit


def test_killing_without_zookeeper_is_a_flash_error_not_a_500(app, store):
    receipt = submit(store, 3)
    plan_id, ids = receipt["plan_id"], item_ids(receipt)
    running(store, ids[0])
    client = logged_in(app, OPERATOR)
    answer = client.post(
        f"/plans/items/{ids[0]}/cancel", data={"csrf_token": client.csrf}, follow_redirects=True
    )
    assert answer.status_code == 200
    (message,) = flashes(answer.get_data(as_text=True))
    assert "load-0 (#0) not cancelled" in message and "ZooKeeper" in message
    answer = client.post(
        f"/plans/{plan_id}/cancel", data={"csrf_token": client.csrf}, follow_redirects=True
    )
    assert answer.status_code == 200
    (message,) = flashes(answer.get_data(as_text=True))
    assert "1 running item could not be killed" in message and "ZooKeeper" in message
    assert [i["state"] for i in store.plan_items(plan_id)] == ["running", "killed", "killed"]


def test_a_post_without_the_csrf_token_is_refused(app, store):
    receipt = submit(store, 2)
    client = logged_in(app, OPERATOR)
    assert client.post(f"/plans/{receipt['plan_id']}/cancel").status_code == 400
    item = item_ids(receipt)[0]
    bad = {"csrf_token": "not-the-token"}
    assert client.post(f"/plans/items/{item}/cancel", data=bad).status_code == 400
    assert store.get_plan(receipt["plan_id"])["counts"] == {"queued": 2}


def test_an_unknown_plan_or_item_is_a_404_page(app, store):
    client = logged_in(app, OPERATOR)
    answer = client.get("/plans/no-such-plan")
    assert answer.status_code == 404
    page = answer.get_data(as_text=True)
    assert "no plan with id" in page and "<h1>404 · Not found</h1>" in page
    data = {"csrf_token": client.csrf}
    assert client.post("/plans/no-such-plan/cancel", data=data).status_code == 404
    assert client.post("/plans/items/no-such-item/cancel", data=data).status_code == 404
    anonymous = app.test_client().get("/plans")
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]


def test_names_are_escaped(app, store):
    evil = "<script>alert(1)</script>"
    receipt = Operations(store).submit_plan(
        "upstream",
        {
            "name": evil,
            "items": [{"type": "etl", "command": "true", "external_id": "<b>x</b>"}],
        },
    )
    end(store, receipt["items"][0]["item_id"], "failed", error="<img src=x onerror=alert(2)>")
    client = logged_in(app, OPERATOR)
    for path in ("/plans", f"/plans/{receipt['plan_id']}"):
        page = client.get(path).get_data(as_text=True)
        assert evil not in page and "<b>x</b>" not in page and "<img src=x" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page

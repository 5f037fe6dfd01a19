"""The run pages (Flask test client on a real store; real ZooKeeper for killing a running run):
the list with its filters (task id or name, status, agent, time range), bad filters at their
field with 422, pages; the detail with every fact, its output escaped and the report of an
http task's service; live.json following a run; kill (cancel a queued manual run, a kill
request to the agent of a running one, refusals), roles and unknown ids."""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta, timezone

import helpers
import pytest
from helpers import make_web_app, run_document, web_login

from cloudtask.clock import to_bson_time
from cloudtask.config import Config
from cloudtask.runmodel import OUTPUT_TAIL_BYTES
from cloudtask.zkpaths import ZkPaths, decode

NOW = datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def app(store):
    return make_web_app(store)


@pytest.fixture
def csrf_page():
    return "/runs"


def make_task(store, name="backup", **spec):
    return helpers.make_task(store, name, **spec)


def add_run(store, task, hours_ago=1.0, status="succeeded", agent="agent-1", **fields):
    """One run of ``task`` scheduled ``hours_ago`` hours ago, stored whole."""
    when = NOW - timedelta(hours=hours_ago)
    doc = run_document(
        task,
        when,
        agent=agent,
        attempt=fields.pop("attempt", 0),
        trigger=fields.pop("trigger", "schedule"),
    )
    finished = status not in ("queued", "running")
    doc.update(
        status=status,
        started_at=to_bson_time(when) if status != "queued" else None,
        finished_at=to_bson_time(when + timedelta(seconds=2)) if finished else None,
        duration=2.0 if finished else None,
        exit_code=0 if status == "succeeded" else (1 if finished else None),
    )
    doc.update(fields)
    store.runs.insert_one(doc)
    return doc


def listed(page: str) -> list[str]:
    """The run ids in the list's table, in order."""
    return re.findall(r'<tr data-run="([^"]+)">', page)


def field_error(page: str, name: str) -> str:
    match = re.search(rf'<span class="field-error" data-error="{name}">([^<]*)</span>', page)
    return html.unescape(match.group(1)) if match else ""


# --- list -------------------------------------------------------------------------------------


def test_the_list_shows_runs_newest_first_without_their_output(client, store, viewer):
    task = make_task(store)
    old = add_run(store, task, hours_ago=3, output_tail="OLD-OUTPUT-SECRET")
    new = add_run(
        store, task, hours_ago=1, status="failed", exit_code=3, attempt=2, trigger="retry"
    )
    mid = add_run(store, task, hours_ago=2, agent="agent-2", http_status=502, exit_code=None)
    answer = client.get("/runs")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert listed(page) == [new["_id"], mid["_id"], old["_id"]]
    assert "OLD-OUTPUT-SECRET" not in page
    row = page.split(f'<tr data-run="{new["_id"]}">', 1)[1].split("</tr>", 1)[0]
    assert f'href="/runs/{new["_id"]}"' in row
    assert f'href="/tasks/{task["_id"]}"' in row
    assert "retry #2" in row and 'class="badge bad">failed' in row
    assert "<td>3</td>" in row and "2.00 s" in row and "agent-1" in row
    mid_row = page.split(f'<tr data-run="{mid["_id"]}">', 1)[1].split("</tr>", 1)[0]
    assert "HTTP 502" in mid_row and "agent-2" in mid_row
    assert "3 runs" in page


def test_filters_by_status_agent_task_and_time(client, store, viewer):
    a, b = make_task(store, "alpha"), make_task(store, "beta")
    a1 = add_run(store, a, hours_ago=1, status="failed")
    a2 = add_run(store, a, hours_ago=5, agent="agent-2")
    b1 = add_run(store, b, hours_ago=2, status="failed", agent="agent-2")
    b2 = add_run(store, b, hours_ago=30, status="running", agent="agent-3")

    def ids(query):
        answer = client.get("/runs?" + query)
        assert answer.status_code == 200, (query, answer.status_code)
        return listed(answer.get_data(as_text=True))

    assert ids("status=failed") == [a1["_id"], b1["_id"]]
    assert ids("status=running") == [b2["_id"]]
    assert ids("agent=agent-2") == [b1["_id"], a2["_id"]]
    assert ids(f"task={a['_id']}") == [a1["_id"], a2["_id"]]
    assert ids("task=beta") == [b1["_id"], b2["_id"]]  # a name as typed
    assert ids("task=beta&status=failed") == [b1["_id"]]
    fmt = "%Y-%m-%dT%H:%M"
    since = (NOW - timedelta(hours=6)).strftime(fmt)
    until = (NOW - timedelta(hours=1, minutes=30)).strftime(fmt)
    assert ids(f"since={since}") == [a1["_id"], b1["_id"], a2["_id"]]
    assert ids(f"until={until}") == [b1["_id"], a2["_id"], b2["_id"]]
    assert ids(f"since={since}&until={until}") == [b1["_id"], a2["_id"]]
    assert ids(f"since={since}&until={until}&status=failed") == [b1["_id"]]
    page = client.get("/runs?task=alpha").get_data(as_text=True)
    assert f'Runs of <a href="/tasks/{a["_id"]}">alpha</a>' in page
    page = client.get(f"/runs?since={since}").get_data(as_text=True)
    assert f'name="since" step="1" value="{since}"' in page  # shown back in the field


def test_runs_of_a_deleted_task_stay_listed_by_its_id(client, store, viewer):
    task = make_task(store, "gone")
    run = add_run(store, task)
    store.delete_task(task["_id"])
    answer = client.get(f"/runs?task={task['_id']}")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert listed(page) == [run["_id"]]
    assert 'gone <span class="muted small">(deleted)</span>' in page
    assert f'href="/tasks/{task["_id"]}"' not in page


def test_bad_filters_are_shown_at_their_field_and_the_others_still_apply(client, store, viewer):
    task = make_task(store)
    failed = add_run(store, task, hours_ago=1, status="failed")
    add_run(store, task, hours_ago=2, status="succeeded")
    add_run(store, task, hours_ago=3, status="failed", agent="agent-9")

    answer = client.get("/runs?status=bogus&agent=agent-1")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 422
    assert "expected one of" in field_error(page, "status") and "'bogus'" in field_error(
        page, "status"
    )
    assert len(listed(page)) == 2  # agent-1 still applied, status dropped

    answer = client.get("/runs?task=no-such-task&status=failed")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 422
    assert field_error(page, "task") == "no task has the id or name 'no-such-task'"
    assert len(listed(page)) == 2  # both failed runs, of any task
    assert 'value="no-such-task"' in page  # what was typed stays in the field

    answer = client.get("/runs?since=yesterday&status=failed&agent=agent-1")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 422
    assert "expected a time such as" in field_error(page, "since")
    assert listed(page) == [failed["_id"]]

    fmt = "%Y-%m-%dT%H:%M"
    since, until = NOW.strftime(fmt), (NOW - timedelta(hours=5)).strftime(fmt)
    answer = client.get(f"/runs?since={since}&until={until}")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 422
    assert field_error(page, "until") == "must be later than since"

    answer = client.get("/runs?page=0&per_page=x")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 422
    assert "page: expected a number from 1" in html.unescape(page)
    assert "per_page: expected a whole number, got 'x'" in html.unescape(page)
    assert len(listed(page)) == 3


def test_pages(client, store, viewer):
    task = make_task(store)
    runs = [add_run(store, task, hours_ago=h) for h in range(1, 8)]  # newest first
    ids = [r["_id"] for r in runs]
    page1 = client.get("/runs?per_page=3").get_data(as_text=True)
    assert listed(page1) == ids[:3]
    assert "7 runs, page 1 of 3" in page1
    assert 'href="/runs?per_page=3&amp;page=2" rel="next"' in page1
    page2 = client.get("/runs?per_page=3&page=2").get_data(as_text=True)
    assert listed(page2) == ids[3:6]
    page3 = client.get("/runs?per_page=3&page=3").get_data(as_text=True)
    assert listed(page3) == ids[6:]
    assert 'rel="next"' not in page3 and 'rel="prev"' in page3
    assert listed(client.get("/runs?per_page=3&page=9").get_data(as_text=True)) == []


# --- detail -----------------------------------------------------------------------------------


def test_detail_shows_every_fact_and_the_output_escaped(client, store, viewer):
    task = make_task(store, "nightly")
    run = add_run(
        store,
        task,
        status="failed",
        exit_code=7,
        error="exited with code 7",
        requested_by="op1",
        trigger="manual",
        output_tail="line 1\n<script>alert('x')</script>\n& done\n",
    )
    answer = client.get(f"/runs/{run['_id']}")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    facts = page.split('id="run-facts"', 1)[1].split("</section>", 1)[0]
    for text in (
        "nightly",
        "exited with code 7",
        "op1",
        "manual",
        "agent-1",
        run["_id"],
        (NOW - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S"),
        "2.00 s",
        '<dd data-live="exit_code">7</dd>',
    ):
        assert text in facts, text
    output = re.search(r'<pre class="run-output" id="run-output" >(.*?)</pre>', page, re.DOTALL)
    assert output, "no output block"
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in output.group(1)
    assert "&amp; done" in output.group(1)
    assert "<script>alert" not in page
    assert 'data-going="no"' in page
    assert 'id="kill-form"' not in page  # finished: nothing to kill


def test_detail_of_an_http_run_shows_the_service_report(client, store, viewer):
    task = store.create_task(
        {"name": "svc", "schedule": {"every": "1h"}, "http": {"url": "http://127.0.0.1:9/x"}}
    )
    run = add_run(store, task, status="running", exit_code=None)
    page = client.get(f"/runs/{run['_id']}").get_data(as_text=True)
    assert 'id="run-report"' in page and "no progress reported yet" in page
    assert 'data-going="yes"' in page and "runs.js" in page

    store.report_progress(run["_id"], 40.0, "copying <files>")
    page = client.get(f"/runs/{run['_id']}").get_data(as_text=True)
    assert 'value="40.0"' in page and "40 %" in page
    assert "copying &lt;files&gt;" in page
    assert re.search(r'<div id="run-result"\s+hidden>', page)

    store.report_result(run["_id"], "failed", "disk full")
    page = client.get(f"/runs/{run['_id']}").get_data(as_text=True)
    result = page.split('id="run-result"', 1)[1].split("</div>", 1)[0]
    assert "hidden" not in result.split(">", 1)[0]
    assert "failed" in result and "disk full" in result


def test_a_process_run_shows_no_report(client, store, viewer):
    run = add_run(store, make_task(store))
    assert 'id="run-report"' not in client.get(f"/runs/{run['_id']}").get_data(as_text=True)


def test_unknown_run_ids_answer_404(client, operator):
    answer = client.get("/runs/no-such-run")
    assert answer.status_code == 404
    assert "no run with id &#39;no-such-run&#39;" in answer.get_data(as_text=True)
    answer = client.get("/runs/no-such-run/live.json")
    assert answer.status_code == 404 and "no run with id" in answer.get_json()["error"]
    answer = client.post("/runs/no-such-run/kill", data={"csrf_token": operator})
    assert answer.status_code == 404


def test_a_full_output_tail_says_older_output_was_cut(client, store, viewer):
    task = make_task(store)
    full = add_run(store, task, output_tail="x" * OUTPUT_TAIL_BYTES)
    short = add_run(store, task, hours_ago=2, output_tail="short\n")
    page = client.get(f"/runs/{full['_id']}").get_data(as_text=True)
    assert '<span class="muted small" id="run-output-note">the last 64 KiB</span>' in page
    assert client.get(f"/runs/{full['_id']}/live.json").get_json()["output_truncated"] is True
    page = client.get(f"/runs/{short['_id']}").get_data(as_text=True)
    assert '<span class="muted small" id="run-output-note"></span>' in page
    assert client.get(f"/runs/{short['_id']}/live.json").get_json()["output_truncated"] is False


# --- live -------------------------------------------------------------------------------------


def test_live_json_follows_the_run_document(client, store, viewer):
    task = store.create_task(
        {"name": "svc", "schedule": {"every": "1h"}, "http": {"url": "http://127.0.0.1:9/x"}}
    )
    run = add_run(store, task, status="running", exit_code=None, output_tail="step 1\n")
    url = f"/runs/{run['_id']}/live.json"
    first = client.get(url).get_json()
    assert first["status"] == "running" and first["going"] is True
    assert first["output"] == "step 1\n"
    assert first["duration_text"].endswith("so far") and first["duration"] >= 3600
    assert first["report"] is None and first["finished_at"] == "–"

    same = client.get(url, query_string={"output": first["output_digest"]}).get_json()
    assert same["output"] is None  # unchanged: not sent again
    assert same["output_digest"] == first["output_digest"]

    store.report_progress(run["_id"], 75, "almost")
    doc = store.runs.find_one({"_id": run["_id"]})
    doc.update(output_tail="step 1\nstep 2\n")
    store.runs.replace_one({"_id": run["_id"]}, doc)
    second = client.get(url, query_string={"output": first["output_digest"]}).get_json()
    assert second["output"] == "step 1\nstep 2\n"
    assert second["output_digest"] != first["output_digest"]
    assert second["report"]["percent"] == 75 and second["report"]["message"] == "almost"

    finished_at = to_bson_time(NOW)
    doc.update(status="succeeded", finished_at=finished_at, duration=3601.5, http_status=200)
    store.runs.replace_one({"_id": run["_id"]}, doc)
    store.report_result(run["_id"], "succeeded", "all copied")
    last = client.get(url).get_json()
    assert last["status"] == "succeeded" and last["going"] is False
    assert last["status_class"] == "ok"
    assert last["finished_at"] == NOW.strftime("%Y-%m-%d %H:%M:%S")
    assert last["duration"] == 3601.5 and last["result_code"] == "HTTP 200"
    assert last["report"]["result"]["status"] == "succeeded"
    assert last["report"]["result"]["message"] == "all copied"


# --- kill -------------------------------------------------------------------------------------


def test_kill_cancels_a_manual_run_no_agent_took(client, store, operator):
    task = make_task(store)
    run = store.request_manual_run(task, requested_by="op1")
    page = client.get(f"/runs/{run['_id']}").get_data(as_text=True)
    assert 'id="kill-form"' in page
    form = page.split('id="kill-form"', 1)[1].split("</form>", 1)[0]
    assert f'name="csrf_token" value="{operator}"' in form
    answer = client.post(f"/runs/{run['_id']}/kill", data={"csrf_token": operator})
    assert answer.status_code == 302
    assert answer.headers["Location"].endswith(f"/runs/{run['_id']}")
    doc = store.runs.find_one({"_id": run["_id"]})
    assert doc["status"] == "killed" and "killed by op1" in doc["error"]
    page = client.get(answer.headers["Location"]).get_data(as_text=True)
    assert "asked to stop" in page and "cancelled" in page
    assert 'id="kill-form"' not in page
    assert store.audit.find_one({"action": "run.kill", "target": f"run:{run['_id']}"})


def test_kill_of_a_finished_run_is_refused(client, store, operator):
    run = add_run(store, make_task(store))
    answer = client.post(
        f"/runs/{run['_id']}/kill", data={"csrf_token": operator}, follow_redirects=True
    )
    page = html.unescape(answer.get_data(as_text=True))
    assert answer.status_code == 200
    assert (
        f"Cannot kill run {run['_id']}: run {run['_id']} is not running (it is succeeded)" in page
    )
    assert store.runs.find_one({"_id": run["_id"]})["status"] == "succeeded"


def test_kill_of_a_running_run_without_zookeeper_says_why(client, store, operator):
    run = add_run(store, make_task(store), status="running")
    answer = client.post(
        f"/runs/{run['_id']}/kill", data={"csrf_token": operator}, follow_redirects=True
    )
    page = html.unescape(answer.get_data(as_text=True))
    assert "Cannot kill run" in page and "needs the cluster (ZooKeeper)" in page
    assert store.runs.find_one({"_id": run["_id"]})["status"] == "running"


def test_kill_of_a_running_run_asks_its_agent(store, zk):
    client = make_web_app(store, zk).test_client()
    token = web_login(client, "op1", "operator passphrase", "/runs")
    run = add_run(store, make_task(store), status="running", agent="agent-7")
    answer = client.post(f"/runs/{run['_id']}/kill", data={"csrf_token": token})
    assert answer.status_code == 302
    paths = ZkPaths(Config().zookeeper.root)
    assert zk.get_children(paths.kill_dir("agent-7")) == [run["_id"]]
    data, _ = zk.get(paths.kill("agent-7", run["_id"]))
    assert decode(data)["reason"] == "killed by op1"
    page = client.get(answer.headers["Location"]).get_data(as_text=True)
    assert "asked to stop" in page and "agent-7" in page
    # the agent finishes the run; until then it is still running
    assert store.runs.find_one({"_id": run["_id"]})["status"] == "running"


def test_viewers_cannot_kill_and_see_no_kill_button(client, store, viewer):
    task = make_task(store)
    run = store.request_manual_run(task, requested_by="op1")
    page = client.get(f"/runs/{run['_id']}").get_data(as_text=True)
    assert 'id="kill-form"' not in page
    answer = client.post(f"/runs/{run['_id']}/kill", data={"csrf_token": viewer})
    assert answer.status_code == 403
    assert store.runs.find_one({"_id": run["_id"]})["status"] == "queued"


def test_a_kill_without_the_csrf_token_is_refused(client, store, operator):
    run = store.request_manual_run(make_task(store), requested_by="op1")
    answer = client.post(f"/runs/{run['_id']}/kill", data={})
    assert answer.status_code == 400
    assert store.runs.find_one({"_id": run["_id"]})["status"] == "queued"


def test_anonymous_users_are_sent_to_the_login_page(client, store):
    run = add_run(store, make_task(store))
    for url in ("/runs", f"/runs/{run['_id']}", f"/runs/{run['_id']}/live.json"):
        answer = client.get(url)
        assert answer.status_code == 302 and "/login" in answer.headers["Location"], url

"""Plan callbacks: every state change of every item POSTed to the plan's callback_url, signed
with its stored secret, in order per item, tried again after a failure, and a last message
when the plan completes (real store, real agents in threads, a real HTTP receiver)."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from collections import defaultdict
from datetime import datetime, timezone

import pytest
from helpers import wait_for
from test_agent import Running

from cloudtask.config import load_config
from cloudtask.exceptions import ValidationError
from cloudtask.notify import Notifier
from cloudtask.notify.plancallbacks import item_changes
from cloudtask.operations import Operations
from cloudtask.secretbox import SecretBox, make_key_file, parse_ring

PY = sys.executable
HOOK_SECRET = "plan-hook-Secret-5a1e"
T = datetime(2026, 12, 4, 21, 0, tzinfo=timezone.utc)


def attempt(k: int, status: str, started: bool = True, max_attempts: int = 3) -> dict:
    return {
        "_id": f"r{k}",
        "task_id": "i1",
        "task_name": "one",
        "group": "etl",
        "attempt": k,
        "status": status,
        "claimed_at": T,
        "started_at": T if started else None,
        "finished_at": T if status not in ("queued", "running") else None,
        "max_attempts": max_attempts,
    }


def test_an_items_changes_come_in_order_and_only_the_last_end_is_final():
    changes = item_changes([attempt(1, "succeeded"), attempt(0, "failed")])
    assert [(seq, c["state"], c["final"]) for seq, c in changes] == [
        (0, "queued", False),
        (1, "started", False),
        (2, "failed", False),
        (10, "retried", False),
        (11, "started", False),
        (12, "succeeded", True),
    ]
    # a failed attempt with attempts left is not final; out of attempts, it is
    assert item_changes([attempt(0, "failed", max_attempts=2)])[-1][1]["final"] is False
    assert item_changes([attempt(0, "failed", max_attempts=1)])[-1][1]["final"] is True
    assert [c["state"] for _, c in item_changes([attempt(0, "queued", started=False)])] == [
        "queued"
    ]


@pytest.fixture
def ring(tmp_path):
    path = tmp_path / "keys"
    make_key_file(path)
    return path


@pytest.fixture
def agents(mongo_client, mongo_db_name, tmp_path):
    running = Running(mongo_client, mongo_db_name, tmp_path)
    yield running
    running.stop_all()


def test_a_callback_needs_a_stored_secret(store, ring, receiver):
    plan = {
        "callback_url": receiver.url,
        "callback_secret": "up.hook",
        "items": [{"type": "etl", "command": "true"}],
    }
    with pytest.raises(ValidationError) as e:
        Operations(store).submit_plan("upstream", plan)
    assert [p.path for p in e.value.problems] == ["callback_secret"]
    assert store.db["plans"].count_documents({}) == 0


def test_every_change_is_posted_signed_in_order_and_again_after_a_failure(
    store, agents, ring, receiver, tmp_path
):
    box = SecretBox(tuple(parse_ring(ring.read_text(), str(ring))))
    ops = Operations(store)
    ops.set_secret("alice", box, "up.hook", HOOK_SECRET)
    flaky = [
        PY,
        "-c",
        "import os, sys; sys.exit(0 if os.environ['CLOUDTASK_ATTEMPT'] == '1' else 3)",
    ]
    receipt = ops.submit_plan(
        "upstream",
        {
            "name": "nightly",
            "callback_url": receiver.url,
            "callback_secret": "up.hook",
            "items": [
                {"type": "etl", "name": "ok", "command": ["true"], "external_id": "e-1"},
                {"type": "etl", "name": "flaky", "command": flaky, "retries": 1},
                {"type": "etl", "name": "bad", "command": ["false"]},
            ],
        },
    )
    cfg = load_config(None, environ={}).with_section("secrets", keys=f"file:{ring}")
    notifier = Notifier(store, cfg)
    receiver.status = 500  # the upstream is down at first: nothing counts as delivered
    notifier.run_once()
    assert len(receiver.requests) == 1
    first_try = json.loads(receiver.requests[0]["body"])
    assert [c["state"] for c in first_try["events"]] == ["queued"] * 3
    receiver.status = 200
    agents.start("a1", group="etl", max_parallel=2, poll_interval=0.3)

    def completed():
        plan = store.get_plan(receipt["plan_id"])
        if plan.get("callback_next_ts"):  # (the backoff after the failure, skipped here)
            store.db["plans"].update_one(
                {"_id": receipt["plan_id"]}, {"$set": {"callback_next_ts": 0.0}}
            )
        notifier.run_once()
        return receiver.requests and json.loads(receiver.requests[-1]["body"])["completed"]

    done = wait_for(completed, timeout=60, interval=0.3, message="no completion callback")
    assert done == {"counts": {"failed": 1, "succeeded": 2}, "total": 3}
    # every request is signed with the stored secret, over its exact body
    for request in receiver.requests:
        expected = (
            "sha256=" + hmac.new(HOOK_SECRET.encode(), request["body"], hashlib.sha256).hexdigest()
        )
        assert hmac.compare_digest(request["headers"]["x-cloudtask-signature"], expected)
        assert HOOK_SECRET.encode() not in request["body"]
    assert receiver.requests[-1]["headers"]["x-cloudtask-event"] == "plan.completed"
    # delivered (after the failed first try): in order per item, each change once
    seen: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for request in receiver.requests[1:]:
        for change in json.loads(request["body"])["events"]:
            seen[change["name"]].append((change["seq"], change["state"]))
    for name, changes in seen.items():
        assert changes == sorted(set(changes)), (name, changes)
    assert [s for _, s in seen["ok"]] == ["queued", "started", "succeeded"]
    assert [s for _, s in seen["flaky"]] == [
        "queued",
        "started",
        "failed",
        "retried",
        "started",
        "succeeded",
    ]
    assert [s for _, s in seen["bad"]] == ["queued", "started", "failed"]
    ok = [c for r in receiver.requests[1:] for c in json.loads(r["body"])["events"]]
    assert {c["external_id"] for c in ok if c["name"] == "ok"} == {"e-1"}
    # nothing more to say: a further pass posts nothing
    posted = len(receiver.requests)
    notifier.run_once()
    assert len(receiver.requests) == posted

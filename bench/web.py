"""Web benchmark: page latency with 10,000 tasks and 100,000 runs stored, and API task creation.

A MongoDB wire server (nx-27017) is filled with 10,000 tasks (their last result set, as the
agents leave it) and 100,000 runs spread over the last 10 days (about 10,000 in the last 24 h).
The site runs in waitress (as ``cloudtask web`` serves it) on loopback, and a logged-in client
fetches each page ``--requests`` times over HTTP, with varied filters and pages:

- tasks list: pages of 50, plus name searches and filters by group, state and last result;
- task detail: random tasks (definition, next fires, last runs);
- runs list: pages of 50, filters by status and by task;
- dashboard.

Then ``api_create_per_s``: tasks created per second through ``POST /api/v1/tasks`` (Bearer
token, one client, sequential requests).

Usage: python bench/web.py [--tasks 10000] [--runs 100000] [--requests 60]
The last line is one JSON object: tasks_list_p95_ms, task_detail_p95_ms, runs_list_p95_ms,
dashboard_p95_ms (its figures read on every request), api_create_per_s (targets: 150 ms each
on a 2-core machine); also dashboard_cached_p95_ms (figures at most 5 s old, as served).
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import logging
import random
import re
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloudtask.clock import to_bson_time
from cloudtask.config import Config  # noqa: E402
from cloudtask.localservers import MongoServer, free_port  # noqa: E402
from cloudtask.runmodel import new_id, new_run_document
from cloudtask.store import Store  # noqa: E402
from cloudtask.task import parse_task  # noqa: E402
from cloudtask.users import Users  # noqa: E402

STATUSES = ["succeeded"] * 17 + ["failed", "timed_out", "skipped"]
GROUPS = ["default", "reports", "sync", "cleanup"]


def fill(store: Store, n_tasks: int, n_runs: int) -> list[str]:
    now = datetime.now(timezone.utc)
    specs = [
        parse_task({"name": "x", "schedule": {"cron": "*/5 * * * *"}, "command": "true"}),
        parse_task({"name": "x", "schedule": {"every": "30s"}, "command": ["echo", "hi"]}),
        parse_task(
            {
                "name": "x",
                "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
                "command": "./nightly.sh",
                "shell": True,
            }
        ),
    ]
    ids, docs = [], []
    for i in range(n_tasks):
        spec = specs[i % len(specs)].to_dict()
        spec.update(name=f"task-{i:05d}", group=GROUPS[i % len(GROUPS)], owner=f"team{i % 7}")
        doc = Store._task_document(parse_task(spec), new_id(), 1, now)
        doc["created_at"] = doc["updated_at"]
        doc["done_at"] = None
        doc["enabled"] = i % 10 != 0
        status = STATUSES[i % len(STATUSES)]
        doc["last_run"] = {
            "id": new_id(),
            "status": status,
            "finished": (now - timedelta(minutes=i % 600)).timestamp(),
            "duration": 1.5,
            "trigger": "schedule",
        }
        ids.append(doc["_id"])
        docs.append(doc)
    for i in range(0, len(docs), 1000):
        store.tasks.insert_many(docs[i : i + 1000], ordered=False)
    span = timedelta(days=10).total_seconds()
    batch = []
    for i in range(n_runs):
        task_index = i % n_tasks
        when = now - timedelta(seconds=span * i / n_runs)
        status = STATUSES[i % len(STATUSES)]
        doc = new_run_document(
            task_id=ids[task_index],
            task_name=f"task-{task_index:05d}",
            group=GROUPS[task_index % len(GROUPS)],
            revision=1,
            scheduled_for=when,
            slot="one",
            attempt=0,
            trigger="schedule",
            agent=f"agent-{i % 10}",
            status=status,
            now=when,
        )
        doc.update(
            started_at=to_bson_time(when),
            finished_at=to_bson_time(when + timedelta(seconds=1.5)),
            duration=1.5,
            exit_code=0 if status == "succeeded" else 1,
            output_tail="line of output\n" * 20,
        )
        batch.append(doc)
        if len(batch) == 2000:
            store.runs.insert_many(batch, ordered=False)
            batch = []
    if batch:
        store.runs.insert_many(batch, ordered=False)
    return ids


class Client:
    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def get(self, path: str) -> tuple[int, str]:
        with self.opener.open(self.base + path, timeout=60) as answer:
            return answer.status, answer.read().decode()

    def login(self, username: str, password: str) -> None:
        _, html = self.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
        body = urllib.parse.urlencode(
            {"username": username, "password": password, "csrf_token": token}
        ).encode()
        with self.opener.open(self.base + "/login", data=body, timeout=60) as answer:
            assert answer.status == 200, answer.status  # followed the redirect to the dashboard


def timed(client: Client, paths: list[str]) -> list[float]:
    out = []
    for path in paths:
        started = time.perf_counter()
        status, _ = client.get(path)
        out.append((time.perf_counter() - started) * 1000)
        assert status == 200, (path, status)
    return out


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--creates", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import waitress.server

    from web import create_app

    with tempfile.TemporaryDirectory() as tmp:
        mongo = MongoServer(Path(tmp) / "mongo")
        mongo.start()
        try:
            store = Store(mongo.uri, "bench")
            started = time.monotonic()
            ids = fill(store, args.tasks, args.runs)
            print(
                f"stored {args.tasks} tasks and {args.runs} runs in {time.monotonic() - started:.1f} s"
            )
            Users(store).add("bench", "bench passphrase", role="operator")
            token = Users(store).create_token("bench", "bench")
            token = token if isinstance(token, str) else token["token"]
            # the dashboard's figures are cached for a few seconds; measure the page uncached
            # (every request reads MongoDB), then cached, as viewers mostly see it
            app = create_app(Config(), {"STORE": store, "DASHBOARD_CACHE_SECONDS": 0})
            port = free_port()
            server = waitress.server.create_server(app, host="127.0.0.1", port=port, threads=8)
            threading.Thread(target=server.run, daemon=True).start()
            client = Client(f"http://127.0.0.1:{port}")
            client.login("bench", "bench passphrase")
            rnd = random.Random(7)
            n = args.requests
            timed(client, ["/", "/tasks", "/runs"])  # warm up
            lists = [f"/tasks?page={rnd.randint(1, args.tasks // 50)}" for _ in range(n // 2)] + [
                rnd.choice(
                    [
                        f"/tasks?q=task-0{rnd.randint(0, 99):02d}",
                        f"/tasks?group={rnd.choice(GROUPS)}&page={rnd.randint(1, 20)}",
                        "/tasks?state=paused",
                        "/tasks?last=failed",
                        f"/tasks?owner=team{rnd.randint(0, 6)}&last=succeeded",
                    ]
                )
                for _ in range(n - n // 2)
            ]
            figures = {"tasks_list_p95_ms": p95(timed(client, lists))}
            details = [f"/tasks/{rnd.choice(ids)}" for _ in range(n)]
            figures["task_detail_p95_ms"] = p95(timed(client, details))
            since = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
            runs = [f"/runs?page={rnd.randint(1, 200)}" for _ in range(n // 2)] + [
                rnd.choice(
                    [
                        f"/runs?status={rnd.choice(['failed', 'timed_out', 'succeeded'])}",
                        f"/runs?task={rnd.choice(ids)}",
                        f"/runs?agent=agent-{rnd.randint(0, 9)}",
                        f"/runs?since={since}&status=failed",
                    ]
                )
                for _ in range(n - n // 2)
            ]
            figures["runs_list_p95_ms"] = p95(timed(client, runs))
            figures["dashboard_p95_ms"] = p95(timed(client, ["/"] * n))
            app.config["DASHBOARD_CACHE_SECONDS"] = 5
            figures["dashboard_cached_p95_ms"] = p95(timed(client, ["/"] * n))
            # API creation rate
            started = time.perf_counter()
            for i in range(args.creates):
                body = json.dumps(
                    {"name": f"api-{i:05d}", "schedule": {"every": "1h"}, "command": "true"}
                ).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/v1/tasks",
                    data=body,
                    method="POST",
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                    },
                )
                with urllib.request.urlopen(request, timeout=60) as answer:
                    assert answer.status == 201, answer.status
            figures["api_create_per_s"] = round(args.creates / (time.perf_counter() - started), 1)
            server.close()
            store.close()
        finally:
            mongo.stop()
    for key, value in figures.items():
        print(f"{key:24} {value}")
    figures.pop("dashboard_cached_p95_ms")  # the last line has exactly the keys
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""A stored secret followed through a whole cluster: real ZooKeeper, the MongoDB wire server,
a center and an agent as processes, the real aiosmtpd SMTP server, a webhook receiver, and the
web site (Flask test client) on the same store.

An operator stores the secret through the API and creates, through the API, a task whose
environment refers to it and whose command prints it (runs alternate: fail with exit 3, then
succeed), so the leader mails the failure and the recovery and posts the events to a webhook.
Then the value is looked for (as it is, in any case, and base64 or hex encoded) in every
answer the site gave, every page an admin reads, every document of every collection (the
sealed secret too), every znode under the test's chroot, every file the agent wrote (its daily
log files, its journal), the processes' own logs, every mail and every webhook: it is in none.
That the run really had the value (the command writes it to a file the test reads) and that
``***`` stands for it in the output tail, the mails and the webhooks is checked too, so the
test cannot pass by having nothing to look at."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import bson
import pytest
from bson import json_util
from helpers import ADMIN, OPERATOR, VIEWER, make_web_app, wait_for, web_login
from kazoo.exceptions import NoNodeError
from test_cluster import Cluster, leader

from cloudtask.config import load_config
from cloudtask.runmodel import RUNNING_STATUSES
from cloudtask.secretbox import make_key_file
from cloudtask.users import Users

VALUE = "s3cr3t-LEAK-probe-7f1c"
SECRET = "leak.probe"
OWNER = "owner@example.com"
OPS = "ops@example.com"
HOOK_SHARED = "hook-shared-signing-key"
BASE_URL = "https://cloudtask.example.com"


def base64_forms(value: bytes) -> set[bytes]:
    """The runs of base64 characters that encode ``value`` wherever it starts in a longer
    text (at each of the three byte offsets), standard and URL-safe alphabets."""
    forms = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + value)
        total = offset + len(value)
        first = -(-8 * offset // 6)  # the first character made of the value's bits only
        last = (8 * total - 6) // 6  # the last one
        core = encoded[first : last + 1]
        forms.add(core)
        forms.add(core.translate(bytes.maketrans(b"+/", b"-_")))
    return forms


RAW = VALUE.encode()
FORMS: tuple[bytes, ...] = (RAW, *sorted(base64_forms(RAW)), RAW.hex().encode())


def leaks(data: bytes | str) -> list[str]:
    """Which forms of the value ``data`` holds: as it is (in any case), base64 or hex."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    found = [f.decode() for f in FORMS if f in raw]
    if RAW.lower() in raw.lower() and RAW.decode() not in found:
        found.append(RAW.decode())
    if RAW.hex().encode() in raw.lower():  # hex in capitals
        found.append("hex")
    return found


def assert_no_leak(where: str, texts: dict[str, bytes | str]) -> None:
    assert texts, f"nothing was collected from {where}"
    found = {name: leaks(text) for name, text in texts.items()}
    found = {name: forms for name, forms in found.items() if forms}
    if found:
        name, forms = next(iter(found.items()))
        text = texts[name]
        raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        at = max(raw.lower().find(RAW.lower()), 0)
        excerpt = raw[max(at - 200, 0) : at + 200]
        raise AssertionError(
            f"the secret's value is in {len(found)} item(s) of {where}, first {name} "
            f"(forms {forms}): ...{excerpt!r}..."
        )


# --- the cluster, the site --------------------------------------------------------------------


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.keys"
    make_key_file(path)
    return path


@pytest.fixture
def cluster(zk_hosts, mongo_server, mongo_db_name, tmp_path, smtp, receiver, ring, request):
    c = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    c.env.update(
        CLOUDTASK_SECRETS_KEYS=f"file:{ring}",
        CLOUDTASK_ALERTS_SMTP_HOST="127.0.0.1",
        CLOUDTASK_ALERTS_SMTP_PORT=str(smtp.port),
        CLOUDTASK_ALERTS_SMTP_SECURITY="none",
        CLOUDTASK_ALERTS_MAIL_FROM="cloudtask@example.com",
        CLOUDTASK_ALERTS_OPERATORS=OPS,
        CLOUDTASK_ALERTS_ALERT_INTERVAL="1h",
        CLOUDTASK_ALERTS_WEBHOOKS=json.dumps([{"url": receiver.url, "secret": HOOK_SHARED}]),
        CLOUDTASK_WEB_BASE_URL=BASE_URL,
    )
    yield c
    c.stop_all()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for log in tmp_path.glob("*.log"):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture
def app(store, zk, ring):
    cfg = load_config(None, environ={}).with_section("secrets", keys=f"file:{ring}")
    cfg = cfg.with_section("web", base_url=BASE_URL)
    app = make_web_app(store, zk, cfg, users=[ADMIN, OPERATOR, VIEWER])
    app.answers = []  # type: ignore[attr-defined]

    @app.after_request
    def record(answer):  # every answer the site gives, whatever the route
        body = b"" if answer.direct_passthrough else answer.get_data()
        app.answers.append(  # type: ignore[attr-defined]
            (answer.status_code, body + json.dumps(dict(answer.headers)).encode())
        )
        return answer

    return app


def znodes(zk) -> dict[str, bytes]:
    """Path -> data of every znode under the test's chroot (nodes may vanish meanwhile)."""
    out: dict[str, bytes] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        try:
            data, _ = zk.get(path)
            children = zk.get_children(path)
        except NoNodeError:
            continue
        out[path] = (data or b"") + path.encode()  # a node's name is data too
        todo += [f"{path.rstrip('/')}/{child}" for child in children]
    return out


def files_under(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file()}


def mail_texts(smtp) -> dict[str, bytes | str]:
    """Each mail as sent (raw bytes) and each of its parts decoded (a body sent base64 or
    quoted-printable encoded would hide the value from a look at the raw bytes)."""
    out: dict[str, bytes | str] = {}
    with smtp.inbox.lock:
        envelopes = list(smtp.inbox.envelopes)
    for i, envelope in enumerate(envelopes):
        out[f"mail {i} (raw)"] = envelope.original_content
    for i, (_, message) in enumerate(smtp.inbox.messages()):
        out[f"mail {i} (headers)"] = "\n".join(f"{k}: {v}" for k, v in message.items())
        for n, part in enumerate(message.walk()):
            if not part.is_multipart():
                content = part.get_content()
                out[f"mail {i} part {n}"] = content
    return out


def bodies_of(smtp, recipient: str) -> list[tuple[str, str]]:
    """(subject, plain text body) of each mail to ``recipient``."""
    return [
        (str(m["Subject"]), m.get_body(("plain",)).get_content())
        for m in smtp.inbox.by_recipient().get(recipient, [])
    ]


# --- the test ---------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_secret_a_task_prints_is_in_nothing_the_cluster_keeps_or_sends(
    cluster, app, store, zk, smtp, receiver, tmp_path
):
    token = Users(store).create_token(OPERATOR.name, "leak test")
    api_client = app.test_client()

    def api(method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        return api_client.open("/api/v1" + path, method=method, headers=headers, **kw)

    # the secret, stored by an operator through the API
    answer = api("PUT", f"/secrets/{SECRET}", json={"value": VALUE, "description": "probe"})
    assert answer.status_code == 201, answer.get_json()

    # a task using it, made through the API: it prints the value, then fails every other run
    probe = tmp_path / "probe"  # outside the agent's directory and the processes' logs
    probe.mkdir()
    seen, counter = probe / "seen", probe / "count"
    command = (
        f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n+1)); echo "$n" > "{counter}"; '
        f'printf "%s\\n" "$PROBE" >> "{seen}"; '
        'echo "run $n probe=$PROBE"; echo "again:$PROBE:end"; '
        'if [ $((n % 2)) -eq 1 ]; then echo "failing with $PROBE" >&2; exit 3; fi; '
        'echo "fine with $PROBE"'
    )
    spec = {
        "name": "leak-probe",
        "schedule": {"every": "2s"},
        "command": command,
        "shell": True,
        "concurrency": "allow",  # the manual run is never skipped for a fire
        "env": {"PROBE": {"secret": SECRET}, "PLAIN": "visible"},
        "notify": {"emails": [OWNER]},
    }
    answer = api("POST", "/tasks", json=spec)
    assert answer.status_code == 201, answer.get_json()
    task_id = answer.get_json()["id"]

    cluster.center("c1")
    wait_for(lambda: leader(zk) == "c1", timeout=30, message="c1 leads")
    cluster.agent("a1")
    run_now = api("POST", f"/tasks/{task_id}/run")  # a manual run too, besides the schedule
    assert run_now.status_code == 202, run_now.get_json()

    # the znodes while it runs (assignments, signals, registrations come and go)
    zk_seen: dict[str, bytes] = {}

    def runs(status: str) -> int:
        return store.runs.count_documents({"task_id": task_id, "status": status})

    def enough() -> bool:
        for path, data in znodes(zk).items():  # each version of a node's data once
            zk_seen[f"{path} ({hashlib.sha256(data).hexdigest()[:12]})"] = data
        subjects = [s for s, _ in bodies_of(smtp, OWNER)]
        return (
            runs("failed") >= 2
            and runs("succeeded") >= 1
            and any("FAILED leak-probe" in s for s in subjects)
            and any("RECOVERED leak-probe" in s for s in subjects)
            and any(b"run.failed" in r["body"] for r in receiver.requests)
        )

    wait_for(
        enough,
        timeout=60,
        interval=0.3,
        message="two failed runs, one succeeded, the failure and recovery mailed, a webhook",
    )
    answer = api("POST", f"/tasks/{task_id}/pause")
    assert answer.status_code == 200, answer.get_json()
    wait_for(
        lambda: (
            store.runs.count_documents(
                {"task_id": task_id, "status": {"$in": list(RUNNING_STATUSES)}}
            )
            == 0
        ),
        timeout=30,
        message="the runs still going ended",
    )
    wait_for(
        lambda: store.db["deliveries"].count_documents({"status": "pending"}) == 0,
        timeout=30,
        message="every mail and webhook sent",
    )
    zk_seen.update({f"{p} (at the end)": d for p, d in znodes(zk).items()})

    # --- the run had the value; what is kept of it has *** instead -----------------------------
    done = list(store.runs.find({"task_id": task_id, "status": {"$in": ["failed", "succeeded"]}}))
    assert len(done) >= 3
    values = seen.read_text().splitlines()
    assert len(values) >= len(done) and set(values) == {VALUE}  # each run had it
    for run in done:
        tail = run["output_tail"]
        assert "probe=***" in tail and "again:***:end" in tail, tail
        if run["status"] == "failed":
            assert run["exit_code"] == 3 and "failing with ***" in tail, run
        else:
            assert "fine with ***" in tail, tail
    assert {r["trigger"] for r in done} >= {"manual", "schedule"}
    failure = [b for s, b in bodies_of(smtp, OWNER) if "FAILED leak-probe" in s]
    assert failure and "failing with ***" in failure[0], failure  # the tail went out, redacted
    assert any("failing with ***" in b for s, b in bodies_of(smtp, OPS) if "FAILED" in s)
    failed_hooks = [json.loads(r["body"]) for r in receiver.requests if b"run.failed" in r["body"]]
    assert any(
        "failing with ***" in (h.get("details") or {}).get("output_tail_lines", "")
        for h in failed_hooks
    ), failed_hooks

    # --- every answer of the API, and the pages an admin reads ---------------------------------
    run_ids = [r["_id"] for r in done]
    api_paths = [
        "/tasks",
        f"/tasks/{task_id}",
        f"/runs?task={task_id}",
        "/runs",
        "/events",
        f"/events?task={task_id}",
        "/secrets",
        f"/secrets/{SECRET}",
        "/agents",
        "/cluster",
        "/me",
    ]
    for run_id in run_ids:
        api_paths += [f"/runs/{run_id}", f"/runs/{run_id}/output"]
    for path in api_paths:
        answer = api("GET", path)
        assert answer.status_code == 200, (path, answer.status_code)
    outputs = [api("GET", f"/runs/{run_id}/output").get_json()["output"] for run_id in run_ids]
    assert all("probe=***" in o for o in outputs)  # the API gives the tail, redacted

    admin = app.test_client()
    web_login(admin, ADMIN.name, ADMIN.password)
    pages = [
        "/",
        "/tasks",
        f"/tasks/{task_id}",
        f"/tasks/{task_id}/edit",
        "/runs",
        f"/runs?task={task_id}",
        "/events",
        "/audit",
        "/secrets",
        f"/secrets?name={SECRET}",
        "/settings",
        "/cluster",
        "/users",
    ]
    for run_id in run_ids:
        pages += [f"/runs/{run_id}", f"/runs/{run_id}/live.json"]
    for path in pages:
        answer = admin.get(path)
        assert answer.status_code == 200, (path, answer.status_code)
    run_page = admin.get(f"/runs/{run_ids[0]}").get_data(as_text=True)
    assert "probe=***" in run_page  # the page shows the output, redacted

    cluster.stop_all()  # the agent's files complete, the processes' logs closed

    # --- look for the value everywhere -------------------------------------------------------
    answers = {f"answer {i} ({status})": body for i, (status, body) in enumerate(app.answers)}
    assert len(answers) >= len(api_paths) + len(pages) + 3
    assert_no_leak("the site's answers (API and pages)", answers)

    database: dict[str, bytes | str] = {}
    for name in store.db.list_collection_names():
        for doc in store.db[name].find({}):
            key = f"{name}/{doc.get('_id')}"
            database[key + " (bson)"] = bson.encode(doc)
            database[key + " (json)"] = json_util.dumps(doc)
    collections = {key.split("/")[0] for key in database}
    assert {"secrets", "tasks", "runs", "events", "audit", "deliveries"} <= collections
    (sealed,) = store.db["secrets"].find({"_id": SECRET})
    assert sealed.get("ciphertext") and sealed.get("nonce")  # it is there, sealed
    assert any("***" in str(d.get("output_tail")) for d in store.runs.find({}))
    assert store.audit.count_documents({"target": f"secret:{SECRET}"}) >= 1
    assert store.events.count_documents({"task_id": task_id, "kind": "run.failed"}) >= 1
    assert_no_leak("MongoDB (every document of every collection)", database)

    assert any(b"/assignments/" in p.encode() for p in zk_seen), sorted(zk_seen)[:20]
    assert_no_leak("ZooKeeper (every znode under the chroot)", zk_seen)

    agent_files = files_under(tmp_path / "a1")
    daily = [p for p in agent_files if "/logs/leak-probe/" in p]
    assert daily and any(b"probe=***" in agent_files[p] for p in daily), sorted(agent_files)
    assert_no_leak("the agent's files (daily logs, journal, ...)", agent_files)
    process_logs = {str(p): p.read_bytes() for p in tmp_path.glob("*.log")}
    assert {"a1.log", "c1.log"} <= {Path(p).name for p in process_logs}
    assert_no_leak("the processes' own logs", process_logs)

    mails = mail_texts(smtp)
    assert len(smtp.inbox.envelopes) >= 3  # failure to the owner and ops, a recovery
    assert_no_leak("the mails", mails)

    hooks = {
        f"webhook {i}": r["body"] + json.dumps(r["headers"]).encode()
        for i, r in enumerate(receiver.requests)
    }
    assert_no_leak("the webhooks", hooks)

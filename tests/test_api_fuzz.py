"""schemathesis against the API's own OpenAPI document (/api/v1/openapi.json), in process
(WSGI) on a real store and ZooKeeper, as an operator with a Bearer token: generated inputs,
valid and invalid (wrong types, out-of-range numbers, unicode, NUL bytes, odd bodies), never
get a 500, and every answer is one the document lists, with a body of its schema.

Each operation gets at most ``MAX_EXAMPLES`` generated cases (plus schemathesis' coverage
cases), so the whole file takes a minute or two. The store holds a task named like the
document's example and a running run, so some cases reach real objects.
"""

from __future__ import annotations

import hashlib
import os
import secrets

import pytest
import schemathesis
from helpers import make_web_app, run_document
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from cloudtask.clock import to_bson_time, utcnow
from cloudtask.config import load_config
from cloudtask.operations import Operations
from cloudtask.secretbox import SecretBox, make_key_file, parse_ring
from cloudtask.users import Users, token_hash
from web.api import api
from web.openapi import document

MAX_EXAMPLES = int(os.environ.get("CLOUDTASK_FUZZ_EXAMPLES", "30"))
RUN_TOKEN = "fuzz-run-token"
RUN_ID = "fuzz-run-1"
TASK_NAME = "nightly-cleanup"  # the example of the document's task spec
SECRET_NAME = "fuzz.secret"  # a stored secret, so some cases reach one
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    unsupported_method,
]


@pytest.fixture
def fuzz_app(store, zk, tmp_path):
    make_key_file(tmp_path / "keys")  # a key ring: PUT /secrets/{name} can store values
    cfg = load_config(None, environ={}).with_section("secrets", keys=f"file:{tmp_path / 'keys'}")
    app = make_web_app(store, zk, cfg, users=[("fuzzer", "fuzzer passphrase", "operator")])
    users = Users(store)
    # the token the schema's config sends, stored as Users.create_token stores one
    doc = users.get("fuzzer")
    doc["tokens"] = [
        {"name": "fuzz", "hash": token_hash(OPERATOR_TOKEN), "created_at": to_bson_time(utcnow())}
    ]
    store.users.replace_one({"_id": doc["_id"]}, doc)
    assert users.by_token(OPERATOR_TOKEN)["username"] == "fuzzer"
    task = store.create_task(
        {"name": TASK_NAME, "schedule": {"cron": "0 3 * * *"}, "command": "true"}
    )
    run = run_document(task, utcnow(), token_hash=hashlib.sha256(RUN_TOKEN.encode()).hexdigest())
    run["_id"] = RUN_ID
    store.runs.insert_one(run)
    Operations(store).set_secret(
        "fuzzer",
        SecretBox(tuple(parse_ring((tmp_path / "keys").read_text(), "keys"))),
        SECRET_NAME,
        "fuzz-secret-value",
    )
    app.statuses = []  # type: ignore[attr-defined]
    yield app
    # the credentials worked: some cases of every operation got past the login
    codes = {code for _, code in app.statuses}
    assert codes - {401, 405}, codes


# The document as /api/v1/openapi.json serves it (test_web_api checks the route serves this),
# with the credentials of its two security schemes: the operator's API token (stored by the
# fixture) and the seeded run's token. Not schemathesis.pytest.from_fixture: its lazy loader
# breaks on pytest 9 (Node._nodeid).
OPERATOR_TOKEN = "ct_" + secrets.token_urlsafe(32)
CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {
            "openapi": {"bearer": {"bearer": OPERATOR_TOKEN}, "runToken": {"api_key": RUN_TOKEN}}
        },
        # half the cases name the seeded task and run, so they get past the 404s and 401s
        "dictionaries": {
            "tasks": {"values": [TASK_NAME]},
            "runs": {"values": [RUN_ID]},
            "secrets": {"values": [SECRET_NAME]},
        },
        "parameters": {
            "path.task": {"dictionary": "tasks", "probability": 0.5},
            "path.run_id": {"dictionary": "runs", "probability": 0.5},
            "path.name": {"dictionary": "secrets", "probability": 0.5},
        },
    }
)
schema = schemathesis.openapi.from_dict(document(api), config=CONFIG)


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs every run: CI fails on a change, not on luck
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_input_makes_a_500_or_an_undocumented_answer(case, fuzz_app):
    checks = CHECKS
    if case.path == "/api/v1/files" and case.method == "POST":
        # a multipart form field is text: the "number" schemathesis puts in `name` to make an
        # invalid upload arrives as a valid name, so that check cannot apply here
        checks = [c for c in CHECKS if c is not negative_data_rejection]
    # every request goes to this test's app in process, the checks' own probes too
    case.operation.schema.app = fuzz_app
    response = case.call_and_validate(base_url="http://localhost", app=fuzz_app, checks=checks)
    fuzz_app.statuses.append((case.path, response.status_code))

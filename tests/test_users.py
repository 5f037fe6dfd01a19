"""Users, roles, password hashing and API tokens on a real store; the CLI that manages them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cloudtask.cli import cli
from cloudtask.exceptions import Conflict, ValidationError
from cloudtask.users import Users, has_role


def test_add_and_authenticate(store):
    users = Users(store)
    doc = users.add("alice", "correct horse battery", role="admin")
    assert doc["password_hash"] != "correct horse battery"
    assert doc["password_hash"].startswith(("scrypt:", "pbkdf2:"))
    assert users.authenticate("alice", "correct horse battery")["role"] == "admin"
    assert users.authenticate("alice", "wrong password!!") is None
    assert users.authenticate("nobody", "correct horse battery") is None
    with pytest.raises(Conflict):
        users.add("alice", "another long one", role="viewer")


@pytest.mark.parametrize(
    "username, password, role, path",
    [
        ("bad name", "long enough pw", "viewer", "username"),
        ("bob", "short", "viewer", "password"),
        ("bob", "long enough pw", "root", "role"),
    ],
)
def test_bad_users_are_refused(store, username, password, role, path):
    with pytest.raises(ValidationError) as err:
        Users(store).add(username, password, role)
    assert [p.path for p in err.value.problems] == [path]


def test_disabled_user_cannot_log_in_and_roles_rank(store):
    users = Users(store)
    users.add("carol", "a long passphrase", role="operator")
    users.set_enabled("carol", False)
    assert users.authenticate("carol", "a long passphrase") is None
    assert has_role("admin", "operator") and has_role("operator", "viewer")
    assert not has_role("viewer", "operator") and not has_role("operator", "admin")


def test_tokens_are_shown_once_and_stored_hashed(store):
    users = Users(store)
    users.add("dave", "a long passphrase", role="operator")
    token = users.create_token("dave", "ci")
    stored = users.get("dave")["tokens"][0]
    assert stored["name"] == "ci" and token not in str(stored)
    assert users.by_token(token)["username"] == "dave"
    assert users.by_token(token + "x") is None
    users.set_enabled("dave", False)
    assert users.by_token(token) is None


def test_cli_user_add_reads_password_from_stdin(mongo_server, mongo_db_name, store):
    env = {
        "CLOUDTASK_MONGO_URI": mongo_server.uri,
        "CLOUDTASK_MONGO_DATABASE": mongo_db_name,
        "CLOUDTASK_CONFIG": "",
    }
    result = CliRunner().invoke(
        cli, ["user", "add", "erin", "--role", "admin"], input="a long passphrase\n", env=env
    )
    assert result.exit_code == 0, result.output
    assert Users(store).authenticate("erin", "a long passphrase")["role"] == "admin"
    short = CliRunner().invoke(cli, ["user", "add", "frank"], input="short\n", env=env)
    assert short.exit_code == 2 and "at least 10 characters" in short.output
    token = CliRunner().invoke(cli, ["token", "create", "erin"], env=env).output.strip()
    assert Users(store).by_token(token)["username"] == "erin"
    listed = CliRunner().invoke(cli, ["user", "list"], env=env).output
    assert listed.startswith("erin\tadmin\tenabled")

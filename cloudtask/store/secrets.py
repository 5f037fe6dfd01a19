"""Named secrets, encrypted at rest (``secrets`` collection; see :mod:`cloudtask.secretbox`).

A document is ``{_id: name, key_id, nonce, ciphertext, revision, description, created_at,
created_by, updated_at, updated_by}`` (``revision`` counts the writes of its value). Nobody reads a value back through the site or the API: the
listing leaves the sealed fields out, and only the processes that use a value (an agent
just before a run, the leader for the SMTP password and webhook secrets) open it, with the
key ring of their own configuration. Tasks refer to a secret by name (``{"secret": NAME}``);
which tasks use which secret is read from the tasks' ``secrets_used`` field.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pymongo import ASCENDING

from ..clock import stored_time, to_bson_time, utcnow
from ..exceptions import Conflict, NotFound, Problem, ValidationError
from ..secretbox import SecretBox, SecretError
from ..task import SECRET_NAME_PATTERN, SECRET_NAME_RULE, text_problem
from .base import StoreBase, guard, read_all

MAX_SECRET_BYTES = 64 * 1024
MAX_DESCRIPTION = 500


def secret_name_problem(name: Any) -> str | None:
    """Why ``name`` is not a secret's name, or None."""
    if not isinstance(name, str) or not SECRET_NAME_PATTERN.fullmatch(name):
        return SECRET_NAME_RULE
    return None


def secret_value_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return "expected the secret's value: a non-empty string"
    if "\0" in value:
        return "a secret's value may not contain NUL bytes"
    if text_problem(value):  # a lone surrogate: it cannot be stored
        return "a secret's value must be text (no lone surrogates)"
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SECRET_BYTES:
        return f"a secret's value is at most {MAX_SECRET_BYTES // 1024} KiB"
    return None


def secret_problems(name: Any, value: Any, description: Any = None) -> list[Problem]:
    """What is wrong with a secret to store (each at its path: name, value, description)."""
    problems = [
        Problem(path, why)
        for path, why in (
            ("name", secret_name_problem(name)),
            ("value", secret_value_problem(value)),
        )
        if why
    ]
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION
    ):
        problems.append(
            Problem("description", f"expected text of at most {MAX_DESCRIPTION} characters")
        )
    elif isinstance(description, str) and (problem := text_problem(description)):
        problems.append(Problem("description", problem))
    return problems


class SecretRecords(StoreBase):
    """Secrets: set or replaced by people, read back only by the processes that use them."""

    @property
    def secrets(self) -> Any:
        return self.db["secrets"]

    def put_secret(
        self,
        box: SecretBox,
        name: str,
        value: str,
        *,
        by: str,
        description: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Set or replace ``name``'s value (sealed under the ring's primary key). Returns
        what the listing shows of it."""
        problems = secret_problems(name, value, description)
        if problems:
            raise ValidationError(problems)
        when = to_bson_time(now or utcnow())
        changes: dict[str, Any] = {**box.seal(name, value), "updated_at": when, "updated_by": by}
        if description is not None:
            changes["description"] = description
        guard(  # $set, not a whole replace: the embedded wire server cannot replace bytes
            self.secrets.update_one,
            "store the secret",
            {"_id": name},
            {
                "$set": changes,
                "$inc": {"revision": 1},
                "$setOnInsert": {"created_at": when, "created_by": by}
                | ({} if description is not None else {"description": ""}),
            },
            upsert=True,
        )
        return self.get_secret_info(name)

    def get_secret_info(self, name: str) -> dict[str, Any]:
        """Name, description, who changed it and when, the tasks using it: never the value."""
        doc = guard(self.secrets.find_one, "read the secret", {"_id": name}, _no_values())
        if doc is None:
            raise NotFound(f"no secret named {name!r}")
        return self._with_users(doc)

    def stored_secret_names(self, names: Iterable[str]) -> set[str]:
        """Which of ``names`` are stored secrets."""
        names = sorted(set(names))
        if not names:
            return set()
        docs = read_all(self.secrets.find({"_id": {"$in": names}}, {"_id": 1}), "read secrets")
        return {d["_id"] for d in docs}

    def list_secrets(self) -> list[dict[str, Any]]:
        docs = read_all(self.secrets.find({}, _no_values()).sort("_id", ASCENDING), "list secrets")
        users = self.tasks_using_secrets([d["_id"] for d in docs])
        return [{**_times(d), "name": d["_id"], "used_by": users.get(d["_id"], [])} for d in docs]

    def _with_users(self, doc: dict[str, Any]) -> dict[str, Any]:
        users = self.tasks_using_secrets([doc["_id"]])
        return {**_times(doc), "name": doc["_id"], "used_by": users.get(doc["_id"], [])}

    def tasks_using_secrets(self, names: Iterable[str]) -> dict[str, list[dict[str, str]]]:
        """secret name -> the tasks whose spec refers to it (id and name)."""
        names = list(names)
        out: dict[str, list[dict[str, str]]] = {n: [] for n in names}
        if not names:
            return out
        docs = read_all(
            self.tasks.find({"secrets_used": {"$in": names}}, {"name": 1, "secrets_used": 1}).sort(
                "name", ASCENDING
            ),
            "find the tasks using secrets",
        )
        for doc in docs:
            for n in doc.get("secrets_used") or ():
                if n in out:
                    out[n].append({"id": doc["_id"], "name": doc.get("name", "")})
        return out

    def delete_secret(self, name: str) -> None:
        """Delete ``name``; refused (Conflict) while a task refers to it."""
        users = self.tasks_using_secrets([name])[name]
        if users:
            shown = ", ".join(u["name"] for u in users[:5]) + (" ..." if len(users) > 5 else "")
            raise Conflict(f"secret {name!r} is used by {len(users)} task(s): {shown}")
        result = guard(self.secrets.delete_one, "delete the secret", {"_id": name})
        if result.deleted_count == 0:
            raise NotFound(f"no secret named {name!r}")

    def secret_values(self, box: SecretBox | None, names: Iterable[str]) -> dict[str, str]:
        """The values of ``names`` (for a process that uses them, never for people).
        SecretError naming what is missing or cannot be opened."""
        names = sorted(set(names))
        if not names:
            return {}
        if box is None:
            raise SecretError(
                "this process has no key ring (secrets.keys), so it cannot open the secrets "
                + ", ".join(names)
            )
        docs = read_all(self.secrets.find({"_id": {"$in": names}}), "read secrets")
        found = {d["_id"]: d for d in docs}
        missing = [n for n in names if n not in found]
        if missing:
            raise SecretError("no secret named " + ", ".join(repr(n) for n in missing))
        return {n: box.open(n, found[n]) for n in names}

    def rotate_secrets(self, box: SecretBox) -> int:
        """Seal every value again under the ring's primary key; how many were rewritten.
        A value that none of the ring's keys opens is left as it is (SecretError names it)."""
        rewritten = 0
        docs = read_all(
            self.secrets.find({"key_id": {"$ne": box.primary}}), "read secrets to rotate"
        )
        for doc in docs:
            value = box.open(doc["_id"], doc)
            sealed = box.seal(doc["_id"], value)
            result = guard(
                self.secrets.update_one,
                "rotate the secret",
                {"_id": doc["_id"], "revision": doc.get("revision")},  # not replaced meanwhile
                {"$set": sealed, "$inc": {"revision": 1}},
            )
            rewritten += result.modified_count
        return rewritten


def _no_values() -> dict[str, int]:
    return {"nonce": 0, "ciphertext": 0}  # the key's id is no secret: rotation shows it


def _times(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its times as datetimes (a time written with $set may read back as text
    from the embedded wire server)."""
    return {**doc, **{k: stored_time(doc[k]) for k in ("created_at", "updated_at") if k in doc}}

"""The store's base: the MongoDB connection, its collections, the one error guard, and the
workarounds the embedded wire server (nx-27017) needs.

Every module of the store is a mixin over :class:`StoreBase`; :class:`cloudtask.store.Store`
puts them together. Nothing outside this package touches a collection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timezone
from typing import Any, TypeVar

import gridfs
from pymongo import MongoClient, ReadPreference, WriteConcern
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError
from pymongo.read_concern import ReadConcern

from ..exceptions import StoreError
from ..runmodel import SCHEMA_VERSION, new_id

__all__ = [
    "DUPLICATE_KEY",
    "SCHEMA_VERSION",
    "StoreBase",
    "guard",
    "indexed",
    "nest_dotted",
    "new_id",
]

log = logging.getLogger("cloudtask.store")

DUPLICATE_KEY = 11000
T = TypeVar("T")


def guard(fn: Callable[..., T], what: str, *args: Any, **kwargs: Any) -> T:
    """Run a pymongo call, turning connection failures into a StoreError that says what to do.

    A duplicate key is raised as it is (the callers that expect one tell claims or names taken
    by another process from other errors); a bulk write refused for any other reason is a
    StoreError naming the errors."""
    try:
        return fn(*args, **kwargs)
    except DuplicateKeyError:
        raise
    except BulkWriteError as e:
        if all(err.get("code") == DUPLICATE_KEY for err in e.details.get("writeErrors", [])):
            raise
        raise StoreError(f"MongoDB refused to {what}: {e.details.get('writeErrors')}") from e
    except PyMongoError as e:
        raise StoreError(
            f"MongoDB failed to {what} ({type(e).__name__}: {e}); "
            "check that it runs and that mongodb.uri points at it"
        ) from e


def read_all(cursor: Any, what: str) -> list[dict[str, Any]]:
    """Every document of ``cursor``, read under :func:`guard` (a cursor talks to the server
    while it is read, not when it is made)."""
    return guard(lambda: list(cursor), what)


def indexed(query: dict[str, Any]) -> dict[str, Any]:
    """``query`` with each plain equality on a string or number written as ``$eq``.

    MongoDB reads the two alike. The embedded server (nx-27017) lets a plain value match
    inside arrays too, a condition no index serves, so it scans the whole collection: 0.5 s a
    query over 126,000 runs, against 3 ms with ``$eq`` (and a long query holds that
    single-threaded server for everyone). Dates are left alone (nx-27017 compares them by
    its own rules), as are ``None`` and operators.
    """
    return {
        key: {"$eq": value}
        if not key.startswith("$") and key != "_id" and isinstance(value, (str, int, float))
        else value
        for key, value in query.items()
    }


def nest_dotted(doc: dict[str, Any]) -> dict[str, Any]:
    """A document read with a dotted projection (``spec.owner``), nested as MongoDB returns it:
    nx-27017 answers such a projection with flat dotted keys instead. Changes ``doc``."""
    for key in [k for k in doc if "." in k]:
        value = doc.pop(key)
        parts = key.split(".")
        target = doc
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return doc


class StoreBase:
    """The connection and the collections every part of the store works on."""

    def __init__(
        self,
        mongo: str | MongoClient,
        database: str = "cloudtask",
        *,
        run_retention_days: int = 90,
        server_selection_timeout_ms: int = 10000,
        claim_write_concern: str = "auto",
    ) -> None:
        if isinstance(mongo, MongoClient):
            self.client: MongoClient = mongo
            self._owns_client = False
        else:
            if not mongo:
                raise StoreError(
                    "no MongoDB URI configured: set mongodb.uri or CLOUDTASK_MONGO_URI"
                )
            self.client = MongoClient(
                mongo,
                tz_aware=True,
                tzinfo=timezone.utc,
                serverSelectionTimeoutMS=server_selection_timeout_ms,
                connect=False,
            )
            self._owns_client = True
        self.db = self.client[database]
        self.tasks = self.db["tasks"]
        self.runs = self.db["runs"]
        self.events = self.db["events"]
        self.users = self.db["users"]
        self.audit = self.db["audit"]
        self.leases = self.db["leases"]
        self.agents = self.db["agents"]
        self.reports = self.db["run_reports"]  # what http-task services report (callbacks)
        self.fs = gridfs.GridFS(self.db, collection="files")
        self.run_retention_days = run_retention_days
        self.claim_write_concern = claim_write_concern
        # runs as claims are written and read: see _use_claim_concern (set with the indexes)
        self.claims = self.runs
        self._opened()

    def _opened(self) -> None:
        """Called once the connection and collections are set (the store makes its indexes)."""

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def ping(self) -> None:
        guard(self.client.admin.command, "answer a ping", "ping")

    def _use_claim_concern(self) -> None:
        """Claims and every change of a run's owner or state that once-only rests on (start,
        release, lost) are written with ``claim_write_concern``: on a replica set "auto" means
        ``majority``, so an election cannot roll a claim back and let a fire be claimed again;
        the reads that decide a claim (is this duplicate ours? what ran last?) read from the
        primary at ``majority``, so they see such writes. A single server (and the wire server
        used on one machine) has nothing to roll back: the server's default is kept."""
        wanted = self.claim_write_concern
        if wanted == "auto":
            hello = self.client.admin.command("hello")
            wanted = "majority" if hello.get("setName") else ""
        if not wanted:
            self.claims = self.runs
            return
        w: int | str = int(wanted) if wanted.isdigit() else wanted
        self.claims = self.runs.with_options(
            write_concern=WriteConcern(w=w, wtimeout=10000),
            read_concern=ReadConcern("majority"),
            read_preference=ReadPreference.PRIMARY,
        )

"""Task files in GridFS (``files`` bucket, ``file_heads`` summaries).

Every upload of a name is a version: a GridFS file whose ``filename`` is the name, with
metadata {version (schema), sha256, size, uploaded_by, rolled_back_from}. The newest upload is
the latest version (``uploadDate``, then ``_id`` for uploads in the same millisecond). A task
follows the latest version of its ``spec.file`` or pins one by sha256 (``spec.file_version``).
Each upload prunes the name down to the newest ``keep`` versions, keeping the bytes of every
version a task pins. An archive is checked by :mod:`cloudtask.archives` before it is stored.

The list of files reads one summary document per name (collection ``file_heads``: the latest
version's metadata and how many versions are kept), written whole after every change made
through the store: nx-27017 keeps GridFS files in a table of its own that aggregations cannot
group, and reading every version of every file is too slow.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING

from ..archives import TaskFileError, check_archive
from ..clock import stored_time
from ..exceptions import Conflict, NotFound, Problem, StoreError, ValidationError
from ..runmodel import (
    SCHEMA_VERSION,
)
from ..task import file_name_problem
from .base import StoreBase, guard, nest_dotted, read_all

log = logging.getLogger("cloudtask.store")


class FileRecords(StoreBase):
    """Task files and their versions."""

    _FILE_HEADS_BUILT = "\x00built"  # no file name has a control character

    def ensure_file_indexes(self) -> None:
        """The indexes of the file queries (GridFS creates the first one on its first write
        only; a web process that only reads needs it too). nx-27017 keeps GridFS files in a
        table of its own, indexed by name; the sha256 index is for MongoDB."""
        files = self.db["files.files"]
        files.create_index([("filename", ASCENDING), ("uploadDate", ASCENDING)])
        files.create_index([("metadata.sha256", ASCENDING)], name="sha256")
        self.tasks.create_index([("spec.file", ASCENDING)], name="file")

    def _file_docs(self) -> Any:
        """The GridFS files collection, with its indexes made once per store."""
        if not getattr(self, "_file_indexes_ready", False):
            guard(self.ensure_file_indexes, "create the file indexes")
            self._file_indexes_ready = True
        return self.db["files.files"]

    @staticmethod
    def _file_meta(doc: dict[str, Any]) -> dict[str, Any]:
        meta = doc.get("metadata") or {}
        return {
            "id": str(doc["_id"]),
            "name": doc["filename"],
            "version": meta.get("version", SCHEMA_VERSION),
            "sha256": meta.get("sha256", ""),
            "size": meta.get("size", doc.get("length", 0)),
            "uploaded_by": meta.get("uploaded_by", ""),
            "uploaded_at": doc.get("uploadDate"),
            "rolled_back_from": meta.get("rolled_back_from"),
        }

    def _versions_of(self, name: str) -> list[dict[str, Any]]:
        """The stored versions (GridFS file documents) of ``name``, newest first."""
        files = self._file_docs()
        return guard(
            lambda: list(
                files.find({"filename": name}).sort(
                    [("uploadDate", DESCENDING), ("_id", DESCENDING)]
                )
            ),
            "read the file's versions",
        )

    def file_pins(self, name: str) -> dict[str, list[str]]:
        """The versions of ``name`` tasks pin: sha256 -> the names of the tasks pinning it."""
        cursor = self.tasks.find(
            {"spec.file": name, "spec.file_version": {"$nin": [None]}},
            {"name": 1, "spec.file_version": 1},
        )
        pins: dict[str, list[str]] = {}
        for doc in read_all(cursor, "read the tasks pinning the file"):
            sha256 = (nest_dotted(doc).get("spec") or {}).get("file_version")
            if sha256:
                pins.setdefault(sha256, []).append(doc["name"])
        for names in pins.values():
            names.sort()
        return pins

    def file_tasks(self, name: str | None, limit: int = 1000) -> list[dict[str, Any]]:
        """The tasks that use the file ``name`` (None: any file), by task name, at most
        ``limit``: ``{"id", "name", "file", "file_version"}`` (``file_version`` None: the
        task follows the latest version)."""
        # every task naming a file is an index range; nx-27017 answers $in with a full scan
        query = {"spec.file": name if name is not None else {"$gt": ""}}
        cursor = (
            self.tasks.find(query, {"name": 1, "spec.file": 1, "spec.file_version": 1})
            .sort("name", ASCENDING)
            .limit(limit)
        )
        out = []
        for doc in read_all(cursor, "read the tasks using files"):
            spec = nest_dotted(doc).get("spec") or {}
            out.append(
                {
                    "id": doc["_id"],
                    "name": doc["name"],
                    "file": spec.get("file"),
                    "file_version": spec.get("file_version"),
                }
            )
        return out

    def file_task_counts(self, name: str | None = None) -> dict[str, int]:
        """How many tasks use each file (only ``name``, if given): file name -> count, in one
        aggregation over the ``spec.file`` index."""
        match = {"spec.file": name if name is not None else {"$gt": ""}}
        pipeline = [{"$match": match}, {"$group": {"_id": "$spec.file", "n": {"$sum": 1}}}]
        rows = guard(  # aggregate talks to the server when called
            lambda: list(self.tasks.aggregate(pipeline)), "count the files' tasks"
        )
        return {row["_id"]: int(row["n"]) for row in rows if isinstance(row.get("_id"), str)}

    def _upload_problems(self, name: str, data: bytes, max_bytes: int | None) -> list[Problem]:
        if problem := file_name_problem(name):
            return [Problem("name", problem)]
        if max_bytes is not None and len(data) > max_bytes:
            return [
                Problem(
                    "file",
                    f"{len(data)} bytes is more than the upload limit of {max_bytes} bytes "
                    "(web.max_upload_bytes)",
                )
            ]
        try:
            check_archive(name, data)
        except TaskFileError as e:
            return [Problem("file", str(e))]
        return []

    def put_file(
        self,
        name: str,
        data: bytes,
        uploaded_by: str = "",
        *,
        keep: int = 20,
        max_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Store ``data`` as the new latest version of the file ``name``; returns its metadata
        (id, name, version, sha256, size, uploaded_by, uploaded_at, rolled_back_from, and
        ``created``: False when the bytes equal the latest version's, which is then returned
        and no version is added).

        Refused with a ValidationError: a bad name (``name``), more than ``max_bytes``
        (``file``), an archive (.zip, .tar.gz, .tgz, .tar) that does not open or holds an
        unsafe member (``file``, naming the member). Versions beyond the newest ``keep`` are
        deleted, except those a task pins.
        """
        if problems := self._upload_problems(name, data, max_bytes):
            raise ValidationError(problems, source=f"the file {name!r}")
        return self._add_file_version(name, data, uploaded_by, keep)

    def _add_file_version(
        self,
        name: str,
        data: bytes,
        uploaded_by: str,
        keep: int,
        rolled_back_from: str | None = None,
    ) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        versions = self._versions_of(name)
        if versions and (versions[0].get("metadata") or {}).get("sha256") == sha256:
            return {**self._file_meta(versions[0]), "created": False}
        meta: dict[str, Any] = {
            "version": SCHEMA_VERSION,
            "sha256": sha256,
            "size": len(data),
            "uploaded_by": uploaded_by,
        }
        if rolled_back_from:
            meta["rolled_back_from"] = rolled_back_from
        file_id = guard(self.fs.put, "store the file", data, filename=name, metadata=meta)
        versions = self._prune_file_versions(name, keep)
        self._write_file_head(name, versions)
        doc = next((d for d in versions if d["_id"] == file_id), None) or guard(
            self._file_docs().find_one, "read the stored file", {"_id": file_id}
        )
        return {**self._file_meta(doc), "created": True}

    def _prune_file_versions(self, name: str, keep: int) -> list[dict[str, Any]]:
        """Delete the versions of ``name`` beyond the newest ``keep``, except one copy of each
        version a task pins (a pinned sha256 also among the newest needs no older copy).
        Returns the versions left, newest first."""
        versions = self._versions_of(name)
        if len(versions) <= keep:
            return versions
        pinned = self.file_pins(name)
        kept = {(d.get("metadata") or {}).get("sha256") for d in versions[:keep]}
        left = versions[:keep]
        for doc in versions[keep:]:
            sha256 = (doc.get("metadata") or {}).get("sha256")
            if sha256 in pinned and sha256 not in kept:
                kept.add(sha256)
                left.append(doc)
                continue
            guard(self.fs.delete, "delete an old file version", doc["_id"])
        if len(left) < len(versions):
            log.info("pruned %d old version(s) of file %s", len(versions) - len(left), name)
        return left

    def _write_file_head(self, name: str, versions: list[dict[str, Any]]) -> None:
        heads = self.db["file_heads"]
        if not versions:
            guard(heads.delete_one, "forget the file", {"_id": name})
            return
        doc = {
            "_id": name,
            "version": SCHEMA_VERSION,
            "latest": self._file_meta(versions[0]),
            "versions": len(versions),
        }
        guard(
            heads.replace_one, "record the file's latest version", {"_id": name}, doc, upsert=True
        )

    def rebuild_file_heads(self) -> int:
        """Write the summary of every stored file again from GridFS (done by itself when the
        summaries are missing: files stored by an older version). Returns how many files."""
        cursor = (
            self._file_docs()
            .find({})
            .sort([("filename", ASCENDING), ("uploadDate", DESCENDING), ("_id", DESCENDING)])
        )
        by_name: dict[str, list[dict[str, Any]]] = {}
        for doc in read_all(cursor, "list files"):
            by_name.setdefault(doc["filename"], []).append(doc)
        for name, versions in by_name.items():
            self._write_file_head(name, versions)
        for head in read_all(self.db["file_heads"].find({}, {"_id": 1}), "list"):
            if head["_id"] not in by_name and head["_id"] != self._FILE_HEADS_BUILT:
                self._write_file_head(head["_id"], [])  # its versions were deleted
        marker = {"_id": self._FILE_HEADS_BUILT, "version": SCHEMA_VERSION}
        guard(
            self.db["file_heads"].replace_one,
            "mark the file summaries built",
            {"_id": self._FILE_HEADS_BUILT},
            marker,
            upsert=True,
        )
        return len(by_name)

    def get_file_by_hash(self, sha256: str) -> bytes:
        doc = guard(self._file_docs().find_one, "find the file", {"metadata.sha256": sha256})
        if doc is None:
            raise NotFound(f"no stored file with sha256 {sha256}")
        return guard(lambda: self.fs.get(doc["_id"]).read(), "read the file")

    def file_version(self, name: str, sha256: str) -> dict[str, Any]:
        """The metadata of the version ``sha256`` of the file ``name`` (its newest upload)."""
        doc = guard(
            lambda: self._file_docs().find_one(
                {"filename": name, "metadata.sha256": sha256},
                sort=[("uploadDate", DESCENDING), ("_id", DESCENDING)],
            ),
            "find the file version",
        )
        if doc is None:
            raise NotFound(f"file {name!r} has no stored version {sha256}")
        return self._file_meta(doc)

    def read_file_version(self, name: str, sha256: str) -> tuple[dict[str, Any], bytes]:
        """The metadata and the bytes of the version ``sha256`` of the file ``name``."""
        meta = self.file_version(name, sha256)
        data = guard(lambda: self.fs.get(ObjectId(meta["id"])).read(), "read the file")
        return meta, data

    def list_files(self) -> list[dict[str, Any]]:
        """The latest version of every stored file, by name, with ``versions`` (how many
        versions of it are stored)."""
        heads = self.db["file_heads"]
        docs = read_all(heads.find({}).sort("_id", ASCENDING), "list files")
        if not any(d["_id"] == self._FILE_HEADS_BUILT for d in docs):
            self.rebuild_file_heads()
            docs = read_all(heads.find({}).sort("_id", ASCENDING), "list files")
        out = []
        for doc in docs:
            if doc["_id"] == self._FILE_HEADS_BUILT:
                continue
            head = {**doc["latest"], "versions": doc["versions"]}
            if isinstance(head.get("uploaded_at"), str):  # nx-27017: a nested date as text
                head["uploaded_at"] = stored_time(head["uploaded_at"])
            out.append(head)
        return out

    def latest_file(self, name: str) -> dict[str, Any]:
        doc = guard(
            lambda: self._file_docs().find_one(
                {"filename": name}, sort=[("uploadDate", DESCENDING), ("_id", DESCENDING)]
            ),
            "find the file",
        )
        if doc is None:
            raise NotFound(f"no stored file named {name!r}; upload it first")
        return self._file_meta(doc)

    def file_reference_problems(self, name: str | None, sha256: str | None) -> list[Problem]:
        """What is wrong with a task naming the file ``name`` (pinned to ``sha256``, if given):
        no such file is stored, or not that version. [] when it can run."""
        if not name:
            return []
        versions = self._versions_of(name)
        if not versions:
            return [
                Problem(
                    "file",
                    f"no file named {name!r} is stored; upload it first (the Files page, "
                    f"POST /api/v1/files or `cloudtask file put`)",
                )
            ]
        hashes = [(d.get("metadata") or {}).get("sha256") for d in versions]
        if sha256 and sha256 not in hashes:
            shown = ", ".join(h[:12] for h in dict.fromkeys(hashes) if h)
            return [
                Problem(
                    "file_version",
                    f"file {name!r} has no version {sha256[:12]}…; its stored versions, newest "
                    f"first: {shown}",
                )
            ]
        return []

    def list_file_versions(self, name: str) -> list[dict[str, Any]]:
        """The stored versions of the file ``name``, newest first: the metadata of each, plus
        ``latest`` (the first) and ``pinned_by`` (the names of the tasks pinning its sha256).
        The same bytes appear twice after a rollback. NotFound when none is stored."""
        versions = self._versions_of(name)
        if not versions:
            raise NotFound(f"no stored file named {name!r}; upload it first")
        pins = self.file_pins(name)
        out = []
        for i, doc in enumerate(versions):
            meta = self._file_meta(doc)
            meta.update(latest=i == 0, pinned_by=pins.get(meta["sha256"], []))
            out.append(meta)
        return out

    def rollback_file(self, name: str, sha256: str, by: str, *, keep: int = 20) -> dict[str, Any]:
        """Make the stored version ``sha256`` of ``name`` the latest again: its bytes are stored
        as a new upload by ``by`` (marked ``rolled_back_from`` the version that was latest),
        so the latest stays the newest upload and the history shows the rollback. Returns the
        new version's metadata. NotFound: no such version; Conflict: it is the latest already."""
        versions = self._versions_of(name)
        if not versions:
            raise NotFound(f"no stored file named {name!r}; upload it first")
        current = (versions[0].get("metadata") or {}).get("sha256")
        if current == sha256:
            raise Conflict(f"version {sha256[:12]} is already the latest version of {name!r}")
        target = next(
            (d for d in versions if (d.get("metadata") or {}).get("sha256") == sha256), None
        )
        if target is None:
            raise NotFound(
                f"file {name!r} has no stored version {sha256}; "
                "list them with `cloudtask file versions NAME`"
            )
        data = guard(lambda: self.fs.get(target["_id"]).read(), "read the file")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StoreError(f"the stored bytes of {name!r} {sha256[:12]} do not match its sha256")
        return self._add_file_version(name, data, by, keep, rolled_back_from=current)

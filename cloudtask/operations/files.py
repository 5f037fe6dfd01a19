"""Task files: upload a new version, roll back to an older one. Every upload is audited:
``file.upload`` when it stored a version, ``file.upload.unchanged`` when its bytes were the
latest version already, ``file.upload.refused`` when it was refused (and why)."""

from __future__ import annotations

from typing import Any

from ..exceptions import NotFound, ValidationError
from .base import OperationsBase

MAX_NAME_IN_TARGET = 200


def _target(name: Any) -> str:
    text = name if isinstance(name, str) else repr(name)
    return f"file:{text[:MAX_NAME_IN_TARGET]}"


class FileOperations(OperationsBase):
    def put_file(
        self, actor: str, name: str, data: bytes, *, keep: int, max_bytes: int | None = None
    ) -> dict[str, Any]:
        """Store ``data`` as the new latest version of ``name`` (see :meth:`Store.put_file`:
        ValidationError for a bad name, size or archive). ``created`` False: the bytes are
        the latest version already, nothing is stored."""
        try:
            before = self.store.latest_file(name)["sha256"]
        except (NotFound, ValidationError):
            before = None
        try:
            meta = self.store.put_file(
                name, data, uploaded_by=actor, keep=keep, max_bytes=max_bytes
            )
        except ValidationError as e:
            problems = [f"{p.path}: {p.message}" if p.path else p.message for p in e.problems]
            after = {"size": len(data), "problems": problems[:20]}
            self.audit(actor, "file.upload.refused", _target(name), None, after)
            raise
        after = {"sha256": meta["sha256"], "size": meta["size"]}
        if meta["created"]:
            self.audit(
                actor, "file.upload", _target(name), {"sha256": before} if before else None, after
            )
        else:
            self.audit(actor, "file.upload.unchanged", _target(name), None, after)
        return meta

    def rollback_file(self, actor: str, name: str, sha256: str, *, keep: int) -> dict[str, Any]:
        """Make the stored version ``sha256`` of ``name`` the latest again (a new upload of
        its bytes). NotFound: no such version; Conflict: it is the latest already."""
        meta = self.store.rollback_file(name, sha256, actor, keep=keep)
        self.audit(
            actor,
            "file.rollback",
            _target(name),
            {"sha256": meta["rolled_back_from"]},
            {"sha256": meta["sha256"], "size": meta["size"]},
        )
        return meta
